"""The real ledger activities, with gates: a test holds one step of one payment (a posting, or
the record of its outcome) to open the window in which a race happens, then releases it."""

from __future__ import annotations

import asyncio

from temporalio import activity

from ledger.activity import LedgerActivities
from ledger.records import LedgerPosting, LedgerReceipt, PaymentOutcome
from ledger.store import Ledger

OUTCOME = "outcome"  # the step name of `record_payment_outcome`


class GatedLedger(LedgerActivities):
    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger)
        self.gates: dict[tuple[str, str, str], tuple[asyncio.Event, asyncio.Event]] = {}

    def hold(self, payment_id: str, step: str, reference: str = "") -> None:
        """`step`: a transaction kind (`refund`, `payment_reversal`, …) or OUTCOME."""
        self.gates[(payment_id, step, reference)] = (asyncio.Event(), asyncio.Event())

    async def wait_held(
        self, payment_id: str, step: str, reference: str = "", timeout: float = 30
    ) -> None:
        await asyncio.wait_for(self.gates[(payment_id, step, reference)][0].wait(), timeout)

    def release(self, payment_id: str, step: str, reference: str = "") -> None:
        self.gates[(payment_id, step, reference)][1].set()

    def release_all(self) -> None:
        """At a rig's teardown: a test that failed while a posting was held must not leave its
        worker waiting for it (the worker's shutdown would wait forever)."""
        for _, released in self.gates.values():
            released.set()

    async def _pass(self, payment_id: str, step: str, reference: str) -> None:
        gate = self.gates.get((payment_id, step, reference))
        if gate is not None:
            arrived, released = gate
            arrived.set()
            await released.wait()

    @activity.defn(name="post_ledger_transaction")
    async def post_ledger_transaction(self, posting: LedgerPosting) -> LedgerReceipt:
        txn = posting.transaction
        await self._pass(txn.payment_id, txn.kind.value, txn.reference)
        return await super().post_ledger_transaction(posting)

    @activity.defn(name="record_payment_outcome")
    async def record_payment_outcome(self, outcome: PaymentOutcome) -> None:
        await self._pass(outcome.payment_id, OUTCOME, "")
        await super().record_payment_outcome(outcome)
