"""Kafka intake: billing systems and agents request payments over Kafka.

    python -m intake      # its own process; or PAYSAGA_KAFKA_INTAKE_ENABLED=true in the worker

Each client configured in `PAYSAGA_KAFKA_INTAKE_CLIENTS` produces to its own topic,
`payments.requests.<client_id>`, and **the topic says who asks**: a producer cannot choose
another client by a header, and Kafka ACLs grant each producer's principal WRITE on its own
topic only (docs/security.md, "The Kafka intake"). A message is the REST API's JSON body;
headers carry `idempotency-key` (required) and may carry `client-id`, which must then name the
topic's client. Delivery is at least once and starting is idempotent, so:

- a valid message starts the payment's workflow, and its offset is committed only after
  Temporal accepted the start (or said this key already started the same payment);
- a replayed message (same key, same body) starts nothing new, even after Temporal forgot the
  payment (the idempotency register in the database remembers every key: infra/idempotency.py);
- an invalid message (bad JSON, schema error, card data, missing key, a `client-id` naming
  another client, key reused with another body) is copied to `payments.requests.dlq` with
  `dlq-reason` / `dlq-error-code` headers and the original key and headers, and committed once
  the broker's delivery report acknowledged the copy: it cannot succeed by being read again;
- when Temporal (or the database) does not accept a start, or the broker does not acknowledge
  a dead letter, nothing from that message on is committed: the partition is rewound to it and
  read again after a pause.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Literal

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from temporalio.client import Client

from domain.cards import contains_card_number
from domain.events import REQUESTS_DLQ_TOPIC
from infra.database import make_engine
from infra.idempotency import IdempotencyRegister
from infra.metrics import INTAKE_MESSAGES
from intake.messages import (
    Refused,
    dead_letter_headers,
    message_headers,
    read_payment_order,
)
from service.start import IdempotencyKeyReused, start_payment
from settings import Settings, get_settings

log = logging.getLogger("paysaga.intake")

_BATCH_SIZE = 100
_POLL_SECONDS = 0.5
_RETRY_PAUSE_SECONDS = 1.0


class _NotAccepted(Exception):
    """Temporal (or the DLQ) did not take the message: don't commit it; read it again."""


@dataclass
class DeadLetterDelivery:
    """The broker's delivery report for one dead letter, set by librdkafka's callback.

    Only this says the copy is on the DLQ: `flush()` returning 0 means the producer's queue is
    empty, which is also true after the broker *refused* the copy (an ACL, an unknown or
    invalid topic, a message timeout) and librdkafka reported that error and dropped it."""

    reported: bool = False
    error: str | None = None

    def report(self, error: KafkaError | None, _message: Message) -> None:
        self.error = None if error is None else error.str()
        self.reported = True

    @property
    def acknowledged(self) -> bool:
        return self.reported and self.error is None


Started = Literal["started", "replayed"]


