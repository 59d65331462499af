"""Kafka's promises: every stored event (the outbox) reached Kafka, and no ledger event in Kafka
lacks its outbox row. One pass over each topic, joining no consumer group."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from sqlalchemy.ext.asyncio import AsyncEngine

from checker.report import (
    KAFKA_HAS_OUTBOX,
    OUTBOX_IN_KAFKA,
    CheckResult,
    CheckScope,
    Findings,
    fetch_rows,
)
from domain.events import LEDGER_EVENT_KINDS

LEDGER_TOPICS: tuple[str, ...] = tuple(sorted(kind.topic for kind in LEDGER_EVENT_KINDS))


# ── the records ──────────────────────────────────────────────────────────────────────────────
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
    where = scope.where("o", "created_at")
    rows = await fetch_rows(
        engine,
        f"SELECT o.event_id::text AS event_id, o.payment_id, o.topic FROM outbox_events o "
        f"WHERE {where}",
        scope.params(),
    )
    return [OutboxRow(r["event_id"], r["payment_id"], r["topic"]) for r in rows]


async def outbox_rows_for(engine: AsyncEngine, event_ids: Sequence[str]) -> dict[str, OutboxRow]:
    """Outbox rows by event id, whatever their age: the second look for records in Kafka."""
    found: dict[str, OutboxRow] = {}
    valid = [e for e in event_ids if _is_uuid(e)]
    for start in range(0, len(valid), 1000):
        rows = await fetch_rows(
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
    findings = Findings(OUTBOX_IN_KAFKA, max_examples)
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
    findings = Findings(KAFKA_HAS_OUTBOX, max_examples)
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
