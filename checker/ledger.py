"""The ledger's promises, read once per run: every transaction balances, refunds and disputes
stay within what was captured, one posting per captured payment, and the payments register
agrees with the amounts its entries moved.

Each check recomputes what a payment moved from its ledger entries and only then compares it
with the register, read as the ledger's own `RegisterRow`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from checker.report import (
    LEDGER_BALANCED,
    POSTED_ONCE,
    REGISTER_MATCHES,
    WITHIN_CAPTURED,
    CheckResult,
    CheckScope,
    Findings,
    as_int,
    fetch_rows,
)
from domain.amounts import Amounts, PaymentStatus
from domain.ledger import AccountType, TransactionKind
from ledger.records import RegisterRow

# Workflow statuses of a payment between steps: not judged (the checker wants a quiet system).
IN_FLIGHT = frozenset(
    {
        PaymentStatus.RECEIVED,
        PaymentStatus.REQUIRES_REVIEW,
        PaymentStatus.PROCESSING,
        # Authorized and held, waiting for a capture or a void (checker/holds.py checks the hold).
        PaymentStatus.REQUIRES_CAPTURE,
    }
)
# Statuses that say money was captured and still is.
CAPTURED = frozenset(
    {
        PaymentStatus.SUCCEEDED,
        PaymentStatus.PARTIALLY_REFUNDED,
        PaymentStatus.REFUNDED,
        PaymentStatus.DISPUTED,
    }
)


def register_amounts(register: RegisterRow) -> Amounts:
    return Amounts(register.captured, register.refunded, register.disputed, register.dispute_lost)


def _recorded(register: RegisterRow, name: str) -> str | None:
    """A field of the workflow's final word (the register's summary, once it ended), as text
    the way PostgreSQL's `summary ->> name` reads it."""
    value = (register.summary or {}).get(name)
    if value is None:
        return None
    return value if isinstance(value, str) else json.dumps(value)


def recorded_status(register: RegisterRow) -> str | None:
    return _recorded(register, "status")


def recorded_amounts(register: RegisterRow) -> Amounts | None:
    values = [
        _recorded_int(_recorded(register, name))
        for name in ("captured", "refunded", "disputed", "dispute_lost")
    ]
    if any(v is None for v in values):
        return None
    return Amounts(*(v or 0 for v in values))


@dataclass(frozen=True)
class PaymentLedger:
    """One payment as the ledger knows it: its register row and what its entries moved."""

    payment_id: str
    register: RegisterRow | None
    moved: Amounts
    transactions: int
    postings: int
    reversals: int
    follow_ups: int

    @property
    def captured_and_kept(self) -> bool:
        return self.postings > 0 and self.reversals == 0

    def workflow_statuses_that_agree(self) -> frozenset[PaymentStatus]:
        """The workflow statuses consistent with this ledger state."""
        if self.captured_and_kept:
            return frozenset({self.moved.status()})
        if self.reversals > 0:
            # The posting was reversed: canceled by request, or failed and compensated.
            return frozenset({PaymentStatus.CANCELED, PaymentStatus.FAILED})
        recorded = payment_status(self.register.status if self.register else None)
        return frozenset({recorded}) if recorded is not None else frozenset()


_UNBALANCED_SQL = """
WITH scoped AS (SELECT t.id, t.payment_id, t.kind FROM ledger_transactions t WHERE {where})
SELECT s.id::text AS transaction_id, s.payment_id, s.kind, e.currency,
       coalesce(sum(e.amount), 0) AS total, count(e.id) AS entries,
       count(e.id) FILTER (WHERE a.currency IS DISTINCT FROM e.currency) AS foreign_entries
FROM scoped s
LEFT JOIN ledger_entries e ON e.transaction_id = s.id
LEFT JOIN accounts a ON a.id = e.account_id
GROUP BY s.id, s.payment_id, s.kind, e.currency
HAVING coalesce(sum(e.amount), 0) <> 0 OR count(e.id) = 0
    OR count(e.id) FILTER (WHERE a.currency IS DISTINCT FROM e.currency) > 0
ORDER BY s.payment_id
"""

