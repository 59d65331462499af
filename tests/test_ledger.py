"""Ledger invariants against the real PostgreSQL in SERIALIZABLE mode."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from activities.ledger import Ledger, LedgerPosting, LedgerRejected, PaymentParties
from domain.events import EventKind, PaymentEvent, event_id
from domain.ledger import (
    Entry,
    LedgerTransaction,
    TransactionKind,
    customer_account,
    merchant_account,
    payment_transaction,
    refund_transaction,
)
from infra.database import RetryStats, run_serializable


def _capture(payment_id: str, amount: int = 1000, ccy: str = "USD") -> LedgerPosting:
    customer, merchant = f"cus_{payment_id}", f"mer_{payment_id}"
    event = PaymentEvent(
        id=event_id(payment_id, EventKind.CONFIRMED),
        kind=EventKind.CONFIRMED,
        payment_id=payment_id,
        time=datetime.now(UTC),
        data={"amount": amount},
    )
    return LedgerPosting(
        transaction=payment_transaction(payment_id, customer, merchant, amount, ccy),
        amount=amount,
        parties=PaymentParties(
            client_id="t", customer_id=customer, merchant_id=merchant, currency=ccy
        ),
        event=event,
    )


async def _scalar(engine: AsyncEngine, sql: str, **params: object) -> object:
    async with engine.connect() as conn:
        return (await conn.execute(text(sql), params)).scalar()


async def _ledger_sums_to_zero(engine: AsyncEngine) -> None:
    unbalanced = await _scalar(
        engine,
        "SELECT count(*) FROM (SELECT transaction_id, currency FROM ledger_entries "
        "GROUP BY transaction_id, currency HAVING sum(amount) <> 0) u",
    )
    assert unbalanced == 0


def test_an_unbalanced_transaction_cannot_be_constructed() -> None:
    with pytest.raises(ValueError, match="do not sum to zero"):
        LedgerTransaction(
            payment_id="p",
            kind=TransactionKind.PAYMENT,
            entries=[
                Entry(account=customer_account("c", "USD"), amount=100),
                Entry(account=merchant_account("m", "USD"), amount=-99),
            ],
        )
    with pytest.raises(
        ValueError, match="do not sum to zero"
    ):  # balanced overall, not per currency
        LedgerTransaction(
            payment_id="p",
            kind=TransactionKind.PAYMENT,
            entries=[
                Entry(account=customer_account("c", "USD"), amount=100),
                Entry(account=merchant_account("m", "EUR"), amount=-100),
            ],
        )


async def test_the_database_refuses_to_commit_unbalanced_entries(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    pid = f"pay_{uuid.uuid4().hex[:12]}"
    await ledger.post(_capture(pid))
    with pytest.raises(DBAPIError) as refused:
        async with engine.begin() as conn:
            txn = await conn.scalar(
                text(
                    "INSERT INTO ledger_transactions (payment_id, kind, reference) "
                    "VALUES (:p, 'refund', 'sneaky') RETURNING id"
                ),
                {"p": pid},
            )
            account = await conn.scalar(text("SELECT id FROM accounts LIMIT 1"))
            await conn.execute(
                text(
                    "INSERT INTO ledger_entries (transaction_id, account_id, amount, currency) "
                    "VALUES (:t, :a, 500, 'USD')"
                ),
                {"t": txn, "a": account},
            )
    assert "does not sum to zero" in str(refused.value)
    assert (
        await _scalar(engine, "SELECT count(*) FROM ledger_transactions WHERE reference='sneaky'")
        == 0
    )


async def test_entries_are_append_only(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    await ledger.post(_capture(f"pay_{uuid.uuid4().hex[:12]}"))
    with pytest.raises(DBAPIError, match="append-only"):
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE ledger_entries SET amount = amount * 2"))


async def test_posting_the_same_payment_concurrently_yields_one_transaction(
    engine: AsyncEngine,
) -> None:
    ledger = Ledger(engine)
    pid = f"pay_{uuid.uuid4().hex[:12]}"
    receipts = await asyncio.gather(*(ledger.post(_capture(pid)) for _ in range(8)))
    assert len({r.transaction_id for r in receipts}) == 1
    assert sum(not r.duplicate for r in receipts) == 1
    assert (
        await _scalar(engine, "SELECT count(*) FROM ledger_transactions WHERE payment_id=:p", p=pid)
        == 1
    )
    assert (
        await _scalar(engine, "SELECT count(*) FROM outbox_events WHERE payment_id=:p", p=pid) == 1
    )
    assert await _scalar(engine, "SELECT captured FROM payments WHERE payment_id=:p", p=pid) == 1000
    await _ledger_sums_to_zero(engine)


async def test_a_forced_serialization_conflict_is_retried_and_succeeds(engine: AsyncEngine) -> None:
    """Two transactions read then write the same rows; PostgreSQL aborts one with 40001 and
    `run_serializable` runs it again from the start."""
    key = uuid.uuid4().hex[:12]
    async with engine.begin() as conn:
        await conn.execute(
            text("CREATE TABLE IF NOT EXISTS conflict_probe (k text PRIMARY KEY, n int)")
        )
        await conn.execute(text("INSERT INTO conflict_probe VALUES (:k, 0)"), {"k": key})
    both_read = asyncio.Barrier(2)
    attempts = 0

    async def bump(conn: AsyncConnection) -> None:
        nonlocal attempts
        attempts += 1
        n = (
            await conn.execute(text("SELECT sum(n) FROM conflict_probe WHERE k=:k"), {"k": key})
        ).scalar()
        if attempts <= 2:
            await both_read.wait()
        await conn.execute(
            text("UPDATE conflict_probe SET n = :n WHERE k=:k"), {"n": (n or 0) + 1, "k": key}
        )

    before = RetryStats.serialization_retries
    await asyncio.gather(run_serializable(engine, bump), run_serializable(engine, bump))
    assert RetryStats.serialization_retries > before
    assert attempts >= 3
    assert await _scalar(engine, "SELECT n FROM conflict_probe WHERE k=:k", k=key) == 2


async def test_the_outbox_row_commits_or_rolls_back_with_its_transaction(
    engine: AsyncEngine,
) -> None:
    ledger = Ledger(engine)
    pid = f"pay_{uuid.uuid4().hex[:12]}"
    await ledger.post(_capture(pid, amount=1000))
    over = refund_transaction(pid, "re_too_much", f"cus_{pid}", f"mer_{pid}", 1500, "USD")
    event = PaymentEvent(
        id=event_id(pid, EventKind.REFUNDED, "re_too_much"),
        kind=EventKind.REFUNDED,
        payment_id=pid,
        time=datetime.now(UTC),
        data={},
    )
    with pytest.raises(LedgerRejected):
        await ledger.post(LedgerPosting(transaction=over, amount=1500, event=event))
    assert (
        await _scalar(engine, "SELECT count(*) FROM outbox_events WHERE payment_id=:p", p=pid) == 1
    )
    assert (
        await _scalar(engine, "SELECT count(*) FROM ledger_transactions WHERE payment_id=:p", p=pid)
        == 1
    )

    ok = refund_transaction(pid, "re_1", f"cus_{pid}", f"mer_{pid}", 400, "USD")
    event_ok = event.model_copy(update={"id": event_id(pid, EventKind.REFUNDED, "re_1")})
    await ledger.post(LedgerPosting(transaction=ok, amount=400, event=event_ok))
    assert (
        await _scalar(engine, "SELECT count(*) FROM outbox_events WHERE payment_id=:p", p=pid) == 2
    )
    row = await ledger.payment(pid)
    assert row is not None and (row.refunded, row.status) == (400, "partially_refunded")
    await _ledger_sums_to_zero(engine)


async def test_a_closed_account_refuses_postings(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    pid = f"pay_{uuid.uuid4().hex[:12]}"
    await ledger.post(_capture(f"pay_{uuid.uuid4().hex[:12]}"))
    await ledger.post(_capture(pid))
    await ledger.close_account(f"merchant:mer_{pid}:USD")
    refund = refund_transaction(pid, "re_x", f"cus_{pid}", f"mer_{pid}", 100, "USD")
    with pytest.raises(LedgerRejected, match="closed"):
        await ledger.post(LedgerPosting(transaction=refund, amount=100))
