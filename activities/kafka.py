"""Publishing payment events to Kafka: an idempotent producer behind an asyncio API, and the
`publish_payment_event` activity.

`confluent_kafka.aio.AIOProducer` cannot send headers, and the events travel in CloudEvents
binary mode (`ce_*` headers), so this wraps the sync `Producer`: a daemon thread serves its
delivery reports and each report resolves the asyncio future of the publish that sent it.

An idempotent producer breaks for good when the broker forgets its producer id, which the
embedded broker does on every restart (memory storage). librdkafka then either raises a fatal
error (the partition had earlier messages: UNKNOWN_PRODUCER_ID cannot be retried safely) or
keeps bumping its epoch and resending until the message times out (a partition it had not
written to yet); and a producer made after the restart may be fenced for good by an older one
that was handed the same id. All three are detected here, and the producer is replaced by a
fresh one that gets a new producer id, instead of failing every publish until the worker
restarts.

Over 400 lines: one external system: the producer's configuration, its recovery from a fenced
producer id and the publishing activities change together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from pydantic import BaseModel
from pydantic_core import to_json
from temporalio import activity
from temporalio.exceptions import ApplicationError

from domain.events import EventRecord, PaymentEvent
from settings import Settings, get_settings

if TYPE_CHECKING:
    from activities.event_store import AckRecorder, EventStore

log = logging.getLogger(__name__)

KAFKA_UNAVAILABLE = "KafkaUnavailable"

_POLL_SECONDS = 0.1
# librdkafka backs reconnects off up to 10 s; a restarted broker should be found again well
# within one message timeout.
_RECONNECT_BACKOFF_MAX_MS = 1000
# A full local queue drains as the broker acknowledges; past this wait the broker is not keeping up.
_QUEUE_FULL_WAIT_SECONDS = 5.0
_QUEUE_FULL_BACKOFF_SECONDS = 0.05
# Sending again on a fresh producer is safe: consumers deduplicate by event id, and a payment's
# events are published one at a time, so a resend cannot overtake a later event of its payment.
_RESENDS_ON_A_FRESH_PRODUCER = 1
# Delivery reports arrive within message.timeout.ms; this margin only guards against a lost one.
_REPORT_GRACE_SECONDS = 5.0
# librdkafka's log facility for "the broker does not know this producer id" (debug context eos).
_UNKNOWN_PRODUCER_ID_FACILITY = "UNKPID"


class KafkaPublishError(Exception):
    """An event did not reach the broker; the message says why in an operator's words."""


class DeliveryReceipt(BaseModel):
    topic: str
    partition: int
    offset: int
    event_id: str
    latency_ms: float


@dataclass(frozen=True)
class _Delivered:
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class _Undelivered:
    reason: str
    producer_broken: bool = False  # the producer was replaced: sending again may succeed


_Outcome = _Delivered | _Undelivered


def _resolve(future: asyncio.Future[_Outcome], outcome: _Outcome) -> None:
    # The publish may have been cancelled meanwhile (activity cancelled, worker shutting down).
    if not future.done():
        future.set_result(outcome)


@dataclass(eq=False)
class _PendingDelivery:
    """One produced message whose delivery report a publish awaits."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[_Outcome]

    def settle(self, outcome: _Outcome) -> None:
        """Called from the poll thread: hand the outcome to the publisher's event loop."""
        # RuntimeError: the loop is closed, so nobody waits for this report any more.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(_resolve, self.future, outcome)


@dataclass(eq=False)
class _ProducerHandle:
    """One producer, the deliveries it owes, and why it must be replaced (if it must)."""

    generation: int
    producer: Producer = field(init=False)
    pending: set[_PendingDelivery] = field(default_factory=set)
    broken_reason: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def track(self, delivery: _PendingDelivery) -> None:
        with self.lock:
            self.pending.add(delivery)

    def forget(self, delivery: _PendingDelivery) -> None:
        with self.lock:
            self.pending.discard(delivery)

    def take_pending(self) -> list[_PendingDelivery]:
        with self.lock:
            taken = list(self.pending)
            self.pending.clear()
        return taken

    def flag_broken(self, reason: str) -> None:
        if self.broken_reason is None:
            self.broken_reason = reason
            log.error(
                "kafka producer #%d is broken and will be replaced: %s", self.generation, reason
            )


class _LibrdkafkaLog:
    """librdkafka's log lines (the `logger` setting) go to our logger; on the way, the one that
    says the broker forgot our producer id marks the producer broken: librdkafka itself would
    only bump the epoch and resend, forever, to a broker that rejects that id."""

    def __init__(self, handle: _ProducerHandle) -> None:
        self._handle = handle

    def log(self, level: int, fmt: str, *args: Any) -> None:
        if args and args[0] == _UNKNOWN_PRODUCER_ID_FACILITY:
            self._handle.flag_broken("the broker does not know this producer id (restarted?)")
        log.log(level, fmt, *args)


