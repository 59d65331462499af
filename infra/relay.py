"""The outbox relay: the events store is the source of truth, Kafka a copy that can be rebuilt.

The saga still publishes its own events as it goes (README "Events"): that keeps a payment's
events in order on its partition and on Kafka within milliseconds of the step. The relay is
what makes "at least once" hold whatever happens to that publish or to the broker:

- **Owed events.** Every event Kafka has not acknowledged `relay_grace_seconds` after it was
  recorded (the saga's publish is still retrying, the worker died before its acknowledgement
  was noted, nobody was going to publish it) is published by the relay.
- **A broker that lost its log.** The embedded broker keeps its log in memory: a restart
  forgets every event. The relay keeps an epoch marker as the first record of a one-partition
  topic (`relay_epoch_topic`) and remembers it in the database. A missing or different marker
  means the log it published to is gone (or the cluster is another one): it republishes every
  event recorded before that moment, in order, resuming where it stopped after a crash.
  On a real cluster (durable, replicated) that never fires; `paysaga events replay --since …`
  republishes a window explicitly for consumers that need it.

Consumers deduplicate by `ce_id` and order a payment's events by `data.sequence`: a republished
event is the same record again, possibly after later ones.

Several relays (one per worker process) may run at once: they agree on the epoch through the
log itself (the first marker written wins) and the database (a conditional update), and at
worst publish an event twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from activities.event_store import EventStore, StoredEvent
from activities.kafka import EventPublisher, KafkaPublishError
from settings import Settings

log = logging.getLogger("paysaga.relay")

RELAY_NAME = "kafka"
_REPUBLISH_CONCURRENCY = 200


class BrokerUnavailable(Exception):
    """The broker did not answer the epoch check; nothing is concluded from silence."""


class BrokerEpochs:
    """The epoch marker: the first record of partition 0 of a one-partition topic. Writing a
    candidate is always safe, because only the first record in the log counts."""

    def __init__(self, bootstrap_servers: str, topic: str, timeout: float = 10.0) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic = topic
        self.timeout = timeout

    def current(self) -> str:
        # One consumer per check (not one kept across checks: a broker restart must be met by
        # fresh connections), which also lists the topics: no admin client unless it is missing.
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": f"paysaga-relay-epoch-{uuid.uuid4().hex[:8]}",  # never joined
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": 50,
                "socket.timeout.ms": 5000,
            }
        )
        try:
            if not self._topic_exists(consumer):
                self._create_topic()
            epoch = self._first_record(consumer)
            if epoch is None:
                self._write(uuid.uuid4().hex)
                epoch = self._first_record(consumer)
        finally:
            consumer.close()
        if epoch is None:
            raise BrokerUnavailable(f"the epoch marker written to {self.topic} cannot be read")
        return epoch

    def _topic_exists(self, consumer: Consumer) -> bool:
        try:
            return self.topic in consumer.list_topics(timeout=self.timeout).topics
        except KafkaException as exc:
            raise BrokerUnavailable(str(exc)) from None

    def _create_topic(self) -> None:
        admin = AdminClient(
            {"bootstrap.servers": self.bootstrap_servers, "socket.timeout.ms": 5000}
        )
        # Kept forever: a marker lost to retention would look like a lost log.
        wanted = NewTopic(
            self.topic, num_partitions=1, replication_factor=1, config={"retention.ms": "-1"}
        )
        for future in admin.create_topics([wanted]).values():
            try:
                future.result(self.timeout)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise BrokerUnavailable(f"cannot create {self.topic}: {exc}") from None

    def _first_record(self, consumer: Consumer) -> str | None:
        consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1, timeout=0.2):
                error = message.error()
                if error is None:
                    value = message.value()
                    return value.decode() if isinstance(value, bytes) else str(value)
                if error.code() == KafkaError._PARTITION_EOF:
                    return None  # read to the end and found nothing: an empty log
                raise BrokerUnavailable(error.str())
        raise BrokerUnavailable(f"no answer reading {self.topic} within {self.timeout:g}s")

    def _write(self, candidate: str) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap_servers, "acks": "all"})
        failures: list[str] = []
        producer.produce(
            self.topic,
            value=candidate.encode(),
            partition=0,
            on_delivery=lambda err, _msg: failures.append(err.str()) if err else None,
        )
        if producer.flush(self.timeout) or failures:
            raise BrokerUnavailable(f"cannot write the epoch marker: {failures or 'timed out'}")


@dataclass
class RelayPass:
    published: int = 0  # owed events published
    swept: int = 0  # events republished by a sweep
    new_epoch: bool = False


class OutboxRelay:
    def __init__(
        self,
        store: EventStore,
        publisher: EventPublisher,
        settings: Settings,
        epochs: BrokerEpochs | None = None,
        name: str = RELAY_NAME,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.settings = settings
        self.epochs = epochs
        self.name = name
        self._next_broker_check = 0.0
        # Whether a sweep may be under way: at start (one interrupted by a crash) and after
        # every broker check (this relay or another may have started one). Between checks
        # the relay's state is not read again once it showed no sweep.
        self._sweep_may_run = True
        self.totals = RelayPass()

    async def run(self, stop: asyncio.Event) -> None:
        log.info("outbox relay started (grace %gs)", self.settings.relay_grace_seconds)
        while not stop.is_set():
            try:
                done = await self.run_once()
            except Exception as exc:  # the next pass tries again; never kill the worker
                log.warning("outbox relay pass failed: %s: %s", type(exc).__name__, exc)
            else:
                self.totals.published += done.published
                self.totals.swept += done.swept
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.relay_interval_seconds)

    async def run_once(self) -> RelayPass:
        done = RelayPass()
        if self.epochs is not None and time.monotonic() >= self._next_broker_check:
            done.new_epoch = await self.check_broker()
            self._next_broker_check = time.monotonic() + self.settings.relay_broker_check_seconds
        done.swept = await self.sweep()
        done.published = await self.publish_owed()
        return done

    async def check_broker(self) -> bool:
        """True when the broker's log turned out to be a new one (a sweep was started)."""
        assert self.epochs is not None
        self._sweep_may_run = True
        try:
            epoch = await asyncio.to_thread(self.epochs.current)
        except BrokerUnavailable as exc:
            log.info("outbox relay: broker epoch not checked: %s", exc)
            return False
        state = await self.store.relay_state(self.name)
        if state.broker_epoch == epoch:
            return False
        # Anything recorded up to a grace period from now may have gone to the lost log.
        until = datetime.now(UTC) + timedelta(seconds=self.settings.relay_grace_seconds)
        adopted = await self.store.adopt_broker_epoch(self.name, state.broker_epoch, epoch, until)
        if adopted:
            log.warning(
                "outbox relay: the broker's log is new (epoch %s, was %s): republishing every "
                "event recorded before %s",
                epoch,
                state.broker_epoch or "none",
                until.isoformat(),
            )
        return adopted

    async def sweep(self) -> int:
        """Continue the current sweep (after a lost log) until it is done or Kafka fails."""
        swept = 0
        while self._sweep_may_run:
            state = await self.store.relay_state(self.name)
            until = state.sweep_until
            if until is None:
                self._sweep_may_run = False
                return swept
            page = await self.store.created_between(
                state.sweep_cursor, None, until, self.settings.relay_batch_size
            )
            acknowledged = await self.publish_all(page.events)
            swept += len(acknowledged)
            if len(acknowledged) < len(page.events):
                return swept  # Kafka is failing: resume from the cursor next pass
            await self.store.mark_published(acknowledged)
            finished = not page.full
            await self.store.advance_sweep(self.name, until, None if finished else page.last)
            if finished:
                log.warning("outbox relay: sweep finished (%d events republished)", swept)
                return swept
        return swept

    async def publish_owed(self) -> int:
        published = 0
        while True:
            before = datetime.now(UTC) - timedelta(seconds=self.settings.relay_grace_seconds)
            owed = await self.store.unpublished(before, self.settings.relay_batch_size)
            if not owed:
                return published
            acknowledged = await self.publish_all(owed)
            await self.store.mark_published(acknowledged)
            published += len(acknowledged)
            if acknowledged:
                log.info("outbox relay: published %d owed event(s)", len(acknowledged))
            if len(acknowledged) < len(owed) or len(owed) < self.settings.relay_batch_size:
                return published

    async def publish_all(self, events: Sequence[StoredEvent]) -> list[str]:
        """Publish concurrently (the producer batches them); the ids Kafka acknowledged."""
        return await publish_events(self.publisher, events)


