"""Subscription routes (issue 17). Thin like the payment routes: validate, start the
subscription's workflow or ask it (the `change` Update, whose validator refuses what the
subscription cannot do before it enters the history), shape the answer.

Scopes: reading needs `payments:read`, every change `payments:write` (a subscription is a
series of payments). Errors have the payments' shape (api/errors.py).
"""

from __future__ import annotations

import asyncio
import re
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, BeforeValidator, Field
from temporalio.client import (
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.auth import ApiClient, require_scope
from api.errors import ApiError, error_responses
from api.ids import issued, link, no_card_number
from api.listing import Cursor, IdentifierFilter, Limit, list_page
from api.state import (
    IdempotencyKey,
    answer_started,
    app_settings,
    idempotency_key_reused,
    temporal_client,
)
from domain.subscription import (
    SUBSCRIPTION_ID_PATTERN,
    CancelChange,
    CancelRequest,
    EmptyRequest,
    Interval,
    PauseChange,
    PaymentMethodChange,
    PaymentMethodRequest,
    Period,
    PriceChange,
    PriceChangeRequest,
    ResumeChange,
    SubscriptionRequest,
    SubscriptionState,
    SubscriptionStatus,
    total_over_limit,
)
from service.start import IdempotencyKeyReused, start_subscription
from workflows import search_attributes as sa

router = APIRouter(prefix="/v1", tags=["subscriptions"])

SUBSCRIPTION_ID = re.compile(SUBSCRIPTION_ID_PATTERN)
SubscriptionId = Annotated[
    str,
    # Any text is a well-formed question; one never issued is simply not found.
    Path(description="A subscription's id (`sub_…`). Any other text is simply not found (404)."),
    BeforeValidator(no_card_number),
]
# How long the API waits for a new subscription's workflow to answer its first query.
_FIRST_ANSWER_SECONDS = 10.0
_POLL_SECONDS = 0.05

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


def _not_found() -> ApiError:
    return ApiError(404, "invalid_request_error", "resource_missing", "No such subscription.", "id")


async def _query(handle: WorkflowHandle[Any, Any], timeout: float) -> SubscriptionState:
    state: SubscriptionState = await handle.query(
        "state", result_type=SubscriptionState, rpc_timeout=timedelta(seconds=timeout)
    )
    return state


async def load_subscription(
    request: Request, subscription_id: str, client: ApiClient
) -> SubscriptionState:
    if not issued(SUBSCRIPTION_ID, subscription_id):
        raise _not_found()
    handle = temporal_client(request).get_workflow_handle(subscription_id)
    try:
        state = await _query(handle, app_settings(request).api_query_timeout_seconds)
    except RPCError as exc:
        if exc.status not in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
            raise
        raise _not_found() from None
    if state.client_id != client.client_id:
        raise _not_found()  # another client's subscription does not exist for you
    return state


async def _first_answer(handle: WorkflowHandle[Any, Any], seconds: float) -> SubscriptionState:
    """The new subscription's state once its workflow answers; a 503 to retry with the same
    Idempotency-Key (which finds the same subscription) if no worker answers in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        try:
            return await _query(handle, max(0.5, deadline - loop.time()))
        except RPCError:
            if loop.time() >= deadline:
                raise ApiError(
                    503,
                    "api_error",
                    "subscription_unavailable",
                    "The subscription was created but its workflow has not answered yet; retry "
                    "with the same Idempotency-Key.",
                    headers={"Retry-After": "1"},
                ) from None
        await asyncio.sleep(_POLL_SECONDS)


@router.post(
    "/subscriptions",
    status_code=201,
    response_model=SubscriptionResource,
    responses={
        201: {"links": SUBSCRIPTION_LINKS},
        **error_responses(400, 401, 403, 409, 413, 422, 503),
    },
    summary="Create a subscription",
    description="Starts the subscription's workflow: a trial (`trial_days`), then a renewal "
    "payment at every period boundary through the acquirer, with dunning retries of a declined "
    "one (docs/subscriptions.md). The same Idempotency-Key and body find the same subscription "
    "(`Idempotent-Replayed: true`); another body with it is 409 `idempotency_key_reused`.",
)
async def create_subscription(
    body: SubscriptionRequest,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey,
    client: ApiClient = Depends(require_scope("payments:write")),
) -> SubscriptionResource:
    limit = total_over_limit(body.currency, body.unit_amount, body.quantity)
    if limit is not None:
        raise ApiError(
            409,
            "invalid_request_error",
            "amount_too_large",
            f"unit_amount × quantity exceeds the per-payment limit of {limit} minor units for "
            f"{body.currency}: a renewal is one payment.",
            "quantity",
        )
    try:
        started = await start_subscription(
            temporal_client(request), app_settings(request), client.client_id, idempotency_key, body
        )
    except IdempotencyKeyReused:
        raise idempotency_key_reused() from None
    answer_started(response, started.replayed, f"/v1/subscriptions/{started.subscription_id}")
    return SubscriptionResource.of(await _first_answer(started.handle, _FIRST_ANSWER_SECONDS))


@router.get(
    "/subscriptions/{subscription_id}",
    response_model=SubscriptionResource,
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Retrieve a subscription",
)
async def get_subscription(
    subscription_id: SubscriptionId,
    request: Request,
    client: ApiClient = Depends(require_scope("payments:read")),
) -> SubscriptionResource:
    return SubscriptionResource.of(await load_subscription(request, subscription_id, client))


@router.get(
    "/subscriptions",
    response_model=SubscriptionList,
    responses=error_responses(400, 401, 403, 422, 503),
    summary="List subscriptions (Temporal visibility)",
)
async def list_subscriptions(
    request: Request,
    status: SubscriptionStatus | None = None,
    customer_id: IdentifierFilter = None,
    merchant_id: IdentifierFilter = None,
    limit: Limit = 20,
    cursor: Cursor = None,
    client: ApiClient = Depends(require_scope("payments:read")),
) -> SubscriptionList:
    filters = {
        "SubscriptionStatus": status.value if status is not None else None,
        "CustomerId": customer_id,
        "MerchantId": merchant_id,
    }
    executions, next_cursor = await list_page(
        temporal_client(request), client.client_id, "SubscriptionWorkflow", filters, limit, cursor
    )
    items = []
    for execution in executions:
        attrs = execution.typed_search_attributes
        items.append(
            SubscriptionListItem(
                id=execution.id,
                status=attrs.get(sa.SUBSCRIPTION_STATUS),
                amount=attrs.get(sa.AMOUNT_MINOR),
                currency=attrs.get(sa.CURRENCY),
                customer_id=attrs.get(sa.CUSTOMER_ID),
                merchant_id=attrs.get(sa.MERCHANT_ID),
                next_renewal_at=attrs.get(sa.NEXT_RENEWAL_AT),
                created_at=execution.start_time,
            )
        )
    return SubscriptionList(data=items, has_more=next_cursor is not None, next_cursor=next_cursor)


# ── changes: the workflow's `change` Update ──────────────────────────────────────────────


async def _change(
    request: Request, subscription_id: str, client: ApiClient, change: Any, param: str | None
) -> SubscriptionResource:
    await load_subscription(request, subscription_id, client)
    handle = temporal_client(request).get_workflow_handle(subscription_id)
    try:
        state: SubscriptionState = await handle.execute_update(
            "change", change, result_type=SubscriptionState
        )
    except WorkflowUpdateFailedError as exc:
        cause = exc.cause
        code = cause.type if isinstance(cause, ApplicationError) and cause.type else "change_failed"
        message = cause.message if isinstance(cause, ApplicationError) else "Refused."
        raise ApiError(409, "invalid_request_error", code, message, param) from None
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        raise ApiError(
            503,
            "api_error",
            "subscription_busy",
            "The subscription is busy; retry.",
            headers={"Retry-After": "1"},
        ) from None
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        # Its workflow has completed: the subscription ended.
        raise ApiError(
            409, "invalid_request_error", "subscription_canceled", "The subscription is canceled."
        ) from None
    return SubscriptionResource.of(state)


_CHANGE_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 422, 503)


@router.post(
    "/subscriptions/{subscription_id}/cancel",
    response_model=SubscriptionResource,
    responses={200: {"links": SUBSCRIPTION_LINKS}, **_CHANGE_ERRORS},
    summary="Cancel a subscription, now or at the end of the current period",
)
async def cancel_subscription(
    subscription_id: SubscriptionId,
    request: Request,
    body: CancelRequest | None = None,
    client: ApiClient = Depends(require_scope("payments:write")),
) -> SubscriptionResource:
    change = CancelChange(at_period_end=body.at_period_end if body else False)
    return await _change(request, subscription_id, client, change, "at_period_end")


@router.post(
    "/subscriptions/{subscription_id}/pause",
    response_model=SubscriptionResource,
    responses={200: {"links": SUBSCRIPTION_LINKS}, **_CHANGE_ERRORS},
    summary="Pause an active subscription: boundaries passing meanwhile are not charged",
)
async def pause_subscription(
    subscription_id: SubscriptionId,
    request: Request,
    body: EmptyRequest | None = None,
    client: ApiClient = Depends(require_scope("payments:write")),
) -> SubscriptionResource:
    return await _change(request, subscription_id, client, PauseChange(), None)


@router.post(
    "/subscriptions/{subscription_id}/resume",
    response_model=SubscriptionResource,
    responses={200: {"links": SUBSCRIPTION_LINKS}, **_CHANGE_ERRORS},
    summary="Resume a paused subscription at its next boundary",
)
async def resume_subscription(
    subscription_id: SubscriptionId,
    request: Request,
    body: EmptyRequest | None = None,
    client: ApiClient = Depends(require_scope("payments:write")),
) -> SubscriptionResource:
    return await _change(request, subscription_id, client, ResumeChange(), None)


@router.post(
    "/subscriptions/{subscription_id}/price",
    response_model=SubscriptionResource,
    responses={200: {"links": SUBSCRIPTION_LINKS}, **_CHANGE_ERRORS},
    summary="Change the price or quantity, prorated onto the next renewal",
    description="In a paid period, the new total's part of the days left minus the old "
    "total's part (each rounded half up to a minor unit) is added to the next renewal "
    "(`pending_adjustment`; negative is a credit). 409 `parameter_missing` without either.",
)
async def change_subscription_price(
    subscription_id: SubscriptionId,
    body: PriceChangeRequest,
    request: Request,
    client: ApiClient = Depends(require_scope("payments:write")),
) -> SubscriptionResource:
    change = PriceChange(unit_amount=body.unit_amount, quantity=body.quantity)
    return await _change(request, subscription_id, client, change, "unit_amount")


@router.post(
    "/subscriptions/{subscription_id}/payment_method",
    response_model=SubscriptionResource,
    responses={200: {"links": SUBSCRIPTION_LINKS}, **_CHANGE_ERRORS},
    summary="Replace the payment method the next renewal (or dunning retry) charges",
)
async def change_subscription_payment_method(
    subscription_id: SubscriptionId,
    body: PaymentMethodRequest,
    request: Request,
    client: ApiClient = Depends(require_scope("payments:write")),
) -> SubscriptionResource:
    change = PaymentMethodChange(payment_method=body.payment_method)
    return await _change(request, subscription_id, client, change, "payment_method")