def _headers(event: EventRecord) -> list[tuple[str, str | bytes | None]]:
    return [(name, value) for name, value in event.headers()]


def _number(value: int | None) -> int:
    return -1 if value is None else value


# A producer the broker fenced never sends again. A restarted embedded broker numbers producer
# ids from scratch, so a producer made after the restart can share its id with one from before
# that then bumps the epoch: every later send of the newer one is refused as fenced
# (test_faults' broker kill, once in CI). Replaced like a fatal error: its successor gets an id
# of its own.
_FENCED = frozenset(
    {KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH, KafkaError._FENCED}
)


def _breaks_producer(err: KafkaError) -> bool:
    return bool(err.fatal()) or err.code() == KafkaError._FATAL or err.code() in _FENCED


class EventPublisher:
    """Publishes `PaymentEvent`s: topic per kind, key = payment id (one partition per payment,
    so its events keep their order), compact JSON body, CloudEvents attributes as headers.

    Build it once per worker (outside or inside an event loop) and `close()` it on shutdown.
    """

    def __init__(self, bootstrap_servers: str, settings: Settings | None = None) -> None:
        self._bootstrap_servers = bootstrap_servers
        self._settings = settings or get_settings()
        self._lock = threading.Lock()
        self._retired: list[_ProducerHandle] = []
        self._stopping = threading.Event()
        self._closed = False
        self.producers_replaced = 0
        self._handle = self._new_handle(generation=1)
        self._poller = threading.Thread(
            target=self._serve_delivery_reports, name="kafka-delivery-reports", daemon=True
        )
        self._poller.start()

    # -- public API -------------------------------------------------------------------------

    async def publish(self, event: PaymentEvent | EventRecord) -> DeliveryReceipt:
        """Send one event and wait for the broker's acknowledgement (acks=all). Raises
        `KafkaPublishError` within about `kafka_message_timeout_ms` if it cannot."""
        if self._closed:
            raise KafkaPublishError("the event publisher is closed")
        if isinstance(event, PaymentEvent):
            event = event.record()
        value = to_json(event.body)
        started = time.monotonic()
        for resend in range(_RESENDS_ON_A_FRESH_PRODUCER + 1):
            outcome = await self._deliver(event, value)
            if isinstance(outcome, _Delivered):
                return DeliveryReceipt(
                    topic=outcome.topic,
                    partition=outcome.partition,
                    offset=outcome.offset,
                    event_id=event.id,
                    latency_ms=round((time.monotonic() - started) * 1000, 3),
                )
            if not outcome.producer_broken or resend == _RESENDS_ON_A_FRESH_PRODUCER:
                raise KafkaPublishError(outcome.reason)
            log.warning(
                "resending event %s of %s on a fresh producer after: %s",
                event.id,
                event.subject,
                outcome.reason,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def ensure_connected(self, timeout: float = 5.0) -> bool:
        """Readiness: the broker answers a metadata request within `timeout` seconds."""
        try:
            self._handle.producer.list_topics(timeout=timeout)
        except (KafkaException, RuntimeError) as exc:  # RuntimeError: closed while retired
            log.warning("kafka broker %s not reachable: %s", self._bootstrap_servers, exc)
            return False
        return True

    def close(self, timeout: float = 10.0) -> int:
        """Deliver what is queued (up to `timeout` seconds) and stop the poll thread. Returns
        how many messages were still undelivered."""
        if self._closed:
            return 0
        self._closed = True
        self._stopping.set()
        self._poller.join(timeout)
        handle = self._handle
        try:
            left = int(handle.producer.flush(timeout))
        except Exception as exc:  # a fatal error surfaces here too; nothing left to save
            log.warning("kafka producer flush on close failed: %s", exc)
            left = len(handle.pending)
        handle.broken_reason = handle.broken_reason or "the event publisher closed"
        self._dispose(handle)
        for retired in self._take_retired():
            self._dispose(retired)
        return left

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- producing ---------------------------------------------------------------------------

    async def _deliver(self, event: EventRecord, value: bytes) -> _Outcome:
        loop = asyncio.get_running_loop()
        delivery = _PendingDelivery(loop, loop.create_future())
        handle = await self._enqueue(event, value, delivery)
        # message.timeout.ms bounds the wait: librdkafka reports a failure when it expires.
        wait = self._settings.kafka_message_timeout_ms / 1000 + _REPORT_GRACE_SECONDS
        try:
            async with asyncio.timeout(wait):
                return await delivery.future
        except TimeoutError:
            return _Undelivered(f"no delivery report within {wait:g}s")
        finally:
            handle.forget(delivery)

    async def _enqueue(
        self, event: EventRecord, value: bytes, delivery: _PendingDelivery
    ) -> _ProducerHandle:
        deadline = time.monotonic() + _QUEUE_FULL_WAIT_SECONDS
        replacements = 0
        while True:
            if self._closed:
                raise KafkaPublishError("the event publisher is closed")
            handle = self._handle
            if handle.broken_reason is not None:
                if replacements > _RESENDS_ON_A_FRESH_PRODUCER:
                    raise KafkaPublishError(f"the producer keeps breaking: {handle.broken_reason}")
                self._replace(handle)  # the poll thread has not swapped it yet
                replacements += 1
                continue
            # Tracked before produce(): the report can arrive before produce() returns here.
            handle.track(delivery)
            try:
                handle.producer.produce(
                    event.kind.topic,
                    value=value,
                    key=event.subject.encode(),
                    headers=_headers(event),
                    on_delivery=partial(self._on_delivery, handle, delivery),
                )
                return handle
            except BufferError:
                handle.forget(delivery)
                if time.monotonic() >= deadline:
                    raise KafkaPublishError(
                        f"the local producer queue stayed full for {_QUEUE_FULL_WAIT_SECONDS:g}s"
                        " (broker slow or unreachable)"
                    ) from None
                # The poll thread drains delivery reports meanwhile; don't block the event loop.
                await asyncio.sleep(_QUEUE_FULL_BACKOFF_SECONDS)
            except RuntimeError:
                handle.forget(delivery)
                # Retired and closed by the poll thread between reading self._handle and
                # produce(): go round again with its successor.
                if handle.broken_reason is None:
                    raise
            except KafkaException as exc:
                handle.forget(delivery)
                err: KafkaError = exc.args[0]
                if not _breaks_producer(err):
                    raise KafkaPublishError(err.str()) from None
                handle.flag_broken(err.str())

    def _on_delivery(
        self,
        handle: _ProducerHandle,
        delivery: _PendingDelivery,
        err: KafkaError | None,
        msg: Message,
    ) -> None:
        """Runs on the poll thread. Must never raise: librdkafka cannot propagate it."""
        outcome: _Outcome
        try:
            if err is None:
                outcome = _Delivered(
                    str(msg.topic()), _number(msg.partition()), _number(msg.offset())
                )
            else:
                if _breaks_producer(err):
                    handle.flag_broken(err.str())
                # Purged from a replaced producer, or failed by the fault that broke it.
                outcome = _Undelivered(err.str(), producer_broken=handle.broken_reason is not None)
        except Exception as exc:
            # confluent-kafka raises a fatal error inside poll() and then still runs delivery
            # callbacks with that exception pending, so any call on err or msg fails.
            reason = f"fatal producer error ({type(exc).__name__}: {exc})"
            handle.flag_broken(reason)
            outcome = _Undelivered(reason, producer_broken=True)
        handle.forget(delivery)
        delivery.settle(outcome)

    def _on_error(self, handle: _ProducerHandle, err: KafkaError) -> None:
        """librdkafka's error callback: mostly connection trouble it recovers from itself."""
        if _breaks_producer(err):
            handle.flag_broken(err.str())
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("kafka: all brokers down (%s): %s", self._bootstrap_servers, err.str())
        else:
            log.info("kafka: %s", err.str())

    # -- the producer's lifecycle -----------------------------------------------------------

    def _producer_config(self, handle: _ProducerHandle) -> dict[str, Any]:
        return {
            "bootstrap.servers": self._bootstrap_servers,
            "client.id": f"paysaga-publisher-{handle.generation}",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": self._settings.kafka_linger_ms,
            "message.timeout.ms": self._settings.kafka_message_timeout_ms,
            "reconnect.backoff.max.ms": _RECONNECT_BACKOFF_MAX_MS,
            "error_cb": partial(self._on_error, handle),
            "logger": _LibrdkafkaLog(handle),
            # Idempotence state changes only (a handful per producer, none per message): the
            # unknown-producer-id line is the only signal of the resend loop described above.
            "debug": "eos",
        }

    def _new_handle(self, generation: int) -> _ProducerHandle:
        handle = _ProducerHandle(generation)
        config = self._producer_config(handle)
        try:
            handle.producer = Producer({**config, "compression.type": "lz4"})
        except KafkaException:
            # librdkafka built without lz4: send uncompressed rather than not at all.
            handle.producer = Producer({**config, "compression.type": "none"})
        return handle

    def _replace(self, broken: _ProducerHandle) -> None:
        """Swap in a fresh producer, once per broken one, whichever thread notices first."""
        with self._lock:
            if self._handle is not broken or self._closed:
                return
            self._handle = self._new_handle(broken.generation + 1)
            self._retired.append(broken)
            self.producers_replaced += 1
        log.warning(
            "kafka producer #%d replaced by #%d after: %s",
            broken.generation,
            broken.generation + 1,
            broken.broken_reason,
        )

    def _take_retired(self) -> list[_ProducerHandle]:
        with self._lock:
            taken, self._retired = self._retired, []
        return taken

    def _dispose(self, handle: _ProducerHandle) -> None:
        """Fail whatever a retired producer still holds, so those publishes send again, and
        close it: a dropped producer lingers (its callbacks form a cycle) with its sockets."""
        try:
            handle.producer.purge(in_queue=True, in_flight=True)
            handle.producer.poll(0)  # serves the purge reports (marked producer_broken)
        except Exception as exc:
            log.debug("purging kafka producer #%d: %s", handle.generation, exc)
        reason = f"producer #{handle.generation} was retired ({handle.broken_reason})"
        for delivery in handle.take_pending():
            delivery.settle(_Undelivered(reason, producer_broken=True))
        try:
            handle.producer.close()
        except Exception as exc:
            log.debug("closing kafka producer #%d: %s", handle.generation, exc)

    def _serve_delivery_reports(self) -> None:
        while not self._stopping.is_set():
            handle = self._handle
            try:
                handle.producer.poll(_POLL_SECONDS)
            except Exception as exc:
                # poll() raises only for a fatal error (or a callback's pending one).
                handle.flag_broken(f"{type(exc).__name__}: {exc}")
            if handle.broken_reason is not None:
                self._replace(handle)
            for retired in self._take_retired():
                self._dispose(retired)


class KafkaActivities:
    """The `publish_payment_event` activity. Register
    `KafkaActivities(publisher, events).publish_payment_event` on the worker. Its start-to-close
    timeout must exceed `kafka_message_timeout_ms` (plus ~1 s for a producer replacement).

    With an events store, an event the ledger did not record (payments.raw, rejected, failed,
    canceled) is recorded there before it is sent, under the same id: the store holds every
    event of a payment, and the outbox relay owes Kafka whatever Kafka did not acknowledge.
    Acknowledgements are noted for the relay in batches (`AckRecorder`), off the payment's path.
    """

    def __init__(
        self,
        publisher: EventPublisher,
        events: EventStore | None = None,
        acks: AckRecorder | None = None,
    ) -> None:
        self._publisher = publisher
        self._events = events
        self._acks = acks

    @activity.defn(name="publish_payment_event")
    async def publish_payment_event(self, event: PaymentEvent) -> DeliveryReceipt:
        attempt = activity.info().attempt if activity.in_activity() else 1
        if self._events is not None and not event.kind.from_ledger:
            # Before sending: once Kafka has it, the store must too (the relay and the
            # events API read from the store).
            await self._events.record(event.record())
        try:
            receipt = await self._publisher.publish(event)
        except KafkaPublishError as exc:
            message = (
                f"kafka publish of {event.kind.topic} for {event.payment_id} failed: {exc} "
                f"(attempt {attempt}); will retry"
            )
            _activity_log(logging.WARNING, message)
            raise ApplicationError(message, type=KAFKA_UNAVAILABLE) from None
        if self._acks is not None:
            self._acks.note(event.id)
        _activity_log(
            logging.INFO,
            f"published {event.kind.topic} for {event.payment_id} (event {event.id}) to "
            f"partition {receipt.partition} offset {receipt.offset} in {receipt.latency_ms:.1f}ms",
        )
        return receipt

    @activity.defn(name="publish_subscription_event")
    async def publish_subscription_event(self, record: EventRecord) -> DeliveryReceipt:
        """A subscription's event (issue 17): recorded in the events store first (the events
        API, the webhook dispatcher and the outbox relay read it there), then sent to Kafka
        under the same id. Retried until Kafka takes it, like a payment's."""
        if self._events is not None:
            await self._events.record(record)
        try:
            receipt = await self._publisher.publish(record)
        except KafkaPublishError as exc:
            message = f"kafka publish of {record.kind.topic} for {record.subject} failed: {exc}"
            _activity_log(logging.WARNING, message)
            raise ApplicationError(message, type=KAFKA_UNAVAILABLE) from None
        if self._acks is not None:
            self._acks.note(record.id)
        return receipt


def _activity_log(level: int, message: str) -> None:
    # activity.logger adds the workflow and activity ids, but only exists inside an activity.
    (activity.logger if activity.in_activity() else log).log(level, message)