_PAYMENTS_SQL = """
WITH scoped AS (
    SELECT p.payment_id FROM payments p WHERE {register_where}
    UNION
    SELECT t.payment_id FROM ledger_transactions t
    WHERE {ledger_where} AND t.kind NOT IN (:expected, :payout, :manual_match, :write_off)
),
moved AS (
    SELECT t.payment_id,
        count(DISTINCT t.id) FILTER (
            WHERE t.kind NOT IN (:hold, :hold_captured, :hold_voided,
                                 :expected, :payout, :manual_match, :write_off)
        ) AS transactions,
        count(DISTINCT t.id) FILTER (WHERE t.kind = :payment) AS postings,
        count(DISTINCT t.id) FILTER (WHERE t.kind = :reversal) AS reversals,
        count(DISTINCT t.id) FILTER (
            WHERE t.kind NOT IN (:payment, :reversal, :hold, :hold_captured, :hold_voided,
                                 :expected, :payout, :manual_match, :write_off)
        ) AS follow_ups,
        -- Captured: what the customer's funding account was debited by the posting, net of a
        -- reversal. Returned: what it was credited back by refunds and lost disputes. Held:
        -- what the disputes account holds for this payment.
        coalesce(sum(e.amount) FILTER (
            WHERE a.type = :customer AND t.kind IN (:payment, :reversal)), 0) AS captured,
        coalesce(-sum(e.amount) FILTER (WHERE a.type = :customer AND t.kind = :refund), 0)
            AS refunded,
        coalesce(-sum(e.amount) FILTER (WHERE a.type = :disputes), 0) AS disputed,
        coalesce(-sum(e.amount) FILTER (WHERE a.type = :customer AND t.kind = :lost), 0)
            AS dispute_lost
    FROM ledger_transactions t
    LEFT JOIN ledger_entries e ON e.transaction_id = t.id
    LEFT JOIN accounts a ON a.id = e.account_id
    WHERE t.payment_id IN (SELECT payment_id FROM scoped)
    GROUP BY t.payment_id
)
SELECT s.payment_id,
    CASE WHEN p.payment_id IS NOT NULL THEN to_jsonb(p) END AS register,
    coalesce(m.transactions, 0) AS transactions, coalesce(m.postings, 0) AS postings,
    coalesce(m.reversals, 0) AS reversals, coalesce(m.follow_ups, 0) AS follow_ups,
    coalesce(m.captured, 0) AS captured, coalesce(m.refunded, 0) AS refunded,
    coalesce(m.disputed, 0) AS disputed, coalesce(m.dispute_lost, 0) AS dispute_lost
FROM scoped s
LEFT JOIN payments p ON p.payment_id = s.payment_id
LEFT JOIN moved m ON m.payment_id = s.payment_id
ORDER BY s.payment_id
"""

KIND_PARAMS = {
    "payment": TransactionKind.PAYMENT.value,
    "reversal": TransactionKind.PAYMENT_REVERSAL.value,
    "refund": TransactionKind.REFUND.value,
    "lost": TransactionKind.DISPUTE_LOST.value,
    "customer": AccountType.CUSTOMER_FUNDING.value,
    "disputes": AccountType.DISPUTES.value,
    "hold": TransactionKind.AUTHORIZATION_HOLD.value,
    "hold_captured": TransactionKind.HOLD_CAPTURED.value,
    "hold_voided": TransactionKind.HOLD_VOIDED.value,
    "hold_account": AccountType.AUTHORIZATION_HOLD.value,
    # Reconciliation's postings (docs/reconciliation.md) move no payment's captured money.
    "expected": TransactionKind.SETTLEMENT_EXPECTED.value,
    "payout": TransactionKind.SETTLEMENT_PAYOUT.value,
    "manual_match": TransactionKind.SETTLEMENT_MANUAL_MATCH.value,
    "write_off": TransactionKind.SETTLEMENT_WRITE_OFF.value,
}


def _recorded_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _payment_ledger(row: Mapping[str, Any]) -> PaymentLedger:
    register = row["register"]
    return PaymentLedger(
        payment_id=str(row["payment_id"]),
        register=RegisterRow.model_validate(register) if register is not None else None,
        moved=Amounts(
            as_int(row["captured"]),
            as_int(row["refunded"]),
            as_int(row["disputed"]),
            as_int(row["dispute_lost"]),
        ),
        transactions=as_int(row["transactions"]),
        postings=as_int(row["postings"]),
        reversals=as_int(row["reversals"]),
        follow_ups=as_int(row["follow_ups"]),
    )


async def fetch_ledger_rows(
    engine: AsyncEngine, sql: str, scope: CheckScope
) -> list[dict[str, Any]]:
    """The rows of a query over the ledger in `scope`, its kinds and account types bound by
    their names in `KIND_PARAMS` (`:payment`, `:hold`, …)."""
    return await fetch_rows(engine, sql, {**scope.params(), **KIND_PARAMS})


async def load_payments(engine: AsyncEngine, scope: CheckScope) -> list[PaymentLedger]:
    sql = _PAYMENTS_SQL.format(
        register_where=scope.where("p", "updated_at"),
        ledger_where=scope.where("t", "created_at"),
    )
    return [_payment_ledger(row) for row in await fetch_ledger_rows(engine, sql, scope)]


