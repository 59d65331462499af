"""The saga's undo list: add an undo step as soon as its do-step may have taken effect."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from temporalio import workflow

Undo = Callable[[], Awaitable[None]]


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

    async def unwind(self) -> None:
        """Run the undo steps in reverse order, shielded so that a second cancellation of the
        workflow cannot interrupt them half way. Each step is an idempotent activity with its
        own retry policy, so a step that fails transiently is retried, not skipped."""
        steps, self._steps = list(reversed(self._steps)), []

        async def run_all() -> None:
            for name, undo in steps:
                workflow.logger.info("compensating: %s", name)
                await undo()
                self.ran.append(name)

        task = asyncio.ensure_future(run_all())
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    raise
                workflow.logger.warning("cancellation requested while compensating; continuing")
        task.result()
