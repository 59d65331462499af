"""Ledger invariants against the real PostgreSQL in SERIALIZABLE mode."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from domain.bounds import ID_MAX
from domain.errors import FailureType
from domain.events import EventKind, PaymentEvent, event_id
from domain.ledger import (
    Entry,
    LedgerTransaction,
    Parties,
    TransactionKind,
    authorization_hold_transaction,
    customer_account,
    hold_released_transaction,
    merchant_account,
    payment_transaction,
    refund_transaction,
)
from infra.database import (
    RetryStats,
    is_data_error,
    is_transient,
    run_serializable,
    sqlstate,
)
from ledger.activity import LedgerActivities
from ledger.records import LedgerPosting, LedgerRejected, PaymentParties
from ledger.store import Ledger


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
        transaction=payment_transaction(payment_id, Parties(customer, merchant, ccy), amount),
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
    over = refund_transaction(pid, "re_too_much", Parties(f"cus_{pid}", f"mer_{pid}", "USD"), 1500)
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

    ok = refund_transaction(pid, "re_1", Parties(f"cus_{pid}", f"mer_{pid}", "USD"), 400)
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
    refund = refund_transaction(pid, "re_x", Parties(f"cus_{pid}", f"mer_{pid}", "USD"), 100)
    with pytest.raises(LedgerRejected, match="closed"):
        await ledger.post(LedgerPosting(transaction=refund, amount=100))


# ── a claimed slot holding another posting; errors the database refuses for good ──────────


async def test_a_different_posting_in_a_claimed_slot_is_refused_not_a_duplicate(
    engine: AsyncEngine,
) -> None:
    """A second run of a payment (or a refund id reused for another amount) reaching the ledger
    must not be told "already done" while its own amounts never moved."""
    ledger = Ledger(engine)
    pid = f"pay_{uuid.uuid4().hex[:12]}"
    first = await ledger.post(_capture(pid, amount=1000))
    again = await ledger.post(_capture(pid, amount=1000))
    assert again.duplicate and again.transaction_id == first.transaction_id

    with pytest.raises(LedgerRejected, match="already posted with other entries") as other_amount:
        await ledger.post(_capture(pid, amount=2000))
    assert other_amount.value.failure == FailureType.POSTING_CONFLICT
    elsewhere = _capture(pid, amount=1000)
    moved = payment_transaction(pid, Parties(f"cus_{pid}", "mer_someone_else", "USD"), 1000)
    with pytest.raises(LedgerRejected) as other_merchant:
        await ledger.post(elsewhere.model_copy(update={"transaction": moved}))
    assert other_merchant.value.failure == FailureType.POSTING_CONFLICT

    refund = refund_transaction(pid, "re_once", Parties(f"cus_{pid}", f"mer_{pid}", "USD"), 300)
    await ledger.post(LedgerPosting(transaction=refund, amount=300))
    assert (await ledger.post(LedgerPosting(transaction=refund, amount=300))).duplicate
    bigger = refund_transaction(pid, "re_once", Parties(f"cus_{pid}", f"mer_{pid}", "USD"), 500)
    with pytest.raises(LedgerRejected) as reused:
        await ledger.post(LedgerPosting(transaction=bigger, amount=500))
    assert reused.value.failure == FailureType.POSTING_CONFLICT

    # Nothing of the refused postings was written: one capture, one refund of 300.
    row = await ledger.payment(pid)
    assert row is not None and (row.captured, row.refunded) == (1000, 300)
    assert (
        await _scalar(engine, "SELECT count(*) FROM ledger_transactions WHERE payment_id=:p", p=pid)
        == 2
    )
    await _ledger_sums_to_zero(engine)


async def test_a_hold_is_released_once_and_a_second_release_is_refused_by_name(
    engine: AsyncEngine,
) -> None:
    """The write path itself refuses a second release of a hold (captured after voided, voided
    after captured, either again under another reference): a named, non-retryable refusal
    that writes nothing, not something only the checker finds later. The same release retried
    stays a harmless duplicate."""
    ledger = Ledger(engine)
    activities = LedgerActivities(ledger)
    env = ActivityEnvironment()

    for first_captured in (False, True):
        pid = f"pay_{uuid.uuid4().hex[:12]}"
        customer = f"cus_{pid}"
        await ledger.post(
            LedgerPosting(
                transaction=authorization_hold_transaction(pid, customer, 1000, "USD"),
                amount=1000,
            )
        )
        first = hold_released_transaction(pid, customer, 1000, "USD", captured=first_captured)
        await ledger.post(LedgerPosting(transaction=first, amount=1000))
        assert (await ledger.post(LedgerPosting(transaction=first, amount=1000))).duplicate

        other = hold_released_transaction(pid, customer, 1000, "USD", captured=not first_captured)
        again = first.model_copy(update={"reference": "second"})
        for second in (other, again):
            with pytest.raises(LedgerRejected, match="already released") as refused:
                await ledger.post(LedgerPosting(transaction=second, amount=1000))
            assert refused.value.failure == FailureType.HOLD_ALREADY_RELEASED
            with pytest.raises(ApplicationError) as named:
                await env.run(
                    activities.post_ledger_transaction,
                    LedgerPosting(transaction=second, amount=1000),
                )
            assert named.value.type == FailureType.HOLD_ALREADY_RELEASED
            assert named.value.non_retryable

        # Nothing of the refused releases was written: the hold and its one release.
        assert (
            await _scalar(
                engine, "SELECT count(*) FROM ledger_transactions WHERE payment_id=:p", p=pid
            )
            == 2
        )
    await _ledger_sums_to_zero(engine)


async def test_the_activity_names_a_conflicting_posting_and_never_retries_it(
    engine: AsyncEngine,
) -> None:
    activities = LedgerActivities(Ledger(engine))
    pid = f"pay_{uuid.uuid4().hex[:12]}"
    env = ActivityEnvironment()
    await env.run(activities.post_ledger_transaction, _capture(pid, amount=1000))
    with pytest.raises(ApplicationError) as refused:
        await env.run(activities.post_ledger_transaction, _capture(pid, amount=1500))
    assert refused.value.type == FailureType.POSTING_CONFLICT
    assert refused.value.non_retryable


async def test_a_value_too_long_for_its_column_fails_the_step_for_good(
    engine: AsyncEngine,
) -> None:
    """SQLSTATE 22001 is the same on every retry: the step fails with a name instead of
    retrying forever (which would wedge every later follow-up of the payment)."""
    activities = LedgerActivities(Ledger(engine))
    pid = f"pay_{uuid.uuid4().hex[:12]}"
    env = ActivityEnvironment()
    await env.run(activities.post_ledger_transaction, _capture(pid))
    too_long = "re_" + "x" * ID_MAX  # the ledger's reference column holds ID_MAX characters
    refund = refund_transaction(pid, too_long, Parties(f"cus_{pid}", f"mer_{pid}", "USD"), 100)
    with pytest.raises(ApplicationError) as refused:
        await env.run(
            activities.post_ledger_transaction, LedgerPosting(transaction=refund, amount=100)
        )
    assert refused.value.type == FailureType.DATA_REJECTED
    assert refused.value.non_retryable
    assert "22001" in refused.value.message
    row = await Ledger(engine).payment(pid)
    assert row is not None and row.refunded == 0


async def test_database_errors_are_told_apart_by_sqlstate(engine: AsyncEngine) -> None:
    """Real errors from the real server: data errors are final, the rest is worth a retry."""
    ledger = Ledger(engine)
    pid = f"pay_{uuid.uuid4().hex[:12]}"
    await ledger.post(_capture(pid))

    async def error_of(sql: str, **params: object) -> DBAPIError:
        with pytest.raises(DBAPIError) as caught:
            async with engine.begin() as conn:
                await conn.execute(text(sql), params)
        return caught.value

    too_long = await error_of(
        "UPDATE payments SET client_id = :v WHERE payment_id = :p", v="c" * 65, p=pid
    )
    duplicate = await error_of(
        "INSERT INTO ledger_transactions (id, payment_id, kind, reference) "
        "VALUES (gen_random_uuid(), :p, 'payment', '')",
        p=pid,
    )
    over_refunded = await error_of(
        "UPDATE payments SET refunded = captured + 1 WHERE payment_id = :p", p=pid
    )
    for error, state in ((too_long, "22001"), (duplicate, "23505"), (over_refunded, "23514")):
        assert sqlstate(error) == state
        assert is_data_error(error) and not is_transient(error), state

    # An administrator terminating the session (57P01) and the connection it leaves behind.
    async with engine.connect() as victim:
        backend = await victim.scalar(text("SELECT pg_backend_pid()"))
        async with engine.begin() as admin:
            await admin.execute(text("SELECT pg_terminate_backend(:b)"), {"b": backend})
        with pytest.raises(DBAPIError) as terminated:
            await victim.execute(text("SELECT 1"))
    assert is_transient(terminated.value) and not is_data_error(terminated.value)

    conflict = DBAPIError("UPDATE …", {}, _WithSqlstate("40001"))
    assert is_transient(conflict) and not is_data_error(conflict)


class _WithSqlstate(Exception):
    def __init__(self, state: str) -> None:
        super().__init__(state)
        self.sqlstate = state