# ── ledger checks ────────────────────────────────────────────────────────────────────────────
async def check_ledger_balanced(
    engine: AsyncEngine, scope: CheckScope, max_examples: int
) -> CheckResult:
    findings = Findings(LEDGER_BALANCED, max_examples)
    where = scope.where("t", "created_at")
    params = scope.params()
    async with engine.connect() as conn:
        total = await conn.scalar(
            text(f"SELECT count(*) FROM ledger_transactions t WHERE {where}"), params
        )
    findings.checked(as_int(total))
    for row in await fetch_rows(engine, _UNBALANCED_SQL.format(where=where), params):
        where_ = f"transaction {row['transaction_id']} ({row['kind']})"
        if row["entries"] == 0:
            findings.violation(row["payment_id"], f"{where_} has no entries")
        elif row["total"] != 0:
            findings.violation(
                row["payment_id"], f"{where_} sums to {row['total']} {row['currency']}, not zero"
            )
        else:
            findings.violation(
                row["payment_id"],
                f"{where_} has {row['foreign_entries']} {row['currency']} entries on accounts "
                "kept in another currency",
            )
    return findings.result


def check_within_captured(payments: Sequence[PaymentLedger], max_examples: int) -> CheckResult:
    findings = Findings(WITHIN_CAPTURED, max_examples)
    findings.checked(len(payments))
    for p in payments:
        sources: list[tuple[str, Amounts]] = [("ledger entries", p.moved)]
        if p.register is not None:
            sources.append(("payments register", register_amounts(p.register)))
        for source, amounts in sources:
            negative = [name for name, value in asdict(amounts).items() if value < 0]
            if negative:
                findings.violation(
                    p.payment_id, f"{source}: negative {', '.join(negative)} ({amounts})"
                )
            elif amounts.returned_or_held > amounts.captured:
                findings.violation(
                    p.payment_id,
                    f"{source}: {amounts.returned_or_held} returned or held exceeds the "
                    f"{amounts.captured} captured ({amounts})",
                )
    return findings.result


def check_posted_once(payments: Sequence[PaymentLedger], max_examples: int) -> CheckResult:
    findings = Findings(POSTED_ONCE, max_examples)
    for p in payments:
        findings.checked(1)
        for problem in _posting_problems(p):
            findings.violation(p.payment_id, problem)
    return findings.result


def _posting_problems(p: PaymentLedger) -> Iterator[str]:
    counts = f"{p.postings} posting(s), {p.reversals} reversal(s)"
    if p.register is None:
        # An authorization's hold comes before the register (the capture, or the outcome).
        if p.transactions:
            yield f"{p.transactions} ledger transaction(s) for a payment missing from the register"
        return
    status = p.register.status
    if p.postings > 1:
        yield f"posted {p.postings} times"
    if p.reversals > 1:
        yield f"reversed {p.reversals} times"
    if p.reversals > p.postings:
        yield f"reversed without a posting ({counts})"
    if status in CAPTURED and not (p.postings == 1 and p.reversals == 0):
        yield f"register says {status} but the ledger has {counts}"
    if p.reversals and status != PaymentStatus.CANCELED:
        yield f"the posting was reversed but the register says {status}"
    if p.postings and status in (
        PaymentStatus.REJECTED,
        PaymentStatus.DECLINED,
        PaymentStatus.FAILED,
    ):
        yield f"register says {status} but the ledger has {counts}"
    if p.follow_ups and not p.captured_and_kept:
        yield f"{p.follow_ups} refund/dispute transaction(s) on a payment that is not captured"


def check_register_matches(payments: Sequence[PaymentLedger], max_examples: int) -> CheckResult:
    findings = Findings(REGISTER_MATCHES, max_examples)
    for p in payments:
        if p.register is None:
            continue  # reported by posted-exactly-once
        findings.checked(1)
        reg = p.register
        if register_amounts(reg) != p.moved:
            findings.violation(
                p.payment_id,
                f"register has {register_amounts(reg)}; the ledger entries moved {p.moved}",
            )
        if p.captured_and_kept:
            if reg.status != p.moved.status():
                findings.violation(
                    p.payment_id,
                    f"register status {reg.status}; its amounts imply {p.moved.status()}",
                )
            if reg.amount != p.moved.captured:
                findings.violation(
                    p.payment_id,
                    f"payment of {reg.amount} but {p.moved.captured} captured in the ledger",
                )
        elif reg.status in CAPTURED:
            findings.violation(p.payment_id, f"register says {reg.status} with nothing captured")
    return findings.result


def payment_status(value: str | None) -> PaymentStatus | None:
    try:
        return PaymentStatus(value) if value is not None else None
    except ValueError:
        return None
