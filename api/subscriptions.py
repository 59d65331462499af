"""Subscription routes (issue 17). Thin like the payment routes: validate, start the
subscription's workflow or ask it (the `change` Update, whose validator refuses what the
subscription cannot do before it enters the history), shape the answer.

Scopes: reading needs `payments:read`, every change `payments:write` (a subscription is a
series of payments). Errors have the payments' shape (api/errors.py).
"""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BeforeValidator
from temporalio.client import (
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from api.auth import ApiClient, require_scope
from api.errors import WORKFLOW_UNAVAILABLE, ApiError, error_responses
from api.ids import issued, no_card_number
from api.listing import Cursor, IdentifierFilter, Limit, list_page, listed
from api.state import (
    IdempotencyKey,
    answer_started,
    app_settings,
    start_once,
    temporal_client,
)
from api.subscription_resources import (
    SUBSCRIPTION_LINKS,
    SubscriptionList,
    SubscriptionListItem,
    SubscriptionResource,
)
from domain.subscription import (
    SUBSCRIPTION_ID_PATTERN,
    CancelChange,
    CancelRequest,
    EmptyRequest,
    PauseChange,
    PaymentMethodChange,
    PaymentMethodRequest,
    PriceChange,
    PriceChangeRequest,
    ResumeChange,
    SubscriptionRequest,
    SubscriptionState,
    SubscriptionStatus,
    total_over_limit,
)
from service.follow_ups import unprocessed
from service.lookup import ask_state, held_for
from service.start import start_subscription
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


def _not_found() -> ApiError:
    return ApiError(404, "invalid_request_error", "resource_missing", "No such subscription.", "id")


async def _query(handle: WorkflowHandle[Any, Any], timeout: float) -> SubscriptionState:
    """Asked again within `timeout` when Temporal lost or refused the query, as a payment's."""
    return await ask_state(handle, SubscriptionState, timeout)


async def load_subscription(
    request: Request, subscription_id: str, client: ApiClient
) -> SubscriptionState:
    if not issued(SUBSCRIPTION_ID, subscription_id):
        raise _not_found()
    handle = temporal_client(request).get_workflow_handle(subscription_id)
    try:
        state = await _query(handle, app_settings(request).api_query_timeout_seconds)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            raise _not_found() from None
        # Temporal holds it, but it cannot answer now (its workflow task is failing, or no
        # worker answered in time): never a 404 to its own client, never a 503 to another
        # one (that would tell them it exists).
        if not await held_for(handle, client.client_id):
            raise _not_found() from None
        if exc.status in WORKFLOW_UNAVAILABLE:
            raise ApiError(
                503,
                "api_error",
                "subscription_unavailable",
                "The subscription exists but cannot be read right now (its workflow is not "
                "answering); retry.",
                headers={"Retry-After": "1"},
            ) from None
        raise
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
    started = await start_once(
        request, start_subscription, client.client_id, idempotency_key, body, "subscription"
    )
    answer_started(response, started.replayed, f"/v1/subscriptions/{started.subscription_id}")
    if started.handle is None:
        # Temporal has forgotten the subscription this key started: nothing is started again.
        raise ApiError(
            409,
            "idempotency_error",
            "subscription_record_missing",
            "This Idempotency-Key already created a subscription whose workflow has since been "
            "removed (an operator's delete, retention); it is never started twice. Use a new key.",
            "Idempotency-Key",
        )
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
    items = [
        SubscriptionListItem(
            **listed(execution, sa.SUBSCRIPTION_STATUS),
            next_renewal_at=execution.typed_search_attributes.get(sa.NEXT_RENEWAL_AT),
        )
        for execution in executions
    ]
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
        if unprocessed(cause):  # rejected by Temporal, never seen by the workflow: not a refusal
            raise _subscription_busy() from None
        code = cause.type if isinstance(cause, ApplicationError) and cause.type else "change_failed"
        message = cause.message if isinstance(cause, ApplicationError) else "Refused."
        raise ApiError(409, "invalid_request_error", code, message, param) from None
    except WorkflowUpdateRPCTimeoutOrCancelledError:
        raise _subscription_busy() from None
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        # Its workflow has completed: the subscription ended.
        raise ApiError(
            409, "invalid_request_error", "subscription_canceled", "The subscription is canceled."
        ) from None
    return SubscriptionResource.of(state)


def _subscription_busy() -> ApiError:
    return ApiError(
        503,
        "api_error",
        "subscription_busy",
        "The subscription is busy; retry.",
        headers={"Retry-After": "1"},
    )


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
