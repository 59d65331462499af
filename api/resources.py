"""What the API returns: payments, refunds and disputes as clients see them."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from domain.payment import (
    CrmSync,
    Dispute,
    FollowUpStatus,
    PaymentState,
    PaymentStatus,
    Refund,
    StatusChange,
)


class RefundResource(BaseModel):
    object: Literal["refund"] = "refund"
    id: str
    payment_id: str
    amount: int
    currency: str
    reason: str | None
    status: FollowUpStatus
    failure_reason: str | None
    created_at: datetime

    @classmethod
    def of(cls, refund: Refund, payment: PaymentState) -> RefundResource:
        return cls(
            id=refund.id,
            payment_id=payment.id,
            amount=refund.amount,
            currency=payment.request.currency,
            reason=refund.reason,
            status=refund.status,
            failure_reason=refund.failure_reason,
            created_at=refund.created_at,
        )


class DisputeResource(BaseModel):
    object: Literal["dispute"] = "dispute"
    id: str
    payment_id: str
    amount: int
    currency: str
    reason_code: str
    network_reference: str
    status: str
    failure_reason: str | None
    created_at: datetime

    @classmethod
    def of(cls, dispute: Dispute, payment: PaymentState) -> DisputeResource:
        return cls(
            payment_id=payment.id,
            currency=payment.request.currency,
            **dispute.model_dump(
                include={
                    "id",
                    "amount",
                    "reason_code",
                    "network_reference",
                    "status",
                    "failure_reason",
                    "created_at",
                }
            ),
        )


class PaymentLinks(BaseModel):
    self: str
    refunds: str
    disputes: str


class PaymentResource(BaseModel):
    object: Literal["payment"] = "payment"
    id: str
    status: PaymentStatus
    amount: int
    currency: str
    customer_id: str
    merchant_id: str
    description: str | None
    metadata: dict[str, str]
    amount_captured: int
    amount_refunded: int
    amount_disputed: int
    amount_dispute_lost: int
    amount_refundable: int
    amount_authorized: int = Field(
        0, description="What the acquirer authorized (held), minor units; 0 without one."
    )
    decline_code: str | None = Field(
        None,
        description="Why the issuer declined (`status: declined` by the acquirer): "
        "insufficient_funds, do_not_honor, expired_card, card_velocity_exceeded, lost_card, "
        "stolen_card or generic_decline (docs/acquirer.md).",
    )
    acquirer_reference: str | None = Field(
        None, description="The acquirer's id of the authorization."
    )
    fraud_score: float | None
    fraud_reasons: list[str]
    fraud_scoring_ms: float | None
    crm_sync: CrmSync
    waiting_for: str
    failure_reason: str | None
    cancel_refused: str | None
    refunds: list[RefundResource]
    disputes: list[DisputeResource]
    status_history: list[StatusChange]
    created_at: datetime
    updated_at: datetime
    links: PaymentLinks

    @classmethod
    def of(cls, state: PaymentState) -> PaymentResource:
        request = state.request
        base = f"/v1/payments/{state.id}"
        return cls(
            id=state.id,
            status=state.status,
            amount=request.amount,
            currency=request.currency,
            customer_id=request.customer_id,
            merchant_id=request.merchant_id,
            description=request.description,
            metadata=request.metadata,
            amount_captured=state.captured,
            amount_refunded=state.refunded,
            amount_disputed=state.disputed,
            amount_dispute_lost=state.dispute_lost,
            amount_refundable=max(state.refundable, 0),
            amount_authorized=state.authorized_amount,
            decline_code=state.decline_code,
            acquirer_reference=state.acquirer_reference,
            fraud_score=state.fraud.score if state.fraud else None,
            fraud_reasons=state.fraud.reasons if state.fraud else [],
            fraud_scoring_ms=state.fraud.elapsed_ms if state.fraud else None,
            crm_sync=state.crm_sync,
            waiting_for=state.waiting_for,
            failure_reason=state.failure_reason,
            cancel_refused=state.cancel_refused,
            refunds=[RefundResource.of(r, state) for r in state.refunds],
            disputes=[DisputeResource.of(d, state) for d in state.disputes],
            status_history=state.history,
            created_at=state.created_at,
            updated_at=state.updated_at,
            links=PaymentLinks(self=base, refunds=f"{base}/refunds", disputes=f"{base}/disputes"),
        )


class PaymentListItem(BaseModel):
    id: str
    status: str | None
    amount: int | None
    currency: str | None
    customer_id: str | None
    merchant_id: str | None
    crm_sync: str | None
    created_at: datetime | None


class PaymentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PaymentListItem]
    has_more: bool
    next_cursor: str | None
