"""What every part of PaymentWorkflow does the same way: run an activity with its bounds, post
to the ledger, publish an event, tell the CRM, show where the payment is.

The saga (workflows/payment.py), its follow-ups (workflows/follow_ups.py), the operator's
attention (workflows/attention.py) and the acquirer's steps (workflows/acquirer_steps.py) build
on these; what they send is built by the domain (domain/messages.py, domain/ledger.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeUpdate
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    is_cancelled_exception,
)

with workflow.unsafe.imports_passed_through():
    from activities.crm import CrmActivities
    from activities.kafka import KafkaActivities
    from domain import ledger as entries
    from domain.acquirer import RefundResult
    from domain.amounts import Movement
    from domain.bounds import clipped_text
    from domain.errors import NON_RETRYABLE
    from domain.events import EventKind, PaymentEvent, event_id
    from domain.follow_ups import ENDED, Refused
    from domain.messages import CrmNotification, CrmTarget, crm_notification, payment_event
    from domain.payment import (
        AttentionResolution,
        CancelSignal,
        CaptureSignal,
        CrmSync,
        PaymentPolicy,
        PaymentState,
        PaymentStatus,
        StatusChange,
    )
    from ledger.activity import LedgerActivities
    from ledger.records import LedgerPosting, PaymentOutcome, PaymentParties
    from workflows import search_attributes as sa
    from workflows.local_first import ONE_ATTEMPT, refused, tries_locally_first

# Retry bounds: infrastructure outages (Kafka, database) are waited out, never given up on;
# business refusals (NON_RETRYABLE types) fail at once.
INFRA_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=list(NON_RETRYABLE),
)


# A step's failure: temporalio wraps a regular activity's in ActivityError but raises a local
# activity's ApplicationError as it is.
STEP_FAILURES = (ActivityError, ApplicationError)
StepInput = TypeVar("StepInput")
StepResult = TypeVar("StepResult")


class StepOptions(TypedDict, total=False):
    start_to_close_timeout: timedelta
    schedule_to_close_timeout: timedelta
    retry_policy: RetryPolicy


# A local activity retries inside its workflow task, and the task holds everything while it
# does: queries are buffered (and refused once the buffer is full), and past the task's 10 s
# timeout the task fails and starts over. So a local step that keeps failing (its database
# down) waits out its next attempts on a durable timer instead: the task completes, the
# payment answers reads, and the backoff survives a worker restart (the faults simulation,
# seed 2: PostgreSQL stopped while payments were being scored).
LOCAL_RETRY_THRESHOLD = timedelta(seconds=1)

FRAUD = StepOptions(start_to_close_timeout=timedelta(seconds=10), retry_policy=INFRA_RETRY)
KAFKA = StepOptions(start_to_close_timeout=timedelta(seconds=60), retry_policy=INFRA_RETRY)
LEDGER = StepOptions(start_to_close_timeout=timedelta(seconds=30), retry_policy=INFRA_RETRY)
# A CRM that stays down for a day leaves the money alone: CrmSync=failed, replay later.
CRM = StepOptions(
    start_to_close_timeout=timedelta(seconds=30),
    schedule_to_close_timeout=timedelta(hours=24),
    retry_policy=INFRA_RETRY,
)


class FollowUpRefused(ApplicationError):
    """An Update's validator refusing a request: `type` is the REST API's error code."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.message, type=refused.code.value, non_retryable=True)


def refuse(refused: Refused | None) -> None:
    """In an Update's validator: refuse before anything enters the history."""
    if refused is not None:
        raise FollowUpRefused(refused)


def failure_message(failure: BaseException) -> str:
    """A step's failure as a payment's record shows it: the business reason, bounded."""
    cause = failure if isinstance(failure, ApplicationError) else failure.__cause__
    if isinstance(cause, ApplicationError):
        message = f"{cause.type}: {cause.message}" if cause.type else cause.message
    else:
        message = str(cause or failure)
    return clipped_text(message)