async def publish_events(publisher: EventPublisher, events: Sequence[StoredEvent]) -> list[str]:
    gate = asyncio.Semaphore(_REPUBLISH_CONCURRENCY)

    async def one(event: StoredEvent) -> str | None:
        async with gate:
            try:
                await publisher.publish(event.record)
            except KafkaPublishError as exc:
                log.info("relay: event %s not acknowledged: %s", event.record.id, exc)
                return None
            return event.record.id

    results = await asyncio.gather(*(one(event) for event in events))
    return [the_id for the_id in results if the_id is not None]


async def replay(
    store: EventStore,
    publisher: EventPublisher,
    since: datetime,
    until: datetime | None = None,
    batch_size: int = 500,
) -> int:
    """`paysaga events replay`: republish every event recorded in [since, until), oldest first.
    Raises KafkaPublishError at the first page Kafka does not fully acknowledge."""
    until = until or datetime.now(UTC)
    cursor = None
    total = 0
    while True:
        page = await store.created_between(cursor, since, until, batch_size)
        acknowledged = await publish_events(publisher, page.events)
        total += len(acknowledged)
        if len(acknowledged) < len(page.events):
            raise KafkaPublishError(
                f"{len(page.events) - len(acknowledged)} event(s) not acknowledged after "
                f"{total} republished; run the replay again"
            )
        await store.mark_published(acknowledged)
        if not page.full:
            return total
        cursor = page.last


@asynccontextmanager
async def running_relay(
    settings: Settings, store: EventStore, publisher: EventPublisher
) -> AsyncIterator[OutboxRelay]:
    """Run the relay in this event loop until the block exits."""
    assert settings.kafka_bootstrap_servers
    epochs = (
        BrokerEpochs(settings.kafka_bootstrap_servers, settings.relay_epoch_topic)
        if settings.relay_detect_broker_loss
        else None
    )
    relay = OutboxRelay(store, publisher, settings, epochs)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop), name="outbox-relay")
    try:
        yield relay
    finally:
        stop.set()
        await task
