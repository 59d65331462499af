"""The invariant checker behind `paysaga check`: the promises of the ledger, Kafka and Temporal,
verified against a live system.

Each check reads what the system *did* (ledger entries, outbox rows, Kafka records, workflow
search attributes) and never trusts a summary column on its own: the amounts a payment moved
are recomputed from its ledger entries and only then compared with the payments register.

Reads are set-based (a handful of SQL statements, one pass over each Kafka topic, paged
visibility listings), so thousands of payments take seconds.

The checker judges a *quiescent* system. A payment whose workflow is still between steps
(received, requires_review, processing) is counted as in flight and not judged; an event that
is committed to the outbox but not yet published shows up as missing until it is. Run it after
traffic stops, or give `settle_seconds` to re-check for a while before calling a difference a
violation.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from pydantic import BaseModel, Field, computed_field
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from domain.events import LEDGER_EVENT_KINDS
from domain.ledger import AccountType, TransactionKind
from domain.payment import PaymentStatus, status_from_amounts
from infra.database import make_engine
from infra.postgres import DATABASE
from infra.temporal_client import connect_client
from settings import Settings
from workflows import search_attributes as sa

# ── the promises ─────────────────────────────────────────────────────────────────────────────
LEDGER_BALANCED = "ledger-balanced"
WITHIN_CAPTURED = "refunds-within-captured"
POSTED_ONCE = "posted-exactly-once"
REGISTER_MATCHES = "register-matches-ledger"
OUTBOX_IN_KAFKA = "outbox-in-kafka"
KAFKA_HAS_OUTBOX = "kafka-events-have-outbox"
WORKFLOW_AGREES = "workflow-agrees-with-ledger"
HOLDS_RELEASED = "authorization-holds-released"

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
}

# Workflow statuses of a payment between steps: not judged (the checker wants a quiet system).
IN_FLIGHT = frozenset(
    {
        PaymentStatus.RECEIVED,
        PaymentStatus.REQUIRES_REVIEW,
        PaymentStatus.PROCESSING,
        # Authorized and held, waiting for a capture or a void (the hold is checked apart).
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
LEDGER_TOPICS: tuple[str, ...] = tuple(sorted(kind.topic for kind in LEDGER_EVENT_KINDS))
_VISIBILITY_PAGE = 1000
_IDS_PER_QUERY = 100
_DESCRIBE_CONCURRENCY = 16


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


class _Findings:
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


# ── where the services are ───────────────────────────────────────────────────────────────────
def resolve_endpoints(settings: Settings) -> Settings:
    """Services not configured by URL are the embedded ones `paysaga run` starts, on the ports in
    settings: the checker talks to them directly."""
    return settings.model_copy(
        update={
            "temporal_address": settings.temporal_address or f"127.0.0.1:{settings.temporal_port}",
            "kafka_bootstrap_servers": settings.kafka_bootstrap_servers
            or f"127.0.0.1:{settings.kafka_port}",
            "database_url": settings.database_url
            or f"postgresql+psycopg://postgres@127.0.0.1:{settings.postgres_port}/{DATABASE}",
        }
    )


# ── the ledger, read once per run ────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class Amounts:
    captured: int = 0
    refunded: int = 0
    disputed: int = 0
    dispute_lost: int = 0

    @property
    def returned_or_held(self) -> int:
        return self.refunded + self.disputed + self.dispute_lost

    def status(self) -> PaymentStatus:
        return status_from_amounts(self.captured, self.refunded, self.disputed, self.dispute_lost)

    def __str__(self) -> str:
        return (
            f"captured {self.captured}, refunded {self.refunded}, "
            f"disputed {self.disputed}, lost {self.dispute_lost}"
        )


@dataclass(frozen=True)
class RegisterRow:
    status: str
    amount: int
    amounts: Amounts
    recorded_status: str | None  # the workflow's final word (summary), once it ended
    recorded_amounts: Amounts | None


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
        recorded = _payment_status(self.register.status if self.register else None)
        return frozenset({recorded}) if recorded is not None else frozenset()


def _scope_sql(scope: CheckScope, table: str, time_column: str) -> str:
    clauses = ["TRUE"]
    if scope.since is not None:
        clauses.append(f"{table}.{time_column} >= :since")
    if scope.payment_ids is not None:
        clauses.append(f"{table}.payment_id = ANY(:ids)")
    return " AND ".join(clauses)


def _scope_params(scope: CheckScope) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if scope.since is not None:
        params["since"] = scope.since
    if scope.payment_ids is not None:
        params["ids"] = sorted(scope.payment_ids)
    return params


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
    SELECT t.payment_id FROM ledger_transactions t WHERE {ledger_where}
),
moved AS (
    SELECT t.payment_id,
        count(DISTINCT t.id) FILTER (
            WHERE t.kind NOT IN (:hold, :hold_captured, :hold_voided)
        ) AS transactions,
        count(DISTINCT t.id) FILTER (WHERE t.kind = :payment) AS postings,
        count(DISTINCT t.id) FILTER (WHERE t.kind = :reversal) AS reversals,
        count(DISTINCT t.id) FILTER (
            WHERE t.kind NOT IN (:payment, :reversal, :hold, :hold_captured, :hold_voided)
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
    p.payment_id IS NOT NULL AS registered, p.status, p.amount,
    p.captured AS reg_captured, p.refunded AS reg_refunded, p.disputed AS reg_disputed,
    p.dispute_lost AS reg_dispute_lost,
    p.summary ->> 'status' AS recorded_status,
    p.summary ->> 'captured' AS recorded_captured,
    p.summary ->> 'refunded' AS recorded_refunded,
    p.summary ->> 'disputed' AS recorded_disputed,
    p.summary ->> 'dispute_lost' AS recorded_dispute_lost,
    coalesce(m.transactions, 0) AS transactions, coalesce(m.postings, 0) AS postings,
    coalesce(m.reversals, 0) AS reversals, coalesce(m.follow_ups, 0) AS follow_ups,
    coalesce(m.captured, 0) AS captured, coalesce(m.refunded, 0) AS refunded,
    coalesce(m.disputed, 0) AS disputed, coalesce(m.dispute_lost, 0) AS dispute_lost
FROM scoped s
LEFT JOIN payments p ON p.payment_id = s.payment_id
LEFT JOIN moved m ON m.payment_id = s.payment_id
ORDER BY s.payment_id
"""