class PaymentSteps:
    """The base of every part of PaymentWorkflow: the state they share (the workflow sets it in
    its `__init__`) and, declared once here, what one part calls of another."""

    state: PaymentState
    policy: PaymentPolicy
    # PATCH_DECIDED_AT_START, asked first thing in `run`.
    decided_at_start: bool
    # PATCH_LOCAL_FIRST as decided at the run's start (None: asked at the first remote call).
    local_first_decided: bool | None
    # A cancel asked for (an operator, a void, an expired authorization): the saga unwinds.
    cancel_requested: CancelSignal | None
    # `capture_method: manual`: the capture asked for (the `capture` Update).
    capture_requested: CaptureSignal | None = None
    # A ledger event is built once, for its posting (the outbox row), and published as is:
    # one id, one body, whether a consumer reads it from Kafka, the relay or /v1/events.
    posted_events: dict[str, PaymentEvent]
    # Search attributes that go with the next status upsert (revision 1: the fraud score).
    held_search_attributes: list[SearchAttributeUpdate[Any]]

    if TYPE_CHECKING:
        # Defined by one part, called by another: PaymentWorkflow (workflows/payment.py) …
        def take_cancel(self, request: CancelSignal) -> None: ...

        async def held_in_ledger(self) -> int: ...

        async def settle_compensation_by_hand(
            self, name: str, resolution: AttentionResolution
        ) -> None: ...

        # … and AcquirerSteps (workflows/acquirer_steps.py).
        async def refund_at_acquirer(self, refund_id: str, amount: int) -> RefundResult: ...

    @property
    def account_tenant(self) -> str | None:
        """Whose customer and merchant accounts this payment moves: its API client's, or the
        shared ones for payments started before tenants (PaymentPolicy.tenant_accounts)."""
        return self.state.client_id if self.policy.tenant_accounts else None

    @property
    def parties(self) -> entries.Parties:
        """Whose accounts this payment's postings move: its customer's and merchant's, in its
        currency, under `account_tenant`."""
        request = self.state.request
        return entries.Parties(
            request.customer_id, request.merchant_id, request.currency, self.account_tenant
        )

    def status_from_amounts(self) -> PaymentStatus:
        return self.state.amounts.status()

    def status_after(self, kind: EventKind, amount: int) -> PaymentStatus:
        """The status a follow-up posting of `amount` leaves the payment in (its event says so);
        other postings' events carry the status of the moment."""
        movement = Movement.announced_by(kind)
        if movement is None:
            return self.state.status
        return self.state.amounts.after(movement, amount).status()

    def patched(self, patch_id: str, taken_from_revision: int = 1) -> bool:
        """Whether this payment takes `patch_id`'s branch: always, without a marker, when it was
        started under `taken_from_revision` or later (PaymentPolicy.revision; every patch up to
        SAGA_REVISION 1 is taken from 1); otherwise as `workflow.patched()` answers, recording
        its marker as before (docs/upgrades.md)."""
        return self.policy.revision >= taken_from_revision or workflow.patched(patch_id)

    def set_status(self, status: PaymentStatus, waiting_for: str, note: str = "") -> None:
        now = workflow.now()
        updates, self.held_search_attributes = self.held_search_attributes, []
        if status != self.state.status:
            self.state.history.append(StatusChange(status=status, at=now, note=note))
            self.state.status = status
            updates.append(sa.PAYMENT_STATUS.value_set(status.value))
            if status in ENDED and self.state.crm_sync == CrmSync.PENDING:
                # Never told, nothing to tell: keeps CrmSync="pending" meaning "still to do".
                self.state.crm_sync = CrmSync.SKIPPED
                updates.append(sa.CRM_SYNC.value_set(CrmSync.SKIPPED.value))
        if updates:
            workflow.upsert_search_attributes(updates)
        self.state.updated_at = now
        self.describe_waiting(waiting_for)

    def describe_waiting(self, waiting_for: str) -> None:
        """What an operator sees in the Temporal UI's current details."""
        self.state.waiting_for = waiting_for
        request = self.state.request
        workflow.set_current_details(
            f"**{self.state.status}** — {request.amount} {request.currency} minor units, "
            f"customer {request.customer_id}, merchant {request.merchant_id}\n\n"
            + (f"Waiting for: {waiting_for}" if waiting_for else "Nothing pending.")
        )

    def event(
        self,
        kind: EventKind,
        reference: str = "",
        data: dict[str, Any] | None = None,
        status: PaymentStatus | None = None,
    ) -> PaymentEvent:
        return payment_event(self.state, kind, reference, data, status, workflow.now())

    async def publish(
        self,
        kind: EventKind,
        reference: str = "",
        data: dict[str, Any] | None = None,
        local: bool = False,
    ) -> None:
        the_id = event_id(self.state.id, kind, reference)
        event = self.posted_events.pop(the_id, None) or self.event(kind, reference, data)
        await self.run_step(KafkaActivities.publish_payment_event, event, KAFKA, local=local)

    async def post(
        self,
        transaction: entries.LedgerTransaction,
        amount: int,
        kind: EventKind,
        reference: str = "",
        data: dict[str, Any] | None = None,
        local: bool = False,
    ) -> None:
        event = None
        if kind.from_ledger or kind == EventKind.CANCELED:
            event = self.event(kind, reference, data, status=self.status_after(kind, amount))
            self.posted_events[event.id] = event
        posting = LedgerPosting(
            transaction=transaction.model_copy(
                update={"event_kind": kind, "event_id": event_id(self.state.id, kind, reference)}
            ),
            amount=amount,
            parties=PaymentParties.of(self.state),
            event=event,
        )
        await self.run_step(LedgerActivities.post_ledger_transaction, posting, LEDGER, local=local)

    async def run_step(
        self,
        step: Callable[[Any, StepInput], Awaitable[StepResult]],
        arg: StepInput,
        options: StepOptions,
        *,
        local: bool = False,
    ) -> StepResult:
        """One activity. The short forward steps run as local activities when the payment's
        policy says so; compensations, follow-ups and the CRM stay regular activities (rare,
        or slow and remote: their retries belong on the server)."""
        if local and self.policy.local_activities:
            return await workflow.execute_local_activity_method(
                step, arg, local_retry_threshold=LOCAL_RETRY_THRESHOLD, **options
            )
        return await workflow.execute_activity_method(step, arg, **options)

    async def notify_crm(
        self,
        kind: EventKind,
        reference: str = "",
        details: dict[str, Any] | None = None,
        *,
        local_first: bool = False,
    ) -> None:
        """`local_first` (a confirmed payment's notice): one attempt as a local activity first,
        then the regular activity with the CRM's long retries (workflows/local_first.py)."""
        if not self.policy.crm_targets:
            return
        notification = crm_notification(self.state, kind, reference, details, workflow.now())
        self.describe_waiting(
            f"the CRM ({', '.join(self.policy.crm_targets)}) to accept {kind.ce_type}"
        )
        local = local_first and tries_locally_first(self.policy, self.local_first_decided)
        results = await asyncio.gather(
            *(
                _tell_crm(CrmTarget(target), notification, local)
                for target in self.policy.crm_targets
            ),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in failures:
            if isinstance(failure, asyncio.CancelledError):
                raise failure
        if failures:
            # The money stays where it is: operators find CrmSync="failed" and replay.
            self.state.crm_sync = CrmSync.FAILED
            self.state.crm_error = "; ".join(
                failure_message(f) if isinstance(f, STEP_FAILURES) else str(f) for f in failures
            )
        elif self.state.crm_sync != CrmSync.FAILED:
            self.state.crm_sync = CrmSync.SYNCED
        workflow.upsert_search_attributes([sa.CRM_SYNC.value_set(self.state.crm_sync.value)])
        self.describe_waiting("")

    async def record_outcome(self) -> None:
        """The workflow's last word, kept in the payments register for after its history is
        gone."""
        outcome = PaymentOutcome(
            payment_id=self.state.id,
            parties=PaymentParties.of(self.state),
            amount=self.state.request.amount,
            status=self.state.status,
            summary=self.state.model_dump(mode="json"),
        )
        await workflow.execute_activity_method(
            LedgerActivities.record_payment_outcome, outcome, **LEDGER
        )


async def _tell_crm(target: CrmTarget, notification: CrmNotification, local_first: bool) -> Any:
    if local_first:
        try:
            return await workflow.execute_local_activity_method(
                CrmActivities.notify_crm,
                args=[target, notification],
                start_to_close_timeout=CRM["start_to_close_timeout"],
                retry_policy=ONE_ATTEMPT,
            )
        except FailureError as failure:
            if is_cancelled_exception(failure) or refused(failure):
                raise
            # Transient: the same notification (same idempotency key), retried by the server.
    return await workflow.execute_activity_method(
        CrmActivities.notify_crm, args=[target, notification], **CRM
    )
