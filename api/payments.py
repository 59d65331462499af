"""Payment routes. Thin: validate, start or signal or query a workflow, shape the answer."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from activities.ledger import Ledger
from api.auth import ApiClient, require_scope
from api.errors import ApiError, error_responses
from api.resources import (
    DisputeResource,
    PaymentList,
    PaymentListItem,
    PaymentResource,
    RefundResource,
)
from domain.cards import contains_card_number
from domain.payment import (
    IDEMPOTENCY_KEY_PATTERN,
    IDENTIFIER_PATTERN,
    CancelSignal,
    DisputeClosedSignal,
    DisputeCloseRequest,
    DisputeOpenedSignal,
    DisputeRequest,
    FollowUpStatus,
    PaymentRequest,
    PaymentState,
    PaymentStatus,
    RefundRequest,
    RefundSignal,
)
from settings import Settings
from workflows import search_attributes as sa
from workflows.payment import PaymentWorkflow
from workflows.starter import IdempotencyKeyReused, start_payment

router = APIRouter(prefix="/v1", tags=["payments"])


def _no_card_number(value: Any) -> Any:
    """Headers and filters are strings too: a card number sent as an idempotency key or
    searched for would reach logs and stores the body never does. Checked before the format,
    so every spelling is refused as card data, like one in the body."""
    if isinstance(value, str) and contains_card_number(value):
        raise PydanticCustomError(
            "card_data_not_allowed",
            "Card numbers are not accepted; send a payment-method token (pm_…) instead.",
        )
    return value


IdempotencyKey = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=8,
        max_length=255,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Unique per payment attempt; retries with the same key never pay twice. "
        "8–255 characters of `A-Z a-z 0-9 _ -`; never a card number.",
    ),
    BeforeValidator(_no_card_number),
]
PaymentId = Annotated[str, Path(pattern=r"^pay_[0-9a-f]{24}$")]
DisputeId = Annotated[str, Path(pattern=r"^dp_[0-9a-f]{24}$")]
Wait = Annotated[
    float,
    Query(ge=0, le=30, description="Seconds to wait for the payment to settle (max 30)."),
]
_POLL_SECONDS = 0.05


def _temporal(request: Request) -> Client:
    client: Client = request.app.state.temporal
    return client


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


def _not_found(payment_id: str) -> ApiError:
    return ApiError(404, "invalid_request_error", "resource_missing", "No such payment.", "id")


async def _query_state(handle: WorkflowHandle[Any, Any]) -> PaymentState:
    state: PaymentState = await handle.query("state", result_type=PaymentState)
    return state


async def load_payment(request: Request, payment_id: str, client: ApiClient) -> PaymentState:
    """The workflow's own state while it runs; the ledger's record once its history is gone."""
    handle = _temporal(request).get_workflow_handle(payment_id)
    try:
        state = await _query_state(handle)
    except RPCError as exc:
        if exc.status not in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
            raise
        row = await _ledger(request).payment(payment_id)
        if row is None or row.summary is None:
            raise _not_found(payment_id) from None
        state = PaymentState.model_validate(row.summary)
    if state.client_id != client.client_id:
        raise _not_found(payment_id)  # another client's payment does not exist for you
    return state


async def _wait_until(
    handle: WorkflowHandle[Any, Any], seconds: float, done: Any
) -> PaymentState | None:
    """Poll the workflow's query until `done(state)` or the deadline. Queries are cheap and need
    no history event, unlike an update or a signal."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    state: PaymentState | None = None
    while True:
        try:
            state = await _query_state(handle)
            if done(state):
                return state
        except RPCError:
            pass  # not picked up by a worker yet
        if loop.time() >= deadline:
            return state
        await asyncio.sleep(_POLL_SECONDS)


