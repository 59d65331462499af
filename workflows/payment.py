"""PaymentWorkflow: one durable saga per payment.

    assess (validate + fraud score) ─┬─ reject ≥ 0.95 ─────────────────────────► rejected
                                     ├─ review band: wait approve / decline / timeout
                                     ▼
    publish payments.raw → post ledger transaction → publish payments.confirmed → notify CRM
                                     ▼
    succeeded: serve refunds and disputes (signals) until the dispute window closes

A non-retryable failure or a cancellation before confirmation unwinds the compensations in
reverse: reverse the posting, void payments.raw (payments.failed / payments.canceled), tell the CRM.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypedDict, TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributePair, TypedSearchAttributes
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.crm import CrmActivities, CrmNotification, CrmTarget
    from activities.fraud import FraudActivities, FraudCheck
    from activities.kafka import KafkaActivities
    from activities.ledger import (
        LedgerActivities,
        LedgerPosting,
        PaymentOutcome,
        PaymentParties,
    )
    from domain import ledger as entries
    from domain.errors import NON_RETRYABLE, FailureType
    from domain.events import EventKind, PaymentEvent, event_id
    from domain.payment import (
        CancelSignal,
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
        ReviewDecision,
        StatusChange,
        status_from_amounts,
    )
    from workflows import search_attributes as sa
    from workflows.compensations import Compensations

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


class PaymentCanceled(Exception):
    """A `cancel` signal arrived before the ledger posting."""


@workflow.defn(name="PaymentWorkflow")
class PaymentWorkflow:
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

    # ── the saga ──────────────────────────────────────────────────────────────────────────
    @workflow.run
    async def run(self, input: PaymentWorkflowInput) -> PaymentState:
        try:
            if input.carried_state is None and not await self.take_payment():
                await self.record_outcome()
                return self.state
            await self.serve_follow_ups_until_window_closes()
        except (asyncio.CancelledError, ActivityError) as stop:
            if not is_cancelled_exception(stop):
                raise
            # An operator pressed Cancel in the Temporal UI. Whatever was under way has run to
            # its end or been compensated by now; a succeeded payment keeps its money and only
            # loses its follow-up window.
            await self.close_after_operator_cancel()
            raise
        await self.record_outcome()
        return self.state

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
        try:
            self.set_status(PaymentStatus.PROCESSING, "publishing payments.raw to Kafka")
            saga.add("void payments.raw", self.void_raw_event)
            await _run_to_completion(self.publish(EventKind.RAW, local=True))

            self.stop_if_canceled()
            self.posting_started = True
            self.set_status(PaymentStatus.PROCESSING, "posting the ledger transaction")
            saga.add("reverse the ledger posting", self.reverse_posting)
            await _run_to_completion(self.post_capture())

            self.set_status(PaymentStatus.PROCESSING, "publishing payments.confirmed to Kafka")
            await _run_to_completion(self.publish(EventKind.CONFIRMED, local=True))
            saga.clear()
        except PaymentCanceled:
            await saga.unwind()
            self.set_status(PaymentStatus.CANCELED, "", note=self.cancel_note())
            return False
        except STEP_FAILURES as failure:
            if is_cancelled_exception(failure):
                await self.compensate_operator_cancel(saga)
                raise
            self.state.failure_reason = _failure_message(failure)
            await saga.unwind()
            self.set_status(PaymentStatus.FAILED, "", note=self.state.failure_reason)
            return False
        except asyncio.CancelledError:
            await self.compensate_operator_cancel(saga)
            raise

        self.set_status(PaymentStatus.SUCCEEDED, "notifying the CRM")
        await self.notify_crm(EventKind.CONFIRMED)
        return True

    async def compensate_operator_cancel(self, saga: Compensations) -> None:
        """An operator pressed Cancel in the Temporal UI before the payment was confirmed:
        reverse the posting, void payments.raw with payments.canceled, then tell the CRM."""
        self.cancel_requested = CancelSignal(reason=_OPERATOR_CANCEL)
        await saga.unwind()
        self.set_status(PaymentStatus.CANCELED, "", note=self.cancel_note())
        if self.posting_reversed:
            await self.notify_crm(EventKind.CANCELED)

    async def close_after_operator_cancel(self) -> None:
        if self.state.status in (PaymentStatus.RECEIVED, PaymentStatus.REQUIRES_REVIEW):
            # Canceled while being assessed or reviewed: consumers still hear that it ended.
            self.cancel_requested = CancelSignal(reason=_OPERATOR_CANCEL)
            await _run_to_completion(
                self.end_without_capture(PaymentStatus.CANCELED, EventKind.CANCELED, "")
            )
        why = "the payment's workflow was canceled before this was carried out"
        for refund in self.state.refunds:
            if refund.status == FollowUpStatus.PENDING:
                refund.status, refund.failure_reason = FollowUpStatus.FAILED, why
        for dispute in self.state.disputes:
            if dispute.status == "pending":
                dispute.status, dispute.failure_reason = "failed", why
        self.follow_ups.clear()
        await self.record_outcome()

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
            return  # the capture never committed (the posting ran to completion: we know)
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
        still open then keeps the workflow until it is closed: its funds are held."""
        closes_at = self.state.created_at + timedelta(seconds=self.policy.dispute_window_seconds)
        while True:
            remaining = (closes_at - workflow.now()).total_seconds()
            if remaining > 0:
                self.describe_waiting(
                    f"refunds or disputes until the window closes at {closes_at:%Y-%m-%d %H:%M} UTC"
                )
            elif self.follow_ups or self.holds_disputed_funds():
                self.describe_waiting("the open disputes to close (the dispute window has closed)")
            else:
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
                # the workflow is canceled meanwhile; the cancellation takes effect after it.
                await _run_to_completion(self.run_follow_up(self.follow_ups.popleft()))
                await self.continue_as_new_if_history_is_long()
            await self.continue_as_new_if_history_is_long()

    def history_is_long(self) -> bool:
        info = workflow.info()
        return info.is_continue_as_new_suggested() or (
            info.get_current_history_length() > self.policy.continue_as_new_after_events
        )

    def holds_disputed_funds(self) -> bool:
        return any(d.status in ("pending", "open") for d in self.state.disputes)

    async def continue_as_new_if_history_is_long(self) -> None:
        """Many refunds or disputes would grow the history without bound: carry the state and
        the follow-ups not yet run into a fresh run. Signals that arrive meanwhile are either
        handled before the new run starts (and carried) or delivered to the new run."""
        if not self.history_is_long():
            return
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
        request = self.state.request
        self.describe_waiting(f"posting refund {refund.id}")
        data = {"refund_id": refund.id, "amount": refund.amount}
        try:
            await self.post(
                entries.refund_transaction(
                    self.state.id, refund.id, request.customer_id, request.merchant_id,
                    refund.amount, request.currency, self.account_tenant,
                ),
                refund.amount,
                EventKind.REFUNDED,
                reference=refund.id,
                data=data,
            )  # fmt: skip
        except STEP_FAILURES as failure:
            # The ledger refused it (it re-checks refunded + disputed <= captured itself).
            refund.status, refund.failure_reason = FollowUpStatus.FAILED, _failure_message(failure)
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

    # ── signals and queries ───────────────────────────────────────────────────────────────
    @workflow.signal
    def approve(self, decision: ReviewDecision) -> None:
        if self.state.status == PaymentStatus.REQUIRES_REVIEW and self.review is None:
            self.review, self.review_approved = decision, True
            self.state.review = decision

    @workflow.signal
    def decline(self, decision: ReviewDecision) -> None:
        if self.state.status == PaymentStatus.REQUIRES_REVIEW and self.review is None:
            self.review, self.review_approved = decision, False
            self.state.review = decision

    @workflow.signal
    def cancel(self, signal: CancelSignal) -> None:
        if self.posting_started or self.state.status in _ENDED:
            self.state.cancel_refused = (
                "the payment is already posted to the ledger; refund it instead"
                if self.posting_started
                else f"the payment is already {self.state.status}"
            )
            return
        self.cancel_requested = signal

    @workflow.signal
    def refund(self, signal: RefundSignal) -> None:
        if any(r.id == signal.refund_id for r in self.state.refunds):
            return  # the same refund id twice is one refund
        amount = signal.amount if signal.amount is not None else self.state.refundable
        refund = Refund(
            id=signal.refund_id,
            amount=max(amount, 0),
            reason=signal.reason,
            created_at=workflow.now(),
        )
        problem = self.follow_up_problem(amount)
        if problem:
            refund.status, refund.failure_reason = FollowUpStatus.FAILED, problem
        self.state.refunds.append(refund)
        if not problem:
            self.follow_ups.append(signal.model_copy(update={"amount": amount}))

    @workflow.signal
    def dispute_opened(self, signal: DisputeOpenedSignal) -> None:
        if any(d.id == signal.dispute_id for d in self.state.disputes):
            return
        amount = signal.amount if signal.amount is not None else self.state.refundable
        dispute = Dispute(
            id=signal.dispute_id,
            amount=max(amount, 0),
            reason_code=signal.reason_code,
            network_reference=signal.network_reference,
            created_at=workflow.now(),
        )
        problem = self.follow_up_problem(amount)
        if problem:
            dispute.status, dispute.failure_reason = "failed", problem
        self.state.disputes.append(dispute)
        if not problem:
            self.follow_ups.append(signal.model_copy(update={"amount": amount}))

    @workflow.signal
    def dispute_closed(self, signal: DisputeClosedSignal) -> None:
        dispute = next((d for d in self.state.disputes if d.id == signal.dispute_id), None)
        if dispute is None or dispute.status not in ("pending", "open"):
            return
        if any(
            isinstance(f, DisputeClosedSignal) and f.dispute_id == signal.dispute_id
            for f in self.follow_ups
        ):
            return
        self.follow_ups.append(signal)

    @workflow.query(name="state")
    def current_state(self) -> PaymentState:
        return self.state

    # ── helpers ───────────────────────────────────────────────────────────────────────────
    def follow_up_problem(self, amount: int) -> str | None:
        if self.state.status in _ENDED or not self.state.ledger_posted:
            return f"the payment is {self.state.status}: nothing captured to return"
        if amount <= 0:
            return "nothing left to return: the payment is fully refunded or disputed"
        if amount > self.state.refundable:
            return f"amount {amount} exceeds the {self.state.refundable} still refundable"
        return None

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
            if status in _ENDED and self.state.crm_sync == CrmSync.PENDING:
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
        self, kind: EventKind, reference: str = "", data: dict[str, Any] | None = None
    ) -> PaymentEvent:
        request = self.state.request
        body: dict[str, Any] = {
            "payment_id": self.state.id,
            # The tenant: consumers keep two clients' same-named customers apart by it.
            "client_id": self.state.client_id,
            "status": self.state.status.value,
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
        )

    async def publish(
        self,
        kind: EventKind,
        reference: str = "",
        data: dict[str, Any] | None = None,
        local: bool = False,
    ) -> None:
        await self.run_step(
            KafkaActivities.publish_payment_event,
            self.event(kind, reference, data),
            _KAFKA,
            local=local,
        )

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
            event=self.event(kind, reference, data)
            if kind.from_ledger or kind == EventKind.CANCELED
            else None,
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

    async def post_capture(self) -> None:
        request = self.state.request
        await self.post(
            entries.payment_transaction(
                self.state.id,
                request.customer_id,
                request.merchant_id,
                request.amount,
                request.currency,
                self.account_tenant,
            ),
            request.amount,
            EventKind.CONFIRMED,
            local=True,
        )
        self.state.ledger_posted = True
        self.state.captured = request.amount

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

_ENDED = frozenset(
    {PaymentStatus.REJECTED, PaymentStatus.DECLINED, PaymentStatus.CANCELED, PaymentStatus.FAILED}
)


async def _run_to_completion(step: Awaitable[None]) -> None:
    """Run `step` to its end even if the workflow is canceled while it runs, then let the
    cancellation through. Its activities are never abandoned half way, so the code that reacts
    to the cancellation knows whether the step took effect."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        # The step's own failure is moot now: the cancellation decides what happens next.
        with contextlib.suppress(ActivityError, ApplicationError):
            await task
        raise


def _failure_message(failure: BaseException) -> str:
    cause = failure if isinstance(failure, ApplicationError) else failure.__cause__
    if isinstance(cause, ApplicationError):
        return f"{cause.type}: {cause.message}" if cause.type else cause.message
    return str(cause or failure)


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
