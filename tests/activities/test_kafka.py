"""Payment events reach a real broker as CloudEvents, keyed and ordered per payment, and the
publisher survives a broker restart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import KafkaError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities import kafka as kafka_activities
from activities.kafka import (
    KAFKA_UNAVAILABLE,
    EventPublisher,
    KafkaActivities,
    KafkaPublishError,
)
from domain.events import EVENT_SOURCE, SCHEMA_VERSION, EventKind, PaymentEvent, event_id
from infra.embedded.broker import EmbeddedBroker
from infra.embedded.process import free_port
from infra.embedded.stack import Stack
from settings import Settings
from tests.helpers.kafka import ConsumedEvent, consume_events, dedupe_by_id

MESSAGE_TIMEOUT_MS = 2000


def _settings(message_timeout_ms: int = 10_000) -> Settings:
    return Settings(kafka_message_timeout_ms=message_timeout_ms, kafka_linger_ms=2)


def _payment_id() -> str:
    return f"pay_{uuid.uuid4().hex[:16]}"


def _event(
    payment_id: str, kind: EventKind = EventKind.CONFIRMED, reference: str = "", **data: object
) -> PaymentEvent:
    return PaymentEvent(
        id=event_id(payment_id, kind, reference),
        kind=kind,
        payment_id=payment_id,
        time=datetime.now(UTC),
        data={"amount": 1250, "currency": "EUR", **data},
    )


def _refund(payment_id: str, n: int) -> PaymentEvent:
    return _event(payment_id, EventKind.REFUNDED, f"rf_{n}", seq=n)


def _of_payment(payment_id: str, events: list[ConsumedEvent]) -> list[ConsumedEvent]:
    return [e for e in events if e.key == payment_id]


@pytest.fixture(scope="module")
def publisher(stack: Stack) -> Iterator[EventPublisher]:
    with EventPublisher(stack.kafka_bootstrap_servers, _settings()) as publisher:
        yield publisher


@pytest.fixture
def activity_env() -> ActivityEnvironment:
    return ActivityEnvironment()


async def test_published_event_is_a_cloudevent_keyed_by_its_payment(
    stack: Stack, publisher: EventPublisher, activity_env: ActivityEnvironment
) -> None:
    payment_id = _payment_id()
    event = _event(payment_id, merchant="Café Zürich")

    receipt = await activity_env.run(KafkaActivities(publisher).publish_payment_event, event)

    assert (receipt.topic, receipt.event_id) == ("payments.confirmed", event.id)
    records = _of_payment(
        payment_id,
        consume_events(
            stack.kafka_bootstrap_servers,
            ["payments.confirmed"],
            until=lambda seen: bool(_of_payment(payment_id, seen)),
        ),
    )
    assert len(records) == 1
    record = records[0]
    assert (record.topic, record.partition, record.offset) == (
        receipt.topic,
        receipt.partition,
        receipt.offset,
    )
    assert record.headers == {
        "ce_specversion": "1.0",
        "ce_id": event.id,
        "ce_type": "com.paysaga.payment.confirmed",
        "ce_source": EVENT_SOURCE,
        "ce_subject": payment_id,
        "ce_time": event.time.isoformat(),
        "content-type": "application/json",
    }
    assert record.body["schema_version"] == SCHEMA_VERSION
    assert record.body["event_id"] == record.headers["ce_id"]
    assert record.body["payment_id"] == payment_id
    assert record.body["data"] == {"amount": 1250, "currency": "EUR", "merchant": "Café Zürich"}
    assert datetime.fromisoformat(record.body["occurred_at"]) == event.time
    # Compact UTF-8 JSON, not ASCII-escaped, not pretty-printed.
    compact = json.dumps(record.body, separators=(",", ":"), ensure_ascii=False)
    assert record.value == compact.encode()


async def test_a_republished_event_keeps_its_id_and_dedupes_to_one(
    stack: Stack, publisher: EventPublisher, activity_env: ActivityEnvironment
) -> None:
    payment_id = _payment_id()
    event = _event(payment_id, EventKind.RAW)
    publish = KafkaActivities(publisher).publish_payment_event

    first = await activity_env.run(publish, event)
    second = await activity_env.run(publish, event)

    assert first.partition == second.partition and second.offset > first.offset
    records = _of_payment(
        payment_id,
        consume_events(
            stack.kafka_bootstrap_servers,
            ["payments.raw"],
            until=lambda seen: len(_of_payment(payment_id, seen)) >= 2,
        ),
    )
    assert [r.id for r in records] == [event.id, event.id]
    assert list(dedupe_by_id(records)) == [event.id]


async def test_events_of_one_payment_keep_their_order_in_one_partition(
    stack: Stack, publisher: EventPublisher
) -> None:
    payment_id = _payment_id()
    events = [_refund(payment_id, n) for n in range(40)]

    # All in flight at once: ordering must come from the key and the idempotent producer,
    # not from waiting for each acknowledgement.
    receipts = await asyncio.gather(*(publisher.publish(e) for e in events))

    assert len({r.partition for r in receipts}) == 1
    assert [r.offset for r in receipts] == sorted(r.offset for r in receipts)
    records = _of_payment(
        payment_id,
        consume_events(
            stack.kafka_bootstrap_servers,
            ["payments.refunded"],
            until=lambda seen: len(_of_payment(payment_id, seen)) >= len(events),
        ),
    )
    assert [r.body["data"]["seq"] for r in records] == list(range(40))
    assert [r.id for r in records] == [e.id for e in events]


async def test_events_of_other_kinds_go_to_their_own_topics(
    stack: Stack, publisher: EventPublisher
) -> None:
    payment_id = _payment_id()
    kinds = [EventKind.RAW, EventKind.DISPUTE_OPENED, EventKind.DISPUTE_LOST]
    for kind in kinds:
        await publisher.publish(_event(payment_id, kind))

    records = _of_payment(
        payment_id,
        consume_events(
            stack.kafka_bootstrap_servers,
            [kind.topic for kind in kinds],
            until=lambda seen: len(_of_payment(payment_id, seen)) >= len(kinds),
        ),
    )
    assert {(r.topic, r.headers["ce_type"]) for r in records} == {
        (kind.topic, kind.ce_type) for kind in kinds
    }


async def test_closing_delivers_what_is_in_flight_and_refuses_more(stack: Stack) -> None:
    payment_id = _payment_id()
    publisher = EventPublisher(stack.kafka_bootstrap_servers, _settings())
    events = [_refund(payment_id, n) for n in range(20)]
    in_flight = [asyncio.ensure_future(publisher.publish(e)) for e in events]
    await asyncio.sleep(0)  # each publish has handed its message to the producer

    assert publisher.close(timeout=10) == 0

    receipts = await asyncio.gather(*in_flight)
    assert [r.event_id for r in receipts] == [e.id for e in events]
    with pytest.raises(KafkaPublishError, match="closed"):
        await publisher.publish(_refund(payment_id, 20))


async def test_unreachable_broker_fails_the_activity_retryably_within_the_timeout(
    activity_env: ActivityEnvironment,
) -> None:
    activity_env.info = dataclasses.replace(activity_env.info, attempt=3)
    payment_id = _payment_id()
    with EventPublisher(f"127.0.0.1:{free_port()}", _settings(1000)) as nowhere:
        started = time.monotonic()
        with pytest.raises(ApplicationError) as failure:
            await activity_env.run(
                KafkaActivities(nowhere).publish_payment_event, _event(payment_id)
            )
        elapsed = time.monotonic() - started

    assert elapsed < 5
    assert failure.value.type == KAFKA_UNAVAILABLE
    assert not failure.value.non_retryable
    message = failure.value.message
    assert message.startswith(f"kafka publish of payments.confirmed for {payment_id} failed: ")
    assert message.endswith("(attempt 3); will retry")
    assert "timed out" in message


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker of this test's own, so killing it leaves the session stack alone."""
    broker = EmbeddedBroker(tmp_path / "kafka", free_port())
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.slow
@pytest.mark.parametrize("detected_by", ["unknown producer id log", "fatal error"])
async def test_publishing_recovers_after_the_broker_restarts(
    own_broker: EmbeddedBroker, monkeypatch: pytest.MonkeyPatch, detected_by: str
) -> None:
    if detected_by == "fatal error":
        # The log line comes first; without it, the fatal error alone must suffice.
        monkeypatch.setattr(kafka_activities, "_UNKNOWN_PRODUCER_ID_FACILITY", "(ignored)")
    payment_id = _payment_id()
    with EventPublisher(own_broker.bootstrap_servers, _settings(MESSAGE_TIMEOUT_MS)) as publisher:
        before = await publisher.publish(_refund(payment_id, 0))

        own_broker.kill()
        started = time.monotonic()
        with pytest.raises(KafkaPublishError, match="timed out"):
            await publisher.publish(_refund(payment_id, 1))
        assert time.monotonic() - started < MESSAGE_TIMEOUT_MS / 1000 + 2

        # Memory storage: the restarted broker has no topics and no producer ids; start()
        # recreates the topics. After a timed-out message, an unknown producer id on the same
        # partition is fatal to the producer (librdkafka cannot rule out a duplicate).
        own_broker.start()
        after = [await publisher.publish(_refund(payment_id, n)) for n in (2, 3, 4)]

        assert publisher.producers_replaced == 1
        assert publisher.ensure_connected(timeout=5)
    assert {before.partition} == {r.partition for r in after}
    records = _of_payment(
        payment_id, consume_events(own_broker.bootstrap_servers, ["payments.refunded"])
    )
    assert [r.body["data"]["seq"] for r in records] == [2, 3, 4]