@router.post(
    "/payments",
    status_code=201,
    response_model=PaymentResource,
    responses=error_responses(400, 401, 403, 409, 413, 422),
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
    try:
        handle, replayed = await start_payment(
            _temporal(request), _settings(request), client.client_id, idempotency_key, body
        )
    except IdempotencyKeyReused:
        raise ApiError(
            409,
            "idempotency_error",
            "idempotency_key_reused",
            "This Idempotency-Key was already used with a different request body.",
            "Idempotency-Key",
        ) from None
    payment_id = handle.id
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    state = None
    if wait > 0 or replayed:
        state = await _wait_until(handle, wait, lambda s: s.status.settled_for_wait)
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
    response.headers["Location"] = f"/v1/payments/{payment_id}"
    return PaymentResource.of(state)


@router.get(
    "/payments/{payment_id}",
    response_model=PaymentResource,
    responses=error_responses(401, 403, 404, 422),
    summary="Retrieve a payment",
)
async def get_payment(
    payment_id: PaymentId,
    request: Request,
    client: ApiClient = Depends(require_scope("payments:read")),
) -> PaymentResource:
    return PaymentResource.of(await load_payment(request, payment_id, client))


# A cursor is Temporal's page token plus a check over it and the client it was issued to. Temporal
# cannot tell a mangled token from a fault of its own (it answers "something went wrong" after
# the client's retries, i.e. a slow 500); checked here, any cursor we did not issue is a 400.
_CURSOR_CHECK_BYTES = 8


def _cursor_check(client_id: str, token: bytes) -> bytes:
    digest = hashlib.sha256(b"paysaga-cursor\x1f" + client_id.encode() + b"\x1f" + token)
    return digest.digest()[:_CURSOR_CHECK_BYTES]


def _cursor(client_id: str, token: bytes) -> str:
    return base64.urlsafe_b64encode(_cursor_check(client_id, token) + token).decode()


def _page_token(client_id: str, cursor: str) -> bytes | None:
    """The page token inside a cursor we issued to this client, else None."""
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii"))
    except (binascii.Error, ValueError):
        return None
    check, token = raw[:_CURSOR_CHECK_BYTES], raw[_CURSOR_CHECK_BYTES:]
    if not token or not hmac.compare_digest(check, _cursor_check(client_id, token)):
        return None
    return token


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@router.get(
    "/payments",
    response_model=PaymentList,
    responses=error_responses(400, 401, 403, 422),
    summary="List payments (Temporal visibility)",
)
async def list_payments(
    request: Request,
    status: PaymentStatus | None = None,
    customer_id: Annotated[
        str | None,
        Query(max_length=64, pattern=IDENTIFIER_PATTERN),
        BeforeValidator(_no_card_number),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=2048)] = None,
    client: ApiClient = Depends(require_scope("payments:read")),
) -> PaymentList:
    clauses = [
        f"WorkflowType = {_quote('PaymentWorkflow')}",
        f"ClientId = {_quote(client.client_id)}",
    ]
    if status is not None:
        clauses.append(f"PaymentStatus = {_quote(status.value)}")
    if customer_id is not None:
        clauses.append(f"CustomerId = {_quote(customer_id)}")
    token: bytes | None = None
    if cursor:
        token = _page_token(client.client_id, cursor)
        if token is None:
            raise ApiError(400, "invalid_request_error", "cursor_invalid", "Bad cursor.", "cursor")
    iterator = _temporal(request).list_workflows(
        " AND ".join(clauses), page_size=limit, next_page_token=token
    )
    try:
        await iterator.fetch_next_page()
    except RPCError as exc:
        if exc.status == RPCStatusCode.INVALID_ARGUMENT:
            raise ApiError(
                400, "invalid_request_error", "cursor_invalid", "Bad cursor.", "cursor"
            ) from None
        raise
    items = []
    for execution in iterator.current_page or []:
        attrs = execution.typed_search_attributes
        items.append(
            PaymentListItem(
                id=execution.id,
                status=attrs.get(sa.PAYMENT_STATUS),
                amount=attrs.get(sa.AMOUNT_MINOR),
                currency=attrs.get(sa.CURRENCY),
                customer_id=attrs.get(sa.CUSTOMER_ID),
                merchant_id=attrs.get(sa.MERCHANT_ID),
                crm_sync=attrs.get(sa.CRM_SYNC),
                created_at=execution.start_time,
            )
        )
    next_token = iterator.next_page_token
    return PaymentList(
        data=items,
        has_more=bool(next_token),
        next_cursor=_cursor(client.client_id, next_token) if next_token else None,
    )


# ── follow-ups: refunds, disputes, cancel (issue 4) ──────────────────────────────────────


def _follow_up_id(prefix: str, payment_id: str, key: str) -> str:
    digest = hashlib.sha256(f"{payment_id}:{key}".encode()).hexdigest()
    return f"{prefix}_{digest[:24]}"


def _running(request: Request, state: PaymentState) -> WorkflowHandle[Any, Any]:
    return _temporal(request).get_workflow_handle(state.id)


