"""PaymentWorkflow: one durable saga per payment.

    assess (validate + fraud score) ─┬─ reject ≥ 0.95 ─────────────────────────► rejected
                                     ├─ review band: wait approve / decline / timeout
                                     ▼
    publish payments.raw → post ledger transaction → publish payments.confirmed → notify CRM
                                     ▼
    succeeded: serve refunds and disputes (updates, or operators' signals) until the dispute
    window closes; disputes still open then keep the payment until they close

A non-retryable failure or a cancellation before confirmation unwinds the compensations in
reverse: reverse the posting, void payments.raw (payments.failed / payments.canceled), tell the CRM.
A compensation that cannot complete leaves the payment `requires_attention` until an operator
resolves it (`resolve_attention`): money is never left stranded by a failed workflow.

Follow-ups (refund, dispute_opened, dispute_closed, cancel) exist twice under one name: as an
Update, whose validator refuses what the payment cannot honour before it enters the history and
whose result is the follow-up's outcome, and as a signal for operators, whose refusal is
recorded on the refund or dispute. Both go through the same rules (domain/follow_ups.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypedDict, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.crm import CrmActivities, CrmNotification, CrmTarget
    from activities.fraud import FraudActivities, FraudCheck
    from activities.kafka import KafkaActivities
    from domain import ledger as entries
    from domain.bounds import ID_MAX, TEXT_MAX, clipped_text
    from domain.errors import NON_RETRYABLE, FailureType
    from domain.events import EventKind, PaymentEvent, event_id
    from domain.follow_ups import (
        ENDED,
        Door,
        Refused,
        Taking,
        cancel_refusal,
        capture_refusal,
        dispute_closed_refusal,
        dispute_opened_refusal,
        not_cancelable_reason,
        refund_by_void_refusal,
        refund_refusal,
        resolution_refusal,
        void_refusal,
    )
    from domain.money import MAX_INT64
    from domain.payment import (
        Attention,
        AttentionResolution,
        CancelSignal,
        CaptureSignal,
        CrmSync,
        Dispute,
        DisputeClosedSignal,
        DisputeOpenedSignal,
        FollowUp,
        FollowUpStatus,
        FraudAssessment,
        PaymentState,
        PaymentStatus,
        PaymentWorkflowInput,
        Refund,
        RefundSignal,
        ResolutionRecord,
        ReviewDecision,
        StatusChange,
        UndoFailure,
        VoidSignal,
        status_from_amounts,
    )
    from ledger.activity import LedgerActivities
    from ledger.records import LedgerPosting, PaymentOutcome, PaymentParties
    from workflows import search_attributes as sa
    from workflows.acquirer_steps import (
        ACQUIRER_OUTCOME_UNRESOLVED,
        RELEASE_AT_ACQUIRER,
        AcquirerSteps,
    )
    from workflows.compensations import Compensations, FailedUndo

# Retry bounds: infrastructure outages (Kafka, database) are waited out, never given up on;
# business refusals (NON_RETRYABLE types) fail at once.
_INFRA_RETRY = RetryPolicy(
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


class _Options(TypedDict, total=False):
    start_to_close_timeout: timedelta
    schedule_to_close_timeout: timedelta
    retry_policy: RetryPolicy


_FRAUD = _Options(start_to_close_timeout=timedelta(seconds=10), retry_policy=_INFRA_RETRY)
_KAFKA = _Options(start_to_close_timeout=timedelta(seconds=60), retry_policy=_INFRA_RETRY)
_LEDGER = _Options(start_to_close_timeout=timedelta(seconds=30), retry_policy=_INFRA_RETRY)
# A CRM that stays down for a day leaves the money alone: CrmSync=failed, replay later.
_CRM = _Options(
    start_to_close_timeout=timedelta(seconds=30),
    schedule_to_close_timeout=timedelta(hours=24),
    retry_policy=_INFRA_RETRY,
)


# Patches (docs/upgrades.md): payments whose history was written before follow-ups became
# Updates keep issuing the commands they recorded; new payments, and older ones reaching one of
# these points for the first time, take the new branch.
# Signals are judged by domain/follow_ups.py (bounded ids and texts, refused once the payment
# stops taking them: recorded failed, never queued for a loop that has ended).
PATCH_FOLLOW_UP_RULES = "follow-up-rules-for-signals"
# Before continuing as new, carry out every accepted follow-up (an Update's caller waits for it).
PATCH_DRAIN_BEFORE_CONTINUE = "drain-follow-ups-before-continue-as-new"
# An operator cancel carries out what was accepted and keeps the payment until open disputes
# close (instead of failing queued follow-ups and leaving disputed funds held).
PATCH_CANCEL_FINISHES_FOLLOW_UPS = "operator-cancel-finishes-follow-ups"
# A compensation that fails for good waits for an operator instead of failing the workflow.
PATCH_UNDO_FAILURE_NEEDS_ATTENTION = "undo-failure-needs-attention"
# The CRM hears of a confirmed payment even when an operator cancels during that step (the
# payment is succeeded and keeps its money); before, the notification was abandoned and the
# payment's record kept saying it waited for the CRM (found by the simulation, seed 1).
PATCH_CRM_STEP_OUTLIVES_CANCEL = "crm-step-outlives-operator-cancel"
# A capture posting can commit in a workflow task that is then lost (a worker killed while the
# local activity ran): the next attempt, meeting a cancel first, took the path where nothing
# was posted and left the money captured. The reversal is armed from payments.raw on and asks
# the ledger what it holds (found by the simulation, faults profile, seed 1).
PATCH_REVERSAL_ASKS_THE_LEDGER = "reversal-asks-the-ledger"

# A refund whose money may have moved at the acquirer (its outcome unresolved past the bound,
# or refunded there and then refused by the ledger) waits for an operator in
# `requires_attention`; before, it was recorded `failed` while the customer may have been paid.
PATCH_REFUND_NEEDS_ATTENTION = "refund-that-may-have-moved-needs-attention"

REVERSE_POSTING = "reverse the ledger posting"
# The FailedUndo name of a refund waiting for an operator (followed by the refund's id).
REFUND_AT_ACQUIRER = "refund at the acquirer"
POST_ACQUIRER_REFUND = "post in the ledger the refund the acquirer made"
VOID_RAW = "void payments.raw"


class PaymentCanceled(Exception):
    """A `cancel` arrived before the ledger posting."""


class FollowUpRefused(ApplicationError):
    """An Update's validator refusing a follow-up: `type` is the REST API's error code."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.message, type=refused.code.value, non_retryable=True)


