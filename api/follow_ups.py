"""Follow-up routes of a payment: refunds, disputes, cancel, each asked of the payment's
workflow through an Update (service/follow_ups.py) whose refusal is the answer's error.
`api/capture.py` (capture, void) asks the same way."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from api.auth import ApiClient, require_scope
from api.errors import ApiError, error_responses
from api.ids import (
    DISPUTE_LINKS,
    FOLLOW_UP_LINKS,
    DisputeId,
    PaymentId,
)
from api.payments import Wait, load_payment
from api.resources import (
    DisputeResource,
    PaymentResource,
    RefundResource,
)
from api.state import (
    IdempotencyKey,
    app_settings,
    temporal_client,
)
from domain.follow_ups import Refusal
from domain.payment import (
    CancelSignal,
    Dispute,
    DisputeClosedSignal,
    DisputeCloseRequest,
    DisputeOpenedSignal,
    DisputeRequest,
    DisputeStatus,
    FollowUpStatus,
    PaymentState,
    PaymentStatus,
    Refund,
    RefundRequest,
    RefundSignal,
)
from service.follow_ups import (
    FollowUpRefused,
    PaymentBusy,
    PaymentClosed,
    ask_payment,
    follow_up_id,
)
from service.lookup import query_state
from workflows.payment import PaymentWorkflow

router = APIRouter(prefix="/v1", tags=["payments"])


# ── follow-ups: refunds, disputes, cancel, as Updates of the payment's workflow ──────────
# (service/follow_ups.py): the workflow's refusal is the answer's error.

# Refusals that are the request's fault (400) or name a missing resource (404); the rest, a
# request the payment cannot honour as it stands (more than remains to refund included), 409.
_REFUSAL_STATUS = {
    Refusal.AMOUNT_INVALID: 400,
    Refusal.INVALID: 400,
    Refusal.DISPUTE_MISSING: 404,
}
_PAYMENT_CLOSED = "The payment's dispute window has closed; it accepts no more changes."


@dataclass(frozen=True)
class PaymentWrite:
    """A write on a payment as a whole (void, cancel): the payment the path names, and the
    request, response and client that ask."""

    payment_id: str
    request: Request
    response: Response
    client: ApiClient

    async def payment(self) -> PaymentState:
        return await load_payment(self.request, self.payment_id, self.client)

    async def ask(self, update: Any, arg: Any, action: str, wait: float) -> Any:
        """`ask_workflow` under the update id `<action>-<payment id>`."""
        update_id = f"{action}-{self.payment_id}"
        return await ask_workflow(self.request, self.payment_id, update, arg, update_id, wait)

    async def answer(self, result: Any) -> PaymentResource:
        return await answer_with_payment(self.request, self.payment_id, self.response, result)


async def payment_write(
    payment_id: PaymentId,
    request: Request,
    response: Response,
    client: ApiClient = Depends(require_scope("payments:write")),
) -> PaymentWrite:
    return PaymentWrite(payment_id, request, response, client)


async def ask_workflow(
    request: Request,
    payment_id: str,
    update: Any,
    arg: Any,
    update_id: str,
    wait: float,
    *,
    refusal_param: str | None = None,
) -> Any:
    """The follow-up's outcome within `wait`, else ACCEPTED; ApiError when refused."""
    try:
        return await ask_payment(temporal_client(request), payment_id, update, arg, update_id, wait)
    except PaymentBusy:
        raise ApiError(
            503,
            "api_error",
            "payment_busy",
            "The payment is busy with other requests; retry with the same Idempotency-Key.",
            headers={"Retry-After": "1"},
        ) from None
    except PaymentClosed:
        raise ApiError(409, "invalid_request_error", "payment_closed", _PAYMENT_CLOSED) from None
    except FollowUpRefused as refused:
        raise _refusal(refused, refusal_param) from None


