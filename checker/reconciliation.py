"""Reconciliation's promises (docs/reconciliation.md): every settled line is accounted for, and
the acquirer receivable holds exactly what the acquirer has yet to settle.

Both read the whole reconciliation state (a scope of payments or time does not narrow them: a
settlement line may name no payment of ours)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from checker.report import (
    RECEIVABLE_MATCHES,
    SETTLED_LINES_ACCOUNTED,
    CheckResult,
    Findings,
    fetch_rows,
)
from domain.ledger import AccountType

# A movement line is accounted for when it matched its ledger movement or waits (or waited)
# in the exception queue.
_UNACCOUNTED_SQL = """
SELECT l.line_id, l.type, l.reference, l.amount, l.currency, l.status,
       (l.status = 'matched' AND x.id IS NOT NULL AND x.status IN ('matched')
        AND x.line_id = l.id) AS matched,
       EXISTS (SELECT 1 FROM reconciliation_exceptions r WHERE r.line_id = l.id) AS queued
FROM settlement_lines l
LEFT JOIN settlement_expectations x ON x.id = l.expectation_id
WHERE l.type NOT IN ('fee', 'payout')
"""

_RECEIVABLE_SQL = """
WITH booked AS (
    SELECT a.currency, coalesce(sum(e.amount), 0) AS balance
    FROM accounts a LEFT JOIN ledger_entries e ON e.account_id = a.id
    WHERE a.type = :receivable GROUP BY a.currency
), owed AS (
    SELECT currency, coalesce(sum(amount - settled_amount - written_off_amount), 0) AS unsettled,
           count(*) FILTER (WHERE amount - settled_amount - written_off_amount <> 0) AS open
    FROM settlement_expectations GROUP BY currency
)
SELECT coalesce(b.currency, o.currency) AS currency, coalesce(b.balance, 0) AS balance,
       coalesce(o.unsettled, 0) AS unsettled, coalesce(o.open, 0) AS open
FROM booked b FULL OUTER JOIN owed o ON o.currency = b.currency
ORDER BY 1
"""


async def check_settled_lines_accounted(engine: AsyncEngine, max_examples: int) -> CheckResult:
    findings = Findings(SETTLED_LINES_ACCOUNTED, max_examples)
    rows = await fetch_rows(engine, _UNACCOUNTED_SQL, {})
    findings.checked(len(rows))
    for row in rows:
        if row["matched"] or row["queued"]:
            continue
        findings.violation(
            row["reference"] or None,
            f"settled line {row['line_id']} ({row['type']} {row['amount']} {row['currency']}, "
            f"{row['status']}) neither matched a ledger movement nor is in the exception queue",
        )
    return findings.result


async def check_receivable_matches(engine: AsyncEngine, max_examples: int) -> CheckResult:
    findings = Findings(RECEIVABLE_MATCHES, max_examples)
    rows = await fetch_rows(
        engine, _RECEIVABLE_SQL, {"receivable": AccountType.ACQUIRER_RECEIVABLE.value}
    )
    findings.checked(len(rows))
    for row in rows:
        if int(row["balance"]) != int(row["unsettled"]):
            findings.violation(
                None,
                f"acquirer receivable {row['currency']} holds {row['balance']}; the "
                f"{row['open']} movement(s) not settled yet come to {row['unsettled']}",
            )
    return findings.result
