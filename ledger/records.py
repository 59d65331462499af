"""What goes into the ledger and what comes back: postings, outcomes, register rows, receipts,
and the refusal a posting gets for a business reason."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from domain.errors import FailureType
from domain.events import PaymentEvent
from domain.ledger import LedgerTransaction
from domain.payment import PaymentState, PaymentStatus


class PaymentParties(BaseModel):
    """Who a payment is between; recorded in the payments register at capture."""

    client_id: str
    customer_id: str
    merchant_id: str
    currency: str

    @classmethod
    def of(cls, state: PaymentState) -> PaymentParties:
        request = state.request
        return cls(
            client_id=state.client_id,
            customer_id=request.customer_id,
            merchant_id=request.merchant_id,
            currency=request.currency,
        )


class LedgerPosting(BaseModel):
    transaction: LedgerTransaction
    amount: int  # the business amount: payment, refund or disputed amount
    parties: PaymentParties | None = None  # required for the capture posting
    event: PaymentEvent | None = None  # written to the outbox in the same transaction


class PaymentOutcome(BaseModel):
    payment_id: str
    parties: PaymentParties
    amount: int
    status: PaymentStatus
    summary: dict[str, Any]


class RegisterRow(BaseModel):
    payment_id: str
    client_id: str
    customer_id: str
    merchant_id: str
    currency: str
    amount: int
    captured: int
    refunded: int
    disputed: int
    dispute_lost: int
    status: PaymentStatus
    summary: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime


class LedgerReceipt(BaseModel):
    transaction_id: str
    # True when this exact business event had already been posted (a retry): nothing was written.
    duplicate: bool
    # None only for a hold posted before the payment is registered (its capture or outcome).
    payment: RegisterRow | None


class LedgerRejected(Exception):
    """A posting the ledger refuses for a business reason; never worth retrying."""

    def __init__(self, failure: FailureType, message: str) -> None:
        super().__init__(message)
        self.failure = failure
