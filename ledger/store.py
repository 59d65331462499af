"""The ledger (PostgreSQL here, CockroachDB in production): idempotent double-entry postings.

Each posting is one SERIALIZABLE database transaction holding the ledger transaction, its
entries, the payments-register update and the outbox row of the event it emits. The unique
key (payment id, kind, reference) makes a retried posting a no-op that returns the first one.

Over 400 lines: the one SERIALIZABLE write path of the ledger and the reads that must see it;
splitting it would split the transaction boundary.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain.amounts import Amounts, Movement, PaymentStatus
from domain.errors import FailureType
from domain.events import EventRecord
from domain.ledger import (
    HOLD_KINDS,
    RECONCILIATION_KINDS,
    Account,
    AccountType,
    LedgerTransaction,
    TransactionKind,
)
from infra.database import insert_unless_present, run_serializable
from infra.idempotency import record_started
from ledger.records import (
    LedgerPosting,
    LedgerReceipt,
    LedgerRejected,
    PaymentOutcome,
    RegisterRow,
)
from ledger.tables import accounts, ledger_entries, ledger_transactions, outbox_events, payments

# The two ways an acquirer's hold ends; a payment's hold ends once.
HOLD_RELEASES = frozenset({TransactionKind.HOLD_CAPTURED, TransactionKind.HOLD_VOIDED})

# The statements of every posting, compiled once (infra.database.insert_unless_present).
_RECORD_EVENT = insert_unless_present(
    outbox_events,
    ["event_id", "transaction_id", "payment_id", "client_id", "subject", "topic", "event_type",
     "payload", "created_at"],
    conflict=["event_id"],
    returning=["event_id"],
)  # fmt: skip
_CLAIM_SLOT = insert_unless_present(
    ledger_transactions,
    ["id", "payment_id", "kind", "reference", "description", "created_at"],
    conflict=["payment_id", "kind", "reference"],
    returning=["id"],
)
_OPEN_ACCOUNT = insert_unless_present(
    accounts, ["code", "type", "currency", "status"], conflict=["code"]
)
_REGISTER_CAPTURE = insert_unless_present(
    payments,
    ["payment_id", "amount", "captured", "refunded", "disputed", "dispute_lost", "status",
     "created_at", "updated_at", "client_id", "customer_id", "merchant_id", "currency"],
    conflict=["payment_id"],
    returning=[c.name for c in payments.c],
)  # fmt: skip


async def insert_event(
    conn: AsyncConnection,
    record: EventRecord,
    now: datetime,
    transaction_id: uuid.UUID | None = None,
) -> bool:
    """Record `record` in the events store (the outbox) in the caller's transaction; False
    when its id was already recorded, whose first payload stays. A ledger posting records the
    event it emits here too: the saga may have recorded the same event before (a compensation
    publishes `payments.canceled` before an operator's retry posts the reversal that emits it),
    and one id is one event."""
    values: dict[str, Any] = {
        "event_id": uuid.UUID(record.id),
        "transaction_id": transaction_id,
        "payment_id": record.payment_id,
        "client_id": record.client_id or None,
        "subject": record.subject,
        "topic": record.kind.topic,
        "event_type": record.kind.ce_type,
        "payload": record.body,
        "created_at": now,
    }
    if values["client_id"] is not None or not record.payment_id:
        inserted = await conn.scalar(_RECORD_EVENT, values)
        return inserted is not None
    # Scheduled before events carried their client: the register knows it once captured.
    values["client_id"] = (
        sa.select(payments.c.client_id)
        .where(payments.c.payment_id == record.payment_id)
        .scalar_subquery()
    )
    inserted = await conn.scalar(
        insert(outbox_events)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(outbox_events.c.event_id)
    )
    return inserted is not None


def _register_after(txn: LedgerTransaction, amount: int, row: RegisterRow | None) -> dict[str, Any]:
    """New register amounts for a posting, or LedgerRejected if it would break the invariant
    refunded + disputed + dispute_lost <= captured."""
    if row is None:
        raise LedgerRejected(
            FailureType.INVALID_PAYMENT, f"payment {txn.payment_id} was never captured"
        )
    amounts = Amounts(row.captured, row.refunded, row.disputed, row.dispute_lost)
    if txn.kind == TransactionKind.PAYMENT_REVERSAL:
        if amounts.returned_or_held:
            raise LedgerRejected(
                FailureType.REFUND_EXCEEDS_CAPTURED,
                "a payment with refunds or disputes cannot be reversed",
            )
        return {"captured": amounts.captured - amount, "status": PaymentStatus.CANCELED}
    try:
        movement = Movement(txn.kind.value)
    except ValueError:
        raise LedgerRejected(
            FailureType.INVALID_PAYMENT, f"unexpected posting kind {txn.kind}"
        ) from None
    exceeded = amounts.exceeded_by(movement, amount)
    if exceeded is not None:
        detail = f" ({amounts})" if movement in (Movement.REFUND, Movement.DISPUTE_OPENED) else ""
        raise LedgerRejected(FailureType.REFUND_EXCEEDS_CAPTURED, exceeded + detail)
    after = amounts.after(movement, amount)
    return {
        "refunded": after.refunded,
        "disputed": after.disputed,
        "dispute_lost": after.dispute_lost,
        "status": after.status(),
    }


class Ledger:
    """All writes to the ledger go through `post`; reads serve the API, fraud rules and checks."""

    def __init__(self, engine: AsyncEngine, max_attempts: int = 8) -> None:
        self.engine = engine
        self.max_attempts = max_attempts

    async def post(self, posting: LedgerPosting) -> LedgerReceipt:
        async def work(conn: AsyncConnection) -> LedgerReceipt:
            return await self._post_in(conn, posting)

        return await run_serializable(self.engine, work, max_attempts=self.max_attempts)

    async def _post_in(self, conn: AsyncConnection, posting: LedgerPosting) -> LedgerReceipt:
        txn = posting.transaction
        now = datetime.now(UTC)
        # Claim the (payment, kind, reference) slot first: a duplicate is found by the unique
        # constraint itself rather than by a read before the write (one round trip fewer, and
        # no predicate read of the index for SERIALIZABLE to conflict other postings on).
        txn_id: uuid.UUID | None = await conn.scalar(
            _CLAIM_SLOT,
            {
                "id": uuid.uuid4(),
                "payment_id": txn.payment_id,
                "kind": txn.kind.value,
                "reference": txn.reference,
                "description": txn.description,
                "created_at": now,
            },
        )
        if txn_id is None:
            existing = await conn.scalar(
                sa.select(ledger_transactions.c.id).where(
                    ledger_transactions.c.payment_id == txn.payment_id,
                    ledger_transactions.c.kind == txn.kind.value,
                    ledger_transactions.c.reference == txn.reference,
                )
            )
            assert existing is not None
            await _same_as_posted(conn, existing, txn)
            row = await _register(conn, txn.payment_id)
            assert row is not None or txn.kind in HOLD_KINDS | RECONCILIATION_KINDS
            return LedgerReceipt(transaction_id=str(existing), duplicate=True, payment=row)

        if txn.kind in HOLD_RELEASES:
            await _first_release(conn, txn, txn_id)
        opened = await _open_accounts(conn, [e.account for e in txn.entries])
        await _hold_within_limits(conn, txn, opened)
        account_ids = {code: account.id for code, account in opened.items()}
        row = await self._update_register(conn, posting, now)
        await conn.execute(
            ledger_entries.insert(),
            [
                {
                    "transaction_id": txn_id,
                    "account_id": account_ids[e.account.code],
                    "amount": e.amount,
                    "currency": e.account.currency,
                }
                for e in txn.entries
            ],
        )
        if posting.event is not None:
            record = posting.event.record()
            if not record.client_id and posting.parties is not None:
                record = record.model_copy(update={"client_id": posting.parties.client_id})
            await insert_event(conn, record, now, transaction_id=txn_id)
        return LedgerReceipt(transaction_id=str(txn_id), duplicate=False, payment=row)

    async def _update_register(
        self, conn: AsyncConnection, posting: LedgerPosting, now: datetime
    ) -> RegisterRow | None:
        """The payment's register row after this posting (written and read in one statement)."""
        txn = posting.transaction
        if txn.kind in HOLD_KINDS or txn.kind in RECONCILIATION_KINDS:
            # The acquirer's hold and reconciliation's postings move no captured money: the
            # register is the capture's.
            return await _register(conn, txn.payment_id)
        if txn.kind == TransactionKind.PAYMENT:
            if posting.parties is None:
                raise ValueError("a capture posting names its parties")
            row = await _register_row(
                conn,
                _REGISTER_CAPTURE,
                {
                    "payment_id": txn.payment_id,
                    "amount": posting.amount,
                    "captured": posting.amount,
                    "refunded": 0,
                    "disputed": 0,
                    "dispute_lost": 0,
                    "status": PaymentStatus.SUCCEEDED.value,
                    "created_at": now,
                    "updated_at": now,
                    **posting.parties.model_dump(),
                },
            )
        else:
            changes = _register_after(txn, posting.amount, await _register(conn, txn.payment_id))
            row = await _register_row(
                conn,
                payments.update()
                .where(payments.c.payment_id == txn.payment_id)
                .values(
                    updated_at=now,
                    **{
                        k: (v.value if isinstance(v, PaymentStatus) else v)
                        for k, v in changes.items()
                    },
                )
                .returning(*payments.c),
            )
        if row is None:  # a capture of a payment registered before (say, its outcome)
            row = await _register(conn, txn.payment_id)
        assert row is not None
        return row

    async def payment(self, payment_id: str) -> RegisterRow | None:
        async with self.engine.connect() as conn:
            return await _register(conn, payment_id)

    async def held(self, payment_id: str) -> int:
        """What the payment's authorization hold still holds: its hold posting's amount until a
        release (captured or voided) is posted, then 0. (The hold account is credited by the
        hold: what it holds is the negative of its entries' sum.)"""
        async with self.engine.connect() as conn:
            held = await conn.scalar(
                sa.select(sa.func.coalesce(sa.func.sum(ledger_entries.c.amount), 0))
                .select_from(
                    ledger_transactions.join(
                        ledger_entries, ledger_entries.c.transaction_id == ledger_transactions.c.id
                    ).join(accounts, accounts.c.id == ledger_entries.c.account_id)
                )
                .where(
                    ledger_transactions.c.payment_id == payment_id,
                    accounts.c.type == AccountType.AUTHORIZATION_HOLD.value,
                )
            )
        return -int(held or 0)

    async def record_outcome(self, outcome: PaymentOutcome) -> None:
        """Keep the final word on a payment after its workflow history is gone. Payments that
        never reached the ledger (rejected, declined, canceled early) get a row with nothing
        captured; the amounts of captured ones stay as their postings left them."""

        async def work(conn: AsyncConnection) -> None:
            now = datetime.now(UTC)
            statement = insert(payments).values(
                payment_id=outcome.payment_id,
                amount=outcome.amount,
                captured=0,
                refunded=0,
                disputed=0,
                dispute_lost=0,
                status=outcome.status.value,
                summary=outcome.summary,
                created_at=now,
                updated_at=now,
                **outcome.parties.model_dump(),
            )
            await conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["payment_id"],
                    set_={"summary": statement.excluded.summary, "updated_at": now},
                )
            )
            # Payments started before the idempotency register existed register here, so
            # their key still finds them once Temporal has forgotten them.
            fingerprint = outcome.summary.get("fingerprint")
            if isinstance(fingerprint, str):
                await record_started(
                    conn, outcome.payment_id, outcome.parties.client_id, fingerprint
                )

        await run_serializable(self.engine, work, max_attempts=self.max_attempts)

    async def set_account_limit(self, account: Account, max_balance: int | None) -> None:
        """Cap what `account` may hold (its credit balance), opening it if need be; None lifts
        the cap. Postings that would pass it are refused with MerchantOverLimit."""
        if max_balance is not None and max_balance < 0:
            raise ValueError("an account limit is a non-negative amount of minor units")

        async def work(conn: AsyncConnection) -> None:
            statement = insert(accounts).values(
                code=account.code,
                type=account.type.value,
                currency=account.currency,
                status="open",
                max_balance=max_balance,
            )
            await conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["code"], set_={"max_balance": max_balance}
                )
            )

        await run_serializable(self.engine, work, max_attempts=self.max_attempts)

    async def close_account(self, code: str) -> None:
        async def work(conn: AsyncConnection) -> None:
            await conn.execute(
                accounts.update().where(accounts.c.code == code).values(status="closed")
            )

        await run_serializable(self.engine, work, max_attempts=self.max_attempts)


