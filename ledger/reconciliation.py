"""Reconciliation: the ledger proved against the acquirer's settlement (docs/reconciliation.md).

Three steps, each idempotent:

1. **Expect.** Every ledger movement of a payment made through the acquirer (its capture, each
   refund, each lost or won dispute) becomes an *expectation*: the settlement line the acquirer
   owes us for it. Its claim moves from the customer's funding account to the acquirer
   receivable (`settlement_expected`, one balanced posting per expectation), so the receivable's
   balance is always what the acquirer has yet to settle.
2. **Import and match.** A file is imported once (by its SHA-256), in one SERIALIZABLE
   transaction with everything it leads to, or not at all. Each movement line is matched to an
   expectation by the acquirer's reference, then by our payment id (and our refund or dispute
   reference), and compared exactly in integer minor units: matched, amount mismatch, currency
   mismatch, or unexpected. Each payout batch (one bank credit) is posted once:
   bank + fees = receivable (its lines that found their movement) + settlement suspense (those
   that did not).
3. **Exceptions.** Expectations still open after `missing_after`, unexpected lines and
   mismatches wait in a queue until an operator resolves them with a reason: a manual match (an
   unexpected line that is a missing movement) or a write-off, each a balanced posting.

Over 400 lines: one store for the three steps, whose queries share the expectation and
settlement-line tables and whose import of a file is one SERIALIZABLE transaction; the rules it
applies are in domain/settlement.py.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain.acquirer import acquirer_refund_reference
from domain.ledger import (
    Account,
    AccountType,
    Entry,
    LedgerTransaction,
    TransactionKind,
    acquirer_fees_account,
    acquirer_receivable_account,
    bank_account,
    reconciliation_write_off_account,
    settlement_suspense_account,
)
from domain.settlement import (
    MOVEMENT_TYPES,
    LineType,
    SettlementFile,
    SettlementFileInvalid,
    SettlementLine,
)
from infra.database import run_serializable
from ledger.records import LedgerPosting
from ledger.store import Ledger
from ledger.tables import (
    reconciliation_exceptions,
    settlement_batches,
    settlement_expectations,
    settlement_files,
    settlement_lines,
)

DEFAULT_MISSING_AFTER = timedelta(days=2)


class ExceptionKind(StrEnum):
    MISSING = "missing"
    UNEXPECTED = "unexpected"
    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"


class Resolution(StrEnum):
    MANUAL_MATCH = "manual_match"
    WRITE_OFF = "write_off"
    # Not an operator's: a missing movement whose line arrived in a later file.
    SETTLED_LATE = "settled_late"


class ReconciliationRefused(Exception):
    """An operation the reconciliation state refuses (not found, already resolved, amounts
    that do not agree); `code` names why, for the API's error body."""

    def __init__(self, code: str, message: str, *, not_found: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.not_found = not_found


@dataclass
class ImportReport:
    sha256: str
    filename: str
    duplicate: bool = False
    imported_at: datetime | None = None
    lines: int = 0
    expectations_added: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    batches: list[dict[str, Any]] = field(default_factory=list)
    exceptions_opened: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "filename": self.filename,
            "duplicate": self.duplicate,
            "imported_at": self.imported_at.isoformat() if self.imported_at else None,
            "lines": self.lines,
            "expectations_added": self.expectations_added,
            "statuses": self.statuses,
            "batches": self.batches,
            "exceptions_opened": self.exceptions_opened,
        }


@dataclass(frozen=True)
class ReconciliationException:
    id: str
    kind: ExceptionKind
    status: str
    payment_id: str | None
    currency: str
    amount: int
    detail: str
    opened_at: datetime
    resolution: str | None
    reason: str | None
    resolved_at: datetime | None
    ledger_transaction_id: str | None
    expectation_id: str | None
    line_id: str | None

    def age(self, now: datetime) -> timedelta:
        return max(timedelta(0), now - self.opened_at)


# Age buckets of the exception gauge: how long an exception has waited (upper bounds, days).
AGE_BUCKETS: tuple[tuple[str, timedelta | None], ...] = (
    ("0-1d", timedelta(days=1)),
    ("1-3d", timedelta(days=3)),
    ("3-7d", timedelta(days=7)),
    ("7d+", None),
)


def age_bucket(age: timedelta) -> str:
    for name, bound in AGE_BUCKETS:
        if bound is None or age < bound:
            return name
    return AGE_BUCKETS[-1][0]


