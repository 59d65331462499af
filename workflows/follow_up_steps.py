"""How a payment carries out the follow-ups it took (workflows/follow_ups.py), in arrival
order, until its dispute window closes: each refund at the acquirer (when there is one) and in
the ledger, each dispute held and released in the ledger, then its event and the CRM. A refund
whose money may have moved and that cannot be recorded waits for an operator
(workflows/attention.py). A long history continues as new, carrying what is still queued."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from domain import ledger as entries
    from domain.amounts import Movement
    from domain.bounds import TEXT_MAX, clipped_text
    from domain.events import EventKind
    from domain.follow_ups import Taking
    from domain.payment import (
        AttentionResolution,
        DisputeClosedSignal,
        DisputeOpenedSignal,
        DisputeStatus,
        FollowUp,
        FollowUpStatus,
        PaymentWorkflowInput,
        Refund,
        RefundSignal,
    )
    from workflows.acquirer_steps import ACQUIRER_OUTCOME_UNRESOLVED
    from workflows.attention import NeedsAttention
    from workflows.compensations import FailedUndo, run_to_completion
    from workflows.follow_ups import TakingFollowUps
    from workflows.steps import STEP_FAILURES, failure_message

# Before continuing as new, carry out every accepted follow-up (an Update's caller waits for it).
PATCH_DRAIN_BEFORE_CONTINUE = "drain-follow-ups-before-continue-as-new"
# A refund whose money may have moved at the acquirer (its outcome unresolved past the bound,
# or refunded there and then refused by the ledger) waits for an operator in
# `requires_attention`; before, it was recorded `failed` while the customer may have been paid.
PATCH_REFUND_NEEDS_ATTENTION = "refund-that-may-have-moved-needs-attention"

# The FailedUndo name of a refund waiting for an operator (followed by the refund's id).
REFUND_AT_ACQUIRER = "refund at the acquirer"
POST_ACQUIRER_REFUND = "post in the ledger the refund the acquirer made"

REFUND_OUTCOME_UNKNOWN = (
    "The acquirer's outcome of refund {refund} ({amount} {currency} minor units) is unknown: the "
    "money may have moved. Ask the acquirer for the refund (our reference is in the payment's "
    'history). Then send resolve_attention {{"action":"retry","operator":"<you>"}} if it refunded '
    "or the customer should still be refunded (the same reference: the acquirer never refunds "
    'twice; the ledger then records it); or {{"action":"manual","operator":"<you>","reason":'
    '"<what the acquirer said>"}} only if it did not refund: the refund is then failed '
    "(docs/runbook.md, requires_attention)."
)
REFUNDED_NOT_POSTED = (
    "The acquirer refunded {refund} ({amount} {currency} minor units) but the ledger refused its "
    "posting. Fix the cause (reopen the account, raise its limit) and send resolve_attention "
    '{{"action":"retry","operator":"<you>"}}; or {{"action":"manual","operator":"<you>",'
    '"reason":"<why>"}}: the refund is then posted against suspense:<CCY> instead of the '
    "merchant (docs/runbook.md, requires_attention)."
)


class FollowUpSteps(TakingFollowUps, NeedsAttention):
    """Mixed into PaymentWorkflow."""

    input: PaymentWorkflowInput

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
                await run_to_completion(
                    self.run_follow_up(self.follow_ups.popleft()), on_cancel=self.shut_for_cancel
                )
                await self.continue_as_new_if_history_is_long()
            await self.continue_as_new_if_history_is_long()

    def history_is_long(self) -> bool:
        info = workflow.info()
        return info.is_continue_as_new_suggested() or (
            info.get_current_history_length() > self.policy.continue_as_new_after_events
        )

    def holds_disputed_funds(self) -> bool:
        return any(
            d.status in (DisputeStatus.PENDING, DisputeStatus.OPEN) for d in self.state.disputes
        )

    async def continue_as_new_if_history_is_long(self) -> None:
        """Many refunds or disputes would grow the history without bound: carry the state into
        a fresh run. Updates are refused meanwhile (their callers retry and reach the new run);
        what was queued is carried out here first, since an Update's caller waits for it.
        Signals that arrive meanwhile are carried to the new run."""
        if not self.history_is_long():
            return
        if self.patched(PATCH_DRAIN_BEFORE_CONTINUE):
            self.shut_the_door(Taking.BUSY, "")
            # Only what is queued now (Updates' callers wait for it): signals arriving during
            # the drain are carried, so a steady stream of them cannot hold the run open.
            for _ in range(len(self.follow_ups)):
                await run_to_completion(
                    self.run_follow_up(self.follow_ups.popleft()), on_cancel=self.shut_for_cancel
                )
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            self.input.model_copy(
                update={"carried_state": self.state, "pending_follow_ups": list(self.follow_ups)}
            )
        )

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
            if not (may_have_moved and self.patched(PATCH_REFUND_NEEDS_ATTENTION)):
                # Refused before any money moved: by the acquirer, or by the ledger (it
                # re-checks refunded + disputed <= captured itself) with no acquirer involved.
                refund.status = FollowUpStatus.FAILED
                refund.failure_reason = failure_message(failure)
                return
            await self.refund_needs_attention(refund, failure, refunded_at_acquirer)
            if refund.status != FollowUpStatus.SUCCEEDED:
                return
        refund.status = FollowUpStatus.SUCCEEDED
        self.state.record(Movement.REFUND, refund.amount)
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
        if description:
            transaction = entries.manual_refund_transaction(
                self.state.id, refund.id, request.customer_id, refund.amount,
                request.currency, description, self.account_tenant,
            )  # fmt: skip
            data["manual_resolution"] = description
        else:
            transaction = entries.refund_transaction(
                self.state.id, refund.id, self.parties, refund.amount
            )
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
            REFUNDED_NOT_POSTED if refunded_at_acquirer else REFUND_OUTCOME_UNKNOWN
        ).format(refund=refund.id, amount=refund.amount, currency=self.state.request.currency)
        self.require_attention(self.state.status, what_to_do)
        await self.await_resolution()
        del self.refund_settlements[refund.id]

    async def post_dispute_opened(self, signal: DisputeOpenedSignal) -> None:
        dispute = self.find_dispute(signal.dispute_id)
        data = {
            "dispute_id": dispute.id,
            "amount": dispute.amount,
            "reason_code": dispute.reason_code,
        }
        try:
            await self.post(
                entries.dispute_opened_transaction(
                    self.state.id, dispute.id, self.parties, dispute.amount
                ),
                dispute.amount,
                EventKind.DISPUTE_OPENED,
                reference=dispute.id,
                data=data,
            )
        except STEP_FAILURES as failure:
            dispute.status, dispute.failure_reason = DisputeStatus.FAILED, failure_message(failure)
            return
        dispute.status = DisputeStatus.OPEN
        self.state.record(Movement.DISPUTE_OPENED, dispute.amount)
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
        if dispute.status != DisputeStatus.OPEN:
            return  # its opening failed: there is nothing held to release
        won = signal.outcome == "won"
        kind = EventKind.DISPUTE_WON if won else EventKind.DISPUTE_LOST
        fee = 0 if won else self.policy.chargeback_fee_minor
        transaction = (
            entries.dispute_won_transaction(self.state.id, dispute.id, self.parties, dispute.amount)
            if won
            else entries.dispute_lost_transaction(
                self.state.id, dispute.id, self.parties, dispute.amount, fee
            )
        )
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
            dispute.failure_reason = failure_message(failure)
            return
        dispute.status = DisputeStatus(signal.outcome)
        dispute.failure_reason = None
        self.state.record(Movement.DISPUTE_WON if won else Movement.DISPUTE_LOST, dispute.amount)
        self.set_status(
            self.status_from_amounts(), f"publishing dispute {dispute.id} {signal.outcome}"
        )
        await self.publish(kind, reference=dispute.id, data=data)
        await self.notify_crm(kind, reference=dispute.id, details=data)
