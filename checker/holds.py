"""The acquirer's authorization holds (issue 15): each is released exactly once."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from checker.ledger import fetch_ledger_rows
from checker.report import (
    HOLDS_RELEASED,
    CheckResult,
    CheckScope,
    Findings,
    as_int,
)
from domain.payment import PaymentStatus

_HOLDS_SQL = """
SELECT t.payment_id, p.status,
    count(DISTINCT t.id) FILTER (WHERE t.kind = :hold) AS holds,
    count(DISTINCT t.id) FILTER (WHERE t.kind = :hold_captured) AS captures,
    count(DISTINCT t.id) FILTER (WHERE t.kind = :hold_voided) AS voids,
    coalesce(-sum(e.amount) FILTER (WHERE t.kind = :hold AND a.type = :hold_account), 0) AS held,
    coalesce(sum(e.amount) FILTER (WHERE t.kind = :payment AND a.type = :customer), 0)
        AS captured
FROM ledger_transactions t
LEFT JOIN ledger_entries e ON e.transaction_id = t.id
LEFT JOIN accounts a ON a.id = e.account_id
LEFT JOIN payments p ON p.payment_id = t.payment_id
WHERE t.payment_id IN (
    SELECT h.payment_id FROM ledger_transactions h WHERE h.kind = :hold AND {where}
)
GROUP BY t.payment_id, p.status
ORDER BY t.payment_id
"""

# Register statuses under which a hold may still stand: none yet (in flight, unregistered), or
# an operator still has to act.
_HOLD_MAY_STAND = frozenset({PaymentStatus.REQUIRES_ATTENTION.value})


async def check_holds_released(
    engine: AsyncEngine, scope: CheckScope, max_examples: int
) -> CheckResult:
    """An authorization hold is released exactly once: with its capture, whose posting takes no
    more than was held, or with a void or expiry. A payment the register records as ended (its
    outcome, or its capture) never keeps a hold: the saga releases it on every path, the expiry
    timer included."""
    findings = Findings(HOLDS_RELEASED, max_examples)
    sql = _HOLDS_SQL.format(where=scope.where("h", "created_at"))
    for row in await fetch_ledger_rows(engine, sql, scope):
        findings.checked(1)
        payment_id = str(row["payment_id"])
        holds, captures, voids = as_int(row["holds"]), as_int(row["captures"]), as_int(row["voids"])
        held, captured = as_int(row["held"]), as_int(row["captured"])
        if holds > 1:
            findings.violation(payment_id, f"held {holds} times")
        if captures and voids:
            findings.violation(payment_id, "the hold was both captured and voided")
        elif captures + voids > 1:
            findings.violation(payment_id, f"the hold was released {captures + voids} times")
        if captured > held:
            findings.violation(payment_id, f"captured {captured} of the {held} held")
        if captured and not captures:
            findings.violation(payment_id, f"captured {captured} without releasing its hold")
        status = row["status"]
        if not captures + voids and status is not None and status not in _HOLD_MAY_STAND:
            findings.violation(
                payment_id, f"the payment is {status} but its hold of {held} was never released"
            )
    return findings.result
