"""The saga's steps at the acquirer (issue 15, docs/acquirer.md): authorize, capture, release
(void or refund) and refund, each idempotent by our reference.

An ambiguous outcome (a timeout, a 5xx, a connection lost after sending) is resolved by asking
the acquirer for the status of our reference, with backoff, until it answers: its record says
what happened; no record means it did not happen, and the SAME instruction under the SAME
reference is sent again (the acquirer deduplicates by it). Never a guess, never a second
authorization. Past `policy.acquirer_resolve_seconds` without an answer the step fails with
`AcquirerOutcomeUnresolved`: the saga then releases whatever the acquirer holds, again by
status, and a release the acquirer cannot answer either leaves the payment
`requires_attention` for an operator (docs/runbook.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    is_cancelled_exception,
)

with workflow.unsafe.imports_passed_through():
    from activities.acquirer import (
        ACQUIRER_OUTCOME_UNKNOWN,
        ACQUIRER_UNAVAILABLE,
        AcquirerActivities,
    )
    from domain import acquirer
    from domain import ledger as entries
    from domain.errors import NON_RETRYABLE
    from domain.events import EventKind
    from domain.payment import (
        CancelSignal,
        PaymentStatus,
    )
    from workflows import search_attributes as sa
    from workflows.local_first import ONE_ATTEMPT, refused, tries_locally_first
    from workflows.steps import PaymentSteps

# New payments with an acquirer authorize and capture there before the ledger posting; payments
# whose history was written before keep the commands they recorded (docs/upgrades.md).
PATCH_ACQUIRER = "acquirer-authorize-capture"
# The AuthorizationExpiresAt search attribute, upserted on entering requires_capture (a command).
PATCH_EXPIRY_SEARCH_ATTRIBUTE = "authorization-expires-at-search-attribute"
RELEASE_AT_ACQUIRER = "release the authorization at the acquirer"
ACQUIRER_OUTCOME_UNRESOLVED = "AcquirerOutcomeUnresolved"
AUTHORIZATION_EXPIRED = "the authorization expired uncaptured"
# The compensation's refund: no client refund id can take it (`~` is outside their charset).
REVERSAL_REFUND_ID = "~reversal"

# The connector's own timeout (settings.acquirer_timeout_seconds) ends a call long before this.
_CALL_TIMEOUT = timedelta(seconds=60)
# "Not reached" (nothing was sent, or 408/429) is retried as is; "unknown" comes back to the
# workflow at once, to be resolved by status, never by blindly sending again.
_INSTRUCTION_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=[*NON_RETRYABLE, ACQUIRER_OUTCOME_UNKNOWN],
)
_STATUS_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
    non_retryable_error_types=list(NON_RETRYABLE),
)

Answer = TypeVar("Answer")
Instruction = TypeVar("Instruction")


class AcquirerOutcomeUnresolved(ApplicationError):
    """The acquirer could not say what happened within the payment's bound."""

    def __init__(self, operation: str, reference: str, why: str) -> None:
        super().__init__(
            f"the acquirer's outcome of {operation} {reference} is still unknown: {why}",
            operation,
            reference,
            type=ACQUIRER_OUTCOME_UNRESOLVED,
            non_retryable=True,
        )


def _failure_type(error: BaseException) -> str | None:
    cause = error.__cause__ if isinstance(error, ActivityError) else error
    return cause.type if isinstance(cause, ApplicationError) else None