async def _ensure_open(request: Request, state: PaymentState) -> WorkflowHandle[Any, Any]:
    handle = _running(request, state)
    try:
        status = (await handle.describe()).status
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        status = None  # closed long ago: only the ledger remembers it
    if status != WorkflowExecutionStatus.RUNNING:
        raise ApiError(
            409,
            "invalid_request_error",
            "payment_closed",
            "The payment's dispute window has closed; it accepts no more changes.",
        )
    return handle


@router.post(
    "/payments/{payment_id}/refunds",
    status_code=201,
    response_model=RefundResource,
    responses=error_responses(400, 401, 403, 404, 409, 413, 422, 503),
    summary="Refund a payment, in full or in part",
)
async def create_refund(
    payment_id: PaymentId,
    body: RefundRequest,
    request: Request,
    response: Response,
    idempotency_key: IdempotencyKey,
    wait: Wait = 10,
    client: ApiClient = Depends(require_scope("refunds:write")),
) -> RefundResource:
    state = await load_payment(request, payment_id, client)
    refund_id = _follow_up_id("re", payment_id, idempotency_key)
    existing = next((r for r in state.refunds if r.id == refund_id), None)
    if existing is None:
        _check_refundable(state, body.amount)
        handle = await _ensure_open(request, state)
        await handle.signal(
            PaymentWorkflow.refund,
            RefundSignal(refund_id=refund_id, amount=body.amount, reason=body.reason),
        )
    else:
        if body.amount is not None and body.amount != existing.amount:
            raise ApiError(
                409,
                "idempotency_error",
                "idempotency_key_reused",
                "This Idempotency-Key was already used for a refund of another amount.",
                "Idempotency-Key",
            )
        response.headers["Idempotent-Replayed"] = "true"
        handle = _running(request, state)

    def settled(s: PaymentState) -> bool:
        found = next((r for r in s.refunds if r.id == refund_id), None)
        return found is not None and found.status != FollowUpStatus.PENDING

    final = await _wait_until(handle, wait, settled) or state
    refund = next((r for r in final.refunds if r.id == refund_id), None)
    if refund is None:
        raise ApiError(503, "api_error", "refund_not_acknowledged", "Try again with the same key.")
    if refund.status == FollowUpStatus.FAILED:
        raise ApiError(
            409,
            "invalid_request_error",
            "refund_failed",
            f"The refund was not made: {refund.failure_reason}",
            "amount",
        )
    return RefundResource.of(refund, final)


def _check_refundable(state: PaymentState, amount: int | None) -> None:
    if not state.ledger_posted or state.status in (
        PaymentStatus.REJECTED,
        PaymentStatus.DECLINED,
        PaymentStatus.CANCELED,
        PaymentStatus.FAILED,
    ):
        raise ApiError(
            409,
            "invalid_request_error",
            "payment_not_captured",
            f"The payment is {state.status}; there is nothing captured to return.",
        )
    available = state.refundable
    if available <= 0:
        raise ApiError(
            409, "invalid_request_error", "charge_already_refunded", "Nothing is left to refund."
        )
    if amount is not None and amount > available:
        raise ApiError(
            400,
            "invalid_request_error",
            "amount_too_large",
            f"Amount exceeds the {available} minor units still refundable.",
            "amount",
        )


@router.post(
    "/payments/{payment_id}/disputes",
    status_code=201,
    response_model=DisputeResource,
    responses=error_responses(400, 401, 403, 404, 409, 413, 422, 503),
    summary="Record a dispute (chargeback) opened by the card network",
)
async def open_dispute(
    payment_id: PaymentId,
    body: DisputeRequest,
    request: Request,
    wait: Wait = 10,
    client: ApiClient = Depends(require_scope("disputes:write")),
) -> DisputeResource:
    state = await load_payment(request, payment_id, client)
    dispute_id = _follow_up_id("dp", payment_id, body.network_reference)
    if not any(d.id == dispute_id for d in state.disputes):
        _check_refundable(state, body.amount)
        handle = await _ensure_open(request, state)
        await handle.signal(
            PaymentWorkflow.dispute_opened,
            DisputeOpenedSignal(
                dispute_id=dispute_id,
                amount=body.amount,
                reason_code=body.reason_code,
                network_reference=body.network_reference,
            ),
        )
    final = await _await_dispute(
        request, state, dispute_id, wait, ("open", "failed", "won", "lost")
    )
    return final


