"""What the subscription routes answer (api/subscriptions.py): a subscription, its periods,
a page of the list, and the OpenAPI links between its operations."""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from api.ids import link
from domain.subscription import (
    Interval,
    Period,
    RefusedChange,
    SubscriptionState,
    SubscriptionStatus,
)

_SUBSCRIPTION = "/v1/subscriptions/{subscription_id}"


def _links(pointer: str) -> dict[str, Any]:
    return {
        "GetSubscription": link(_SUBSCRIPTION, "get", subscription_id=pointer),
        "CancelSubscription": link(f"{_SUBSCRIPTION}/cancel", "post", subscription_id=pointer),
        "PauseSubscription": link(f"{_SUBSCRIPTION}/pause", "post", subscription_id=pointer),
        "ResumeSubscription": link(f"{_SUBSCRIPTION}/resume", "post", subscription_id=pointer),
        "ChangeSubscriptionPrice": link(f"{_SUBSCRIPTION}/price", "post", subscription_id=pointer),
    }


SUBSCRIPTION_LINKS = _links("$response.body#/id")


class PeriodResource(BaseModel):
    number: int
    start: date
    end: date
    amount: int
    status: str
    paid_by: str | None = Field(description="The renewal payment (`pay_…`) that captured it.")
    attempts: list[str] = Field(description="Every renewal payment tried for this period.")

    @classmethod
    def of(cls, period: Period) -> PeriodResource:
        return cls(
            number=period.number,
            start=period.start,
            end=period.end,
            amount=period.amount,
            status=period.status.value,
            paid_by=period.paid_by,
            attempts=[a.payment_id for a in period.attempts],
        )


class SubscriptionResource(BaseModel):
    object: Literal["subscription"] = "subscription"
    id: str
    status: SubscriptionStatus
    customer_id: str
    merchant_id: str
    currency: str
    unit_amount: int
    quantity: int
    interval: Interval
    interval_count: int
    billing_anchor: date
    trial_end: datetime
    next_renewal_at: datetime | None
    cancel_at_period_end: bool
    canceled_at: datetime | None
    pending_adjustment: int = Field(
        description="Minor units the next renewal adds (proration of a change; negative: credit)."
    )
    mrr: int = Field(description="Monthly recurring revenue, minor units (0 unless earning).")
    paid_total: int
    current_period: PeriodResource | None
    periods: list[PeriodResource]
    description: str | None
    metadata: dict[str, str]
    last_refused_change: RefusedChange | None = Field(
        default=None,
        description="The last change sent by the operators' signal that was refused and not "
        "applied (e.g. a pause while a renewal was charged: `renewal_in_progress`).",
    )
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, state: SubscriptionState) -> SubscriptionResource:
        request = state.request
        return cls(
            id=state.id,
            status=state.status,
            customer_id=request.customer_id,
            merchant_id=request.merchant_id,
            currency=request.currency,
            unit_amount=state.unit_amount,
            quantity=state.quantity,
            interval=request.interval,
            interval_count=request.interval_count,
            billing_anchor=state.billing_anchor,
            trial_end=state.trial_end,
            next_renewal_at=state.next_renewal_at,
            cancel_at_period_end=state.cancel_at_period_end,
            canceled_at=state.canceled_at,
            pending_adjustment=state.adjustment,
            mrr=state.mrr,
            paid_total=state.paid_total,
            current_period=PeriodResource.of(state.current_period)
            if state.current_period
            else None,
            periods=[PeriodResource.of(p) for p in state.periods],
            description=request.description,
            metadata=dict(request.metadata),
            last_refused_change=state.last_refused_change,
            created_at=state.created_at,
            updated_at=state.updated_at,
        )


class SubscriptionListItem(BaseModel):
    id: str
    status: str | None
    amount: int | None = Field(description="unit_amount × quantity when created.")
    currency: str | None
    customer_id: str | None
    merchant_id: str | None
    next_renewal_at: datetime | None
    created_at: datetime | None


class SubscriptionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SubscriptionListItem]
    has_more: bool
    next_cursor: str | None
