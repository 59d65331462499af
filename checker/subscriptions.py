"""Subscriptions (issue 17): a period is charged at most once, and a paid one by exactly one
captured payment.

Renewal payment ids are derived from (subscription, period, attempt)
(`domain.subscription.renewal_payment_id`), so the checker can list every payment a period
could ever have made without trusting the workflow: for each subscription the events store
knows (`subscription.created`), every period its events mention, attempts 0 to
`MAX_ATTEMPTS_CHECKED - 1`. The ledger then says which of them captured (a `payment` posting not
reversed), and the `subscription.renewed` events say which period was paid by which payment.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from checker.ledger import KIND_PARAMS
from checker.report import (
    RENEWALS_ONCE,
    CheckResult,
    CheckScope,
    Findings,
    fetch_rows,
)
from domain.events import EventKind
from domain.subscription import renewal_payment_id

# More than any dunning schedule's attempts (1 + retries); settings bound it far lower.
MAX_ATTEMPTS_CHECKED = 32

_SUBSCRIPTION_EVENTS_SQL = """
SELECT o.subject, o.event_type, o.payload
FROM outbox_events o
WHERE o.subject IN (
    SELECT c.subject FROM outbox_events c WHERE c.event_type = :created {since}
)
AND o.event_type IN (:renewed, :past_due)
"""

_CAPTURED_SQL = """
SELECT t.payment_id,
    count(*) FILTER (WHERE t.kind = :payment) AS postings,
    count(*) FILTER (WHERE t.kind = :reversal) AS reversals
FROM ledger_transactions t
WHERE t.payment_id = ANY(:ids) AND t.kind IN (:payment, :reversal)
GROUP BY t.payment_id
"""


def _period_of(payload: Any) -> tuple[int, str | None, str | None] | None:
    """(period number, its status, the payment) of a renewed or past_due event's data."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict):
        return None
    period = data.get("period")
    if not isinstance(period, dict) or not isinstance(period.get("number"), int):
        return None
    return int(period["number"]), period.get("status"), data.get("payment_id")


async def check_renewals_once(
    engine: AsyncEngine, scope: CheckScope, max_examples: int
) -> CheckResult:
    findings = Findings(RENEWALS_ONCE, max_examples)
    params: dict[str, Any] = {
        "created": EventKind.SUBSCRIPTION_CREATED.ce_type,
        "renewed": EventKind.SUBSCRIPTION_RENEWED.ce_type,
        "past_due": EventKind.SUBSCRIPTION_PAST_DUE.ce_type,
    }
    since = ""
    if scope.since is not None:
        since = "AND c.created_at >= :since"
        params["since"] = scope.since
    rows = await fetch_rows(engine, _SUBSCRIPTION_EVENTS_SQL.format(since=since), params)
    last_period: dict[str, int] = {}
    paid_by: dict[tuple[str, int], list[str]] = defaultdict(list)
    for row in rows:
        found = _period_of(row["payload"])
        if found is None:
            continue
        subscription = str(row["subject"])
        number, status, payment_id = found
        last_period[subscription] = max(last_period.get(subscription, 0), number)
        if row["event_type"] == params["renewed"] and status == "paid" and payment_id:
            paid_by[(subscription, number)].append(payment_id)

    candidates: dict[str, tuple[str, int]] = {}
    for subscription, last in last_period.items():
        for number in range(last + 1):
            for attempt in range(MAX_ATTEMPTS_CHECKED):
                candidates[renewal_payment_id(subscription, number, attempt)] = (
                    subscription,
                    number,
                )
    captured: dict[tuple[str, int], list[str]] = defaultdict(list)
    if candidates:
        ledger = await fetch_rows(engine, _CAPTURED_SQL, {"ids": sorted(candidates), **KIND_PARAMS})
        for row in ledger:
            if int(row["postings"] or 0) > int(row["reversals"] or 0):
                captured[candidates[str(row["payment_id"])]].append(str(row["payment_id"]))

    # Scoped to payments: the periods those payments could belong to.
    in_scope = (
        None
        if scope.payment_ids is None
        else {candidates[i] for i in scope.payment_ids if i in candidates}
    )
    for subscription, last in sorted(last_period.items()):
        for number in range(last + 1):
            key = (subscription, number)
            if in_scope is not None and key not in in_scope:
                continue
            findings.checked(1)
            took = sorted(captured.get(key, []))
            if len(took) > 1:
                findings.violation(
                    took[0],
                    f"{subscription} period {number} was captured by {len(took)} payments: "
                    + ", ".join(took),
                )
            said = paid_by.get(key, [])
            if said and (len(took) != 1 or took[0] not in said):
                findings.violation(
                    said[0],
                    f"{subscription} period {number} is paid by {said[0]} but the ledger shows "
                    f"{len(took)} captured renewal(s) for it: {', '.join(took) or 'none'}",
                )
    return findings.result