async def _register(conn: AsyncConnection, payment_id: str) -> RegisterRow | None:
    return await _register_row(conn, sa.select(payments).where(payments.c.payment_id == payment_id))


async def _register_row(
    conn: AsyncConnection, statement: sa.Executable, values: dict[str, Any] | None = None
) -> RegisterRow | None:
    """The register row a SELECT, or an INSERT/UPDATE ... RETURNING, gives back (if any)."""
    row = (await conn.execute(statement, values)).mappings().first()
    return RegisterRow.model_validate(dict(row)) if row is not None else None


async def _same_as_posted(
    conn: AsyncConnection, transaction_id: uuid.UUID, txn: LedgerTransaction
) -> None:
    """A retry finds its own posting: the same entries. Anything else in that slot (another
    amount, currency or account: a second run of a payment the first one already posted, a
    refund id reused for another amount) is refused, never reported as a harmless duplicate."""
    rows = await conn.execute(
        sa.select(accounts.c.code, ledger_entries.c.amount, ledger_entries.c.currency)
        .join(accounts, accounts.c.id == ledger_entries.c.account_id)
        .where(ledger_entries.c.transaction_id == transaction_id)
    )
    posted = sorted((r.code, int(r.amount), r.currency) for r in rows)
    asked = sorted((e.account.code, e.amount, e.account.currency) for e in txn.entries)
    if posted != asked:
        raise LedgerRejected(
            FailureType.POSTING_CONFLICT,
            f"{txn.kind} {txn.reference or ''} of {txn.payment_id} was already posted with other "
            f"entries ({_describe(posted)}); refusing a different one ({_describe(asked)})",
        )