def _refusal(refused: FollowUpRefused, param: str | None) -> ApiError:
    code = refused.code
    if code is None:
        return ApiError(409, "invalid_request_error", "follow_up_failed", refused.message)
    status = _REFUSAL_STATUS.get(code, 409)
    error_type: Any = "idempotency_error" if code == Refusal.KEY_REUSED else "invalid_request_error"
    param = "Idempotency-Key" if code == Refusal.KEY_REUSED else param
    return ApiError(status, error_type, code.value, refused.message, param)


async def _pending_record(request: Request, payment_id: str) -> PaymentState:
    """The payment as it is now, to show an accepted follow-up that is still under way."""
    handle = temporal_client(request).get_workflow_handle(payment_id)
    return await query_state(handle, app_settings(request).api_query_timeout_seconds)


async def answer_with_payment(
    request: Request, payment_id: str, response: Response, result: Any
) -> PaymentResource:
    """The payment a follow-up left, or, still under way (ACCEPTED), 202 with it as it is."""
    if isinstance(result, PaymentState):
        return PaymentResource.of(result)
    response.status_code = 202
    return PaymentResource.of(await _pending_record(request, payment_id))


@router.post(
    "/payments/{payment_id}/refunds",
    status_code=201,
    response_model=RefundResource,
    responses={
        201: {"links": FOLLOW_UP_LINKS},
        **error_responses(400, 401, 403, 404, 409, 413, 422, 503),
    },
    summary="Refund a payment, in full or in part",
    description="201 with the refund once the ledger posted it (`succeeded`), or, past `wait`, "
    "accepted and still `pending` (the payment carries it out whatever happens). 409 with the "
    "payment's reason when it cannot be honoured (nothing is recorded), or when the ledger "
    "refused it (`refund_failed`: recorded failed).",
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
    refund_id = follow_up_id("re", payment_id, idempotency_key)
    known = next((r for r in state.refunds if r.id == refund_id), None)
    if known is not None:
        response.headers["Idempotent-Replayed"] = "true"
    refund = known
    if known is None or known.status == FollowUpStatus.PENDING:
        asked = RefundSignal(refund_id=refund_id, amount=body.amount, reason=body.reason)
        result = await ask_workflow(
            request, payment_id, PaymentWorkflow.refund_payment, asked, refund_id, wait,
            refusal_param="amount",
        )  # fmt: skip
        if isinstance(result, Refund):
            refund = result
        else:
            state = await _pending_record(request, payment_id)
            refund = next((r for r in state.refunds if r.id == refund_id), None)
            if refund is None:
                # A refund of a `requires_capture` payment is its void, recorded as a refund of
                # what was held once the void is done: until then it is pending (never a 500).
                refund = Refund(
                    id=refund_id,
                    amount=state.authorized_amount,
                    reason=body.reason,
                    created_at=datetime.now(UTC),
                )
    assert refund is not None
    if body.amount is not None and body.amount != refund.amount:
        raise ApiError(
            409,
            "idempotency_error",
            "idempotency_key_reused",
            "This Idempotency-Key was already used for a refund of another amount.",
            "Idempotency-Key",
        )
    if refund.status == FollowUpStatus.FAILED:
        raise ApiError(
            409,
            "invalid_request_error",
            "refund_failed",
            f"The refund was not made: {refund.failure_reason}",
            "amount",
        )
    return RefundResource.of(refund, state)


@router.post(
    "/payments/{payment_id}/disputes",
    status_code=201,
    response_model=DisputeResource,
    responses={
        201: {"links": DISPUTE_LINKS},
        **error_responses(400, 401, 403, 404, 409, 413, 422, 503),
    },
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
    dispute_id = follow_up_id("dp", payment_id, body.network_reference)
    dispute = next((d for d in state.disputes if d.id == dispute_id), None)
    if dispute is None or dispute.status == DisputeStatus.PENDING:
        asked = DisputeOpenedSignal(
            dispute_id=dispute_id,
            amount=body.amount,
            reason_code=body.reason_code,
            network_reference=body.network_reference,
        )
        result = await ask_workflow(
            request, payment_id, PaymentWorkflow.open_dispute, asked, dispute_id, wait,
            refusal_param="amount",
        )  # fmt: skip
        if isinstance(result, Dispute):
            dispute = result
        else:
            state = await _pending_record(request, payment_id)
            dispute = next(d for d in state.disputes if d.id == dispute_id)
    assert dispute is not None
    if dispute.status == DisputeStatus.FAILED:
        raise ApiError(
            409,
            "invalid_request_error",
            "dispute_failed",
            f"The dispute was not recorded: {dispute.failure_reason}",
            "amount",
        )
    return DisputeResource.of(dispute, state)


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
    if dispute.status in (DisputeStatus.WON, DisputeStatus.LOST):
        if dispute.status != DisputeStatus(body.outcome):
            raise ApiError(
                409,
                "invalid_request_error",
                "dispute_closed",
                f"The dispute was already {dispute.status}.",
            )
        return DisputeResource.of(dispute, state)
    if dispute.status == DisputeStatus.FAILED:
        raise ApiError(
            409, "invalid_request_error", "dispute_failed", "The dispute was never opened."
        )
    # A close may be retried after the ledger refused it: each request is its own Update (the
    # workflow itself makes a repeated close one close).
    update_id = f"{dispute_id}-{body.outcome}-{uuid.uuid4().hex[:12]}"
    asked = DisputeClosedSignal(dispute_id=dispute_id, outcome=body.outcome)
    result = await ask_workflow(
        request, payment_id, PaymentWorkflow.close_dispute, asked, update_id, wait
    )
    if isinstance(result, Dispute):
        dispute = result
    else:
        state = await _pending_record(request, payment_id)
        dispute = next(d for d in state.disputes if d.id == dispute_id)
    if dispute.status in (
        DisputeStatus.WON,
        DisputeStatus.LOST,
    ) and dispute.status != DisputeStatus(body.outcome):
        raise ApiError(
            409,
            "invalid_request_error",
            "dispute_closed",
            f"The dispute was already {dispute.status}.",
        )
    if (
        isinstance(result, Dispute)
        and dispute.status == DisputeStatus.OPEN
        and dispute.failure_reason
    ):
        raise ApiError(
            409,
            "invalid_request_error",
            "dispute_close_failed",
            f"The dispute was not closed: {dispute.failure_reason}",
        )
    return DisputeResource.of(dispute, state)


_CANCEL_ACCEPTED: dict[str, Any] = {
    "model": PaymentResource,
    "description": "The cancel was accepted; the payment is finishing the step under way.",
}


@router.post(
    "/payments/{payment_id}/cancel",
    response_model=PaymentResource,
    responses={**error_responses(401, 403, 404, 409, 413, 422, 503), 202: _CANCEL_ACCEPTED},
    summary="Cancel a payment before it is posted to the ledger",
    description="200 once canceled; 202 when the cancel was accepted but the payment is still "
    "finishing the step under way (poll it); 409 once it is posted: refund it instead.",
)
async def cancel_payment(
    call: PaymentWrite = Depends(payment_write), wait: Wait = 10
) -> PaymentResource:
    state = await call.payment()
    if state.status == PaymentStatus.CANCELED:
        return PaymentResource.of(state)
    try:
        result = await call.ask(
            PaymentWorkflow.cancel_payment,
            CancelSignal(reason="requested_by_customer"),
            "cancel",
            wait,
        )
    except ApiError as refused:
        if refused.code == "payment_closed":
            raise _cannot_cancel(f"the payment is already {state.status}") from None
        if refused.code != Refusal.NOT_CANCELABLE:
            raise
        raise _cannot_cancel(refused.message) from None
    if isinstance(result, PaymentState) and result.status != PaymentStatus.CANCELED:
        raise _cannot_cancel(f"the payment is already {result.status}")
    # Accepted, not yet carried out (e.g. payments.raw is still being published): the
    # workflow stops before the ledger posting.
    return await call.answer(result)


def _cannot_cancel(why: str) -> ApiError:
    return ApiError(
        409, "invalid_request_error", "payment_not_cancelable", f"Cannot cancel: {why}."
    )
