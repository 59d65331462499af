"""`requires_attention`: a step that failed for good (a compensation the ledger refused, a
refund whose money may have moved) waits for an operator's `resolve_attention`, a `retry` of
the failed steps or a `manual` settlement, instead of failing the workflow: money is never left
stranded (docs/runbook.md)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from temporalio import workflow
from temporalio.exceptions import is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from domain.bounds import ID_MAX, clipped_text
    from domain.follow_ups import resolution_refusal
    from domain.payment import (
        Attention,
        AttentionResolution,
        PaymentStatus,
        ResolutionRecord,
        UndoFailure,
    )
    from workflows.compensations import FailedUndo, run_to_completion
    from workflows.steps import STEP_FAILURES, PaymentSteps, failure_message, refuse

WHAT_TO_DO = (
    "Fix the cause (reopen the account, raise its limit) and send resolve_attention "
    '{"action":"retry","operator":"<you>"}; or settle it by hand with '
    '{"action":"manual","operator":"<you>","reason":"<why>"}: the reversal is then posted '
    "against suspense:<CCY> instead of the merchant (docs/runbook.md, requires_attention)."
)


class NeedsAttention(PaymentSteps):
    """Mixed into PaymentWorkflow (which sets these in its `__init__`)."""

    # Steps that failed for good, and operators' resolutions waiting to be applied.
    undo_left: list[FailedUndo]
    resolutions: deque[AttentionResolution]
    resolutions_done: int
    resolutions_taken: int
    # A refund waiting for an operator: how `manual` settles it (refund_needs_attention).
    refund_settlements: dict[str, Callable[[AttentionResolution], Awaitable[None]]]

    @workflow.update(name="resolve_attention")
    async def resolve_attention(self, resolution: AttentionResolution) -> ResolutionRecord:
        """An operator's answer to `requires_attention`; the answer is what it achieved."""
        taken = self.take_resolution(resolution)
        await workflow.wait_condition(lambda: self.resolutions_done >= taken)
        return self.state.resolutions[taken - 1]

    @resolve_attention.validator
    def _resolution_allowed(self, resolution: AttentionResolution) -> None:
        refuse(resolution_refusal(self.state, resolution))

    @workflow.signal(name="resolve_attention")
    def resolve_attention_signal(self, resolution: AttentionResolution) -> None:
        refused = resolution_refusal(self.state, resolution)
        if refused is not None:
            workflow.logger.warning("resolve_attention signal refused: %s", refused.message)
            return
        self.take_resolution(resolution)

    def require_attention(self, ends_as: PaymentStatus, what_to_do: str = "") -> None:
        failures = [
            UndoFailure(step=f.name, error=failure_message(f.failure)) for f in self.undo_left
        ]
        self.state.attention = Attention(
            since=workflow.now(),
            ends_as=ends_as,
            failures=failures,
            what_to_do=what_to_do or WHAT_TO_DO,
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
                await run_to_completion(self.apply_resolution(self.resolutions.popleft()))
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
                step=f.name, error=failure_message(f.failure), attempts=attempts[f.name] + 1
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
        """`manual`: a refund that may have moved money is settled as refund_needs_attention
        says; a compensation as the saga says (settle_compensation_by_hand)."""
        for refund_id, settle in self.refund_settlements.items():
            if failed.name.endswith(f" {refund_id}"):
                await settle(resolution)
                return
        await self.settle_compensation_by_hand(failed.name, resolution)