_KIND_PARAMS = {
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
}


def _int(value: Any) -> int:
    return int(value or 0)


def _recorded_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _recorded_amounts(row: Mapping[str, Any]) -> Amounts | None:
    values = [
        _recorded_int(row[f"recorded_{name}"])
        for name in ("captured", "refunded", "disputed", "dispute_lost")
    ]
    if any(v is None for v in values):
        return None
    return Amounts(*(v or 0 for v in values))


def _payment_ledger(row: Mapping[str, Any]) -> PaymentLedger:
    register = None
    if row["registered"]:
        register = RegisterRow(
            status=str(row["status"]),
            amount=_int(row["amount"]),
            amounts=Amounts(
                _int(row["reg_captured"]),
                _int(row["reg_refunded"]),
                _int(row["reg_disputed"]),
                _int(row["reg_dispute_lost"]),
            ),
            recorded_status=row["recorded_status"],
            recorded_amounts=_recorded_amounts(row),
        )
    return PaymentLedger(
        payment_id=str(row["payment_id"]),
        register=register,
        moved=Amounts(
            _int(row["captured"]),
            _int(row["refunded"]),
            _int(row["disputed"]),
            _int(row["dispute_lost"]),
        ),
        transactions=_int(row["transactions"]),
        postings=_int(row["postings"]),
        reversals=_int(row["reversals"]),
        follow_ups=_int(row["follow_ups"]),
    )


