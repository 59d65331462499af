"""The saga's undo list, and the one way a step is shielded from cancellation.

Add an undo step as soon as its do-step may have taken effect; unwind them in reverse. Both the
do-steps and the unwinding run to completion under a cancellation (`run_to_completion`): a
do-step so that its undo knows whether it took effect, the unwinding so that a cancelled
payment is still compensated."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

Undo = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class FailedUndo:
    """An undo step that failed for good (its activity's retries are for outages only, so this
    is a business refusal such as the ledger refusing a reversal): it waits for an operator."""

    name: str
    undo: Undo
    failure: BaseException


class Compensations:
    def __init__(self) -> None:
        self._steps: list[tuple[str, Undo]] = []
        self.ran: list[str] = []

    def add(self, name: str, undo: Undo) -> None:
        self._steps.append((name, undo))

    def clear(self) -> None:
        """The saga reached a point of no return (the payment is confirmed)."""
        self._steps.clear()

    def __bool__(self) -> bool:
        return bool(self._steps)

    async def unwind(self, keep_going: Callable[[], bool] = lambda: False) -> list[FailedUndo]:
        """Run the undo steps in reverse order, shielded so that a second cancellation of the
        workflow cannot interrupt them half way. Each step is an idempotent activity with its
        own retry policy, so a step that fails transiently is retried, not skipped.

        A step that fails for good: if `keep_going()` says so, the remaining steps still run
        (one refusal must not leave the others undone) and the failed ones are returned for an
        operator; otherwise the failure propagates."""
        steps, self._steps = list(reversed(self._steps)), []
        failed: list[FailedUndo] = []

        async def run_all() -> None:
            for name, undo in steps:
                workflow.logger.info("compensating: %s", name)
                try:
                    await undo()
                except (ActivityError, ApplicationError) as failure:
                    if is_cancelled_exception(failure) or not keep_going():
                        raise
                    workflow.logger.error("compensation %s failed for good: %s", name, failure)
                    failed.append(FailedUndo(name, undo, failure))
                    continue
                self.ran.append(name)

        await run_to_completion(run_all(), absorb_cancel=True)
        return failed


async def run_to_completion(
    step: Awaitable[Any],
    on_cancel: Callable[[], None] | None = None,
    *,
    absorb_cancel: bool = False,
) -> None:
    """Run `step` to its end even if the workflow is canceled while it runs. Its activities are
    never abandoned half way, so the code that reacts to the cancellation knows whether the
    step took effect.

    A do-step (`absorb_cancel=False`) lets the cancellation through once it ended: `on_cancel`
    runs as soon as the cancellation is seen, and the step's own failure is moot then. The
    compensations (`absorb_cancel=True`) absorb it: a cancelled payment is still compensated,
    and the code after them goes on."""
    task = asyncio.ensure_future(step)
    if absorb_cancel:
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    raise
                workflow.logger.warning("cancellation requested while compensating; continuing")
        task.result()
        return
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if on_cancel is not None:
            on_cancel()
        # The step's own failure is moot now: the cancellation decides what happens next.
        with contextlib.suppress(ActivityError, ApplicationError):
            await task
        raise