def exception_id(kind: ExceptionKind, expectation_id: Any, line_id: Any) -> str:
    """Deterministic: the same discrepancy found twice is one exception."""
    key = f"{kind.value}|{expectation_id or ''}|{line_id or ''}"
    return "rex_" + hashlib.sha256(key.encode()).hexdigest()[:24]


# Ledger kinds that a settlement line confirms, and the line types each expects.
_EXPECTED_TYPES: dict[str, tuple[LineType, ...]] = {
    TransactionKind.PAYMENT.value: (LineType.CAPTURE,),
    TransactionKind.REFUND.value: (LineType.REFUND,),
    TransactionKind.DISPUTE_LOST.value: (LineType.CHARGEBACK,),
    TransactionKind.DISPUTE_WON.value: (LineType.CHARGEBACK, LineType.CHARGEBACK_REVERSAL),
}

# Movements of payments the acquirer handled (they have an authorization hold) that have no
# expectation yet; a payment whose capture posting was reversed expects nothing.
_MOVEMENTS_TO_EXPECT_SQL = """
SELECT t.id, t.payment_id, t.kind, t.reference, t.created_at, a.type AS account_type,
       a.code, e.amount, e.currency
FROM ledger_transactions t
JOIN ledger_entries e ON e.transaction_id = t.id
JOIN accounts a ON a.id = e.account_id
WHERE t.kind IN ('payment', 'refund', 'dispute_lost', 'dispute_won')
  AND EXISTS (SELECT 1 FROM ledger_transactions h
              WHERE h.payment_id = t.payment_id AND h.kind = 'authorization_hold')
  AND NOT EXISTS (SELECT 1 FROM ledger_transactions r
                  WHERE r.payment_id = t.payment_id AND r.kind = 'payment_reversal')
  AND NOT EXISTS (SELECT 1 FROM settlement_expectations x WHERE x.source_transaction_id = t.id)
ORDER BY t.created_at, t.id
"""

_CUSTOMER_ACCOUNTS_SQL = """
SELECT t.payment_id, a.code, a.currency
FROM ledger_transactions t
JOIN ledger_entries e ON e.transaction_id = t.id
JOIN accounts a ON a.id = e.account_id
WHERE t.kind = 'payment' AND a.type = 'customer_funding' AND t.payment_id = ANY(:ids)
"""

_ACQUIRER_REFERENCES_SQL = """
SELECT DISTINCT payment_id, payload -> 'data' ->> 'acquirer_reference' AS acquirer_reference
FROM outbox_events
WHERE payment_id = ANY(:ids) AND payload -> 'data' ->> 'acquirer_reference' IS NOT NULL
"""


@dataclass
class _Expectation:
    id: uuid.UUID
    payment_id: str
    kind: str
    merchant_reference: str
    acquirer_reference: str | None
    amount: int
    currency: str
    expected_since: datetime