async def _rows(engine: AsyncEngine, sql: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(text(sql), dict(params))
        return [dict(row._mapping) for row in result]


async def load_payments(engine: AsyncEngine, scope: CheckScope) -> list[PaymentLedger]:
    sql = _PAYMENTS_SQL.format(
        register_where=_scope_sql(scope, "p", "updated_at"),
        ledger_where=_scope_sql(scope, "t", "created_at"),
    )
    rows = await _rows(engine, sql, {**_scope_params(scope), **_KIND_PARAMS})
    return [_payment_ledger(row) for row in rows]


# ── ledger checks ────────────────────────────────────────────────────────────────────────────
async def check_ledger_balanced(
    engine: AsyncEngine, scope: CheckScope, max_examples: int
) -> CheckResult:
    findings = _Findings(LEDGER_BALANCED, max_examples)
    where = _scope_sql(scope, "t", "created_at")
    params = _scope_params(scope)
    async with engine.connect() as conn:
        total = await conn.scalar(
            text(f"SELECT count(*) FROM ledger_transactions t WHERE {where}"), params
        )
    findings.checked(_int(total))
    for row in await _rows(engine, _UNBALANCED_SQL.format(where=where), params):
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
    findings = _Findings(WITHIN_CAPTURED, max_examples)
    findings.checked(len(payments))
    for p in payments:
        sources: list[tuple[str, Amounts]] = [("ledger entries", p.moved)]
        if p.register is not None:
            sources.append(("payments register", p.register.amounts))
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
    findings = _Findings(POSTED_ONCE, max_examples)
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
    findings = _Findings(REGISTER_MATCHES, max_examples)
    for p in payments:
        if p.register is None:
            continue  # reported by posted-exactly-once
        findings.checked(1)
        reg = p.register
        if reg.amounts != p.moved:
            findings.violation(
                p.payment_id, f"register has {reg.amounts}; the ledger entries moved {p.moved}"
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


# ── the acquirer's holds ─────────────────────────────────────────────────────────────────────
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


async def check_holds_released(
    engine: AsyncEngine, scope: CheckScope, max_examples: int
) -> CheckResult:
    """An authorization hold (issue 15) is released exactly once: with its capture, whose
    posting takes no more than was held, or with a void or expiry. A payment the register
    records as ended (its outcome, or its capture) never keeps a hold: the saga releases it on
    every path, the expiry timer included."""
    findings = _Findings(HOLDS_RELEASED, max_examples)
    sql = _HOLDS_SQL.format(where=_scope_sql(scope, "h", "created_at"))
    for row in await _rows(engine, sql, {**_scope_params(scope), **_KIND_PARAMS}):
        findings.checked(1)
        payment_id = str(row["payment_id"])
        holds, captures, voids = _int(row["holds"]), _int(row["captures"]), _int(row["voids"])
        held, captured = _int(row["held"]), _int(row["captured"])
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


# Register statuses under which a hold may still stand: none yet (in flight, unregistered), or
# an operator still has to act.
_HOLD_MAY_STAND = frozenset({PaymentStatus.REQUIRES_ATTENTION.value})


# ── Kafka ────────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class KafkaRecord:
    topic: str
    partition: int
    offset: int
    event_id: str  # "" when the record carries no ce_id
    payment_id: str
    timestamp_ms: int | None


@dataclass
class KafkaScan:
    # topic -> event id -> the first copy seen
    events: dict[str, dict[str, KafkaRecord]] = field(default_factory=dict)
    without_id: list[KafkaRecord] = field(default_factory=list)
    records: int = 0
    duplicates: int = 0
    missing_topics: list[str] = field(default_factory=list)

    def records_of(self, topics: Iterable[str]) -> Iterator[KafkaRecord]:
        for topic in topics:
            yield from self.events.get(topic, {}).values()


def _header_map(raw: Any) -> dict[str, str]:
    pairs = raw.items() if isinstance(raw, dict) else (raw or [])
    return {
        str(name): value.decode(errors="replace") if isinstance(value, bytes) else str(value or "")
        for name, value in pairs
    }


def scan_topics(bootstrap: str, topics: Sequence[str], timeout: float = 60.0) -> KafkaScan:
    """Every record of `topics`, from the beginning up to the end each partition had when the
    scan started. No consumer group joins: partitions are assigned directly and nothing is
    committed, so the scan disturbs no one's offsets."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"paysaga-check-{uuid.uuid4().hex[:12]}",  # required; never joined
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "fetch.wait.max.ms": 50,
            "socket.timeout.ms": 10_000,
            # The end of a partition also ends its scan when the last offsets hold no record
            # (aborted transactions, compaction): the watermark alone would never be reached.
            "enable.partition.eof": True,
        }
    )
    scan = KafkaScan()
    deadline = time.monotonic() + timeout
    try:
        metadata = consumer.list_topics(timeout=min(timeout, 15.0))
        ends: dict[tuple[str, int], int] = {}
        for topic in topics:
            known = metadata.topics.get(topic)
            if known is None or known.error is not None:
                scan.missing_topics.append(topic)
                continue
            for partition in known.partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=min(timeout, 15.0)
                )
                if high > max(low, 0):
                    ends[(topic, partition)] = high
        consumer.assign(
            [TopicPartition(topic, partition, OFFSET_BEGINNING) for topic, partition in ends]
        )
        while ends:
            if time.monotonic() > deadline:
                unread = ", ".join(f"{t}[{p}]" for t, p in sorted(ends))
                raise TimeoutError(f"Kafka scan did not reach the end of {unread} in {timeout}s")
            for message in consumer.consume(num_messages=1000, timeout=0.2):
                topic, partition = str(message.topic()), int(message.partition() or 0)
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    ends.pop((topic, partition), None)
                    continue
                offset = int(message.offset() or 0)
                _record(scan, topic, partition, offset, message)
                end = ends.get((topic, partition))
                if end is not None and offset + 1 >= end:
                    del ends[(topic, partition)]
    finally:
        consumer.close()
    return scan


def _record(scan: KafkaScan, topic: str, partition: int, offset: int, message: Any) -> None:
    headers = _header_map(message.headers())
    kind, stamp = message.timestamp()
    key = message.key()
    record = KafkaRecord(
        topic=topic,
        partition=partition,
        offset=offset,
        event_id=headers.get("ce_id", ""),
        payment_id=headers.get("ce_subject") or (key.decode(errors="replace") if key else ""),
        timestamp_ms=int(stamp) if kind and stamp is not None and stamp >= 0 else None,
    )
    scan.records += 1
    if not record.event_id:
        scan.without_id.append(record)
        return
    seen = scan.events.setdefault(topic, {})
    if record.event_id in seen:
        scan.duplicates += 1
    else:
        seen[record.event_id] = record


def _record_in_scope(record: KafkaRecord, scope: CheckScope) -> bool:
    if not scope.covers_payment(record.payment_id):
        return False
    if scope.since is not None and record.timestamp_ms is not None:
        return record.timestamp_ms >= scope.since.timestamp() * 1000
    return True


@dataclass(frozen=True)
class OutboxRow:
    event_id: str
    payment_id: str
    topic: str


async def load_outbox(engine: AsyncEngine, scope: CheckScope) -> list[OutboxRow]:
    where = _scope_sql(scope, "o", "created_at")
    rows = await _rows(
        engine,
        f"SELECT o.event_id::text AS event_id, o.payment_id, o.topic FROM outbox_events o "
        f"WHERE {where}",
        _scope_params(scope),
    )
    return [OutboxRow(r["event_id"], r["payment_id"], r["topic"]) for r in rows]


async def outbox_rows_for(engine: AsyncEngine, event_ids: Sequence[str]) -> dict[str, OutboxRow]:
    """Outbox rows by event id, whatever their age: the second look for records in Kafka."""
    found: dict[str, OutboxRow] = {}
    valid = [e for e in event_ids if _is_uuid(e)]
    for start in range(0, len(valid), 1000):
        rows = await _rows(
            engine,
            "SELECT event_id::text AS event_id, payment_id, topic FROM outbox_events "
            "WHERE event_id = ANY(CAST(:ids AS uuid[]))",
            {"ids": valid[start : start + 1000]},
        )
        found.update(
            {r["event_id"]: OutboxRow(r["event_id"], r["payment_id"], r["topic"]) for r in rows}
        )
    return found


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def check_outbox_in_kafka(
    outbox: Sequence[OutboxRow], scan: KafkaScan, max_examples: int
) -> CheckResult:
    findings = _Findings(OUTBOX_IN_KAFKA, max_examples)
    findings.checked(len(outbox))
    for row in outbox:
        if row.event_id in scan.events.get(row.topic, {}):
            continue
        elsewhere = [t for t, seen in scan.events.items() if row.event_id in seen]
        detail = f"event {row.event_id} of {row.topic} never reached Kafka"
        if elsewhere:
            detail = f"event {row.event_id} belongs on {row.topic} but is on {', '.join(elsewhere)}"
        findings.violation(row.payment_id, detail)
    if scan.missing_topics:
        findings.note(f"topics missing from the broker: {', '.join(scan.missing_topics)}")
    if scan.duplicates:
        findings.note(f"{scan.duplicates} duplicate deliveries (same event id) collapsed")
    if findings.result.violation_count:
        findings.note(
            "a broker that lost its log (the embedded broker keeps it in memory) is refilled by "
            "the worker's outbox relay within seconds: re-run with --settle-seconds 30; events "
            "a real cluster dropped by retention can be narrowed out with --since, or "
            "republished with `paysaga events replay --since …`"
        )
    return findings.result


async def check_kafka_has_outbox(
    engine: AsyncEngine,
    outbox: Sequence[OutboxRow],
    scan: KafkaScan,
    scope: CheckScope,
    max_examples: int,
) -> CheckResult:
    findings = _Findings(KAFKA_HAS_OUTBOX, max_examples)
    in_scope = [r for r in scan.records_of(LEDGER_TOPICS) if _record_in_scope(r, scope)]
    findings.checked(len(in_scope))
    known = {row.event_id: row for row in outbox}
    # Outbox rows are committed before their event is published, so a record the scan saw has
    # its row by now: look up the ones outside the first read (older, or other payments).
    unknown = [r.event_id for r in in_scope if r.event_id not in known]
    known.update(await outbox_rows_for(engine, unknown) if unknown else {})
    for record in in_scope:
        row = known.get(record.event_id)
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        if row is None:
            findings.violation(
                record.payment_id or None,
                f"event {record.event_id} at {where} has no outbox row in the ledger",
            )
        elif row.topic != record.topic or row.payment_id != record.payment_id:
            findings.violation(
                record.payment_id or None,
                f"event {record.event_id} at {where} is recorded for {row.payment_id} on "
                f"{row.topic}",
            )
    for record in scan.without_id:
        if record.topic in LEDGER_TOPICS and _record_in_scope(record, scope):
            findings.checked(1)
            findings.violation(
                record.payment_id or None,
                f"record at {record.topic}[{record.partition}]@{record.offset} carries no ce_id",
            )
    return findings.result


# ── Temporal ─────────────────────────────────────────────────────────────────────────────────
@dataclass(frozen=True)
class WorkflowView:
    payment_id: str
    execution_status: WorkflowExecutionStatus | None
    payment_status: str | None
    amount: int | None
    start_time: datetime | None

    @property
    def running(self) -> bool:
        return self.execution_status == WorkflowExecutionStatus.RUNNING


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _visibility_queries(scope: CheckScope) -> list[str]:
    base = f"WorkflowType = {_quote('PaymentWorkflow')}"
    if scope.since is not None:
        base += f" AND StartTime >= {_quote(scope.since.astimezone(UTC).isoformat())}"
    if scope.payment_ids is None:
        return [base]
    ids = sorted(scope.payment_ids)
    return [
        f"{base} AND WorkflowId IN ({', '.join(_quote(i) for i in ids[s : s + _IDS_PER_QUERY])})"
        for s in range(0, len(ids), _IDS_PER_QUERY)
    ]


def _view(
    payment_id: str,
    status: WorkflowExecutionStatus | None,
    attributes: Any,
    start_time: datetime | None,
) -> WorkflowView:
    return WorkflowView(
        payment_id=payment_id,
        execution_status=status,
        payment_status=attributes.get(sa.PAYMENT_STATUS),
        amount=attributes.get(sa.AMOUNT_MINOR),
        start_time=start_time,
    )


def _newer(candidate: WorkflowView, current: WorkflowView | None) -> bool:
    """A workflow id has one run per continue-as-new: the running (else latest) one speaks."""
    if current is None or (candidate.running and not current.running):
        return True
    if current.running and not candidate.running:
        return False
    started = candidate.start_time or datetime.min.replace(tzinfo=UTC)
    return started > (current.start_time or datetime.min.replace(tzinfo=UTC))


async def visible_workflows(client: Client, scope: CheckScope) -> dict[str, WorkflowView]:
    views: dict[str, WorkflowView] = {}
    for query in _visibility_queries(scope):
        async for execution in client.list_workflows(query, page_size=_VISIBILITY_PAGE):
            view = _view(
                execution.id,
                execution.status,
                execution.typed_search_attributes,
                execution.start_time,
            )
            if _newer(view, views.get(view.payment_id)):
                views[view.payment_id] = view
    return views


async def describe_workflows(client: Client, ids: Iterable[str]) -> dict[str, WorkflowView]:
    """Targeted look-ups for payments the listing's time filter could not see."""
    limit = asyncio.Semaphore(_DESCRIBE_CONCURRENCY)

    async def describe(payment_id: str) -> WorkflowView | None:
        async with limit:
            try:
                described = await client.get_workflow_handle(payment_id).describe()
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    return None
                raise
        return _view(
            payment_id, described.status, described.typed_search_attributes, described.start_time
        )

    found = await asyncio.gather(*(describe(i) for i in ids))
    return {view.payment_id: view for view in found if view is not None}


def check_workflows_agree(
    payments: Sequence[PaymentLedger], workflows: Mapping[str, WorkflowView], max_examples: int
) -> CheckResult:
    findings = _Findings(WORKFLOW_AGREES, max_examples)
    by_id = {p.payment_id: p for p in payments}
    in_flight = terminated = recorded_only = attention = 0
    for payment_id in sorted(set(by_id) | set(workflows)):
        findings.checked(1)
        verdict = _judge(by_id.get(payment_id), workflows.get(payment_id))
        if verdict is _IN_FLIGHT:
            in_flight += 1
        elif verdict is _TERMINATED:
            terminated += 1
        elif verdict is _RECORDED_ONLY:
            recorded_only += 1
        elif verdict is _NEEDS_ATTENTION:
            attention += 1
        elif isinstance(verdict, str):
            findings.violation(payment_id, verdict)
    if in_flight:
        findings.note(f"{in_flight} payment(s) in flight, not judged (re-run when quiet)")
    if recorded_only:
        findings.note(f"{recorded_only} payment(s) judged by their recorded outcome (history gone)")
    if terminated:
        findings.note(f"{terminated} workflow(s) terminated before capture by an operator")
    if attention:
        findings.note(
            f"{attention} payment(s) require attention: a compensation could not complete; "
            'an operator resolves it (docs/runbook.md, PaymentStatus="requires_attention")'
        )
    return findings.result


class _Verdict:
    def __init__(self, name: str) -> None:
        self.name = name


_IN_FLIGHT, _TERMINATED, _RECORDED_ONLY, _NEEDS_ATTENTION, _AGREES = (
    _Verdict("in flight"),
    _Verdict("terminated"),
    _Verdict("recorded only"),
    _Verdict("requires attention"),
    _Verdict("agrees"),
)


def _judge(p: PaymentLedger | None, wf: WorkflowView | None) -> _Verdict | str:
    """`_Verdict` when fine (or not judged), else what disagrees."""
    if wf is None:
        assert p is not None
        return _judge_by_recorded_outcome(p)
    status = _payment_status(wf.payment_status)
    if status is None:
        return f"workflow has no valid PaymentStatus search attribute ({wf.payment_status!r})"
    closed = f"closed ({_execution(wf)})" if not wf.running else "running"
    if p is None:
        if wf.running and status not in CAPTURED:
            return _IN_FLIGHT  # not captured yet, or recording its outcome
        if wf.running or wf.execution_status != WorkflowExecutionStatus.TERMINATED:
            return f"workflow {closed} says {status} but the ledger has no record of the payment"
        return _TERMINATED if status not in CAPTURED else f"workflow {closed} says {status}"
    if wf.running and status in IN_FLIGHT:
        return _IN_FLIGHT
    if wf.running and status == PaymentStatus.REQUIRES_ATTENTION:
        # Waiting for an operator, by design and in plain sight: reported, not a violation.
        return _NEEDS_ATTENTION
    agreeing = p.workflow_statuses_that_agree()
    if status not in agreeing:
        implied = " or ".join(sorted(agreeing)) or "nothing"
        return (
            f"workflow {closed} says {status}; the ledger ({p.moved}, {p.postings} posting(s), "
            f"{p.reversals} reversal(s)) implies {implied}"
        )
    # A partial approval at the acquirer captures less than the payment asked, never more.
    if p.register is not None and wf.amount is not None and wf.amount < p.register.amount:
        return f"workflow amount {wf.amount} but the register has {p.register.amount}"
    if (
        not wf.running
        and wf.execution_status != WorkflowExecutionStatus.TERMINATED
        and (p.register is None or p.register.recorded_status is None)
    ):
        return f"workflow {closed} but its outcome was never recorded in the register"
    return _AGREES


def _judge_by_recorded_outcome(p: PaymentLedger) -> _Verdict | str:
    """Temporal no longer (or never) knew the workflow: the register's recorded outcome — the
    workflow's last state, written when it ended — must agree with the ledger instead."""
    reg = p.register
    if reg is None or reg.recorded_status is None:
        return (
            "the ledger has this payment but Temporal knows no workflow and no outcome was recorded"
        )
    status = _payment_status(reg.recorded_status)
    if status is None or status not in p.workflow_statuses_that_agree():
        return f"recorded outcome {reg.recorded_status} disagrees with the ledger ({p.moved})"
    if reg.recorded_amounts is not None and reg.recorded_amounts != p.moved:
        return f"recorded outcome has {reg.recorded_amounts}; the ledger moved {p.moved}"
    return _RECORDED_ONLY


def _payment_status(value: str | None) -> PaymentStatus | None:
    try:
        return PaymentStatus(value) if value is not None else None
    except ValueError:
        return None


def _execution(wf: WorkflowView) -> str:
    return wf.execution_status.name.lower() if wf.execution_status is not None else "unknown"


# ── running it all ──────────────────────────────────────────────────────────────────────────
def _reason(exc: BaseException) -> str:
    """One line on why a service did not answer (drivers add pages of background)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


async def _guarded(name: str, work: Any) -> CheckResult:
    """A check whose service does not answer fails with the reason instead of crashing the run."""
    try:
        result: CheckResult = await work
        return result
    except Exception as exc:  # reported in the result, which fails the run
        return CheckResult(name=name, promise=PROMISES[name], error=_reason(exc))


async def _check_once(
    settings: Settings,
    engine: AsyncEngine,
    temporal: Client | Exception,
    scope: CheckScope,
    max_examples: int,
    kafka_timeout: float,
) -> list[CheckResult]:
    balanced = await _guarded(LEDGER_BALANCED, check_ledger_balanced(engine, scope, max_examples))
    kafka_checks = await _kafka_checks(settings, engine, scope, max_examples, kafka_timeout)
    try:
        payments = await load_payments(engine, scope)
    except Exception as exc:
        error = _reason(exc)
        payment_checks = [
            CheckResult(name=n, promise=PROMISES[n], error=error)
            for n in (WITHIN_CAPTURED, POSTED_ONCE, REGISTER_MATCHES, WORKFLOW_AGREES)
        ]
    else:
        payment_checks = [
            check_within_captured(payments, max_examples),
            check_posted_once(payments, max_examples),
            check_register_matches(payments, max_examples),
            await _guarded(
                WORKFLOW_AGREES, _workflow_check(temporal, payments, scope, max_examples)
            ),
        ]
    holds = await _guarded(HOLDS_RELEASED, check_holds_released(engine, scope, max_examples))
    results = [balanced, *payment_checks, *kafka_checks, holds]
    return sorted(results, key=lambda r: list(PROMISES).index(r.name))


async def _kafka_checks(
    settings: Settings,
    engine: AsyncEngine,
    scope: CheckScope,
    max_examples: int,
    kafka_timeout: float,
) -> list[CheckResult]:
    try:
        # The outbox is read before Kafka: an event committed by now and published by the end
        # of the scan is found; one published later is in flight (see `settle_seconds`).
        outbox = await load_outbox(engine, scope)
        topics = sorted({*LEDGER_TOPICS, *(row.topic for row in outbox)})
        bootstrap = settings.kafka_bootstrap_servers or ""
        scan = await asyncio.to_thread(scan_topics, bootstrap, topics, kafka_timeout)
    except Exception as exc:
        error = _reason(exc)
        return [
            CheckResult(name=n, promise=PROMISES[n], error=error)
            for n in (OUTBOX_IN_KAFKA, KAFKA_HAS_OUTBOX)
        ]
    return [
        check_outbox_in_kafka(outbox, scan, max_examples),
        await _guarded(
            KAFKA_HAS_OUTBOX, check_kafka_has_outbox(engine, outbox, scan, scope, max_examples)
        ),
    ]


async def _workflow_check(
    temporal: Client | Exception,
    payments: Sequence[PaymentLedger],
    scope: CheckScope,
    max_examples: int,
) -> CheckResult:
    if isinstance(temporal, Exception):
        raise temporal
    workflows = await visible_workflows(temporal, scope)
    if scope.since is not None:
        # Listed by start time: a payment started earlier but refunded since is looked up.
        unlisted = [p.payment_id for p in payments if p.payment_id not in workflows]
        workflows = {**workflows, **await describe_workflows(temporal, unlisted)}
    return check_workflows_agree(payments, workflows, max_examples)


async def run_checks(
    settings: Settings,
    *,
    scope: CheckScope | None = None,
    engine: AsyncEngine | None = None,
    temporal: Client | None = None,
    max_examples: int = 10,
    settle_seconds: float = 0.0,
    kafka_timeout_seconds: float = 60.0,
) -> CheckReport:
    """Run every check once; with `settle_seconds`, run again (every 2 s) while anything fails,
    until it passes or the time is up, so payments still finishing are not called violations.

    `engine` and `temporal` are used as given (and left open); otherwise they are made from
    `settings` (services not configured are the embedded ones of `paysaga run`)."""
    settings = resolve_endpoints(settings)
    scope = scope or CheckScope()
    started_at, started = datetime.now(UTC), time.monotonic()
    own_engine = engine is None
    db = engine or make_engine(settings.database_url or "", pool_size=2)
    try:
        client: Client | Exception
        try:
            client = temporal or await connect_client(settings)
        except Exception as exc:  # the workflow check reports it and fails
            client = exc
        attempts = 0
        while True:
            attempts += 1
            results = await _check_once(
                settings, db, client, scope, max_examples, kafka_timeout_seconds
            )
            remaining = started + settle_seconds - time.monotonic()
            if all(r.passed for r in results) or remaining <= 0:
                break
            await asyncio.sleep(min(2.0, remaining))
    finally:
        if own_engine:
            await db.dispose()
    return CheckReport(
        scope=scope,
        results=results,
        started_at=started_at,
        elapsed_seconds=round(time.monotonic() - started, 3),
        attempts=attempts,
    )


__all__ = [
    "CAPTURED",
    "IN_FLIGHT",
    "KAFKA_HAS_OUTBOX",
    "LEDGER_BALANCED",
    "OUTBOX_IN_KAFKA",
    "POSTED_ONCE",
    "PROMISES",
    "REGISTER_MATCHES",
    "WITHIN_CAPTURED",
    "WORKFLOW_AGREES",
    "CheckReport",
    "CheckResult",
    "CheckScope",
    "Violation",
    "resolve_endpoints",
    "run_checks",
    "scan_topics",
]