@workflow.defn(name="PaymentWorkflow")
class PaymentWorkflow(AcquirerSteps):
    @workflow.init
    def __init__(self, input: PaymentWorkflowInput) -> None:
        self.input = input
        self.policy = input.policy
        # The start event's time, not workflow.now(): with local activities, temporalio 1.35
        # can replay a first workflow task that completed empty with the *next* task's time,
        # and the dispute window (created_at + window) must close at the same instant in
        # replay as it did live (tests/histories/window_closes_local_activities.json).
        now = workflow.info().workflow_start_time
        self.state: PaymentState = input.carried_state or PaymentState(
            id=input.payment_id,
            client_id=input.client_id,
            request=input.request,
            fingerprint=input.fingerprint,
            created_at=now,
            updated_at=now,
            crm_sync=CrmSync.PENDING if self.policy.crm_targets else CrmSync.NOT_CONFIGURED,
            history=[StatusChange(status=PaymentStatus.RECEIVED, at=now)],
        )
        self.follow_ups: deque[FollowUp] = deque(input.pending_follow_ups)
        self.review: ReviewDecision | None = None
        self.review_approved = False
        self.cancel_requested: CancelSignal | None = None
        self.posting_started = self.state.ledger_posted
        self.posting_reversed = False
        # Whether the reversal asks the ledger what was captured (PATCH_REVERSAL_ASKS_THE_LEDGER).
        self.reversal_asks_the_ledger = False
        # What the payment takes right now (domain/follow_ups.py): it only narrows, and always
        # before the workflow stops serving what it took.
        self.door = Door(Taking.NOT_YET)
        if input.carried_state is not None:
            # A continued run serves from its first activation: signals carried with it or sent
            # meanwhile may be handled before `run` starts.
            self.door = Door(Taking.EVERYTHING)
            if workflow.info().workflow_start_time >= self.window_closes_at():
                self.door = self.window_closed_door(open_disputes=True)
        self.door_before_busy = self.door
        # Dispute closes carried out in this run (their Updates' callers wait for them).
        self.closes_done: set[str] = set()
        # Compensations that failed for good, and operators' resolutions waiting to be applied.
        self.undo_left: list[FailedUndo] = []
        self.resolutions: deque[AttentionResolution] = deque()
        self.resolutions_done = 0
        # A refund waiting for an operator: how `manual` settles it (refund_needs_attention).
        self.refund_settlements: dict[str, Callable[[AttentionResolution], Awaitable[None]]] = {}
        self.resolutions_taken = 0
        # A ledger event is built once, for its posting (the outbox row), and published as is:
        # one id, one body, whether a consumer reads it from Kafka, the relay or /v1/events.
        self.posted_events: dict[str, PaymentEvent] = {}

    # ── the saga ──────────────────────────────────────────────────────────────────────────
    @workflow.run
    async def run(self, input: PaymentWorkflowInput) -> PaymentState:
        try:
            if input.carried_state is None:
                paid = await self.take_payment()
                await self.tell_the_subscription()
                if not paid:
                    await self.finish()
                    return self.state
            await self.serve_follow_ups_until_window_closes()
        except (asyncio.CancelledError, ActivityError) as stop:
            if not is_cancelled_exception(stop):
                raise
            # An operator pressed Cancel in the Temporal UI. Whatever was under way has run to
            # its end or been compensated by now; a succeeded payment keeps its money, carries
            # out the follow-ups it accepted and takes no new ones.
            await self.close_after_operator_cancel()
            raise
        await self.finish()
        return self.state

    async def tell_the_subscription(self) -> None:
        """A renewal (a child of a SubscriptionWorkflow) tells its subscription how it ended as
        soon as it knows, not when its dispute window closes. Payments without a parent (every
        payment before issue 17, and every one a client creates) send nothing, so their
        histories replay unchanged."""
        parent = workflow.info().parent
        if parent is None:
            return
        outcome = {
            "payment_id": self.state.id,
            "status": self.state.status.value,
            "captured": self.state.captured,
            "decline_code": self.state.decline_code,
        }
        try:
            await workflow.get_external_workflow_handle(parent.workflow_id).signal(
                "renewal_settled", outcome
            )
        except Exception as failure:  # the subscription is gone: the payment stands alone
            workflow.logger.warning("could not tell %s: %s", parent.workflow_id, failure)

    async def finish(self) -> None:
        """Stop taking anything, let every handler finish, record the outcome for after the
        history is gone."""
        if self.door.taking != Taking.NOTHING:
            self.shut_the_door(Taking.NOTHING, "The payment has ended; it accepts no more changes.")
        self.fail_what_was_never_carried_out()
        await workflow.wait_condition(workflow.all_handlers_finished)
        await self.record_outcome()

    async def take_payment(self) -> bool:
        """Returns True once the payment is confirmed; False if it ended without money moving."""
        assessment = await self.assess()
        if assessment.score >= self.policy.reject_threshold:
            await self.end_without_capture(
                PaymentStatus.REJECTED, EventKind.REJECTED, "fraud score"
            )
            return False
        if assessment.score >= self.policy.review_threshold and not await self.await_review():
            await self.end_without_capture(PaymentStatus.DECLINED, EventKind.REJECTED, "declined")
            return False
        if self.cancel_requested is not None:
            # Canceled while it was being assessed: nothing was published or posted yet.
            await self.end_without_capture(PaymentStatus.CANCELED, EventKind.CANCELED, "")
            return False

        # Each do-step runs to its end even if the workflow is canceled meanwhile: its undo
        # must know whether it took effect (a capture committing after the workflow gave up
        # on it would never be reversed; a payments.confirmed landing after payments.canceled
        # would un-void the payment for consumers).
        saga = Compensations()
        through_acquirer = self.through_acquirer()
        try:
            if through_acquirer:
                self.set_status(PaymentStatus.PROCESSING, "the acquirer's authorization")
                saga.add(RELEASE_AT_ACQUIRER, self.release_at_acquirer)
                await _run_to_completion(self.authorize_at_acquirer())
                if self.declined:
                    saga.clear()  # nothing is held
                    await self.end_declined()
                    return False
                await _run_to_completion(self.post_hold())
            self.set_status(PaymentStatus.PROCESSING, "publishing payments.raw to Kafka")
            saga.add(VOID_RAW, self.void_raw_event)
            await _run_to_completion(self.publish(EventKind.RAW, local=True))
            if workflow.patched(PATCH_REVERSAL_ASKS_THE_LEDGER):
                self.reversal_asks_the_ledger = True
                saga.add(REVERSE_POSTING, self.reverse_posting)

            if through_acquirer and self.manual_capture:
                await self.await_capture()
            self.stop_if_canceled()
            self.posting_started = True
            if through_acquirer:
                await _run_to_completion(self.capture_in_full())
            self.set_status(PaymentStatus.PROCESSING, "posting the ledger transaction")
            if not self.reversal_asks_the_ledger:
                saga.add(REVERSE_POSTING, self.reverse_posting)
            await _run_to_completion(self.post_capture())

            self.set_status(PaymentStatus.PROCESSING, "publishing payments.confirmed to Kafka")
            await _run_to_completion(self.publish(EventKind.CONFIRMED, local=True))
            saga.clear()
        except PaymentCanceled:
            await self.undo(saga, ends_as=PaymentStatus.CANCELED)
            self.set_status(PaymentStatus.CANCELED, "", note=self.cancel_note())
            return False
        except STEP_FAILURES as failure:
            if is_cancelled_exception(failure):
                await self.compensate_operator_cancel(saga)
                raise
            self.state.failure_reason = _failure_message(failure)
            await self.undo(saga, ends_as=PaymentStatus.FAILED)
            self.set_status(PaymentStatus.FAILED, "", note=self.state.failure_reason)
            return False
        except asyncio.CancelledError:
            await self.compensate_operator_cancel(saga)
            raise

        self.set_status(PaymentStatus.SUCCEEDED, "notifying the CRM")
        self.open_the_door()
        if workflow.patched(PATCH_CRM_STEP_OUTLIVES_CANCEL):
            await _run_to_completion(
                self.notify_crm(EventKind.CONFIRMED), on_cancel=self.shut_for_cancel
            )
        else:
            await self.notify_crm(EventKind.CONFIRMED)
        return True

    async def compensate_operator_cancel(self, saga: Compensations) -> None:
        """An operator pressed Cancel in the Temporal UI before the payment was confirmed:
        reverse the posting, void payments.raw with payments.canceled, then tell the CRM."""
        self.cancel_requested = CancelSignal(reason=_OPERATOR_CANCEL)
        if await self.undo(saga, ends_as=PaymentStatus.CANCELED, tell_crm=True):
            self.set_status(PaymentStatus.CANCELED, "", note=self.cancel_note())
            return
        self.set_status(PaymentStatus.CANCELED, "", note=self.cancel_note())
        if self.posting_reversed:
            await self.notify_crm(EventKind.CANCELED)

    async def undo(
        self, saga: Compensations, ends_as: PaymentStatus, tell_crm: bool = False
    ) -> bool:
        """Unwind the saga. A step that fails for good does not stop the others; the payment
        then waits in `requires_attention` until an operator resolves it. True if it did."""
        self.undo_left = await saga.unwind(
            keep_going=lambda: workflow.patched(PATCH_UNDO_FAILURE_NEEDS_ATTENTION)
        )
        if not self.undo_left:
            return False
        self.require_attention(ends_as)
        if tell_crm:
            # The cancel stands: the CRM hears it now; the ledger follows the operator.
            await self.notify_crm(EventKind.CANCELED)
        await self.await_resolution()
        return True

    async def close_after_operator_cancel(self) -> None:
        if self.state.status in (PaymentStatus.RECEIVED, PaymentStatus.REQUIRES_REVIEW):
            # Canceled while being assessed or reviewed: consumers still hear that it ended.
            self.cancel_requested = CancelSignal(reason=_OPERATOR_CANCEL)
            await _run_to_completion(
                self.end_without_capture(PaymentStatus.CANCELED, EventKind.CANCELED, "")
            )
        self.shut_for_cancel()
        if (self.follow_ups or self.holds_disputed_funds()) and workflow.patched(
            PATCH_CANCEL_FINISHES_FOLLOW_UPS
        ):
            await self.finish_follow_ups_after_cancel()
        else:
            why = "the payment's workflow was canceled before this was carried out"
            for refund in self.state.refunds:
                if refund.status == FollowUpStatus.PENDING:
                    refund.status, refund.failure_reason = FollowUpStatus.FAILED, why
            for dispute in self.state.disputes:
                if dispute.status == "pending":
                    dispute.status, dispute.failure_reason = "failed", why
            self.follow_ups.clear()
        await self.finish()

    async def finish_follow_ups_after_cancel(self) -> None:
        """Carry out what was accepted before the cancel, then keep the payment until its open
        disputes are closed: their funds are held, and only this workflow can release them."""
        while True:
            while self.follow_ups:
                await self.run_follow_up(self.follow_ups.popleft())
            if not self.holds_disputed_funds():
                return
            self.describe_waiting(
                "the open disputes to close: the workflow was canceled by an operator and ends "
                "once they are closed"
            )
            await workflow.wait_condition(lambda: bool(self.follow_ups))

    async def assess(self) -> FraudAssessment:
        self.set_status(PaymentStatus.RECEIVED, "validating and scoring the payment for fraud")
        check = FraudCheck(client_id=self.state.client_id, request=self.state.request)
        assessment = await self.run_step(FraudActivities.assess_payment, check, _FRAUD, local=True)
        self.state.fraud = assessment
        workflow.upsert_search_attributes([sa.FRAUD_SCORE.value_set(assessment.score)])
        return assessment

    async def await_review(self) -> bool:
        timeout = self.policy.review_timeout_seconds
        self.set_status(
            PaymentStatus.REQUIRES_REVIEW,
            f"a reviewer's approve or decline signal (fraud score {self.state.fraud.score:.2f}"
            f" — auto-decline in {timeout:.0f}s)"
            if self.state.fraud
            else "a reviewer's approve or decline signal",
        )
        try:
            await workflow.wait_condition(
                lambda: self.review is not None or self.cancel_requested is not None,
                timeout=timedelta(seconds=timeout),
            )
        except TimeoutError:
            self.review = ReviewDecision(reviewer="system", note="review timed out: auto-declined")
            self.state.review = self.review
        if self.cancel_requested is not None:
            return False
        return self.review_approved

    async def end_without_capture(self, status: PaymentStatus, kind: EventKind, why: str) -> None:
        if self.cancel_requested is not None:
            status, kind, why = PaymentStatus.CANCELED, EventKind.CANCELED, self.cancel_note()
        self.set_status(status, f"publishing payments.{kind.value}", note=why)
        await _run_to_completion(self.publish(kind))
        self.set_status(status, "", note=why)

    # ── compensations ─────────────────────────────────────────────────────────────────────
    async def void_raw_event(self) -> None:
        """Downstream consumers void payments.raw on payments.failed / payments.canceled, which
        share its key and so its partition: they always read the void after the raw event."""
        kind = EventKind.CANCELED if self.cancel_requested is not None else EventKind.FAILED
        # The status the payment ends with, not the `processing` it still shows while unwinding.
        await self.publish(kind, data={"status": kind.value})

    async def reverse_posting(self) -> None:
        """Idempotent: the ledger keys the reversal by (payment, kind), so a retried or replayed
        reversal posts once."""
        if not self.state.ledger_posted:
            if not self.reversal_asks_the_ledger:
                return  # the capture never committed (the posting ran to completion: we know)
            captured = await self.run_step(
                LedgerActivities.captured_in_ledger, self.state.id, _LEDGER, local=True
            )
            if not captured:
                return
            self.state.ledger_posted, self.state.captured = True, captured
        request = self.state.request
        await self.post(
            entries.reversal_transaction(
                self.state.id,
                request.customer_id,
                request.merchant_id,
                self.state.captured,
                request.currency,
                self.account_tenant,
            ),
            self.state.captured,
            EventKind.CANCELED,
            data={"status": PaymentStatus.CANCELED.value},
        )
        self.state.captured = 0
        self.state.ledger_posted = False
        self.posting_reversed = True

    # ── follow-ups: refunds and disputes, until the dispute window closes ─────────────────
    async def serve_follow_ups_until_window_closes(self) -> None:
        """Run refunds and disputes in arrival order until the dispute window closes. A dispute
        still open then keeps the workflow until it is closed: its funds are held.

        The door narrows before the loop can end, in the same step as the check that decides
        it: a follow-up is either refused or in the queue, which is emptied before returning."""
        closes_at = self.window_closes_at()
        while True:
            remaining = (closes_at - workflow.now()).total_seconds()
            if remaining > 0:
                self.describe_waiting(
                    f"refunds or disputes until the window closes at {closes_at:%Y-%m-%d %H:%M} UTC"
                )
            elif self.follow_ups or self.holds_disputed_funds():
                self.door = self.window_closed_door(open_disputes=True)
                self.describe_waiting("the open disputes to close (the dispute window has closed)")
            else:
                self.door = self.window_closed_door(open_disputes=False)
                self.describe_waiting("")
                return
            try:
                # Signals that queue nothing (duplicates, refused ones) still grow the history.
                await workflow.wait_condition(
                    lambda: bool(self.follow_ups) or self.history_is_long(),
                    timeout=timedelta(seconds=remaining) if remaining > 0 else None,
                )
            except TimeoutError:
                continue
            while self.follow_ups:
                # A follow-up that started moving money finishes (ledger, event, CRM) even if
                # the workflow is canceled meanwhile; the cancellation takes effect after it,
                # and the payment takes nothing new from the moment it is seen.
                await _run_to_completion(
                    self.run_follow_up(self.follow_ups.popleft()), on_cancel=self.shut_for_cancel
                )
                await self.continue_as_new_if_history_is_long()
            await self.continue_as_new_if_history_is_long()

    def window_closes_at(self) -> datetime:
        return self.state.created_at + timedelta(seconds=self.policy.dispute_window_seconds)

    def window_closed_door(self, *, open_disputes: bool) -> Door:
        closed = (
            f"The payment's dispute window closed at {self.window_closes_at():%Y-%m-%d %H:%M} UTC"
        )
        if open_disputes:
            return Door(
                Taking.DISPUTE_CLOSES,
                f"{closed}; it takes no new refunds or disputes (open disputes can still be "
                "closed).",
            )
        return Door(Taking.NOTHING, f"{closed}; it accepts no more changes.")

    def history_is_long(self) -> bool:
        info = workflow.info()
        return info.is_continue_as_new_suggested() or (
            info.get_current_history_length() > self.policy.continue_as_new_after_events
        )

    def holds_disputed_funds(self) -> bool:
        return any(d.status in ("pending", "open") for d in self.state.disputes)

    async def continue_as_new_if_history_is_long(self) -> None:
        """Many refunds or disputes would grow the history without bound: carry the state into
        a fresh run. Updates are refused meanwhile (their callers retry and reach the new run);
        what was queued is carried out here first, since an Update's caller waits for it.
        Signals that arrive meanwhile are carried to the new run."""
        if not self.history_is_long():
            return
        if workflow.patched(PATCH_DRAIN_BEFORE_CONTINUE):
            self.shut_the_door(Taking.BUSY, "")
            # Only what is queued now (Updates' callers wait for it): signals arriving during
            # the drain are carried, so a steady stream of them cannot hold the run open.
            for _ in range(len(self.follow_ups)):
                await _run_to_completion(
                    self.run_follow_up(self.follow_ups.popleft()), on_cancel=self.shut_for_cancel
                )
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            self.input.model_copy(
                update={"carried_state": self.state, "pending_follow_ups": list(self.follow_ups)}
            )
        )

    async def run_follow_up(self, follow_up: FollowUp) -> None:
        match follow_up:
            case RefundSignal():
                await self.post_refund(follow_up)
            case DisputeOpenedSignal():
                await self.post_dispute_opened(follow_up)
            case DisputeClosedSignal():
                await self.post_dispute_closed(follow_up)

    async def post_refund(self, signal: RefundSignal) -> None:
        refund = next(r for r in self.state.refunds if r.id == signal.refund_id)
        data = {"refund_id": refund.id, "amount": refund.amount}
        refunded_at_acquirer = False
        try:
            if self.state.acquirer_reference is not None:
                # The money goes back at the acquirer first; the ledger then records it.
                await self.refund_at_acquirer(refund.id, refund.amount)
                refunded_at_acquirer = True
            await self.post_refund_in_ledger(refund)
        except STEP_FAILURES as failure:
            if is_cancelled_exception(failure):
                raise
            may_have_moved = refunded_at_acquirer or (
                isinstance(failure, ApplicationError)
                and failure.type == ACQUIRER_OUTCOME_UNRESOLVED
            )
            if not (may_have_moved and workflow.patched(PATCH_REFUND_NEEDS_ATTENTION)):
                # Refused before any money moved: by the acquirer, or by the ledger (it
                # re-checks refunded + disputed <= captured itself) with no acquirer involved.
                refund.status = FollowUpStatus.FAILED
                refund.failure_reason = _failure_message(failure)
                return
            await self.refund_needs_attention(refund, failure, refunded_at_acquirer)
            if refund.status != FollowUpStatus.SUCCEEDED:
                return
        refund.status = FollowUpStatus.SUCCEEDED
        self.state.refunded += refund.amount
        self.set_status(self.status_from_amounts(), f"publishing refund {refund.id}")
        await self.publish(EventKind.REFUNDED, reference=refund.id, data=data)
        await self.notify_crm(
            EventKind.REFUNDED,
            reference=refund.id,
            details={"refund_id": refund.id, "refund_amount": refund.amount},
        )

    async def post_refund_in_ledger(self, refund: Refund, description: str = "") -> None:
        """The refund's posting: merchant → customer, or, `description` given (an operator's
        manual resolution), suspense → customer. Either takes the refund's own slot (payment,
        `refund`, refund id), so a refund is never posted twice."""
        request = self.state.request
        data: dict[str, Any] = {"refund_id": refund.id, "amount": refund.amount}
        transaction = entries.refund_transaction(
            self.state.id, refund.id, request.customer_id, request.merchant_id,
            refund.amount, request.currency, self.account_tenant,
        )  # fmt: skip
        if description:
            transaction = entries.manual_refund_transaction(
                self.state.id, refund.id, request.customer_id, refund.amount,
                request.currency, description, self.account_tenant,
            )  # fmt: skip
            data["manual_resolution"] = description
        self.describe_waiting(f"posting refund {refund.id}")
        await self.post(
            transaction, refund.amount, EventKind.REFUNDED, reference=refund.id, data=data
        )

    async def refund_needs_attention(
        self, refund: Refund, failure: BaseException, refunded_at_acquirer: bool
    ) -> None:
        """The refund may have moved money (the acquirer's outcome unresolved past the bound,
        or the acquirer refunded and the ledger refused the posting): never `failed`. The
        payment waits in `requires_attention`, the refund `pending`, until an operator retries
        (the same acquirer reference: it never refunds twice) or settles it by hand."""
        progress = {"at_acquirer": refunded_at_acquirer}

        async def carry_out() -> None:
            if not progress["at_acquirer"]:
                await self.refund_at_acquirer(refund.id, refund.amount)
                progress["at_acquirer"] = True
            await self.post_refund_in_ledger(refund)
            refund.status = FollowUpStatus.SUCCEEDED

        async def settle_by_hand(resolution: AttentionResolution) -> None:
            description = clipped_text(
                f"manual resolution by {resolution.operator}: {resolution.reason}", TEXT_MAX
            )
            if progress["at_acquirer"]:
                # The customer has the money back: the ledger says so against suspense.
                await self.post_refund_in_ledger(refund, description)
                refund.status = FollowUpStatus.SUCCEEDED
            else:
                # The operator established at the acquirer that it did not refund.
                refund.status = FollowUpStatus.FAILED
                refund.failure_reason = f"not refunded at the acquirer ({description})"

        name = POST_ACQUIRER_REFUND if refunded_at_acquirer else REFUND_AT_ACQUIRER
        self.refund_settlements[refund.id] = settle_by_hand
        self.undo_left = [FailedUndo(f"{name} {refund.id}", carry_out, failure)]
        what_to_do = (
            _REFUNDED_NOT_POSTED if refunded_at_acquirer else _REFUND_OUTCOME_UNKNOWN
        ).format(refund=refund.id, amount=refund.amount, currency=self.state.request.currency)
        self.require_attention(self.state.status, what_to_do)
        await self.await_resolution()
        del self.refund_settlements[refund.id]

    async def post_dispute_opened(self, signal: DisputeOpenedSignal) -> None:
        dispute = self.find_dispute(signal.dispute_id)
        request = self.state.request
        data = {
            "dispute_id": dispute.id,
            "amount": dispute.amount,
            "reason_code": dispute.reason_code,
        }
        try:
            await self.post(
                entries.dispute_opened_transaction(
                    self.state.id,
                    dispute.id,
                    request.merchant_id,
                    dispute.amount,
                    request.currency,
                    self.account_tenant,
                ),
                dispute.amount,
                EventKind.DISPUTE_OPENED,
                reference=dispute.id,
                data=data,
            )
        except STEP_FAILURES as failure:
            dispute.status, dispute.failure_reason = "failed", _failure_message(failure)
            return
        dispute.status = "open"
        self.state.disputed += dispute.amount
        self.set_status(self.status_from_amounts(), f"publishing dispute {dispute.id}")
        await self.publish(EventKind.DISPUTE_OPENED, reference=dispute.id, data=data)
        await self.notify_crm(EventKind.DISPUTE_OPENED, reference=dispute.id, details=data)

    async def post_dispute_closed(self, signal: DisputeClosedSignal) -> None:
        try:
            await self.close_dispute_in_ledger(signal)
        finally:
            self.closes_done.add(signal.dispute_id)

    async def close_dispute_in_ledger(self, signal: DisputeClosedSignal) -> None:
        dispute = self.find_dispute(signal.dispute_id)
        if dispute.status != "open":
            return  # its opening failed: there is nothing held to release
        request = self.state.request
        won = signal.outcome == "won"
        kind = EventKind.DISPUTE_WON if won else EventKind.DISPUTE_LOST
        fee = 0 if won else self.policy.chargeback_fee_minor
        transaction = (
            entries.dispute_won_transaction(
                self.state.id, dispute.id, request.merchant_id, dispute.amount,
                request.currency, self.account_tenant,
            )
            if won
            else entries.dispute_lost_transaction(
                self.state.id, dispute.id, request.customer_id, request.merchant_id,
                dispute.amount, fee, request.currency, self.account_tenant,
            )
        )  # fmt: skip
        data = {
            "dispute_id": dispute.id,
            "amount": dispute.amount,
            "outcome": signal.outcome,
            "fee": fee,
        }
        try:
            await self.post(transaction, dispute.amount, kind, reference=dispute.id, data=data)
        except STEP_FAILURES as failure:
            # The funds stay held (status open); the reason tells the operator why.
            dispute.failure_reason = _failure_message(failure)
            return
        dispute.status = signal.outcome
        dispute.failure_reason = None
        self.state.disputed -= dispute.amount
        if not won:
            self.state.dispute_lost += dispute.amount
        self.set_status(
            self.status_from_amounts(), f"publishing dispute {dispute.id} {signal.outcome}"
        )
        await self.publish(kind, reference=dispute.id, data=data)
        await self.notify_crm(kind, reference=dispute.id, details=data)

    # ── updates (the API, the CLI) and signals (operators): one code path ─────────────────
    @workflow.signal
    def approve(self, decision: ReviewDecision) -> None:
        if self.state.status == PaymentStatus.REQUIRES_REVIEW and self.review is None:
            self.review, self.review_approved = _bounded_decision(decision), True
            self.state.review = self.review

    @workflow.signal
    def decline(self, decision: ReviewDecision) -> None:
        if self.state.status == PaymentStatus.REQUIRES_REVIEW and self.review is None:
            self.review, self.review_approved = _bounded_decision(decision), False
            self.state.review = self.review

    @workflow.update(name="cancel")
    async def cancel_payment(self, request: CancelSignal) -> PaymentState:
        """Cancel before the ledger posting; the answer is the canceled payment."""
        self.take_cancel(request)
        await workflow.wait_condition(lambda: self.state.status in ENDED)
        return self.state

    @cancel_payment.validator
    def _cancel_allowed(self, request: CancelSignal) -> None:
        self.refuse(
            cancel_refusal(
                self.state,
                request,
                posting_started=self.posting_started,
                requested=self.cancel_requested is not None,
            )
        )

    @workflow.signal
    def cancel(self, signal: CancelSignal) -> None:
        if self.posting_started or self.state.status in ENDED:
            self.state.cancel_refused = not_cancelable_reason(
                self.state, posting_started=self.posting_started
            )
            return
        self.take_cancel(signal)

    def take_cancel(self, request: CancelSignal) -> None:
        if self.cancel_requested is None:
            self.cancel_requested = CancelSignal(reason=clipped_text(request.reason))

    @workflow.update(name="refund")
    async def refund_payment(self, request: RefundSignal) -> Refund:
        """The refund once the ledger posted it (`succeeded`) or refused it (`failed`)."""
        if self.state.status == PaymentStatus.REQUIRES_CAPTURE:
            return await self.refund_by_void(request)
        refund = self.take_refund(request, self.current_door())
        await workflow.wait_condition(lambda: refund.status != FollowUpStatus.PENDING)
        return refund

    @refund_payment.validator
    def _refund_allowed(self, request: RefundSignal) -> None:
        if self.state.status == PaymentStatus.REQUIRES_CAPTURE:
            self.refuse(
                refund_by_void_refusal(
                    self.state, request, capture_requested=self.capture_requested is not None
                )
            )
            return
        self.refuse(refund_refusal(self.state, request, self.current_door()))

    async def refund_by_void(self, request: RefundSignal) -> Refund:
        """A refund of a payment not captured yet is a void: the whole authorization goes back
        to the customer, nothing was ever taken. Recorded as a refund of what was held."""
        self.take_cancel(CancelSignal(reason="refunded before capture: authorization voided"))
        await workflow.wait_condition(lambda: self.state.status in ENDED)
        refund = Refund(
            id=request.refund_id[:ID_MAX],
            amount=self.state.authorized_amount,
            reason=clipped_text(request.reason) if request.reason is not None else None,
            created_at=workflow.now(),
        )
        if self.state.status == PaymentStatus.CANCELED:
            refund.status = FollowUpStatus.SUCCEEDED
        else:
            refund.status = FollowUpStatus.FAILED
            refund.failure_reason = f"the authorization was not voided: {self.state.status}"
        self.state.refunds.append(refund)
        return refund

    @workflow.signal
    def refund(self, signal: RefundSignal) -> None:
        if workflow.patched(PATCH_FOLLOW_UP_RULES):
            self.take_refund(signal, self.door_for_signals())
        else:
            self.take_refund_as_before(signal)

    @workflow.update(name="dispute_opened")
    async def open_dispute(self, request: DisputeOpenedSignal) -> Dispute:
        """The dispute once its funds are held (`open`) or the ledger refused it (`failed`)."""
        dispute = self.take_dispute_opened(request, self.current_door())
        await workflow.wait_condition(lambda: dispute.status != "pending")
        return dispute

    @open_dispute.validator
    def _dispute_allowed(self, request: DisputeOpenedSignal) -> None:
        self.refuse(dispute_opened_refusal(self.state, request, self.current_door()))

    @workflow.signal
    def dispute_opened(self, signal: DisputeOpenedSignal) -> None:
        if workflow.patched(PATCH_FOLLOW_UP_RULES):
            self.take_dispute_opened(signal, self.door_for_signals())
        else:
            self.take_dispute_opened_as_before(signal)

    @workflow.update(name="dispute_closed")
    async def close_dispute(self, request: DisputeClosedSignal) -> Dispute:
        """The dispute once closed (`won`/`lost`), or still `open` with the ledger's refusal as
        its `failure_reason`."""
        dispute = self.find_dispute(request.dispute_id)
        if dispute.status == "open" or dispute.status == "pending":
            self.take_dispute_closed(request)
            await workflow.wait_condition(
                lambda: dispute.status in ("won", "lost") or request.dispute_id in self.closes_done
            )
        return dispute

    @close_dispute.validator
    def _close_allowed(self, request: DisputeClosedSignal) -> None:
        self.refuse(dispute_closed_refusal(self.state, request, self.current_door()))

    @workflow.signal
    def dispute_closed(self, signal: DisputeClosedSignal) -> None:
        if workflow.patched(PATCH_FOLLOW_UP_RULES):
            refused = dispute_closed_refusal(self.state, signal, self.door_for_signals())
            if refused is not None:
                workflow.logger.warning("dispute_closed signal refused: %s", refused.message)
                return
        dispute = next((d for d in self.state.disputes if d.id == signal.dispute_id), None)
        if dispute is None or dispute.status not in ("pending", "open"):
            return
        self.take_dispute_closed(signal)

    @workflow.update(name="capture")
    async def capture_authorization(self, request: CaptureSignal) -> PaymentState:
        """`capture_method: manual`: capture all or part of the authorization (the rest is
        released); the answer is the payment once captured and posted (or failed)."""
        if self.capture_requested is None:
            self.capture_requested = CaptureSignal(amount_to_capture=request.amount_to_capture)
        await workflow.wait_condition(
            lambda: (
                self.state.status not in (PaymentStatus.REQUIRES_CAPTURE, PaymentStatus.PROCESSING)
            )
        )
        return self.state

    @capture_authorization.validator
    def _capture_allowed(self, request: CaptureSignal) -> None:
        self.refuse(
            capture_refusal(
                self.state,
                request,
                requested=self.capture_requested is not None,
                voiding=self.cancel_requested is not None,
            )
        )

    @workflow.update(name="void")
    async def void_authorization(self, request: VoidSignal) -> PaymentState:
        """Release an uncaptured authorization: the payment ends `canceled`, nothing captured."""
        self.take_cancel(CancelSignal(reason=request.reason))
        await workflow.wait_condition(lambda: self.state.status in ENDED)
        return self.state

    @void_authorization.validator
    def _void_allowed(self, request: VoidSignal) -> None:
        self.refuse(void_refusal(self.state, capture_requested=self.capture_requested is not None))

    @workflow.update(name="resolve_attention")
    async def resolve_attention(self, resolution: AttentionResolution) -> ResolutionRecord:
        """An operator's answer to `requires_attention`; the answer is what it achieved."""
        taken = self.take_resolution(resolution)
        await workflow.wait_condition(lambda: self.resolutions_done >= taken)
        return self.state.resolutions[taken - 1]

    @resolve_attention.validator
    def _resolution_allowed(self, resolution: AttentionResolution) -> None:
        self.refuse(resolution_refusal(self.state, resolution))

    @workflow.signal(name="resolve_attention")
    def resolve_attention_signal(self, resolution: AttentionResolution) -> None:
        refused = resolution_refusal(self.state, resolution)
        if refused is not None:
            workflow.logger.warning("resolve_attention signal refused: %s", refused.message)
            return
        self.take_resolution(resolution)

    @workflow.query(name="state")
    def current_state(self) -> PaymentState:
        return self.state

    # ── taking follow-ups ────────────────────────────────────────────────────────────────
    def refuse(self, refused: Refused | None) -> None:
        if refused is not None:
            raise FollowUpRefused(refused)

    def open_the_door(self) -> None:
        self.door = Door(Taking.EVERYTHING)

    def shut_the_door(self, taking: Taking, why: str) -> None:
        """Narrow what the payment takes. While it hands over to a fresh run (BUSY) signals
        are still judged by what it took before: they are carried to the new run."""
        if taking == Taking.BUSY:
            self.door_before_busy = self.door
        self.door = Door(taking, why)

    def shut_for_cancel(self) -> None:
        self.shut_the_door(
            Taking.DISPUTE_CLOSES,
            "The payment's workflow was canceled by an operator; it takes no new refunds or "
            "disputes (open disputes can still be closed).",
        )

    def current_door(self, door: Door | None = None) -> Door:
        """The door as of this activation's time: the window closes at its instant, even while
        the loop is still busy with a backlog and has not looked at the clock yet."""
        door = door or self.door
        if door.taking == Taking.EVERYTHING and workflow.now() >= self.window_closes_at():
            return self.window_closed_door(open_disputes=True)
        return door

    def door_for_signals(self) -> Door:
        """While the run hands over (BUSY), signals are judged by the door before it: they are
        carried to the next run, not refused."""
        busy = self.door.taking == Taking.BUSY
        return self.current_door(self.door_before_busy if busy else self.door)

    def take_refund(self, request: RefundSignal, door: Door) -> Refund:
        """Record the refund and queue it, or record it failed with the reason it was refused.
        An Update reaches here only after its validator accepted the same request."""
        refund_id = request.refund_id[:ID_MAX]
        existing = next((r for r in self.state.refunds if r.id == refund_id), None)
        if existing is not None:
            return existing  # the same refund id twice is one refund
        refused = refund_refusal(self.state, request, door)
        amount = request.amount if request.amount is not None else self.state.refundable
        refund = Refund(
            id=refund_id,
            amount=min(max(amount, 0), MAX_INT64),
            reason=clipped_text(request.reason) if request.reason is not None else None,
            created_at=workflow.now(),
        )
        if refused is not None:
            refund.status, refund.failure_reason = FollowUpStatus.FAILED, refused.message
        self.state.refunds.append(refund)
        if refused is None:
            self.follow_ups.append(request.model_copy(update={"amount": amount}))
        return refund

    def take_dispute_opened(self, request: DisputeOpenedSignal, door: Door) -> Dispute:
        dispute_id = request.dispute_id[:ID_MAX]
        existing = next((d for d in self.state.disputes if d.id == dispute_id), None)
        if existing is not None:
            return existing  # the network resent its notice: one dispute
        refused = dispute_opened_refusal(self.state, request, door)
        amount = request.amount if request.amount is not None else self.state.refundable
        dispute = Dispute(
            id=dispute_id,
            amount=min(max(amount, 0), MAX_INT64),
            reason_code=clipped_text(request.reason_code, ID_MAX),
            network_reference=clipped_text(request.network_reference, ID_MAX),
            created_at=workflow.now(),
        )
        if refused is not None:
            dispute.status, dispute.failure_reason = "failed", refused.message
        self.state.disputes.append(dispute)
        if refused is None:
            self.follow_ups.append(request.model_copy(update={"amount": amount}))
        return dispute

    def take_dispute_closed(self, request: DisputeClosedSignal) -> None:
        if not any(
            isinstance(f, DisputeClosedSignal) and f.dispute_id == request.dispute_id
            for f in self.follow_ups
        ):
            self.follow_ups.append(request)

    def fail_what_was_never_carried_out(self) -> None:
        """The payment is ending: anything still pending (a signal queued after its loop ended,
        under rules older than PATCH_FOLLOW_UP_RULES) is recorded failed, never left pending."""
        why = "the payment stopped taking follow-ups before this was carried out"
        for refund in self.state.refunds:
            if refund.status == FollowUpStatus.PENDING:
                refund.status, refund.failure_reason = FollowUpStatus.FAILED, why
        for dispute in self.state.disputes:
            if dispute.status == "pending":
                dispute.status, dispute.failure_reason = "failed", why
        for follow_up in self.follow_ups:
            if isinstance(follow_up, DisputeClosedSignal):
                self.closes_done.add(follow_up.dispute_id)
        self.follow_ups.clear()

    # Signals under the rules their history was written with (before PATCH_FOLLOW_UP_RULES);
    # retire with the patch (docs/upgrades.md).
    def take_refund_as_before(self, signal: RefundSignal) -> None:
        if any(r.id == signal.refund_id for r in self.state.refunds):
            return
        amount = signal.amount if signal.amount is not None else self.state.refundable
        refund = Refund(
            id=signal.refund_id, amount=max(amount, 0), reason=signal.reason,
            created_at=workflow.now(),
        )  # fmt: skip
        problem = self.follow_up_problem_as_before(amount)
        if problem:
            refund.status, refund.failure_reason = FollowUpStatus.FAILED, problem
        self.state.refunds.append(refund)
        if not problem:
            self.follow_ups.append(signal.model_copy(update={"amount": amount}))

    def take_dispute_opened_as_before(self, signal: DisputeOpenedSignal) -> None:
        if any(d.id == signal.dispute_id for d in self.state.disputes):
            return
        amount = signal.amount if signal.amount is not None else self.state.refundable
        dispute = Dispute(
            id=signal.dispute_id, amount=max(amount, 0), reason_code=signal.reason_code,
            network_reference=signal.network_reference, created_at=workflow.now(),
        )  # fmt: skip
        problem = self.follow_up_problem_as_before(amount)
        if problem:
            dispute.status, dispute.failure_reason = "failed", problem
        self.state.disputes.append(dispute)
        if not problem:
            self.follow_ups.append(signal.model_copy(update={"amount": amount}))

    def follow_up_problem_as_before(self, amount: int) -> str | None:
        if self.state.status in ENDED or not self.state.ledger_posted:
            return f"the payment is {self.state.status}: nothing captured to return"
        if amount <= 0:
            return "nothing left to return: the payment is fully refunded or disputed"
        if amount > self.state.refundable:
            return f"amount {amount} exceeds the {self.state.refundable} still refundable"
        return None

    # ── requires_attention: a compensation that could not complete ──────────────────────
    def require_attention(self, ends_as: PaymentStatus, what_to_do: str = "") -> None:
        failures = [
            UndoFailure(step=f.name, error=_failure_message(f.failure)) for f in self.undo_left
        ]
        self.state.attention = Attention(
            since=workflow.now(),
            ends_as=ends_as,
            failures=failures,
            what_to_do=what_to_do or _WHAT_TO_DO,
        )
        workflow.metric_meter().create_counter(
            "paysaga_payments_requiring_attention",
            "Payments whose compensation could not complete and that wait for an operator.",
        ).add(1, {"ends_as": ends_as.value})
        self.set_status(PaymentStatus.REQUIRES_ATTENTION, self.attention_details())

    def attention_details(self) -> str:
        attention = self.state.attention
        assert attention is not None
        failed = "; ".join(f"{f.step}: {f.error}" for f in attention.failures)
        return f"an operator: could not {failed}. {attention.what_to_do}"

    def take_resolution(self, resolution: AttentionResolution) -> int:
        self.resolutions.append(resolution)
        self.resolutions_taken += 1
        return self.resolutions_taken

    async def await_resolution(self) -> None:
        """Until every failed compensation is done or settled by hand. A cancellation does not
        end the wait: the money would stay stranded."""
        while self.state.attention is not None:
            self.describe_waiting(self.attention_details())
            try:
                await workflow.wait_condition(lambda: bool(self.resolutions))
                await _run_to_completion(self.apply_resolution(self.resolutions.popleft()))
            except asyncio.CancelledError:
                workflow.logger.warning("cancel requested while waiting for an operator")
        # Resolutions sent together with the one that settled it: nothing is left for them.
        while self.resolutions:
            self.record_resolution(self.resolutions.popleft(), resolved=True, remaining=[])

    def record_resolution(
        self, resolution: AttentionResolution, *, resolved: bool, remaining: list[UndoFailure]
    ) -> None:
        self.state.resolutions.append(
            ResolutionRecord(
                action=resolution.action,
                operator=clipped_text(resolution.operator, ID_MAX),
                reason=clipped_text(resolution.reason),
                at=workflow.now(),
                resolved=resolved,
                remaining=remaining,
            )
        )
        self.resolutions_done += 1

    async def apply_resolution(self, resolution: AttentionResolution) -> None:
        attention = self.state.attention
        assert attention is not None
        still_failing: list[FailedUndo] = []
        for failed in self.undo_left:
            try:
                if resolution.action == "manual":
                    await self.settle_by_hand(failed, resolution)
                else:
                    await failed.undo()
            except STEP_FAILURES as failure:
                if is_cancelled_exception(failure):
                    raise
                still_failing.append(FailedUndo(failed.name, failed.undo, failure))
        attempts = {f.step: f.attempts for f in attention.failures}
        self.undo_left = still_failing
        attention.failures = [
            UndoFailure(
                step=f.name, error=_failure_message(f.failure), attempts=attempts[f.name] + 1
            )
            for f in still_failing
        ]
        self.record_resolution(
            resolution, resolved=not still_failing, remaining=list(attention.failures)
        )
        if still_failing:
            self.set_status(PaymentStatus.REQUIRES_ATTENTION, self.attention_details())
            return
        self.state.attention = None
        self.set_status(
            attention.ends_as,
            "",
            note=f"resolved by {clipped_text(resolution.operator, ID_MAX)} ({resolution.action})",
        )

    async def settle_by_hand(self, failed: FailedUndo, resolution: AttentionResolution) -> None:
        """`manual`: a refused reversal is posted against the suspense account instead of the
        merchant; a refund that may have moved money is settled as refund_needs_attention says;
        any other step (an event, a notification) is settled by the operator's word."""
        for refund_id, settle in self.refund_settlements.items():
            if failed.name.endswith(f" {refund_id}"):
                await settle(resolution)
                return
        if failed.name != REVERSE_POSTING or not self.state.ledger_posted:
            return
        request = self.state.request
        description = clipped_text(
            f"manual resolution by {resolution.operator}: {resolution.reason}", TEXT_MAX
        )
        await self.post(
            entries.manual_reversal_transaction(
                self.state.id,
                request.customer_id,
                self.state.captured,
                request.currency,
                description,
                self.account_tenant,
            ),
            self.state.captured,
            EventKind.CANCELED,
            data={"status": PaymentStatus.CANCELED.value, "manual_resolution": description},
        )
        self.state.captured = 0
        self.state.ledger_posted = False
        self.posting_reversed = True

    # ── helpers ───────────────────────────────────────────────────────────────────────────
    @property
    def account_tenant(self) -> str | None:
        """Whose customer and merchant accounts this payment moves: its API client's, or the
        shared ones for payments started before tenants (PaymentPolicy.tenant_accounts)."""
        return self.state.client_id if self.policy.tenant_accounts else None

    def find_dispute(self, dispute_id: str) -> Dispute:
        return next(d for d in self.state.disputes if d.id == dispute_id)

    def status_from_amounts(self) -> PaymentStatus:
        s = self.state
        return status_from_amounts(s.captured, s.refunded, s.disputed, s.dispute_lost)

    def status_after(self, kind: EventKind, amount: int) -> PaymentStatus:
        """The status a follow-up posting of `amount` leaves the payment in (its event says so);
        other postings' events carry the status of the moment."""
        s = self.state
        refunded, disputed, lost = s.refunded, s.disputed, s.dispute_lost
        match kind:
            case EventKind.REFUNDED:
                refunded += amount
            case EventKind.DISPUTE_OPENED:
                disputed += amount
            case EventKind.DISPUTE_WON:
                disputed -= amount
            case EventKind.DISPUTE_LOST:
                disputed, lost = disputed - amount, lost + amount
            case _:
                return s.status
        return status_from_amounts(s.captured, refunded, disputed, lost)

    def stop_if_canceled(self) -> None:
        if self.cancel_requested is not None:
            raise PaymentCanceled

    def cancel_note(self) -> str:
        return self.cancel_requested.reason if self.cancel_requested else "canceled"

    def set_status(self, status: PaymentStatus, waiting_for: str, note: str = "") -> None:
        now = workflow.now()
        if status != self.state.status:
            self.state.history.append(StatusChange(status=status, at=now, note=note))
            self.state.status = status
            updates = [sa.PAYMENT_STATUS.value_set(status.value)]
            if status in ENDED and self.state.crm_sync == CrmSync.PENDING:
                # Never told, nothing to tell: keeps CrmSync="pending" meaning "still to do".
                self.state.crm_sync = CrmSync.SKIPPED
                updates.append(sa.CRM_SYNC.value_set(CrmSync.SKIPPED.value))
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
        request = self.state.request
        body: dict[str, Any] = {
            "payment_id": self.state.id,
            # The tenant: consumers keep two clients' same-named customers apart by it.
            "client_id": self.state.client_id,
            "status": (status or self.state.status).value,
            "amount": request.amount,
            "currency": request.currency,
            "customer_id": request.customer_id,
            "merchant_id": request.merchant_id,
        }
        if kind in (EventKind.REJECTED, EventKind.RAW) and self.state.fraud is not None:
            body["fraud_score"] = self.state.fraud.score
        if self.state.failure_reason and kind == EventKind.FAILED:
            body["failure_reason"] = self.state.failure_reason
        body.update(data or {})
        the_id = event_id(self.state.id, kind, reference)
        if the_id not in self.state.event_sequences:
            self.state.event_sequence += 1
            self.state.event_sequences[the_id] = self.state.event_sequence
        body["sequence"] = self.state.event_sequences[the_id]
        return PaymentEvent(
            id=the_id,
            kind=kind,
            payment_id=self.state.id,
            time=workflow.now(),
            data=body,
            client_id=self.state.client_id,
        )

    async def publish(
        self,
        kind: EventKind,
        reference: str = "",
        data: dict[str, Any] | None = None,
        local: bool = False,
    ) -> None:
        the_id = event_id(self.state.id, kind, reference)
        event = self.posted_events.pop(the_id, None) or self.event(kind, reference, data)
        await self.run_step(KafkaActivities.publish_payment_event, event, _KAFKA, local=local)

    async def post(
        self,
        transaction: entries.LedgerTransaction,
        amount: int,
        kind: EventKind,
        reference: str = "",
        data: dict[str, Any] | None = None,
        local: bool = False,
    ) -> None:
        request = self.state.request
        event = None
        if kind.from_ledger or kind == EventKind.CANCELED:
            event = self.event(kind, reference, data, status=self.status_after(kind, amount))
            self.posted_events[event.id] = event
        posting = LedgerPosting(
            transaction=transaction.model_copy(
                update={"event_kind": kind, "event_id": event_id(self.state.id, kind, reference)}
            ),
            amount=amount,
            parties=PaymentParties(
                client_id=self.state.client_id,
                customer_id=request.customer_id,
                merchant_id=request.merchant_id,
                currency=request.currency,
            ),
            event=event,
        )
        await self.run_step(LedgerActivities.post_ledger_transaction, posting, _LEDGER, local=local)

    async def run_step(
        self,
        step: Callable[[Any, StepInput], Awaitable[StepResult]],
        arg: StepInput,
        options: _Options,
        *,
        local: bool = False,
    ) -> StepResult:
        """One activity. The short forward steps run as local activities when the payment's
        policy says so; compensations, follow-ups and the CRM stay regular activities (rare,
        or slow and remote: their retries belong on the server)."""
        if local and self.policy.local_activities:
            return await workflow.execute_local_activity_method(step, arg, **options)
        return await workflow.execute_activity_method(step, arg, **options)

    async def capture_in_full(self) -> None:
        """`automatic` capture: everything the acquirer authorized (a partial approval's
        part), posted to the ledger as the payment's capture."""
        self.set_status(PaymentStatus.PROCESSING, "the acquirer's capture")
        asked = self.capture_requested
        captured = await self.capture_at_acquirer(asked.amount_to_capture if asked else None)
        self.acquirer_captured = captured.captured_amount
        await self.release_hold(captured=captured.captured_amount)

    async def post_capture(self) -> None:
        request = self.state.request
        amount = self.acquirer_captured or request.amount
        await self.post(
            entries.payment_transaction(
                self.state.id,
                request.customer_id,
                request.merchant_id,
                amount,
                request.currency,
                self.account_tenant,
            ),
            amount,
            EventKind.CONFIRMED,
            data={"amount_captured": amount} if self.acquirer_captured else None,
            local=True,
        )
        self.state.ledger_posted = True
        self.state.captured = amount

    async def notify_crm(
        self, kind: EventKind, reference: str = "", details: dict[str, Any] | None = None
    ) -> None:
        if not self.policy.crm_targets:
            return
        request = self.state.request
        notification = CrmNotification(
            event_id=event_id(self.state.id, kind, reference),
            event_kind=kind,
            payment_id=self.state.id,
            status=self.state.status.value,
            amount=request.amount,
            currency=request.currency,
            customer_id=request.customer_id,
            merchant_id=request.merchant_id,
            salesforce_opportunity_id=request.salesforce_opportunity_id,
            hubspot_deal_id=request.hubspot_deal_id,
            occurred_at=workflow.now(),
            details=details or {},
        )
        self.describe_waiting(
            f"the CRM ({', '.join(self.policy.crm_targets)}) to accept {kind.ce_type}"
        )
        results = await asyncio.gather(
            *(
                workflow.execute_activity_method(
                    CrmActivities.notify_crm, args=[CrmTarget(target), notification], **_CRM
                )
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
                _failure_message(f) if isinstance(f, STEP_FAILURES) else str(f) for f in failures
            )
        elif self.state.crm_sync != CrmSync.FAILED:
            self.state.crm_sync = CrmSync.SYNCED
        workflow.upsert_search_attributes([sa.CRM_SYNC.value_set(self.state.crm_sync.value)])
        self.describe_waiting("")

    async def record_outcome(self) -> None:
        request = self.state.request
        outcome = PaymentOutcome(
            payment_id=self.state.id,
            parties=PaymentParties(
                client_id=self.state.client_id,
                customer_id=request.customer_id,
                merchant_id=request.merchant_id,
                currency=request.currency,
            ),
            amount=request.amount,
            status=self.state.status,
            summary=self.state.model_dump(mode="json"),
        )
        await workflow.execute_activity_method(
            LedgerActivities.record_payment_outcome, outcome, **_LEDGER
        )


_OPERATOR_CANCEL = "workflow canceled by an operator"

_REFUND_OUTCOME_UNKNOWN = (
    "The acquirer's outcome of refund {refund} ({amount} {currency} minor units) is unknown: the "
    "money may have moved. Ask the acquirer for the refund (our reference is in the payment's "
    'history). Then send resolve_attention {{"action":"retry","operator":"<you>"}} if it refunded '
    "or the customer should still be refunded (the same reference: the acquirer never refunds "
    'twice; the ledger then records it); or {{"action":"manual","operator":"<you>","reason":'
    '"<what the acquirer said>"}} only if it did not refund: the refund is then failed '
    "(docs/runbook.md, requires_attention)."
)
_REFUNDED_NOT_POSTED = (
    "The acquirer refunded {refund} ({amount} {currency} minor units) but the ledger refused its "
    "posting. Fix the cause (reopen the account, raise its limit) and send resolve_attention "
    '{{"action":"retry","operator":"<you>"}}; or {{"action":"manual","operator":"<you>",'
    '"reason":"<why>"}}: the refund is then posted against suspense:<CCY> instead of the '
    "merchant (docs/runbook.md, requires_attention)."
)
_WHAT_TO_DO = (
    "Fix the cause (reopen the account, raise its limit) and send resolve_attention "
    '{"action":"retry","operator":"<you>"}; or settle it by hand with '
    '{"action":"manual","operator":"<you>","reason":"<why>"}: the reversal is then posted '
    "against suspense:<CCY> instead of the merchant (docs/runbook.md, requires_attention)."
)


def _bounded_decision(decision: ReviewDecision) -> ReviewDecision:
    return ReviewDecision(
        reviewer=clipped_text(decision.reviewer, ID_MAX), note=clipped_text(decision.note)
    )


async def _run_to_completion(
    step: Awaitable[None], on_cancel: Callable[[], None] | None = None
) -> None:
    """Run `step` to its end even if the workflow is canceled while it runs, then let the
    cancellation through. Its activities are never abandoned half way, so the code that reacts
    to the cancellation knows whether the step took effect. `on_cancel` runs as soon as the
    cancellation is seen, before the step ends."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        # The step's own failure is moot now: the cancellation decides what happens next.
        with contextlib.suppress(ActivityError, ApplicationError):
            await task
        raise


def _failure_message(failure: BaseException) -> str:
    cause = failure if isinstance(failure, ApplicationError) else failure.__cause__
    if isinstance(cause, ApplicationError):
        message = f"{cause.type}: {cause.message}" if cause.type else cause.message
    else:
        message = str(cause or failure)
    return clipped_text(message)


def initial_search_attributes(input: PaymentWorkflowInput) -> TypedSearchAttributes:
    """Set at start by the API, so a payment is findable before its first workflow task."""
    request = input.request
    crm = CrmSync.PENDING if input.policy.crm_targets else CrmSync.NOT_CONFIGURED
    return TypedSearchAttributes(
        [
            SearchAttributePair(sa.PAYMENT_STATUS, PaymentStatus.RECEIVED.value),
            SearchAttributePair(sa.CUSTOMER_ID, request.customer_id),
            SearchAttributePair(sa.MERCHANT_ID, request.merchant_id),
            SearchAttributePair(sa.AMOUNT_MINOR, request.amount),
            SearchAttributePair(sa.CURRENCY, request.currency),
            SearchAttributePair(sa.CLIENT_ID, input.client_id),
            SearchAttributePair(sa.CRM_SYNC, crm.value),
        ]
    )


__all__ = ["FailureType", "PaymentWorkflow", "initial_search_attributes"]