class Reconciliation:
    """Imports settlement files, matches them against the ledger, keeps the exception queue."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        missing_after: timedelta = DEFAULT_MISSING_AFTER,
        max_attempts: int = 8,
    ) -> None:
        self.engine = engine
        self.ledger = Ledger(engine, max_attempts=max_attempts)
        self.missing_after = missing_after
        self.max_attempts = max_attempts

    # ── expectations ─────────────────────────────────────────────────────────────────────
    async def refresh(self, now: datetime | None = None) -> tuple[int, dict[str, int]]:
        """Expect what the ledger moved since the last run and open the missing exceptions
        that are due; returns (expectations added, exceptions opened by kind)."""
        moment = now or datetime.now(UTC)

        async def work(conn: AsyncConnection) -> tuple[int, dict[str, int]]:
            added = await self._expect(conn, moment)
            opened = await self._open_missing(conn, moment)
            return added, {ExceptionKind.MISSING.value: opened} if opened else {}

        return await run_serializable(self.engine, work, max_attempts=self.max_attempts)

    async def _expect(self, conn: AsyncConnection, now: datetime) -> int:
        rows = (await conn.execute(sa.text(_MOVEMENTS_TO_EXPECT_SQL))).mappings().all()
        if not rows:
            return 0
        by_txn: dict[uuid.UUID, list[Any]] = defaultdict(list)
        for row in rows:
            by_txn[row["id"]].append(row)
        ids = sorted({row["payment_id"] for row in rows})
        customers = {
            r.payment_id: Account(
                code=r.code, type=AccountType.CUSTOMER_FUNDING, currency=r.currency
            )
            for r in await conn.execute(sa.text(_CUSTOMER_ACCOUNTS_SQL), {"ids": ids})
        }
        acquirer_refs = {
            r.payment_id: r.acquirer_reference
            for r in await conn.execute(sa.text(_ACQUIRER_REFERENCES_SQL), {"ids": ids})
        }
        added = 0
        for txn_id, entries in by_txn.items():
            first = entries[0]
            payment_id, kind, reference = first["payment_id"], first["kind"], first["reference"]
            customer = customers.get(payment_id)
            if customer is None:
                continue  # a follow-up without its capture posting: the checker reports that
            ccy = customer.currency

            def moved(account_type: str, entries: list[Any] = entries) -> int:
                return sum(int(e["amount"]) for e in entries if e["account_type"] == account_type)

            if kind == TransactionKind.PAYMENT.value:
                wanted = [(LineType.CAPTURE, moved("customer_funding"), "")]
            elif kind == TransactionKind.REFUND.value:
                wanted = [
                    (
                        LineType.REFUND,
                        moved("customer_funding"),
                        acquirer_refund_reference(payment_id, reference),
                    )
                ]
            elif kind == TransactionKind.DISPUTE_LOST.value:
                wanted = [(LineType.CHARGEBACK, moved("customer_funding"), reference)]
            else:  # a won dispute: charged back, then given back
                held = moved("disputes")
                wanted = [
                    (LineType.CHARGEBACK, -held, reference),
                    (LineType.CHARGEBACK_REVERSAL, held, reference),
                ]
            for line_type, amount, merchant_reference in wanted:
                if amount == 0:
                    continue
                expectation_id = uuid.uuid4()
                inserted = await conn.scalar(
                    insert(settlement_expectations)
                    .values(
                        id=expectation_id,
                        payment_id=payment_id,
                        kind=line_type.value,
                        merchant_reference=merchant_reference,
                        acquirer_reference=acquirer_refs.get(payment_id),
                        source_transaction_id=txn_id,
                        amount=amount,
                        currency=ccy,
                        expected_since=first["created_at"],
                        status="open",
                        settled_amount=0,
                        written_off_amount=0,
                        updated_at=now,
                    )
                    .on_conflict_do_nothing(index_elements=["source_transaction_id", "kind"])
                    .returning(settlement_expectations.c.id)
                )
                if inserted is None:
                    continue
                added += 1
                await self._post(
                    conn,
                    payment_id,
                    TransactionKind.SETTLEMENT_EXPECTED,
                    # One slot per expectation, within the column's 64 characters.
                    f"{line_type.value}:{txn_id.hex}",
                    f"expected from the acquirer: {line_type.value}",
                    [
                        Entry(account=acquirer_receivable_account(ccy), amount=amount),
                        Entry(account=customer, amount=-amount),
                    ],
                )
        return added

    async def _post(
        self,
        conn: AsyncConnection,
        payment_id: str,
        kind: TransactionKind,
        reference: str,
        description: str,
        entries: list[Entry],
    ) -> uuid.UUID | None:
        """One balanced posting through the ledger's write path, in the caller's transaction;
        entries that cancel out on an account are merged, zero ones dropped."""
        merged: dict[str, tuple[Account, int]] = {}
        for entry in entries:
            account, total = merged.get(entry.account.code, (entry.account, 0))
            merged[entry.account.code] = (account, total + entry.amount)
        kept = [Entry(account=a, amount=t) for a, t in merged.values() if t != 0]
        if len(kept) < 2:
            return None
        txn = LedgerTransaction(
            payment_id=payment_id,
            kind=kind,
            reference=reference,
            description=description,
            entries=kept,
        )
        amount = sum(e.amount for e in kept if e.amount > 0)
        receipt = await self.ledger._post_in(conn, LedgerPosting(transaction=txn, amount=amount))
        return uuid.UUID(receipt.transaction_id)

    # ── import and match ─────────────────────────────────────────────────────────────────
    async def import_file(
        self, parsed: SettlementFile, filename: str, now: datetime | None = None
    ) -> ImportReport:
        """Import a parsed file (domain.settlement.parse_settlement_file) in one transaction.
        The same bytes a second time: nothing happens, `duplicate` says so. A file that reuses a
        batch or line id another file already brought is refused whole (SettlementFileInvalid)."""
        moment = now or datetime.now(UTC)

        async def work(conn: AsyncConnection) -> ImportReport:
            return await self._import_in(conn, parsed, filename, moment)

        return await run_serializable(self.engine, work, max_attempts=self.max_attempts)

    async def _import_in(
        self, conn: AsyncConnection, parsed: SettlementFile, filename: str, now: datetime
    ) -> ImportReport:
        report = ImportReport(sha256=parsed.sha256, filename=filename)
        earlier = (
            await conn.execute(
                sa.select(settlement_files).where(settlement_files.c.sha256 == parsed.sha256)
            )
        ).first()
        if earlier is not None:
            report.duplicate = True
            report.imported_at = earlier.imported_at
            report.filename = earlier.filename
            report.lines = earlier.line_count
            return report
        await self._refuse_reused_ids(conn, parsed)
        # The file's row first: an import of the same bytes racing this one waits on it here,
        # and SERIALIZABLE makes the loser retry (40001) and find it imported above, before it
        # has written anything else.
        file_id = uuid.uuid4()
        claimed = await conn.scalar(
            insert(settlement_files)
            .values(
                id=file_id,
                sha256=parsed.sha256,
                filename=filename[:255],
                imported_at=now,
                line_count=len(parsed.lines),
                summary={},
            )
            .on_conflict_do_nothing(index_elements=["sha256"])
            .returning(settlement_files.c.id)
        )
        if claimed is None:  # PostgreSQL and CockroachDB answer 40001 first; belt and braces
            report.duplicate = True
            report.lines = len(parsed.lines)
            return report
        report.expectations_added = await self._expect(conn, now)
        statuses: dict[str, int] = defaultdict(int)
        opened: dict[str, int] = defaultdict(int)
        for batch_id, lines in parsed.batches().items():
            movements = [ln for ln in lines if ln.type in MOVEMENT_TYPES]
            pool = await self._open_expectations(conn, movements)
            outcome: dict[str, str] = {}
            for line in lines:
                status, exception = await self._match_line(conn, file_id, line, pool, now)
                outcome[line.line_id] = status
                statuses[status] += 1
                if exception is not None:
                    opened[exception.value] += 1
            report.batches.append(await self._post_batch(conn, file_id, batch_id, lines, outcome))
        missing = await self._open_missing(conn, now)
        if missing:
            opened[ExceptionKind.MISSING.value] += missing
        report.lines = len(parsed.lines)
        report.statuses = dict(statuses)
        report.exceptions_opened = dict(opened)
        report.imported_at = now
        await conn.execute(
            settlement_files.update()
            .where(settlement_files.c.id == file_id)
            .values(summary=report.as_json())
        )
        return report

    async def _refuse_reused_ids(self, conn: AsyncConnection, parsed: SettlementFile) -> None:
        batch_ids = sorted(parsed.batches())
        line_ids = [ln.line_id for ln in parsed.lines]
        reused_batches = (
            await conn.scalars(
                sa.select(settlement_batches.c.batch_id).where(
                    settlement_batches.c.batch_id.in_(batch_ids)
                )
            )
        ).all()
        reused_lines = set(
            (
                await conn.scalars(
                    sa.select(settlement_lines.c.line_id).where(
                        settlement_lines.c.line_id.in_(line_ids)
                    )
                )
            ).all()
        )
        problems = [
            (0, f"payout batch {b} was already imported from another file") for b in reused_batches
        ]
        problems += [
            (ln.line_number, f"line_id {ln.line_id} was already imported from another file")
            for ln in parsed.lines
            if ln.line_id in reused_lines and ln.type is not LineType.PAYOUT
        ]
        if problems:
            raise SettlementFileInvalid(problems)

    async def _open_expectations(
        self, conn: AsyncConnection, lines: Sequence[SettlementLine]
    ) -> list[_Expectation]:
        if not lines:
            return []
        acquirer_refs = sorted({ln.acquirer_reference for ln in lines})
        references = sorted({ln.reference for ln in lines})
        x = settlement_expectations.c
        rows = await conn.execute(
            sa.select(settlement_expectations)
            .where(
                x.status == "open",
                sa.or_(x.acquirer_reference.in_(acquirer_refs), x.payment_id.in_(references)),
            )
            .order_by(x.expected_since, x.id)
        )
        return [
            _Expectation(
                id=r.id,
                payment_id=r.payment_id,
                kind=r.kind,
                merchant_reference=r.merchant_reference,
                acquirer_reference=r.acquirer_reference,
                amount=int(r.amount),
                currency=r.currency,
                expected_since=r.expected_since,
            )
            for r in rows
        ]

    @staticmethod
    def _candidate(line: SettlementLine, pool: list[_Expectation]) -> _Expectation | None:
        """By the acquirer's reference first, then by our payment id; among those, ours for the
        refund or dispute when the line names it, and the one agreeing in amount and currency
        before one that does not (so a mismatch is reported against the right movement)."""
        same_kind = [x for x in pool if x.kind == line.type.value]
        found = [x for x in same_kind if x.acquirer_reference == line.acquirer_reference]
        found = found or [x for x in same_kind if x.payment_id == line.reference]
        if line.merchant_reference:
            named = [x for x in found if x.merchant_reference == line.merchant_reference]
            found = named or found
        if not found:
            return None
        found.sort(key=lambda x: (x.currency != line.currency, x.amount != line.amount))
        return found[0]

    async def _match_line(
        self,
        conn: AsyncConnection,
        file_id: uuid.UUID,
        line: SettlementLine,
        pool: list[_Expectation],
        now: datetime,
    ) -> tuple[str, ExceptionKind | None]:
        line_uuid = uuid.uuid4()
        expectation: _Expectation | None = None
        exception: ExceptionKind | None = None
        if line.type is LineType.FEE:
            status = "fee"
        elif line.type is LineType.PAYOUT:
            status = "payout"
        else:
            expectation = self._candidate(line, pool)
            if expectation is None:
                status, exception = "unexpected", ExceptionKind.UNEXPECTED
            else:
                pool.remove(expectation)
                if expectation.currency != line.currency:
                    status, exception = "currency_mismatch", ExceptionKind.CURRENCY_MISMATCH
                elif expectation.amount != line.amount:
                    status, exception = "amount_mismatch", ExceptionKind.AMOUNT_MISMATCH
                else:
                    status = "matched"
        await conn.execute(
            settlement_lines.insert().values(
                id=line_uuid,
                file_id=file_id,
                line_number=line.line_number,
                line_id=line.line_id,
                batch_id=line.batch_id,
                settlement_date=line.settlement_date,
                type=line.type.value,
                reference=line.reference,
                acquirer_reference=line.acquirer_reference,
                movement_reference=line.movement_reference,
                merchant_reference=line.merchant_reference,
                amount=line.amount,
                currency=line.currency,
                occurred_at=line.occurred_at,
                status=status,
                expectation_id=expectation.id if expectation else None,
            )
        )
        if expectation is not None:
            settled = line.amount if status != "currency_mismatch" else 0
            await conn.execute(
                settlement_expectations.update()
                .where(settlement_expectations.c.id == expectation.id)
                .values(status=status, line_id=line_uuid, settled_amount=settled, updated_at=now)
            )
            await self._close_missing(conn, expectation.id, line, now)
        if exception is not None:
            await self._open_exception(
                conn, exception, line, line_uuid, expectation, now=line.occurred_at
            )
        return status, exception

    async def _open_exception(
        self,
        conn: AsyncConnection,
        kind: ExceptionKind,
        line: SettlementLine,
        line_uuid: uuid.UUID,
        expectation: _Expectation | None,
        now: datetime,
    ) -> None:
        if kind is ExceptionKind.UNEXPECTED or expectation is None:
            detail = (
                f"{line.type.value} {line.amount} {line.currency} of {line.reference} "
                f"(acquirer {line.acquirer_reference}, {line.movement_reference}) settled; no "
                "ledger movement expects it"
            )
            currency, amount, payment_id = line.currency, line.amount, None
        elif kind is ExceptionKind.AMOUNT_MISMATCH:
            detail = (
                f"{line.type.value} of {expectation.payment_id}: ledger {expectation.amount}, "
                f"settled {line.amount} {line.currency} ({line.movement_reference})"
            )
            currency, amount = expectation.currency, expectation.amount - line.amount
            payment_id = expectation.payment_id
        else:
            detail = (
                f"{line.type.value} of {expectation.payment_id}: ledger {expectation.amount} "
                f"{expectation.currency}, settled {line.amount} {line.currency} "
                f"({line.movement_reference})"
            )
            currency, amount = expectation.currency, expectation.amount
            payment_id = expectation.payment_id
        await conn.execute(
            insert(reconciliation_exceptions)
            .values(
                id=exception_id(kind, expectation.id if expectation else None, line_uuid),
                kind=kind.value,
                status="open",
                expectation_id=expectation.id if expectation else None,
                line_id=line_uuid,
                payment_id=payment_id,
                currency=currency,
                amount=amount,
                detail=detail,
                opened_at=now,
            )
            .on_conflict_do_nothing(index_elements=["id"])
        )

    async def _close_missing(
        self, conn: AsyncConnection, expectation_id: uuid.UUID, line: SettlementLine, now: datetime
    ) -> None:
        e = reconciliation_exceptions.c
        await conn.execute(
            reconciliation_exceptions.update()
            .where(
                e.expectation_id == expectation_id,
                e.kind == ExceptionKind.MISSING.value,
                e.status == "open",
            )
            .values(
                status="resolved",
                resolution=Resolution.SETTLED_LATE.value,
                reason=f"settled on {line.settlement_date} ({line.line_id})",
                resolved_at=now,
            )
        )

    async def _open_missing(self, conn: AsyncConnection, now: datetime) -> int:
        x = settlement_expectations.c
        due = await conn.execute(
            sa.select(settlement_expectations).where(
                x.status == "open", x.expected_since <= now - self.missing_after
            )
        )
        opened = 0
        for row in due:
            inserted = await conn.scalar(
                insert(reconciliation_exceptions)
                .values(
                    id=exception_id(ExceptionKind.MISSING, row.id, None),
                    kind=ExceptionKind.MISSING.value,
                    status="open",
                    expectation_id=row.id,
                    payment_id=row.payment_id,
                    currency=row.currency,
                    amount=int(row.amount),
                    detail=(
                        f"{row.kind} {row.amount} {row.currency} of {row.payment_id} "
                        f"{row.merchant_reference} expected since "
                        f"{row.expected_since:%Y-%m-%d %H:%M} UTC; not settled"
                    ).replace("  ", " "),
                    opened_at=row.expected_since,
                )
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(reconciliation_exceptions.c.id)
            )
            opened += inserted is not None
        return opened

    async def _post_batch(
        self,
        conn: AsyncConnection,
        file_id: uuid.UUID,
        batch_id: str,
        lines: list[SettlementLine],
        outcome: dict[str, str],
    ) -> dict[str, Any]:
        payout = next(ln for ln in lines if ln.type is LineType.PAYOUT)
        ccy = payout.currency
        linked = sum(
            ln.amount for ln in lines if outcome[ln.line_id] in ("matched", "amount_mismatch")
        )
        unlinked = sum(
            ln.amount for ln in lines if outcome[ln.line_id] in ("unexpected", "currency_mismatch")
        )
        fees = sum(ln.amount for ln in lines if ln.type is LineType.FEE)
        transaction_id = await self._post(
            conn,
            f"payout:{batch_id}",
            TransactionKind.SETTLEMENT_PAYOUT,
            "",
            f"payout {payout.movement_reference} of settlement batch {batch_id}",
            [
                entry
                for entry in (
                    Entry(account=bank_account(ccy), amount=payout.amount)
                    if payout.amount
                    else None,
                    Entry(account=acquirer_fees_account(ccy), amount=-fees) if fees else None,
                    Entry(account=acquirer_receivable_account(ccy), amount=-linked)
                    if linked
                    else None,
                    Entry(account=settlement_suspense_account(ccy), amount=-unlinked)
                    if unlinked
                    else None,
                )
                if entry is not None
            ],
        )
        await conn.execute(
            settlement_batches.insert().values(
                batch_id=batch_id,
                file_id=file_id,
                settlement_date=payout.settlement_date,
                currency=ccy,
                payout_amount=payout.amount,
                bank_reference=payout.movement_reference,
                line_count=len(lines) - 1,
                ledger_transaction_id=transaction_id,
            )
        )
        return {
            "batch_id": batch_id,
            "currency": ccy,
            "payout": payout.amount,
            "lines": len(lines) - 1,
            "matched_to_receivable": linked,
            "to_suspense": unlinked,
            "fees": -fees,
        }

    # ── the exception queue ──────────────────────────────────────────────────────────────
    async def exceptions(
        self,
        *,
        status: str | None = "open",
        kind: ExceptionKind | None = None,
        limit: int = 100,
        starting_after: str | None = None,
    ) -> tuple[list[ReconciliationException], bool]:
        """Oldest first (the queue's order); `starting_after` an exception id (cursor)."""
        e = reconciliation_exceptions.c
        query = sa.select(reconciliation_exceptions)
        if status is not None:
            query = query.where(e.status == status)
        if kind is not None:
            query = query.where(e.kind == kind.value)
        async with self.engine.connect() as conn:
            if starting_after is not None:
                cursor = (
                    await conn.execute(sa.select(e.opened_at, e.id).where(e.id == starting_after))
                ).first()
                if cursor is None:
                    raise ReconciliationRefused(
                        "resource_missing", "No such exception.", not_found=True
                    )
                query = query.where(
                    sa.tuple_(e.opened_at, e.id)
                    > sa.tuple_(sa.literal(cursor.opened_at), sa.literal(cursor.id))
                )
            rows = (await conn.execute(query.order_by(e.opened_at, e.id).limit(limit + 1))).all()
        found = [_exception(r) for r in rows[:limit]]
        return found, len(rows) > limit

    async def exception(self, exception_id: str) -> ReconciliationException | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(reconciliation_exceptions).where(
                        reconciliation_exceptions.c.id == exception_id
                    )
                )
            ).first()
        return _exception(row) if row is not None else None

    async def open_summary(
        self, now: datetime | None = None
    ) -> list[tuple[str, str, str, int, int]]:
        """(kind, age bucket, currency, count, value in minor units) of the open exceptions."""
        moment = now or datetime.now(UTC)
        found, _ = await self.exceptions(status="open", limit=10_000)
        totals: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        for exc in found:
            key = (exc.kind.value, age_bucket(exc.age(moment)), exc.currency)
            totals[key][0] += 1
            totals[key][1] += abs(exc.amount)
        return [(k, b, c, n, v) for (k, b, c), (n, v) in sorted(totals.items())]

    async def resolve(
        self,
        exception_id: str,
        resolution: Resolution,
        reason: str,
        *,
        counterpart: str | None = None,
        now: datetime | None = None,
    ) -> ReconciliationException:
        """Resolve an open exception with a reason: a write-off posts the difference to the
        reconciliation expense account; a manual match pairs an unexpected line with a missing
        movement (`counterpart`, the other exception) of the same currency and amount and moves
        the money from settlement suspense to the receivable. Both exceptions resolve."""
        moment = now or datetime.now(UTC)
        if not reason.strip():
            raise ReconciliationRefused("reason_required", "Say why: a reason is required.")

        async def work(conn: AsyncConnection) -> None:
            found = await self._locked_exception(conn, exception_id)
            if resolution is Resolution.WRITE_OFF:
                await self._write_off(conn, found, reason, moment)
            elif resolution is Resolution.MANUAL_MATCH:
                if counterpart is None:
                    raise ReconciliationRefused(
                        "counterpart_required",
                        "A manual match names the other exception (the missing movement for an "
                        "unexpected line, or the unexpected line for a missing movement).",
                    )
                other = await self._locked_exception(conn, counterpart, "counterpart_missing")
                await self._manual_match(conn, found, other, reason, moment)
            else:
                raise ReconciliationRefused("resolution_invalid", f"cannot resolve by {resolution}")

        await run_serializable(self.engine, work, max_attempts=self.max_attempts)
        resolved = await self.exception(exception_id)
        assert resolved is not None
        return resolved

    async def _locked_exception(
        self, conn: AsyncConnection, exception_id: str, missing: str = "resource_missing"
    ) -> Any:
        row = (
            await conn.execute(
                sa.select(reconciliation_exceptions).where(
                    reconciliation_exceptions.c.id == exception_id
                )
            )
        ).first()
        if row is None:
            raise ReconciliationRefused(missing, "No such exception.", not_found=True)
        if row.status != "open":
            raise ReconciliationRefused(
                "exception_resolved",
                f"Exception {exception_id} was already resolved ({row.resolution}).",
            )
        return row

    async def _line(self, conn: AsyncConnection, line_id: Any) -> Any:
        return (
            await conn.execute(sa.select(settlement_lines).where(settlement_lines.c.id == line_id))
        ).first()

    async def _expectation(self, conn: AsyncConnection, expectation_id: Any) -> Any:
        return (
            await conn.execute(
                sa.select(settlement_expectations).where(
                    settlement_expectations.c.id == expectation_id
                )
            )
        ).first()

    async def _write_off(self, conn: AsyncConnection, exc: Any, reason: str, now: datetime) -> None:
        entries: list[Entry] = []
        if exc.expectation_id is not None:
            x = await self._expectation(conn, exc.expectation_id)
            residual = int(x.amount) - int(x.settled_amount) - int(x.written_off_amount)
            if residual:
                entries += [
                    Entry(account=reconciliation_write_off_account(x.currency), amount=residual),
                    Entry(account=acquirer_receivable_account(x.currency), amount=-residual),
                ]
            await conn.execute(
                settlement_expectations.update()
                .where(settlement_expectations.c.id == x.id)
                .values(
                    status="written_off",
                    written_off_amount=int(x.written_off_amount) + residual,
                    updated_at=now,
                )
            )
        if exc.kind in (ExceptionKind.UNEXPECTED.value, ExceptionKind.CURRENCY_MISMATCH.value):
            line = await self._line(conn, exc.line_id)
            entries += [
                Entry(account=settlement_suspense_account(line.currency), amount=int(line.amount)),
                Entry(
                    account=reconciliation_write_off_account(line.currency),
                    amount=-int(line.amount),
                ),
            ]
        transaction_id = await self._post(
            conn,
            exc.payment_id or "reconciliation",
            TransactionKind.SETTLEMENT_WRITE_OFF,
            exc.id,
            f"{exc.kind} written off: {reason}"[:500],
            entries,
        )
        await self._mark_resolved(conn, exc.id, Resolution.WRITE_OFF, reason, now, transaction_id)

    async def _manual_match(
        self, conn: AsyncConnection, first: Any, second: Any, reason: str, now: datetime
    ) -> None:
        kinds = {first.kind, second.kind}
        if kinds != {ExceptionKind.UNEXPECTED.value, ExceptionKind.MISSING.value}:
            raise ReconciliationRefused(
                "match_invalid",
                "A manual match pairs an unexpected line with a missing movement.",
            )
        unexpected, missing = (
            (first, second) if first.kind == ExceptionKind.UNEXPECTED.value else (second, first)
        )
        line = await self._line(conn, unexpected.line_id)
        x = await self._expectation(conn, missing.expectation_id)
        if (line.currency, int(line.amount)) != (x.currency, int(x.amount)):
            raise ReconciliationRefused(
                "match_amounts_differ",
                f"The line settled {line.amount} {line.currency}; the movement expects "
                f"{x.amount} {x.currency}. Write each off instead.",
            )
        transaction_id = await self._post(
            conn,
            x.payment_id,
            TransactionKind.SETTLEMENT_MANUAL_MATCH,
            unexpected.id,
            f"line {line.line_id} matched by hand: {reason}"[:500],
            [
                Entry(account=settlement_suspense_account(line.currency), amount=int(line.amount)),
                Entry(account=acquirer_receivable_account(line.currency), amount=-int(line.amount)),
            ],
        )
        await conn.execute(
            settlement_expectations.update()
            .where(settlement_expectations.c.id == x.id)
            .values(
                status="matched", line_id=line.id, settled_amount=int(line.amount), updated_at=now
            )
        )
        await conn.execute(
            settlement_lines.update()
            .where(settlement_lines.c.id == line.id)
            .values(status="matched", expectation_id=x.id)
        )
        for exc in (unexpected, missing):
            await self._mark_resolved(
                conn, exc.id, Resolution.MANUAL_MATCH, reason, now, transaction_id
            )

    async def _mark_resolved(
        self,
        conn: AsyncConnection,
        exception_id: str,
        resolution: Resolution,
        reason: str,
        now: datetime,
        transaction_id: uuid.UUID | None,
    ) -> None:
        await conn.execute(
            reconciliation_exceptions.update()
            .where(reconciliation_exceptions.c.id == exception_id)
            .values(
                status="resolved",
                resolution=resolution.value,
                reason=reason,
                resolved_at=now,
                ledger_transaction_id=transaction_id,
            )
        )


def _exception(row: Any) -> ReconciliationException:
    return ReconciliationException(
        id=row.id,
        kind=ExceptionKind(row.kind),
        status=row.status,
        payment_id=row.payment_id,
        currency=row.currency,
        amount=int(row.amount),
        detail=row.detail,
        opened_at=row.opened_at,
        resolution=row.resolution,
        reason=row.reason,
        resolved_at=row.resolved_at,
        ledger_transaction_id=str(row.ledger_transaction_id) if row.ledger_transaction_id else None,
        expectation_id=str(row.expectation_id) if row.expectation_id else None,
        line_id=str(row.line_id) if row.line_id else None,
    )
