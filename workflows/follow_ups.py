"""How a payment takes its follow-ups: refunds, disputes opened and closed.

Each exists twice under one name: an Update (the REST API, the CLI), whose validator refuses
what the payment cannot honour before it enters the history and whose result is the outcome,
and a signal for operators, whose refusal is recorded on the refund or dispute. Both are judged
by the same rules (domain/follow_ups.py) against the door: what the payment takes right now,
which only narrows within a run. workflows/follow_up_steps.py carries out what was taken.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from domain.bounds import ID_MAX, clipped_text
    from domain.follow_ups import (
        ENDED,
        Door,
        Taking,
        dispute_closed_refusal,
        dispute_opened_refusal,
        refund_by_void_refusal,
        refund_refusal,
    )
    from domain.money import MAX_INT64
    from domain.payment import (
        CancelSignal,
        Dispute,
        DisputeClosedSignal,
        DisputeOpenedSignal,
        DisputeStatus,
        FollowUp,
        FollowUpStatus,
        PaymentStatus,
        Refund,
        RefundSignal,
    )
    from workflows.steps import PaymentSteps, refuse


# Patches (docs/upgrades.md; the saga's are in workflows/payment.py). Signals are judged by
# domain/follow_ups.py (bounded ids and texts, refused once the payment stops taking them:
# recorded failed, never queued for a loop that has ended); histories written before keep the
# rules they were written with (`*_as_before`).
PATCH_FOLLOW_UP_RULES = "follow-up-rules-for-signals"


class TakingFollowUps(PaymentSteps):
    """Mixed into PaymentWorkflow (which sets these in its `__init__`)."""

    # Follow-ups taken and not yet carried out, in arrival order.
    follow_ups: deque[FollowUp]
    # What the payment takes right now: it only narrows, and always before the workflow stops
    # serving what it took.
    door: Door
    door_before_busy: Door
    # Dispute closes carried out in this run (their Updates' callers wait for them).
    closes_done: set[str]

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
            refuse(
                refund_by_void_refusal(
                    self.state,
                    request,
                    capture_requested=self.capture_requested is not None,
                    voiding=self.cancel_requested is not None,
                )
            )
            return
        refuse(refund_refusal(self.state, request, self.current_door()))

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
        if self.patched(PATCH_FOLLOW_UP_RULES):
            self.take_refund(signal, self.door_for_signals())
        else:
            self.take_refund_as_before(signal)

    @workflow.update(name="dispute_opened")
    async def open_dispute(self, request: DisputeOpenedSignal) -> Dispute:
        """The dispute once its funds are held (`open`) or the ledger refused it (`failed`)."""
        dispute = self.take_dispute_opened(request, self.current_door())
        await workflow.wait_condition(lambda: dispute.status != DisputeStatus.PENDING)
        return dispute

    @open_dispute.validator
    def _dispute_allowed(self, request: DisputeOpenedSignal) -> None:
        refuse(dispute_opened_refusal(self.state, request, self.current_door()))

    @workflow.signal
    def dispute_opened(self, signal: DisputeOpenedSignal) -> None:
        if self.patched(PATCH_FOLLOW_UP_RULES):
            self.take_dispute_opened(signal, self.door_for_signals())
        else:
            self.take_dispute_opened_as_before(signal)

    @workflow.update(name="dispute_closed")
    async def close_dispute(self, request: DisputeClosedSignal) -> Dispute:
        """The dispute once closed (`won`/`lost`), or still `open` with the ledger's refusal as
        its `failure_reason`."""
        dispute = self.find_dispute(request.dispute_id)
        if dispute.status == DisputeStatus.OPEN or dispute.status == DisputeStatus.PENDING:
            self.take_dispute_closed(request)
            await workflow.wait_condition(
                lambda: (
                    dispute.status in (DisputeStatus.WON, DisputeStatus.LOST)
                    or request.dispute_id in self.closes_done
                )
            )
        return dispute

    @close_dispute.validator
    def _close_allowed(self, request: DisputeClosedSignal) -> None:
        refuse(dispute_closed_refusal(self.state, request, self.current_door()))

    @workflow.signal
    def dispute_closed(self, signal: DisputeClosedSignal) -> None:
        if self.patched(PATCH_FOLLOW_UP_RULES):
            refused = dispute_closed_refusal(self.state, signal, self.door_for_signals())
            if refused is not None:
                workflow.logger.warning("dispute_closed signal refused: %s", refused.message)
                return
        dispute = next((d for d in self.state.disputes if d.id == signal.dispute_id), None)
        if dispute is None or dispute.status not in (DisputeStatus.PENDING, DisputeStatus.OPEN):
            return
        self.take_dispute_closed(signal)

    # ── the door: what the payment takes ─────────────────────────────────────────────────
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

    # ── taking: recorded, and queued or refused ─────────────────────────────────────────────
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
            dispute.status, dispute.failure_reason = DisputeStatus.FAILED, refused.message
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

    def fail_pending(self, why: str) -> None:
        """Record every refund and dispute still pending as failed, with `why`."""
        for refund in self.state.refunds:
            if refund.status == FollowUpStatus.PENDING:
                refund.status, refund.failure_reason = FollowUpStatus.FAILED, why
        for dispute in self.state.disputes:
            if dispute.status == DisputeStatus.PENDING:
                dispute.status, dispute.failure_reason = DisputeStatus.FAILED, why

    def fail_what_was_never_carried_out(self) -> None:
        """The payment is ending: anything still pending (a signal queued after its loop ended,
        under rules older than PATCH_FOLLOW_UP_RULES) is recorded failed, never left pending."""
        self.fail_pending("the payment stopped taking follow-ups before this was carried out")
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
            dispute.status, dispute.failure_reason = DisputeStatus.FAILED, problem
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

    def find_dispute(self, dispute_id: str) -> Dispute:
        return next(d for d in self.state.disputes if d.id == dispute_id)
