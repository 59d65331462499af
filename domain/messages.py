"""What a payment tells others, built from its state: the event it publishes (and the ledger's
outbox stores) and the notification every CRM target hears. Plain functions of the state and
the moment; the workflow sends them, the activities deliver them."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from domain.events import EventKind, PaymentEvent, event_id
from domain.payment import PaymentState, PaymentStatus


class CrmTarget(StrEnum):
    WEBHOOK = "webhook"
    SALESFORCE = "salesforce"
    HUBSPOT = "hubspot"


class CrmNotification(BaseModel):
    """One payment event, as every CRM target hears about it."""

    # Deterministic per payment + event kind (use `domain.events.event_id`): the idempotency key.
    event_id: str
    event_kind: EventKind
    payment_id: str
    status: str
    amount: int  # minor units of `currency`
    currency: str
    customer_id: str
    merchant_id: str
    salesforce_opportunity_id: str | None = None
    hubspot_deal_id: str | None = None
    occurred_at: datetime
    # Event specifics, e.g. {"refund_id": "re_1", "refunded": 500}.
    details: dict[str, str | int | None] = Field(default_factory=dict)


def payment_event(
    state: PaymentState,
    kind: EventKind,
    reference: str,
    data: dict[str, Any] | None,
    status: PaymentStatus | None,
    at: datetime,
) -> PaymentEvent:
    """The payment's event of `kind` (for a refund or dispute, `reference` is its id). Each event
    takes the payment's next sequence number once: a retry or a rebuild reuses it."""
    request = state.request
    body: dict[str, Any] = {
        "payment_id": state.id,
        # The tenant: consumers keep two clients' same-named customers apart by it.
        "client_id": state.client_id,
        "status": (status or state.status).value,
        "amount": request.amount,
        "currency": request.currency,
        "customer_id": request.customer_id,
        "merchant_id": request.merchant_id,
    }
    if kind in (EventKind.REJECTED, EventKind.RAW) and state.fraud is not None:
        body["fraud_score"] = state.fraud.score
    if state.failure_reason and kind == EventKind.FAILED:
        body["failure_reason"] = state.failure_reason
    body.update(data or {})
    the_id = event_id(state.id, kind, reference)
    if the_id not in state.event_sequences:
        state.event_sequence += 1
        state.event_sequences[the_id] = state.event_sequence
    body["sequence"] = state.event_sequences[the_id]
    return PaymentEvent(
        id=the_id,
        kind=kind,
        payment_id=state.id,
        time=at,
        data=body,
        client_id=state.client_id,
    )


def crm_notification(
    state: PaymentState,
    kind: EventKind,
    reference: str,
    details: dict[str, Any] | None,
    at: datetime,
) -> CrmNotification:
    """The CRM's view of the payment's event of `kind`: its id is the event's (the CRM's
    idempotency key)."""
    request = state.request
    return CrmNotification(
        event_id=event_id(state.id, kind, reference),
        event_kind=kind,
        payment_id=state.id,
        status=state.status.value,
        amount=request.amount,
        currency=request.currency,
        customer_id=request.customer_id,
        merchant_id=request.merchant_id,
        salesforce_opportunity_id=request.salesforce_opportunity_id,
        hubspot_deal_id=request.hubspot_deal_id,
        occurred_at=at,
        details=details or {},
    )
