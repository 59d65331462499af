"""The idempotency register: every (API client, Idempotency-Key) that ever asked for a payment
(or a subscription: its row is keyed by the `sub_…` id in the same `payment_id` column),
with the payment id it names and the fingerprint of the body it came with.

Temporal forgets a closed payment (retention, an operator's `workflow delete`, a `reset`), and
the Kafka intake may read old `payments.requests` again after an offset reset. The register
does not forget: it is written before a workflow is started and consulted first, so a key
reused at any later time finds its payment (and never starts a second run of it), and a key
reused with another body is refused.

The key itself is never stored (a long numeric key may look like a card number): the row is
keyed by the payment id, which is derived from (client id, key) by `payment_id_for`.

A row goes through two states:
- *claimed* (`started_at` NULL): written before the start; the process may die before Temporal
  accepts it. A retry of the key then starts the workflow itself: a claim never blocks the
  legitimate first start.
- *started* (`started_at` set): Temporal accepted the start (or the payments register shows
  that the payment ran). From then on the key never starts anything again, whatever Temporal
  still remembers.

The mark is written after Temporal accepted the start, so the database may be gone by then (an
outage, a shutdown under way): the payment is started all the same, and the register keeps
marking it in the background until the database answers (`mark_later`). Until then a retry of
the key finds the payment through Temporal's duplicate check, which marks it too. Marks asked
for together are written together (`mark_started`: one transaction for all that arrived while
the previous one committed), each caller still waiting for its own row.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from infra.database import run_serializable, run_statement

StartSource = Literal["api", "kafka", "recorded"]
log = logging.getLogger(__name__)
# How often a mark that failed is tried again: soon, then no more than every few seconds.
_MARK_RETRY_FIRST_SECONDS = 0.5
_MARK_RETRY_MAX_SECONDS = 5.0

metadata = sa.MetaData()
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("payment_id", sa.String, primary_key=True),
    sa.Column("client_id", sa.String),
    sa.Column("fingerprint", sa.String),
    sa.Column("source", sa.String),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("started_at", sa.DateTime(timezone=True)),
)
# The ledger's payments register (ledger/store.py), read here only to learn whether a
# payment ever reached the ledger.
_payments = sa.table("payments", sa.column("payment_id"))
# A new key's claim in one statement, compiled once (like infra.database.insert_unless_present):
# the row is written, and written started if the payments register already knows the payment
# (one from before this register existed), in the same statement and transaction that used to
# insert, then read the payments register, then mark. RETURNING gives a row only if this call
# wrote it.
_CLAIM = (
    sa.text(
        "INSERT INTO idempotency_keys"
        " (payment_id, client_id, fingerprint, source, created_at, started_at)"
        " VALUES (:payment_id, :client_id, :fingerprint, :source, :created_at,"
        " CASE WHEN EXISTS (SELECT 1 FROM payments WHERE payment_id = :payment_id)"
        " THEN CAST(:created_at AS TIMESTAMP WITH TIME ZONE) END)"
        " ON CONFLICT (payment_id) DO NOTHING RETURNING started_at"
    )
    .bindparams(
        *(
            sa.bindparam(c, type_=idempotency_keys.c[c].type)
            for c in ("payment_id", "client_id", "fingerprint", "source", "created_at")
        )
    )
    .columns(idempotency_keys.c.started_at)
)


@dataclass(frozen=True)
class KeyClaim:
    """What the register says about a key after `claim`."""

    payment_id: str
    fingerprint: str
    # This call wrote the row: nobody asked with this key before.
    new: bool
    # A workflow was started for the key once (it may since be forgotten by Temporal).
    started: bool


@dataclass
class _MarkBatch:
    """Marks that go to the database in one transaction; each caller waits for `done`."""

    ids: list[str]
    done: asyncio.Future[None]


class IdempotencyRegister:
    def __init__(self, engine: AsyncEngine, max_attempts: int = 8) -> None:
        self.engine = engine
        self.max_attempts = max_attempts
        # Marks that failed and are being tried again (see `mark_later`).
        self._marking: dict[str, asyncio.Task[None]] = {}
        # The marks waiting for the transaction under way to end (a group commit).
        self._next_marks: _MarkBatch | None = None
        self._writing_marks: asyncio.Task[None] | None = None
        # Transactions that wrote marks (what the grouping saves is measured against starts).
        self.mark_transactions = 0

    async def claim(
        self, payment_id: str, client_id: str, fingerprint: str, source: StartSource
    ) -> KeyClaim:
        """Record the key if it is new; either way, return what the register holds for it.
        A payment already in the payments register counts as started even without a row
        (payments from before this register existed)."""

        now = datetime.now(UTC)

        async def insert_claim(conn: AsyncConnection) -> sa.Row[Any] | None:
            return (
                await conn.execute(
                    _CLAIM,
                    {
                        "payment_id": payment_id,
                        "client_id": client_id,
                        "fingerprint": fingerprint,
                        "source": source,
                        "created_at": now,
                    },
                )
            ).first()

        # One statement, its own transaction: a new key (nearly every request) costs one round
        # trip. ON CONFLICT waits for a concurrent insert of the key to end, so a key this
        # statement did not write is committed by then, and the read below sees it.
        inserted = await run_statement(self.engine, insert_claim, max_attempts=self.max_attempts)
        if inserted is not None:
            # This call wrote the row: it holds our fingerprint (no read back), started if the
            # payments register knew the payment.
            return KeyClaim(
                payment_id, fingerprint, new=True, started=inserted.started_at is not None
            )

        async def held(conn: AsyncConnection) -> KeyClaim:
            row = (
                await conn.execute(
                    sa.select(idempotency_keys.c.fingerprint, idempotency_keys.c.started_at).where(
                        idempotency_keys.c.payment_id == payment_id
                    )
                )
            ).one()
            held, started = row.fingerprint, row.started_at is not None
            if not started:
                started = await _in_payments_register(conn, payment_id)
                if started:
                    await _mark_started(conn, [payment_id], now)
            return KeyClaim(payment_id, held, new=False, started=started)

        return await run_serializable(self.engine, held, max_attempts=self.max_attempts)

    async def mark_started(self, payment_id: str) -> None:
        """Mark the key's payment started; returns once the database has it (raises if it did
        not take it). Marks asked for together share one transaction: the first is written at
        once, and those that arrive while it commits go together in the next (under load, one
        transaction for many payments instead of one each; alone, no wait added)."""
        batch = self._next_marks
        if batch is None:
            batch = self._next_marks = _MarkBatch([], asyncio.get_running_loop().create_future())
        batch.ids.append(payment_id)
        if self._writing_marks is None:
            self._writing_marks = asyncio.create_task(self._write_marks())
        # Shielded: a caller that gives up (its request was canceled) leaves the batch alone.
        await asyncio.shield(batch.done)

    async def _write_marks(self) -> None:
        try:
            while (batch := self._next_marks) is not None:
                self._next_marks = None
                try:
                    await self._write_batch(batch.ids)
                except Exception as exc:
                    batch.done.set_exception(exc)
                    batch.done.add_done_callback(_retrieved)  # every waiter may have gone
                else:
                    batch.done.set_result(None)
        finally:
            self._writing_marks = None

    async def _write_batch(self, payment_ids: list[str]) -> None:
        async def work(conn: AsyncConnection) -> None:
            await _mark_started(conn, payment_ids, datetime.now(UTC))

        self.mark_transactions += 1
        await run_statement(self.engine, work, max_attempts=self.max_attempts)

    def mark_later(self, payment_id: str) -> None:
        """A started payment whose mark failed: keep trying in the background until the
        database takes it (for as long as this process runs; `aclose` stops it)."""
        if payment_id not in self._marking:
            task = asyncio.get_running_loop().create_task(self._mark_until_done(payment_id))
            self._marking[payment_id] = task
            task.add_done_callback(lambda _: self._marking.pop(payment_id, None))

    async def _mark_until_done(self, payment_id: str) -> None:
        delay = _MARK_RETRY_FIRST_SECONDS
        while True:
            await asyncio.sleep(delay)
            try:
                await self.mark_started(payment_id)
            except Exception as exc:
                log.info("payment %s still not marked started: %s", payment_id, type(exc).__name__)
                delay = min(delay * 2, _MARK_RETRY_MAX_SECONDS)
                continue
            log.info("payment %s marked started in the idempotency register", payment_id)
            return

    async def aclose(self) -> None:
        """Stop trying marks still pending (the process is stopping)."""
        pending = list(self._marking.values())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def adopt(self, payment_id: str, fingerprint: str) -> None:
        """The workflow Temporal holds for this id is the truth (a payment started before the
        register existed): its fingerprint replaces a claim made with another body."""

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(
                idempotency_keys.update()
                .where(idempotency_keys.c.payment_id == payment_id)
                .values(fingerprint=fingerprint, started_at=datetime.now(UTC))
            )

        await run_serializable(self.engine, work, max_attempts=self.max_attempts)


async def record_started(
    conn: AsyncConnection, payment_id: str, client_id: str, fingerprint: str
) -> None:
    """Inside another transaction (the ledger's outcome record): make sure the payment's key is
    registered as started. A payment the starter registered and marked is left as it is; one it
    claimed but could not mark (its process died while the database was away) is marked here,
    when the workflow records its outcome, before Temporal's retention can forget it. One
    statement: a row that is there keeps its fingerprint, source and first mark."""
    now = datetime.now(UTC)
    await conn.execute(
        insert(idempotency_keys)
        .values(
            payment_id=payment_id,
            client_id=client_id,
            fingerprint=fingerprint,
            source="recorded",
            created_at=now,
            started_at=now,
        )
        .on_conflict_do_update(
            index_elements=["payment_id"],
            set_={"started_at": now},
            where=idempotency_keys.c.started_at.is_(None),
        )
    )


# Built once: the statement and its cache key are not made again on every call. Marks any
# number of keys started (the grouped marks of concurrent starts, or one key a claim found).
_MARK_STARTED = (
    idempotency_keys.update()
    .where(
        idempotency_keys.c.payment_id.in_(sa.bindparam("marked_ids", expanding=True)),
        idempotency_keys.c.started_at.is_(None),
    )
    .values(started_at=sa.bindparam("marked_at"))
)


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


async def _mark_started(conn: AsyncConnection, payment_ids: list[str], now: datetime) -> None:
    await conn.execute(_MARK_STARTED, {"marked_ids": payment_ids, "marked_at": now})


async def _in_payments_register(conn: AsyncConnection, payment_id: str) -> bool:
    found = await conn.scalar(
        sa.select(_payments.c.payment_id).where(_payments.c.payment_id == payment_id)
    )
    return found is not None