async def _first_release(
    conn: AsyncConnection, txn: LedgerTransaction, transaction_id: uuid.UUID
) -> None:
    """A hold is released once: captured or voided, never both, never twice. The same release
    retried is a duplicate (its own slot, found above); any other release of the payment's hold
    is refused here, in the posting's transaction, before it moves anything (SERIALIZABLE: two
    releases racing cannot both see none)."""
    earlier = (
        await conn.execute(
            sa.select(ledger_transactions.c.kind, ledger_transactions.c.reference).where(
                ledger_transactions.c.payment_id == txn.payment_id,
                ledger_transactions.c.kind.in_([k.value for k in HOLD_RELEASES]),
                ledger_transactions.c.id != transaction_id,
            )
        )
    ).first()
    if earlier is not None:
        raise LedgerRejected(
            FailureType.HOLD_ALREADY_RELEASED,
            f"the hold of {txn.payment_id} was already released ({earlier.kind} "
            f"{earlier.reference!r}); refusing a second release ({txn.kind} {txn.reference!r})",
        )


def _describe(entries: list[tuple[str, int, str]]) -> str:
    return ", ".join(f"{code} {amount:+d} {ccy}" for code, amount, ccy in entries)


class _OpenAccount(NamedTuple):
    id: uuid.UUID
    max_balance: int | None


