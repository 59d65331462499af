"""PaymentWorkflow: one durable saga per payment. This module tells its story; the parts it
builds on each have their own: the follow-ups it takes (workflows/follow_ups.py) and carries out
(workflows/follow_up_steps.py), the operator's attention (workflows/attention.py), the acquirer's
steps (workflows/acquirer_steps.py), the shared steps (workflows/steps.py) and the undo list
(workflows/compensations.py).

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

Over 400 lines: the story, its compensations and the handlers that steer it (review, cancel,
capture, void) read together, top to bottom.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import SearchAttributePair, SearchAttributeUpdate, TypedSearchAttributes
from temporalio.exceptions import ActivityError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.fraud import FraudActivities, FraudCheck
    from domain import ledger as entries
    from domain.bounds import ID_MAX, TEXT_MAX, clipped_text
    from domain.errors import FailureType
    from domain.events import EventKind, PaymentEvent
    from domain.follow_ups import (
        ENDED,
        Door,
        Taking,
        cancel_refusal,
        capture_refusal,
        not_cancelable_reason,
        void_refusal,
    )
    from domain.payment import (
        AttentionResolution,
        CancelSignal,
        CaptureSignal,
        CrmSync,
        FollowUp,
        FraudAssessment,
        PaymentState,
        PaymentStatus,
        PaymentWorkflowInput,
        ReviewDecision,
        StatusChange,
        VoidSignal,
    )
    from ledger.activity import LedgerActivities
    from workflows import search_attributes as sa
    from workflows.acquirer_steps import RELEASE_AT_ACQUIRER, AcquirerSteps
    from workflows.compensations import Compensations, FailedUndo, run_to_completion
    from workflows.follow_up_steps import FollowUpSteps
    from workflows.local_first import PATCH_LOCAL_FIRST
    from workflows.steps import FRAUD, LEDGER, STEP_FAILURES, failure_message, refuse

# Patches of the saga (docs/upgrades.md; the follow-ups' are in workflows/follow_ups.py and
# workflows/follow_up_steps.py): payments whose history was written before keep issuing the
# commands they recorded; new payments, and older ones reaching one of these points for the
# first time, take the new branch.
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

# Every patch above whose call follows a local activity is decided here instead, once, in the
# run's first activation (before any command), and new payments take all their new branches.
# A patch call right after a local activity returns is not at a fixed point of the history:
# the workflow task that records the activity's marker need not be the one in which the code
# after it runs (a task completed while the activity ran: a query, a heartbeat), and on replay
# the marker is found, and `patched()` answered, by workflow task. Found by the simulation's
# faults profile with the acquirer (seed 2): "Non-deprecated patch marker ... acquirer-authorize-
# capture" after a worker restart. Older payments keep asking each patch where they did.
# Patches added since are asked right after it, in the same first activation
# (PATCH_LOCAL_FIRST, workflows/local_first.py).
PATCH_DECIDED_AT_START = "patches-decided-at-start"
# A payment that ends without capture (rejected, declined, canceled before `payments.raw`) asks
# the ledger first and reverses what it holds: the forward path's local activities (score,
# payments.raw, the capture posting) can all run in one workflow task, and a worker killed
# before that task completed leaves the posting committed and no marker; the next attempt,
# meeting a cancel in its first activation (or a score that now counts the lost capture), ended
# `canceled` before arming REVERSE_POSTING and left the money captured (the faults simulation,
# seed 1). Decided at the start of new runs (asked right after PATCH_DECIDED_AT_START).
PATCH_END_ASKS_THE_LEDGER = "end-without-capture-asks-the-ledger"

REVERSE_POSTING = "reverse the ledger posting"
VOID_RAW = "void payments.raw"


class PaymentCanceled(Exception):
    """A `cancel` arrived before the ledger posting."""


@workflow.defn(name="PaymentWorkflow")
class PaymentWorkflow(FollowUpSteps, AcquirerSteps):
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
        # PATCH_DECIDED_AT_START, asked first thing in `run`.
        self.decided_at_start = False
        self.local_first_decided: bool | None = None
        # PATCH_END_ASKS_THE_LEDGER, asked right after PATCH_DECIDED_AT_START.
        self.end_asks_the_ledger = False
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
        self.held_search_attributes: list[SearchAttributeUpdate[Any]] = []

    # ── the saga ──────────────────────────────────────────────────────────────────────────
    @workflow.run
    async def run(self, input: PaymentWorkflowInput) -> PaymentState:
        self.decided_at_start = self.patched(PATCH_DECIDED_AT_START)
        if self.decided_at_start:
            self.local_first_decided = self.patched(PATCH_LOCAL_FIRST)
            self.end_asks_the_ledger = self.patched(PATCH_END_ASKS_THE_LEDGER)
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
                await run_to_completion(self.authorize_at_acquirer())
                if self.declined:
                    saga.clear()  # nothing is held
                    await self.end_declined()
                    return False
                await run_to_completion(self.post_hold())
            self.set_status(PaymentStatus.PROCESSING, "publishing payments.raw to Kafka")
            saga.add(VOID_RAW, self.void_raw_event)
            await run_to_completion(self.publish(EventKind.RAW, local=True))
            if self.decided_at_start or self.patched(PATCH_REVERSAL_ASKS_THE_LEDGER):
                self.reversal_asks_the_ledger = True
                saga.add(REVERSE_POSTING, self.reverse_posting)

            if through_acquirer and self.manual_capture:
                await self.await_capture()
            self.stop_if_canceled()
            self.posting_started = True
            if through_acquirer:
                await run_to_completion(self.capture_in_full())
            self.set_status(PaymentStatus.PROCESSING, "posting the ledger transaction")
            if not self.reversal_asks_the_ledger:
                saga.add(REVERSE_POSTING, self.reverse_posting)
            await run_to_completion(self.post_capture())

            self.set_status(PaymentStatus.PROCESSING, "publishing payments.confirmed to Kafka")
            await run_to_completion(self.publish(EventKind.CONFIRMED, local=True))
            saga.clear()
        except PaymentCanceled:
            await self.undo(saga, ends_as=PaymentStatus.CANCELED)
            self.set_status(PaymentStatus.CANCELED, "", note=self.cancel_note())
            return False
        except STEP_FAILURES as failure:
            if is_cancelled_exception(failure):
                await self.compensate_operator_cancel(saga)
                raise
            self.state.failure_reason = failure_message(failure)
            await self.undo(saga, ends_as=PaymentStatus.FAILED)
            self.set_status(PaymentStatus.FAILED, "", note=self.state.failure_reason)
            return False
        except asyncio.CancelledError:
            await self.compensate_operator_cancel(saga)
            raise

        self.set_status(PaymentStatus.SUCCEEDED, "notifying the CRM")
        self.open_the_door()
        if self.decided_at_start or self.patched(PATCH_CRM_STEP_OUTLIVES_CANCEL):
            await run_to_completion(
                self.notify_crm(EventKind.CONFIRMED, local_first=True),
                on_cancel=self.shut_for_cancel,
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
            keep_going=lambda: (
                self.decided_at_start or self.patched(PATCH_UNDO_FAILURE_NEEDS_ATTENTION)
            )
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
            await run_to_completion(
                self.end_without_capture(PaymentStatus.CANCELED, EventKind.CANCELED, "")
            )
        self.shut_for_cancel()
        if (self.follow_ups or self.holds_disputed_funds()) and self.patched(
            PATCH_CANCEL_FINISHES_FOLLOW_UPS
        ):
            await self.finish_follow_ups_after_cancel()
        else:
            self.fail_pending("the payment's workflow was canceled before this was carried out")
            self.follow_ups.clear()
        await self.finish()

    async def assess(self) -> FraudAssessment:
        self.set_status(PaymentStatus.RECEIVED, "validating and scoring the payment for fraud")
        check = FraudCheck(client_id=self.state.client_id, request=self.state.request)
        assessment = await self.run_step(FraudActivities.assess_payment, check, FRAUD, local=True)
        self.state.fraud = assessment
        score = sa.FRAUD_SCORE.value_set(assessment.score)
        if self.policy.revision >= 1:
            # Every path from here sets a status at once: one upsert (one visibility write) for
            # both, in the same workflow task.
            self.held_search_attributes.append(score)
        else:
            workflow.upsert_search_attributes([score])
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
        if self.end_asks_the_ledger and await self.reverse_a_lost_capture():
            # The ledger held a capture this run never posted (a lost workflow task's): it is
            # reversed, and a reversed payment ends canceled (the ledger says so).
            if status != PaymentStatus.CANCELED:
                why = f"{why}; a capture posted by a lost attempt was reversed"
            status, kind = PaymentStatus.CANCELED, EventKind.CANCELED
        self.set_status(status, f"publishing payments.{kind.value}", note=why)
        await run_to_completion(self.publish(kind))
        self.set_status(status, "", note=why)

    # ── compensations ─────────────────────────────────────────────────────────────────────
    async def reverse_a_lost_capture(self) -> bool:
        """PATCH_END_ASKS_THE_LEDGER: before a payment ends without capture, reverse whatever
        capture the ledger holds for it (the ledger's truth, not this run's memory), as the
        saga's own compensation does. True if a reversal was posted."""
        self.reversal_asks_the_ledger = True
        saga = Compensations()
        saga.add(REVERSE_POSTING, self.reverse_posting)
        await self.undo(saga, ends_as=PaymentStatus.CANCELED)
        return self.posting_reversed

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
                LedgerActivities.captured_in_ledger, self.state.id, LEDGER, local=True
            )
            if not captured:
                return
            self.state.ledger_posted, self.state.captured = True, captured
        await self.post(
            entries.reversal_transaction(self.state.id, self.parties, self.state.captured),
            self.state.captured,
            EventKind.CANCELED,
            data={"status": PaymentStatus.CANCELED.value},
        )
        self.state.captured = 0
        self.state.ledger_posted = False
        self.posting_reversed = True

    async def held_in_ledger(self) -> int:
        """What the ledger holds for this payment's authorization (0 once released)."""
        held: int = await self.run_step(
            LedgerActivities.held_in_ledger, self.state.id, LEDGER, local=True
        )
        return held

    async def settle_compensation_by_hand(self, name: str, resolution: AttentionResolution) -> None:
        """`manual` for a compensation that failed for good: a refused reversal is posted
        against the suspense account instead of the merchant; any other step (an event, a
        notification) is settled by the operator's word."""
        if name != REVERSE_POSTING or not self.state.ledger_posted:
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
            entries.payment_transaction(self.state.id, self.parties, amount),
            amount,
            EventKind.CONFIRMED,
            data={"amount_captured": amount} if self.acquirer_captured else None,
            local=True,
        )
        self.state.ledger_posted = True
        self.state.captured = amount

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
        refuse(
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
        refuse(
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
        refuse(void_refusal(self.state, capture_requested=self.capture_requested is not None))

    @workflow.query(name="state")
    def current_state(self) -> PaymentState:
        return self.state

    # ── helpers ───────────────────────────────────────────────────────────────────────────
    def stop_if_canceled(self) -> None:
        if self.cancel_requested is not None:
            raise PaymentCanceled

    def cancel_note(self) -> str:
        return self.cancel_requested.reason if self.cancel_requested else "canceled"


_OPERATOR_CANCEL = "workflow canceled by an operator"


def _bounded_decision(decision: ReviewDecision) -> ReviewDecision:
    return ReviewDecision(
        reviewer=clipped_text(decision.reviewer, ID_MAX), note=clipped_text(decision.note)
    )


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