class AcquirerSteps(PaymentSteps):
    """Mixed into PaymentWorkflow: the acquirer's part of the saga."""

    # What the acquirer captured in this run, for the ledger posting.
    acquirer_captured: int | None = None

    def through_acquirer(self) -> bool:
        """Asked once, before the payment moves anything (a patch marker is a command). New
        payments decided it at their start (PATCH_DECIDED_AT_START); older ones ask here, where
        they recorded the marker."""
        if self.decided_at_start:
            return self.policy.acquirer
        return self.policy.acquirer and self.patched(PATCH_ACQUIRER)

    @property
    def declined(self) -> bool:
        return self.state.decline_code is not None

    @property
    def manual_capture(self) -> bool:
        return self.state.request.capture_method == "manual"

    async def await_capture(self) -> None:
        """`capture_method: manual`: held until a capture, a void or a cancel, or until the
        authorization expires, which voids it (a durable timer: it fires after any restart)."""
        expires_at = workflow.now() + timedelta(seconds=self.policy.authorization_expiry_seconds)
        self.state.authorization_expires_at = expires_at
        if self.decided_at_start or self.patched(PATCH_EXPIRY_SEARCH_ATTRIBUTE):
            workflow.upsert_search_attributes([sa.AUTHORIZATION_EXPIRES_AT.value_set(expires_at)])
        self.set_status(
            PaymentStatus.REQUIRES_CAPTURE,
            "a capture or a void; the authorization expires (is voided) at "
            f"{expires_at:%Y-%m-%d %H:%M} UTC",
        )
        try:
            await workflow.wait_condition(
                lambda: self.capture_requested is not None or self.cancel_requested is not None,
                timeout=timedelta(seconds=self.policy.authorization_expiry_seconds),
            )
        except TimeoutError:
            self.cancel_requested = CancelSignal(reason=AUTHORIZATION_EXPIRED)
        if self.cancel_requested is None:
            self.set_status(PaymentStatus.PROCESSING, "the acquirer's capture")

    # ── the instructions ─────────────────────────────────────────────────────────────────
    async def authorize_at_acquirer(self) -> None:
        request = self.state.request
        self.describe_waiting(
            f"the acquirer to authorize {request.amount} {request.currency} minor units"
        )
        result = await self.instruct(
            AcquirerActivities.authorize_payment,
            acquirer.AuthorizationRequest(
                reference=self.state.id,
                amount=request.amount,
                currency=request.currency,
                payment_method=request.payment_method,
            ),
            "authorize",
            acquirer.AcquirerAuthorization.authorization_result,
        )
        self.record_authorization(result)

    def record_authorization(self, result: acquirer.AuthorizationResult) -> None:
        self.state.acquirer_reference = result.acquirer_reference
        self.state.authorized_amount = result.authorized_amount
        if not result.approved:
            code = result.decline_code or acquirer.DeclineCode.GENERIC_DECLINE
            self.state.decline_code = code.value
            self.state.acquirer_decline_code = result.acquirer_decline_code

    async def capture_at_acquirer(self, amount: int | None = None) -> acquirer.CaptureResult:
        """Everything authorized (`amount` None), or less: the acquirer releases the rest."""
        self.describe_waiting("the acquirer to capture the authorization")
        return await self.instruct(
            AcquirerActivities.capture_payment,
            acquirer.CaptureRequest(
                reference=self.state.id, amount=amount, currency=self.state.request.currency
            ),
            "capture",
            acquirer.AcquirerAuthorization.capture_result,
            local_first=True,
        )

    async def void_at_acquirer(self) -> acquirer.VoidResult:
        self.describe_waiting("the acquirer to void the authorization")
        return await self.instruct(
            AcquirerActivities.void_authorization,
            acquirer.VoidRequest(reference=self.state.id),
            "void",
            acquirer.AcquirerAuthorization.void_result,
        )

    async def refund_at_acquirer(self, refund_id: str, amount: int) -> acquirer.RefundResult:
        reference = acquirer.acquirer_refund_reference(self.state.id, refund_id)
        self.describe_waiting(f"the acquirer to refund {amount} ({refund_id})")
        return await self.instruct(
            AcquirerActivities.refund_payment,
            acquirer.AcquirerRefundRequest(
                reference=self.state.id,
                refund_reference=reference,
                amount=amount,
                currency=self.state.request.currency,
            ),
            "refund",
            lambda record: record.refund(reference),
        )

    async def release_at_acquirer(self) -> None:
        """The compensation: whatever the acquirer holds for this payment goes back, decided
        by its record of our reference (an authorization whose outcome was never known
        included): held → void; captured → refund what is left; nothing, declined or voided →
        nothing to do."""
        deadline = self.resolve_deadline()
        record = await self.status_until_answered("release", deadline)
        match record.state if record is not None else None:
            case acquirer.AuthorizationState.AUTHORIZED:
                await self.void_at_acquirer()
            case acquirer.AuthorizationState.CAPTURED if record and record.refundable_amount > 0:
                await self.refund_at_acquirer(REVERSAL_REFUND_ID, record.refundable_amount)
        # Whatever the acquirer did, nothing stays held for this payment now. Nothing known
        # held may still be a hold posted in a lost workflow task: the ledger says.
        if self.state.held <= 0 and self.decided_at_start:
            self.state.held = await self.held_in_ledger()
        await self.release_hold(captured=None)

    # ── the hold in the ledger (one balanced posting each, with its event in the outbox) ──
    async def post_hold(self) -> None:
        """Authorized: the ledger holds what the acquirer holds (customer → authorization
        hold), `payments.authorized`."""
        request = self.state.request
        amount = self.state.authorized_amount
        self.describe_waiting("posting the authorization's hold")
        await self.post(
            entries.authorization_hold_transaction(
                self.state.id, request.customer_id, amount, request.currency, self.account_tenant
            ),
            amount,
            EventKind.AUTHORIZED,
            data=self.hold_data(),
            local=True,
        )
        self.state.held = amount
        await self.publish(EventKind.AUTHORIZED, local=True)

    async def release_hold(self, *, captured: int | None) -> None:
        """The whole hold back to the customer, once: at capture (`captured`: the capture
        posting then takes that part; `payments.captured`) or at a void or expiry
        (`payments.voided`)."""
        if self.state.held <= 0:
            return
        request = self.state.request
        kind = EventKind.CAPTURED if captured is not None else EventKind.VOIDED
        data = {**self.hold_data(), "released_amount": self.state.held - (captured or 0)}
        if captured is not None:
            data["captured_amount"] = captured
        self.describe_waiting(f"posting the hold's release ({kind.value})")
        await self.post(
            entries.hold_released_transaction(
                self.state.id,
                request.customer_id,
                self.state.held,
                request.currency,
                self.account_tenant,
                captured=captured is not None,
            ),
            self.state.held,
            kind,
            data=data,
            local=True,
        )
        self.state.held = 0
        await self.publish(kind, local=True)

    def hold_data(self) -> dict[str, Any]:
        return {
            "authorized_amount": self.state.authorized_amount,
            "acquirer_reference": self.state.acquirer_reference,
        }

    async def end_declined(self) -> None:
        """A decline is the payment's outcome: `declined` with its code, payments.declined,
        the CRM told. Nothing was held, so nothing is posted."""
        code = self.state.decline_code
        data = {"decline_code": code, "acquirer_decline_code": self.state.acquirer_decline_code}
        note = f"declined by the issuer: {code}"
        self.set_status(PaymentStatus.DECLINED, "publishing payments.declined", note=note)
        await self.publish(EventKind.DECLINED, data=data)
        self.set_status(PaymentStatus.DECLINED, "", note=note)
        await self.notify_crm(EventKind.DECLINED, details=data)

    # ── resolving an ambiguous outcome ───────────────────────────────────────────────────
    def resolve_deadline(self) -> datetime:
        return workflow.now() + timedelta(seconds=self.policy.acquirer_resolve_seconds)

    async def instruct(
        self,
        step: Callable[[AcquirerActivities, Instruction], Awaitable[Answer]],
        instruction: Instruction,
        operation: str,
        from_record: Callable[[acquirer.AcquirerAuthorization], Answer | None],
        *,
        local_first: bool = False,
    ) -> Answer:
        """The instruction's answer, its outcome read from the acquirer's record when the
        answer was lost, or AcquirerOutcomeUnresolved past the bound. A refusal propagates.

        `local_first` (the forward path's capture, workflows/local_first.py): the first
        attempt is a local activity; what it does not settle is resolved exactly as a regular
        attempt's failure would be."""
        deadline = self.resolve_deadline()
        local = local_first and tries_locally_first(self.policy, self.local_first_decided)
        while True:
            remaining = (deadline - workflow.now()).total_seconds()
            if remaining <= 0:
                raise AcquirerOutcomeUnresolved(operation, self.state.id, "the bound has passed")
            if local:
                local = False
                try:
                    return await workflow.execute_local_activity_method(
                        step,
                        instruction,
                        start_to_close_timeout=_CALL_TIMEOUT,
                        schedule_to_close_timeout=timedelta(seconds=remaining),
                        retry_policy=ONE_ATTEMPT,
                    )
                except FailureError as failure:
                    if is_cancelled_exception(failure) or refused(failure):
                        raise
                    if _failure_type(failure) == ACQUIRER_UNAVAILABLE:
                        continue  # nothing was sent: the regular activity sends it, retrying
                    # Anything else (the answer lost, the attempt timed out) may have reached
                    # the acquirer: only its status can say.
            else:
                try:
                    return await workflow.execute_activity_method(
                        step,
                        instruction,
                        start_to_close_timeout=_CALL_TIMEOUT,
                        schedule_to_close_timeout=timedelta(seconds=remaining),
                        retry_policy=_INSTRUCTION_RETRY,
                    )
                except ActivityError as failure:
                    if is_cancelled_exception(failure):
                        raise
                    if _failure_type(failure) in NON_RETRYABLE:
                        raise  # refused: nothing happened, and asking again will not help
                    if _failure_type(failure) != ACQUIRER_OUTCOME_UNKNOWN:
                        # Not reached for the whole bound: the acquirer may still have acted
                        # on an earlier attempt's late arrival, so only its status can say.
                        raise AcquirerOutcomeUnresolved(
                            operation, self.state.id, "the acquirer was not reachable"
                        ) from failure
            record = await self.status_until_answered(operation, deadline)
            if record is not None:
                answer = from_record(record)
                if answer is not None:
                    return answer
            # Not done as far as the acquirer knows now: the same instruction, same reference.

    async def status_until_answered(
        self, operation: str, deadline: datetime
    ) -> acquirer.AcquirerAuthorization | None:
        remaining = (deadline - workflow.now()).total_seconds()
        if remaining <= 0:
            raise AcquirerOutcomeUnresolved(operation, self.state.id, "the bound has passed")
        self.describe_waiting(
            f"the acquirer's status of {self.state.id}: the outcome of {operation} is unknown"
        )
        try:
            return await workflow.execute_activity_method(
                AcquirerActivities.acquirer_status,
                self.state.id,
                start_to_close_timeout=_CALL_TIMEOUT,
                schedule_to_close_timeout=timedelta(seconds=remaining),
                retry_policy=_STATUS_RETRY,
            )
        except ActivityError as failure:
            if is_cancelled_exception(failure) or _failure_type(failure) in NON_RETRYABLE:
                raise
            raise AcquirerOutcomeUnresolved(
                operation, self.state.id, "the acquirer did not answer the status request"
            ) from failure