class PaymentIntake:
    """Consumes every intake client's `payments.requests.<client_id>` in batches. Each batch's
    starts run concurrently; then, per partition, offsets are committed up to the first message
    that was not accepted, and the partition is rewound to it. A redelivered message is
    harmless: starts are idempotent."""

    def __init__(
        self,
        settings: Settings,
        temporal: Client,
        *,
        group_id: str | None = None,
        dead_letter_topic: str = REQUESTS_DLQ_TOPIC,
    ) -> None:
        assert settings.kafka_bootstrap_servers, "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS is not set"
        assert settings.database_url, "PAYSAGA_DATABASE_URL is not set"
        if not settings.kafka_intake_clients:
            raise ValueError(
                "the Kafka intake has no clients: set PAYSAGA_KAFKA_INTAKE_CLIENTS "
                "(each produces to payments.requests.<client_id>)"
            )
        self._settings = settings
        self._temporal = temporal
        self._group_id = group_id or settings.kafka_intake_group
        # Whose each topic is: the only source of a message's client.
        self._clients = settings.intake_topics()
        self._dead_letter_topic = dead_letter_topic
        # The idempotency register: a message read again after Temporal forgot its payment
        # (an offset reset, a re-sent batch) finds the payment and starts nothing.
        self._engine = make_engine(settings.database_url, pool_size=2)
        self._register = IdempotencyRegister(self._engine, max_attempts=settings.db_max_retries)
        # librdkafka handles are not for concurrent use: every call goes through this thread.
        self._kafka_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="intake")
        self._consumer = Consumer(self._consumer_config())
        self._dead_letters = Producer(
            {
                "bootstrap.servers": settings.kafka_bootstrap_servers,
                "client.id": "paysaga-intake-dlq",
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": settings.kafka_linger_ms,
                "message.timeout.ms": settings.kafka_message_timeout_ms,
            }
        )

    def _consumer_config(self) -> dict[str, Any]:
        session_ms = self._settings.kafka_session_timeout_ms
        return {
            "bootstrap.servers": self._settings.kafka_bootstrap_servers,
            "group.id": self._group_id,
            "client.id": "paysaga-intake",
            # Offsets are committed by hand, only once Temporal accepted the start.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # tansu answers ListOffsets LATEST wrongly; a new group must read from the start.
            "auto.offset.reset": "earliest",
            "session.timeout.ms": session_ms,
            "heartbeat.interval.ms": max(session_ms // 3, 100),
            "fetch.wait.max.ms": 100,
        }

    async def _kafka(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._kafka_thread, fn, *args)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then leave the group cleanly."""
        topics = sorted(self._clients)
        await self._kafka(self._consumer.subscribe, topics)
        log.info("intake consuming %s as group %s", ", ".join(topics), self._group_id)
        try:
            while not stop.is_set():
                batch: list[Message] = await self._kafka(
                    self._consumer.consume, _BATCH_SIZE, _POLL_SECONDS
                )
                messages = [m for m in batch if not self._is_error(m)]
                if messages and not await self.take(messages):
                    await _pause(stop, _RETRY_PAUSE_SECONDS)
        finally:
            await self._kafka(self._dead_letters.flush, 10.0)
            await self._kafka(self._consumer.close)
            self._kafka_thread.shutdown(wait=False)
            await self._register.aclose()
            await self._engine.dispose()

    def _is_error(self, message: Message) -> bool:
        error = message.error()
        if error is None:
            return False
        if error.code() != KafkaError._PARTITION_EOF:
            log.warning("intake: consumer error: %s", error.str())
        return True

    async def take(self, messages: Sequence[Message]) -> bool:
        """Start every message's payment; commit what was accepted. False if some were not."""
        results: list[Started | DeadLetterDelivery | BaseException] = await asyncio.gather(
            *(self._start_or_refuse(m) for m in messages), return_exceptions=True
        )
        if any(isinstance(r, DeadLetterDelivery) for r in results):
            # Serves the delivery callbacks; every dead letter gets its report within
            # message.timeout.ms. One without a report by then is not acknowledged either.
            await self._kafka(
                self._dead_letters.flush, self._settings.kafka_message_timeout_ms / 1000 + 5
            )
        accepted = [self._accepted(m, r) for m, r in zip(messages, results, strict=True)]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, _NotAccepted):
                raise result  # a bug, not an outage: let the process supervisor see it
        await self._commit_accepted(messages, accepted)
        return all(accepted)

    def _accepted(self, message: Message, result: object) -> bool:
        if isinstance(result, BaseException):
            return False
        if not isinstance(result, DeadLetterDelivery):
            return True
        if result.acknowledged:
            INTAKE_MESSAGES.labels("dead_lettered").inc()
            return True
        INTAKE_MESSAGES.labels("retried").inc()
        log.warning(
            "intake: the dead letter of %s[%s]@%s was not acknowledged by the broker (%s); "
            "not committed, will retry",
            message.topic(),
            message.partition(),
            message.offset(),
            result.error or "no delivery report in time",
        )
        return False

    async def _start_or_refuse(self, message: Message) -> Started | DeadLetterDelivery:
        headers = message_headers(message)
        client_id = self._clients[str(message.topic())]
        try:
            order = read_payment_order(
                message.value(),
                headers,
                self._settings.max_body_bytes,
                client_id,
                message_key=message.key(),
            )
            started = await start_payment(
                self._temporal,
                self._register,
                self._settings,
                order.client_id,
                order.idempotency_key,
                order.body,
                source="kafka",
            )
        except Refused as refusal:
            return self._dead_letter(message, headers, refusal, client_id)
        except IdempotencyKeyReused:
            reused = Refused(
                "idempotency_key_reused",
                "this idempotency-key already started a payment with a different body",
            )
            return self._dead_letter(message, headers, reused, client_id)
        except Exception as exc:
            INTAKE_MESSAGES.labels("retried").inc()
            log.warning(
                "intake: Temporal did not accept the start from %s[%s]@%s, will retry: %s",
                message.topic(),
                message.partition(),
                message.offset(),
                exc,
            )
            raise _NotAccepted(str(exc)) from exc
        outcome: Started = "replayed" if started.replayed else "started"
        INTAKE_MESSAGES.labels(outcome).inc()
        return outcome

    def _dead_letter(
        self,
        message: Message,
        headers: Sequence[tuple[str, bytes]],
        refusal: Refused,
        client_id: str,
    ) -> DeadLetterDelivery:
        # A refused card-bearing value (or key) is not copied anywhere: the DLQ stays PAN-free.
        card = refusal.code == "card_data_not_allowed"
        key = message.key()
        if key is not None and contains_card_number(key.decode(errors="replace")):
            key = None
        delivery = DeadLetterDelivery()
        try:
            self._dead_letters.produce(
                self._dead_letter_topic,
                value=None if card else message.value(),
                key=key,
                headers=dead_letter_headers(message, headers, refusal, client_id),
                on_delivery=delivery.report,
            )
        except (BufferError, KafkaException) as exc:
            INTAKE_MESSAGES.labels("retried").inc()
            log.warning(
                "intake: the dead letter of %s[%s]@%s could not be queued, will retry: %s",
                message.topic(),
                message.partition(),
                message.offset(),
                exc,
            )
            raise _NotAccepted(f"dead letter not queued: {exc}") from exc
        log.warning(
            "intake: %s[%s]@%s refused, dead-lettering: %s (%s)",
            message.topic(),
            message.partition(),
            message.offset(),
            refusal.code,
            refusal.reason,
        )
        return delivery

    async def _commit_accepted(self, messages: Sequence[Message], accepted: Sequence[bool]) -> None:
        """Per partition: commit past the accepted prefix; rewind to the first refusal."""
        prefix_end: dict[tuple[str, int], int] = {}
        rewind_to: dict[tuple[str, int], int] = {}
        for message, ok in sorted(
            zip(messages, accepted, strict=True), key=lambda pair: _number(pair[0].offset())
        ):
            where = (str(message.topic()), _number(message.partition()))
            if where in rewind_to:
                continue
            if ok:
                prefix_end[where] = _number(message.offset()) + 1
            else:
                rewind_to[where] = _number(message.offset())
        commits = [TopicPartition(t, p, offset) for (t, p), offset in prefix_end.items()]
        if commits:
            try:
                await self._kafka(
                    lambda: self._consumer.commit(offsets=commits, asynchronous=False)
                )
            except Exception as exc:
                # e.g. the partition was reassigned meanwhile: its new owner re-reads and the
                # starts are idempotent.
                log.warning("intake: commit failed, messages will be redelivered: %s", exc)
        for (topic, partition), offset in rewind_to.items():
            try:
                await self._kafka(self._consumer.seek, TopicPartition(topic, partition, offset))
            except Exception as exc:
                log.warning("intake: cannot rewind %s[%d] to %d: %s", topic, partition, offset, exc)


def _number(value: int | None) -> int:
    return -1 if value is None else value


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("intake stopped consuming", exc_info=task.exception())


@asynccontextmanager
async def running_intake(
    settings: Settings,
    temporal: Client,
    *,
    group_id: str | None = None,
    dead_letter_topic: str = REQUESTS_DLQ_TOPIC,
) -> AsyncIterator[PaymentIntake]:
    """Run the intake in this event loop until the block exits."""
    intake = PaymentIntake(
        settings, temporal, group_id=group_id, dead_letter_topic=dead_letter_topic
    )
    stop = asyncio.Event()
    task = asyncio.create_task(intake.run(stop), name="payments-intake")
    task.add_done_callback(_report_crash)
    try:
        yield intake
    finally:
        stop.set()
        await task


async def main() -> None:
    from infra.exit import stop_on_signals
    from infra.logs import configure_logging
    from infra.observability import worker_telemetry
    from infra.temporal_client import connect_client

    settings = get_settings()
    configure_logging(settings)
    stop = stop_on_signals()
    with worker_telemetry(settings, "paysaga-intake"):
        client = await connect_client(settings)
        await PaymentIntake(settings, client).run(stop)
