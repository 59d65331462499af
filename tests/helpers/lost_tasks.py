"""A workflow task lost for real right after a local ledger posting answered.

A local activity runs inside a workflow task: a worker killed after a posting committed but
before the task completed leaves the posting in the ledger and no marker in the history, so
the next attempt runs from the history as if the posting never happened. `LoseTheTask` fails
the workflow task once for a chosen payment right after its posting of one kind answered (as a
dead worker's task times out); `PostingGate` is the real posting, which can hold its answer
back after the commit (so that a cancel reaches the server while that task is in flight) and
counts the postings of that kind each payment asked for."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import (
    Interceptor,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)
from temporalio.workflow import ActivityHandle

from domain.ledger import TransactionKind
from ledger.activity import LedgerActivities
from ledger.records import LedgerPosting, LedgerReceipt
from ledger.store import Ledger
from settings import Settings
from worker import payment_worker


class PostingGate(LedgerActivities):
    """The real posting; for a gated payment, the answer of its first posting of `kind` waits
    after the commit until the test opens the gate. Counts the postings of `kind` each payment
    asked for."""

    def __init__(self, ledger: Ledger, kind: TransactionKind) -> None:
        super().__init__(ledger)
        self.kind = kind
        self.gates: dict[str, asyncio.Event] = {}
        self.committed: dict[str, asyncio.Event] = {}
        self.postings: Counter[str] = Counter()

    def gate(self, payment_id: str) -> None:
        self.gates[payment_id] = asyncio.Event()
        self.committed[payment_id] = asyncio.Event()

    def open(self, payment_id: str) -> None:
        self.gates[payment_id].set()

    @activity.defn(name="post_ledger_transaction")
    async def post_ledger_transaction(self, posting: LedgerPosting) -> LedgerReceipt:
        receipt = await super().post_ledger_transaction(posting)
        txn = posting.transaction
        if txn.kind == self.kind:
            self.postings[txn.payment_id] += 1
            committed = self.committed.get(txn.payment_id)
            if committed is not None and not committed.is_set():  # its first posting only
                committed.set()
                await self.gates[txn.payment_id].wait()
        return receipt


class LoseTheTask(Interceptor):
    """Fails the workflow task once for each chosen payment, right after its posting of `kind`
    answered: the workflow raises a non-Temporal error there, which fails the task (not the
    workflow), and the next attempt replays the history, in which the posting never ran."""

    def __init__(self, kind: TransactionKind) -> None:
        self.kind = kind
        self.payments: set[str] = set()

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor]:
        payments = self.payments
        kind = self.kind

        class Outbound(WorkflowOutboundInterceptor):
            def start_local_activity(self, input: StartLocalActivityInput) -> ActivityHandle[Any]:
                handle = super().start_local_activity(input)
                # The sandbox imports its own copy of ledger.records: read the posting by shape.
                txn = getattr(input.args[0], "transaction", None) if input.args else None
                if getattr(txn, "kind", None) != kind:
                    return handle
                payment_id = getattr(txn, "payment_id", "")
                if payment_id not in payments:
                    return handle
                payments.discard(payment_id)

                async def lost() -> Any:
                    await handle
                    raise RuntimeError("the worker died before this workflow task completed")

                return asyncio.ensure_future(lost())  # type: ignore[return-value]

        class Inbound(WorkflowInboundInterceptor):
            def init(self, outbound: WorkflowOutboundInterceptor) -> None:
                super().init(Outbound(outbound))

        return Inbound


@asynccontextmanager
async def worker_losing_tasks(
    settings: Settings, temporal: Client, kind: TransactionKind
) -> AsyncIterator[tuple[PostingGate, LoseTheTask]]:
    """A payment worker on `settings.task_queue` whose postings of `kind` can be gated, and
    whose workflow task can be lost after one, per payment."""
    gates: list[PostingGate] = []
    loser = LoseTheTask(kind)

    def gated(ledger: Ledger) -> PostingGate:
        gates.append(PostingGate(ledger, kind))
        return gates[0]

    async with payment_worker(settings, temporal, ledger_activities=gated, interceptors=[loser]):
        yield gates[0], loser


async def lost_tasks(temporal: Client, payment_id: str) -> int:
    """How many of the payment's workflow tasks failed."""
    history = await temporal.get_workflow_handle(payment_id).fetch_history()
    return sum(e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED for e in history.events)
