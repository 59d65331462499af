"""What `paysaga check` promises and how it reports: the promises by name, the scope of a run,
each check's result with its first examples, and the SQL filters a scope turns into."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field, computed_field
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

# ── the promises ─────────────────────────────────────────────────────────────────────────────
LEDGER_BALANCED = "ledger-balanced"
WITHIN_CAPTURED = "refunds-within-captured"
POSTED_ONCE = "posted-exactly-once"
REGISTER_MATCHES = "register-matches-ledger"
OUTBOX_IN_KAFKA = "outbox-in-kafka"
KAFKA_HAS_OUTBOX = "kafka-events-have-outbox"
WORKFLOW_AGREES = "workflow-agrees-with-ledger"
HOLDS_RELEASED = "authorization-holds-released"
SETTLED_LINES_ACCOUNTED = "settled-lines-accounted"
RECEIVABLE_MATCHES = "receivable-matches-unsettled"
RENEWALS_ONCE = "subscription-periods-charged-once"

PROMISES: dict[str, str] = {
    LEDGER_BALANCED: "Every ledger transaction sums to zero per currency",
    WITHIN_CAPTURED: "Refunds + lost and open disputes never exceed what was captured",
    POSTED_ONCE: "Each captured payment has exactly one posting (and at most one reversal)",
    REGISTER_MATCHES: "The payments register agrees with the amounts its ledger entries moved",
    OUTBOX_IN_KAFKA: "Every stored event (the outbox) reached Kafka at least once (by event id)",
    KAFKA_HAS_OUTBOX: "No ledger event in Kafka lacks its outbox row",
    WORKFLOW_AGREES: "Each payment's workflow status agrees with its ledger state",
    HOLDS_RELEASED: "Each authorization hold is released once, captured or voided but never "
    "both, captures no more than it held, and none outlives its payment",
    SETTLED_LINES_ACCOUNTED: "Every settled line matched its ledger movement or is in the "
    "reconciliation exception queue",
    RECEIVABLE_MATCHES: "The acquirer receivable's balance equals the expected settlement "
    "movements not settled (or written off) yet",
    RENEWALS_ONCE: "Each subscription period is captured by at most one renewal payment, and a "
    "paid period by exactly the one its subscription.renewed event names",
}


# ── the report ───────────────────────────────────────────────────────────────────────────────
class CheckScope(BaseModel, frozen=True):
    """What to judge: everything (the default), payments touched since a moment, or a set of
    payments. Both filters together mean both must hold."""

    since: datetime | None = None
    payment_ids: frozenset[str] | None = None

    def describe(self) -> str:
        parts = []
        if self.since is not None:
            parts.append(f"since {self.since.isoformat()}")
        if self.payment_ids is not None:
            parts.append(f"{len(self.payment_ids)} named payment(s)")
        return ", ".join(parts) or "everything"

    def covers_payment(self, payment_id: str) -> bool:
        return self.payment_ids is None or payment_id in self.payment_ids

    def where(self, table: str, time_column: str) -> str:
        """The SQL condition of this scope on `table` (its rows' `payment_id`, `time_column`);
        its values are `params()`."""
        clauses = ["TRUE"]
        if self.since is not None:
            clauses.append(f"{table}.{time_column} >= :since")
        if self.payment_ids is not None:
            clauses.append(f"{table}.payment_id = ANY(:ids)")
        return " AND ".join(clauses)

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.since is not None:
            params["since"] = self.since
        if self.payment_ids is not None:
            params["ids"] = sorted(self.payment_ids)
        return params


class Violation(BaseModel):
    payment_id: str | None = None
    detail: str


class CheckResult(BaseModel):
    name: str
    promise: str
    checked: int = 0
    violation_count: int = 0
    examples: list[Violation] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    # The check could not run (a service did not answer): the promise is unproven, so it fails.
    error: str | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return self.error is None and self.violation_count == 0


class CheckReport(BaseModel):
    scope: CheckScope
    results: list[CheckResult]
    started_at: datetime
    elapsed_seconds: float
    attempts: int = 1

    @computed_field  # type: ignore[prop-decorator]
    @property
    def passed(self) -> bool:
        return all(result.passed for result in self.results)

    def result(self, name: str) -> CheckResult:
        return next(r for r in self.results if r.name == name)

    def violations(self, name: str) -> list[Violation]:
        return list(self.result(name).examples)


class Findings:
    """Counts every violation of one check and keeps the first `max_examples` of them."""

    def __init__(self, name: str, max_examples: int) -> None:
        self.result = CheckResult(name=name, promise=PROMISES[name])
        self.max_examples = max_examples

    def violation(self, payment_id: str | None, detail: str) -> None:
        self.result.violation_count += 1
        if len(self.result.examples) < self.max_examples:
            self.result.examples.append(Violation(payment_id=payment_id, detail=detail))

    def checked(self, count: int) -> None:
        self.result.checked += count

    def note(self, note: str) -> None:
        self.result.notes.append(note)


def as_int(value: Any) -> int:
    """A count or sum the database may answer with NULL (no rows): 0."""
    return int(value or 0)


async def fetch_rows(
    engine: AsyncEngine, sql: str, params: Mapping[str, Any]
) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(text(sql), dict(params))
        return [dict(row._mapping) for row in result]
