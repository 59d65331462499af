"""Events: kinds, topics, deterministic ids, the CloudEvents envelope on Kafka, and the event
as the events API and merchant webhooks show it.

One event has one id everywhere: the Kafka `ce_id`, the events store's key (the ledger's
outbox), the `/v1/events` id and the id a merchant's webhook receives.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field

SCHEMA_VERSION = 1
EVENT_SOURCE = "/paysaga/payments"
SUBSCRIPTION_EVENT_SOURCE = "/paysaga/subscriptions"
WEBHOOK_ENDPOINT_SOURCE = "/paysaga/webhook_endpoints"
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
    # The acquirer (the issuer) declined the authorization: an outcome, not an error.
    DECLINED = "declined"
    # The acquirer's hold in the ledger: posted, captured (the rest released), voided/expired.
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    VOIDED = "voided"
    # Not a payment's event: a merchant's webhook endpoint kept failing and was switched off.
    WEBHOOK_ENDPOINT_DISABLED = "webhook_endpoint.disabled"
    # A subscription's transitions (issue 17), on `subscriptions.<what>` topics.
    SUBSCRIPTION_CREATED = "subscription.created"
    SUBSCRIPTION_RENEWED = "subscription.renewed"
    SUBSCRIPTION_PAST_DUE = "subscription.past_due"
    SUBSCRIPTION_UNPAID = "subscription.unpaid"
    SUBSCRIPTION_CANCELED = "subscription.canceled"
    SUBSCRIPTION_PAUSED = "subscription.paused"
    SUBSCRIPTION_RESUMED = "subscription.resumed"
    SUBSCRIPTION_UPDATED = "subscription.updated"

    @property
    def about_a_payment(self) -> bool:
        return self is not EventKind.WEBHOOK_ENDPOINT_DISABLED and not self.about_a_subscription

    @property
    def about_a_subscription(self) -> bool:
        return self.value.startswith("subscription.")

    @property
    def api_type(self) -> str:
        """The type the events API and webhooks show, e.g. `payment.confirmed`."""
        return f"payment.{self.value}" if self.about_a_payment else self.value

    @property
    def topic(self) -> str:
        if self.about_a_subscription:
            return f"subscriptions.{self.value.split('.', 1)[1]}"
        if not self.about_a_payment:
            return "webhook_endpoints.disabled"
        return f"payments.{self.value}"

    @property
    def ce_type(self) -> str:
        return f"com.paysaga.{self.api_type}"

    @property
    def ce_source(self) -> str:
        if self.about_a_subscription:
            return SUBSCRIPTION_EVENT_SOURCE
        return EVENT_SOURCE if self.about_a_payment else WEBHOOK_ENDPOINT_SOURCE

    @property
    def from_ledger(self) -> bool:
        """Events that a ledger transaction emits (and records in its outbox)."""
        return self in LEDGER_EVENT_KINDS

    @classmethod
    def of_ce_type(cls, ce_type: str) -> EventKind:
        return _BY_CE_TYPE[ce_type]


_BY_CE_TYPE = {kind.ce_type: kind for kind in EventKind}

LEDGER_EVENT_KINDS = frozenset(
    {
        EventKind.CONFIRMED,
        EventKind.REFUNDED,
        EventKind.DISPUTE_OPENED,
        EventKind.DISPUTE_WON,
        EventKind.DISPUTE_LOST,
        EventKind.AUTHORIZED,
        EventKind.CAPTURED,
        EventKind.VOIDED,
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
# What a webhook endpoint may subscribe to: every type, every type of one resource, or one type.
EVENT_TYPES: tuple[str, ...] = tuple(kind.api_type for kind in EventKind)
EVENT_TYPE_PATTERNS: tuple[str, ...] = (
    "*",
    *sorted({f"{t.split('.', 1)[0]}.*" for t in EVENT_TYPES}),
    *EVENT_TYPES,
)


def event_type_matches(pattern: str, api_type: str) -> bool:
    """`*` matches everything, `payment.*` every payment event, anything else itself."""
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return api_type.startswith(pattern[:-1])
    return pattern == api_type


def event_id(payment_id: str, kind: EventKind, reference: str = "") -> str:
    """Deterministic per payment + kind (+ refund/dispute id): a retried publish carries the
    same id, so consumers deduplicate by it."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, f"{payment_id}/{kind.value}/{reference}"))


class EventRecord(BaseModel):
    """An event as the events store keeps it and Kafka carries it: the JSON value, and what the
    CloudEvents headers and the record key are made of."""

    id: str
    kind: EventKind
    # The API client (tenant) the event belongs to; "" only for events recorded before 0005.
    client_id: str
    # The Kafka key and `ce_subject`: the payment id (one partition per payment, so its events
    # keep their order), or the webhook endpoint's id.
    subject: str
    payment_id: str | None
    time: datetime
    body: dict[str, Any]

    def headers(self) -> list[tuple[str, bytes]]:
        """CloudEvents binary content mode: attributes travel as `ce_` headers."""
        return [
            ("ce_specversion", b"1.0"),
            ("ce_id", self.id.encode()),
            ("ce_type", self.kind.ce_type.encode()),
            ("ce_source", self.kind.ce_source.encode()),
            ("ce_subject", self.subject.encode()),
            ("ce_time", self.time.isoformat().encode()),
            ("content-type", b"application/json"),
        ]


class PaymentEvent(BaseModel):
    id: str
    kind: EventKind
    payment_id: str
    time: datetime
    data: dict[str, Any]
    # Recorded in the events store (which the API scopes by client), never sent on Kafka.
    client_id: str = ""

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
        return self.record().headers()

    def record(self) -> EventRecord:
        return EventRecord(
            id=self.id,
            kind=self.kind,
            client_id=self.client_id,
            subject=self.payment_id,
            payment_id=self.payment_id,
            time=self.time,
            body=self.body(),
        )


class EventObject(BaseModel):
    """An event as `GET /v1/events/{id}` answers and a merchant's webhook endpoint receives it."""

    object: Literal["event"] = "event"
    id: str = Field(description="The CloudEvents id: the same on Kafka (`ce_id`) and webhooks.")
    type: str = Field(description="e.g. `payment.confirmed`; see docs/webhooks.md.")
    created_at: datetime = Field(description="When the event was recorded.")
    occurred_at: datetime = Field(description="When it happened in the payment's saga.")
    payment_id: str | None
    data: dict[str, Any] = Field(
        description="The event's data: amounts in minor units, status, `sequence` (orders one "
        "payment's events)."
    )

    @classmethod
    def of(cls, record: EventRecord, created_at: datetime) -> EventObject:
        data = record.body.get("data")
        return cls(
            id=record.id,
            type=record.kind.api_type,
            created_at=created_at,
            occurred_at=record.time,
            payment_id=record.payment_id,
            data=data if isinstance(data, dict) else {},
        )