@pytest.mark.parametrize(
    ("code", "breaks"),
    [
        (KafkaError.PRODUCER_FENCED, True),
        (KafkaError.INVALID_PRODUCER_EPOCH, True),
        (KafkaError._FENCED, True),
        (KafkaError._FATAL, True),
        (KafkaError._MSG_TIMED_OUT, False),
        (KafkaError._TRANSPORT, False),
        (KafkaError.NOT_LEADER_FOR_PARTITION, False),
    ],
)
def test_a_fenced_producer_is_replaced_and_a_passing_fault_is_not(code: int, breaks: bool) -> None:
    """A fenced producer never sends again: after a broker restart, a producer made since can
    share its new id with an older one that bumps the epoch (test_faults' broker kill met it
    once: every publish of the newer producer refused, for good). Replacing it is the only way
    on; a timeout or a lost connection passes and the same producer goes on."""
    assert kafka_activities._breaks_producer(KafkaError(code)) is breaks


@pytest.mark.slow
async def test_a_clean_broker_restart_does_not_stall_publishing(
    own_broker: EmbeddedBroker,
) -> None:
    payment_id = _payment_id()
    with EventPublisher(own_broker.bootstrap_servers, _settings(MESSAGE_TIMEOUT_MS)) as publisher:
        await publisher.publish(_refund(payment_id, 0))
        own_broker.kill()
        own_broker.start()

        # Nothing was lost in flight, so librdkafka answers the unknown producer id by bumping
        # its epoch and resending, forever; only replacing the producer gets the event through
        # (within the message timeout, or this would raise).
        second = await publisher.publish(_refund(payment_id, 1))
        third = await publisher.publish(_refund(payment_id, 2))

        assert publisher.producers_replaced == 1
    records = _of_payment(
        payment_id, consume_events(own_broker.bootstrap_servers, ["payments.refunded"])
    )
    # The restart wiped the first record; the later two arrive exactly once each, in order.
    assert [(r.id, r.offset) for r in records] == [(second.event_id, 0), (third.event_id, 1)]
