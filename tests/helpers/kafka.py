"""Reading events back from the broker in tests, as a downstream consumer would see them.

The consumer `assign()`s every partition of the wanted topics from the beginning instead of
joining a group: tansu holds each JoinGroup for session.timeout.ms / 2, and a test that only
reads has no use for group coordination or commits.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    Message,
    TopicPartition,
)
from temporalio import activity

from activities.kafka import DeliveryReceipt, EventPublisher, KafkaActivities
from domain.events import EventKind, PaymentEvent
from infra.topics import DEFAULT_PARTITIONS


@dataclass(frozen=True)
class ConsumedEvent:
    topic: str
    key: str
    headers: dict[str, str]
    body: dict[str, Any]  # {} when the value is not a JSON object (see `value`)
    partition: int
    offset: int
    value: bytes = field(default=b"", repr=False)
    # The record's timestamp: when the producer sent it (CreateTime), in ms since the epoch.
    timestamp_ms: int | None = None

    @property
    def id(self) -> str:
        return self.headers.get("ce_id", "")

    @property
    def type(self) -> str:
        return self.headers.get("ce_type", "")


def consume_events(
    bootstrap: str,
    topics: Sequence[str],
    *,
    until: Callable[[list[ConsumedEvent]], bool] | None = None,
    timeout: float = 20,
    group: str | None = None,
) -> list[ConsumedEvent]:
    """Every record of `topics` from the beginning, in arrival order (ordered per partition).

    Stops as soon as `until(events)` holds, or, without `until`, once every partition has been
    read to its end. After `timeout` seconds it returns what it has: the caller asserts on it.
    `group` only names the consumer; no offsets are committed.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group or f"test-reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 2000,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            # Empty partitions are the norm here; don't let each fetch idle for 500 ms.
            "fetch.wait.max.ms": 50,
        }
    )
    events: list[ConsumedEvent] = []
    deadline = time.monotonic() + timeout
    try:
        assigned = _partitions_of(consumer, topics, timeout)
        consumer.assign(
            [TopicPartition(topic, partition, OFFSET_BEGINNING) for topic, partition in assigned]
        )
        at_end: set[tuple[str, int]] = set()
        while time.monotonic() < deadline:
            batch = consumer.consume(num_messages=500, timeout=0.1)
            fresh = False
            for message in batch:
                where = (str(message.topic()), _number(message.partition()))
                error = message.error()
                if error is None:
                    events.append(_consumed(message))
                    at_end.discard(where)
                    fresh = True
                elif error.code() == KafkaError._PARTITION_EOF:
                    at_end.add(where)
            if until is not None:
                if fresh and until(events):
                    return events
            elif at_end >= assigned:
                return events
        return events
    finally:
        consumer.close()


def dedupe_by_id(events: Iterable[ConsumedEvent]) -> dict[str, ConsumedEvent]:
    """One event per CloudEvents id (the first copy): a retried publish sends the same id
    again, and consumers are expected to collapse such copies. Records without ce_id are
    left out."""
    unique: dict[str, ConsumedEvent] = {}
    for event in events:
        if event.id and event.id not in unique:
            unique[event.id] = event
    return unique


def _partitions_of(
    consumer: Consumer, topics: Sequence[str], timeout: float
) -> set[tuple[str, int]]:
    metadata = consumer.list_topics(timeout=timeout)
    wanted: set[tuple[str, int]] = set()
    for topic in topics:
        known = metadata.topics.get(topic)
        # A topic not created yet gets the stack's partition count when it appears.
        count = len(known.partitions) if known is not None and known.partitions else None
        wanted.update((topic, p) for p in range(count or DEFAULT_PARTITIONS))
    return wanted


def _consumed(message: Message) -> ConsumedEvent:
    value = message.value() or b""
    raw_headers = message.headers() or []
    # A Consumer hands headers over as a list of (name, bytes); the stub also allows a dict.
    pairs = raw_headers.items() if isinstance(raw_headers, dict) else raw_headers
    return ConsumedEvent(
        topic=str(message.topic()),
        key=(message.key() or b"").decode(errors="replace"),
        headers={name: _text(raw) for name, raw in pairs},
        body=_json_object(value),
        partition=_number(message.partition()),
        offset=_number(message.offset()),
        value=value,
        timestamp_ms=_timestamp(message),
    )


def _timestamp(message: Message) -> int | None:
    kind, stamp = message.timestamp()
    return int(stamp) if kind != TIMESTAMP_NOT_AVAILABLE and stamp >= 0 else None


def _text(raw: str | bytes | None) -> str:
    return raw.decode(errors="replace") if isinstance(raw, bytes) else (raw or "")


def _json_object(value: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _number(value: int | None) -> int:
    return -1 if value is None else value


class GatedKafka(KafkaActivities):
    """The real publishing activity, holding one event kind of chosen payments until released:
    the window between two steps where a test cancels, or an operator's cancel lands."""

    def __init__(self, publisher: EventPublisher, *recording: Any) -> None:
        super().__init__(publisher, *recording)
        self.held: dict[str, tuple[EventKind, asyncio.Event, asyncio.Event]] = {}

    def hold(self, payment_id: str, kind: EventKind) -> None:
        self.held[payment_id] = (kind, asyncio.Event(), asyncio.Event())

    async def wait_held(self, payment_id: str, timeout: float = 30) -> None:
        await asyncio.wait_for(self.held[payment_id][1].wait(), timeout)

    def release(self, payment_id: str) -> None:
        self.held[payment_id][2].set()

    @activity.defn(name="publish_payment_event")
    async def publish_payment_event(self, event: PaymentEvent) -> DeliveryReceipt:
        kind, arrived, released = self.held.get(event.payment_id, (None, None, None))
        if arrived is not None and released is not None and event.kind == kind:
            arrived.set()
            await released.wait()
        return await super().publish_payment_event(event)
