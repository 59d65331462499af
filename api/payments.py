"""Payment routes. Thin: validate, start a workflow or ask it (Updates), shape the answer."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from api.auth import ApiClient, require_scope
from api.errors import ApiError, error_responses
from api.ids import (
    PAYMENT_ID,
    PAYMENT_LINKS,
    READ_PAYMENT_LINKS,
    PaymentId,
    issued,
)
from api.listing import Cursor, IdentifierFilter, Limit, list_page, listed
from api.resources import (
    PaymentList,
    PaymentListItem,
    PaymentResource,
)
from api.state import (
    IdempotencyKey,
    answer_started,
    app_settings,
    ledger,
    start_once,
    temporal_client,
)
from domain.payment import (
    PaymentRequest,
    PaymentState,
    PaymentStatus,
)
from service.lookup import (
    held_for,
    query_state,
    recorded_state,
    settled_for_wait,
    wait_until,
)
from service.start import start_payment
from workflows import search_attributes as sa

router = APIRouter(prefix="/v1", tags=["payments"])


Wait = Annotated[
    float,
    Query(ge=0, le=30, description="Seconds to wait for the payment to settle (max 30)."),
]
_POLL_SECONDS = 0.05


def _not_found(payment_id: str) -> ApiError:
    return ApiError(404, "invalid_request_error", "resource_missing", "No such payment.", "id")


async def load_payment(request: Request, payment_id: str, client: ApiClient) -> PaymentState:
    """The workflow's own state while it runs; the ledger's record once its history is gone."""
    if not issued(PAYMENT_ID, payment_id):
        raise _not_found(payment_id)  # no payment was ever given this id
    handle = temporal_client(request).get_workflow_handle(payment_id)
    try:
        state = await query_state(handle, app_settings(request).api_query_timeout_seconds)
    except RPCError as exc:
        if exc.status not in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
            # No worker answered in time (or Temporal is away): a 503 for the client's own
            # payment only; another client's is not found, served or not.
            await _only_yours(handle, client)
            raise
        recorded = await _recorded_state(request, payment_id)
        if recorded is None:
            if exc.status == RPCStatusCode.FAILED_PRECONDITION:
                await _unserved(handle, client)
            raise _not_found(payment_id) from None
        state = recorded
    if state.client_id != client.client_id:
        raise _not_found(payment_id)  # another client's payment does not exist for you
    return state


async def _unserved(handle: WorkflowHandle[Any, Any], client: ApiClient) -> None:
    """Temporal holds the payment but its workflow cannot answer yet: no workflow task of it
    has completed (no worker picked it up, or its task keeps failing). It exists, so never a
    404: the client's own payment is `503 payment_unavailable` (retry); another client's is
    not found."""
    await _only_yours(handle, client)
    raise ApiError(
        503,
        "api_error",
        "payment_unavailable",
        "The payment exists but cannot be read right now (its workflow has not been served "
        "yet); retry.",
        headers={"Retry-After": "1"},
    )


async def _only_yours(handle: WorkflowHandle[Any, Any], client: ApiClient) -> None:
    """Not found unless the payment is the client's own."""
    if not await held_for(handle, client.client_id):
        raise _not_found(handle.id)


async def _recorded_state(
    request: Request, payment_id: str, body: PaymentRequest | None = None
) -> PaymentState | None:
    return await recorded_state(ledger(request), payment_id, body)


@router.post(
    "/payments",
    status_code=201,
    response_model=PaymentResource,
    responses={
        201: {"links": PAYMENT_LINKS},
        **error_responses(400, 401, 403, 409, 413, 422, 503),
    },
    summary="Create a payment",
)
async def create_payment(
    body: PaymentRequest,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey,
    wait: Wait = 0,
    client: ApiClient = Depends(require_scope("payments:write")),
) -> PaymentResource:
    started = await start_once(
        request, start_payment, client.client_id, idempotency_key, body, "payment"
    )
    payment_id = started.payment_id
    answer_started(response, started.replayed, f"/v1/payments/{payment_id}")
    if started.handle is None:
        # Temporal has forgotten the payment: the payments register answers, and nothing runs.
        recorded = await _recorded_state(request, payment_id, body)
        if recorded is None:
            raise ApiError(
                409,
                "idempotency_error",
                "payment_record_missing",
                "This Idempotency-Key already started a payment whose record is gone (its "
                "workflow was removed before it recorded anything); it is never started twice. "
                "Use a new key.",
                "Idempotency-Key",
            )
        return PaymentResource.of(recorded)
    state = None
    if wait > 0 or started.replayed:
        state = await wait_until(
            started.handle, wait, settled_for_wait, app_settings(request).api_query_timeout_seconds
        )
    if state is None:
        # The workflow has not answered yet: describe what was accepted.
        now = datetime.now(UTC)
        state = PaymentState(
            id=payment_id,
            client_id=client.client_id,
            request=body,
            fingerprint=body.fingerprint(),
            created_at=now,
            updated_at=now,
            waiting_for="a worker to pick the payment up",
        )
    return PaymentResource.of(state)


@router.get(
    "/payments/{payment_id}",
    response_model=PaymentResource,
    responses={200: {"links": READ_PAYMENT_LINKS}, **error_responses(401, 403, 404, 422, 503)},
    summary="Retrieve a payment",
)
async def get_payment(
    payment_id: PaymentId,
    request: Request,
    client: ApiClient = Depends(require_scope("payments:read")),
) -> PaymentResource:
    return PaymentResource.of(await load_payment(request, payment_id, client))


@router.get(
    "/payments",
    response_model=PaymentList,
    responses=error_responses(400, 401, 403, 422, 503),
    summary="List payments (Temporal visibility)",
)
async def list_payments(
    request: Request,
    status: PaymentStatus | None = None,
    customer_id: IdentifierFilter = None,
    limit: Limit = 20,
    cursor: Cursor = None,
    client: ApiClient = Depends(require_scope("payments:read")),
) -> PaymentList:
    filters = {
        "PaymentStatus": status.value if status is not None else None,
        "CustomerId": customer_id,
    }
    executions, next_cursor = await list_page(
        temporal_client(request), client.client_id, "PaymentWorkflow", filters, limit, cursor
    )
    items = [
        PaymentListItem(
            **listed(execution, sa.PAYMENT_STATUS),
            crm_sync=execution.typed_search_attributes.get(sa.CRM_SYNC),
        )
        for execution in executions
    ]
    return PaymentList(data=items, has_more=next_cursor is not None, next_cursor=next_cursor)
