"""Payment events on Kafka: kinds, topics, deterministic ids and the CloudEvents envelope."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

SCHEMA_VERSION = 1
EVENT_SOURCE = "/paysaga/payments"
_EVENT_NAMESPACE = uuid.UUID("6f1c4a52-3b0e-4d8e-9a57-0c2b8f6d1e34")


class EventKind(StrEnum):
    RAW = "raw"
    REJECTED = "rejected"
    CONFIRMED = "confirmed"
    FAILED = "failed"
    CANCELED = "canceled"
    REFUNDED = "refunded"
    DISPUTE_OPENED = "dispute.opened"
    DISPUTE_WON = "dispute.won"
    DISPUTE_LOST = "dispute.lost"

    @property
    def topic(self) -> str:
        return f"payments.{self.value}"

    @property
    def ce_type(self) -> str:
        return f"com.paysaga.payment.{self.value}"

    @property
    def from_ledger(self) -> bool:
        """Events that a ledger transaction emits (and records in its outbox)."""
        return self in LEDGER_EVENT_KINDS


LEDGER_EVENT_KINDS = frozenset(
    {
        EventKind.CONFIRMED,
        EventKind.REFUNDED,
        EventKind.DISPUTE_OPENED,
        EventKind.DISPUTE_WON,
        EventKind.DISPUTE_LOST,
    }
)

# The Kafka intake: each client produces to its own `payments.requests.<client_id>` (the topic
# says who asks: settings.intake_topic); refusals of every client land on one dead-letter topic.
REQUESTS_TOPIC = "payments.requests"
REQUESTS_DLQ_TOPIC = "payments.requests.dlq"
ALL_TOPICS: tuple[str, ...] = (
    *(kind.topic for kind in EventKind),
    REQUESTS_DLQ_TOPIC,
)


def event_id(payment_id: str, kind: EventKind, reference: str = "") -> str:
    """Deterministic per payment + kind (+ refund/dispute id): a retried publish carries the
    same id, so consumers deduplicate by it."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{payment_id}/{kind.value}/{reference}"))


class PaymentEvent(BaseModel):
    id: str
    kind: EventKind
    payment_id: str
    time: datetime
    data: dict[str, Any]

    def body(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "event_id": self.id,
            "type": self.kind.ce_type,
            "payment_id": self.payment_id,
            "occurred_at": self.time.isoformat(),
            "data": self.data,
        }

    def headers(self) -> list[tuple[str, bytes]]:
        """CloudEvents binary content mode: attributes travel as `ce_` headers."""
        return [
            ("ce_specversion", b"1.0"),
            ("ce_id", self.id.encode()),
            ("ce_type", self.kind.ce_type.encode()),
            ("ce_source", EVENT_SOURCE.encode()),
            ("ce_subject", self.payment_id.encode()),
            ("ce_time", self.time.isoformat().encode()),
            ("content-type", b"application/json"),
        ]