async def _open_accounts(conn: AsyncConnection, wanted: list[Account]) -> dict[str, _OpenAccount]:
    """Create accounts on first use; refuse a posting to a closed one."""
    unique = {a.code: a for a in wanted}
    await conn.execute(
        _OPEN_ACCOUNT,
        [
            {"code": a.code, "type": a.type.value, "currency": a.currency, "status": "open"}
            for a in unique.values()
        ],
    )
    rows = (
        await conn.execute(
            sa.select(
                accounts.c.id, accounts.c.code, accounts.c.status, accounts.c.max_balance
            ).where(accounts.c.code.in_(unique))
        )
    ).all()
    for row in rows:
        if row.status != "open":
            raise LedgerRejected(FailureType.ACCOUNT_CLOSED, f"account {row.code} is closed")
    return {row.code: _OpenAccount(row.id, row.max_balance) for row in rows}


async def _hold_within_limits(
    conn: AsyncConnection, txn: LedgerTransaction, opened: dict[str, _OpenAccount]
) -> None:
    """Refuse a posting that takes a limited account's credit balance past its limit.

    The balance is read inside the posting's SERIALIZABLE transaction: two postings to the same
    limited account that both read it conflict (40001) and one is run again, so concurrent
    postings can never overshoot the limit together. Unlimited accounts cost no extra read."""
    raised: dict[str, int] = defaultdict(int)
    for entry in txn.entries:
        raised[entry.account.code] -= entry.amount  # a credit (negative) raises what it holds
    for code, increase in raised.items():
        limit = opened[code].max_balance
        if limit is None or increase <= 0:
            continue
        debits_minus_credits = await conn.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(ledger_entries.c.amount), 0)).where(
                ledger_entries.c.account_id == opened[code].id
            )
        )
        held_after = -int(debits_minus_credits or 0) + increase
        if held_after > limit:
            raise LedgerRejected(
                FailureType.MERCHANT_OVER_LIMIT,
                f"account {code} would hold {held_after} minor units, over its limit of {limit}",
            )