async def _await_dispute(
    request: Request, state: PaymentState, dispute_id: str, wait: float, statuses: tuple[str, ...]
) -> DisputeResource:
    def settled(s: PaymentState) -> bool:
        return any(d.id == dispute_id and d.status in statuses for d in s.disputes)

    final = await _wait_until(_running(request, state), wait, settled) or state
    dispute = next((d for d in final.disputes if d.id == dispute_id), None)
    if dispute is None:
        raise ApiError(503, "api_error", "dispute_not_acknowledged", "Try again.")
    if dispute.status == "failed":
        raise ApiError(
            409,
            "invalid_request_error",
            "dispute_failed",
            f"The dispute was not recorded: {dispute.failure_reason}",
            "amount",
        )
    return DisputeResource.of(dispute, final)


@router.post(
    "/payments/{payment_id}/disputes/{dispute_id}/close",
    response_model=DisputeResource,
    responses=error_responses(400, 401, 403, 404, 409, 413, 422, 503),
    summary="Close a dispute as won or lost",
)
async def close_dispute(
    payment_id: PaymentId,
    dispute_id: DisputeId,
    body: DisputeCloseRequest,
    request: Request,
    wait: Wait = 10,
    client: ApiClient = Depends(require_scope("disputes:write")),
) -> DisputeResource:
    state = await load_payment(request, payment_id, client)
    dispute = next((d for d in state.disputes if d.id == dispute_id), None)
    if dispute is None:
        raise ApiError(
            404, "invalid_request_error", "resource_missing", "No such dispute.", "dispute_id"
        )
    if dispute.status in ("won", "lost"):
        if dispute.status != body.outcome:
            raise ApiError(
                409,
                "invalid_request_error",
                "dispute_closed",
                f"The dispute was already {dispute.status}.",
            )
        return DisputeResource.of(dispute, state)
    if dispute.status == "failed":
        raise ApiError(
            409, "invalid_request_error", "dispute_failed", "The dispute was never opened."
        )
    handle = await _ensure_open(request, state)
    await handle.signal(
        PaymentWorkflow.dispute_closed,
        DisputeClosedSignal(dispute_id=dispute_id, outcome=body.outcome),
    )
    return await _await_dispute(request, state, dispute_id, wait, ("won", "lost", "failed"))


_CANCEL_ACCEPTED: dict[str, Any] = {
    "model": PaymentResource,
    "description": "The cancel was accepted; the payment is finishing the step under way.",
}


@router.post(
    "/payments/{payment_id}/cancel",
    response_model=PaymentResource,
    responses={**error_responses(401, 403, 404, 409, 413, 422), 202: _CANCEL_ACCEPTED},
    summary="Cancel a payment before it is posted to the ledger",
    description="200 once canceled; 202 when the cancel was accepted but the payment is still "
    "finishing the step under way (poll it); 409 once it is posted: refund it instead.",
)
async def cancel_payment(
    payment_id: PaymentId,
    request: Request,
    response: Response,
    wait: Wait = 10,
    client: ApiClient = Depends(require_scope("payments:write")),
) -> PaymentResource:
    state = await load_payment(request, payment_id, client)
    if state.status == PaymentStatus.CANCELED:
        return PaymentResource.of(state)
    if state.ledger_posted or state.status not in _CANCELABLE:
        raise _cannot_cancel(state)
    handle = await _ensure_open(request, state)
    await handle.signal(PaymentWorkflow.cancel, CancelSignal(reason="requested_by_customer"))
    final = await _wait_until(
        handle,
        wait,
        lambda s: s.status == PaymentStatus.CANCELED or s.cancel_refused is not None,
    )
    final = final or state
    if final.status == PaymentStatus.CANCELED:
        return PaymentResource.of(final)
    if final.cancel_refused is not None or final.status not in _CANCELABLE:
        raise _cannot_cancel(final)
    # Accepted, not yet carried out (e.g. payments.raw is still being published): the
    # workflow stops before the ledger posting.
    response.status_code = 202
    return PaymentResource.of(final)


_CANCELABLE = (PaymentStatus.RECEIVED, PaymentStatus.REQUIRES_REVIEW, PaymentStatus.PROCESSING)


def _cannot_cancel(state: PaymentState) -> ApiError:
    why = state.cancel_refused or (
        "the payment is already posted to the ledger; refund it instead"
        if state.ledger_posted
        else f"the payment is already {state.status}"
    )
    return ApiError(
        409, "invalid_request_error", "payment_not_cancelable", f"Cannot cancel: {why}."
    )
