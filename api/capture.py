"""Manual capture (issue 15): `POST /v1/payments/{id}/capture` and `/void` of a payment created
with `capture_method: manual`, answered by the payment's workflow through Updates whose
validators refuse what it cannot do (a payment not `requires_capture`, more than authorized)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from api.auth import ApiClient, require_scope
from api.errors import error_responses
from api.follow_ups import PaymentWrite, answer_with_payment, ask_workflow, payment_write
from api.ids import PaymentId
from api.payments import Wait, load_payment
from api.resources import PaymentResource
from domain.payment import (
    CaptureSignal,
    PaymentCaptureRequest,
    PaymentStatus,
    VoidSignal,
)
from workflows.payment import PaymentWorkflow

router = APIRouter(prefix="/v1", tags=["payments"])

_STILL_UNDER_WAY: dict[str, Any] = {
    "model": PaymentResource,
    "description": "Accepted; the acquirer has not answered yet (poll the payment).",
}


@router.post(
    "/payments/{payment_id}/capture",
    response_model=PaymentResource,
    responses={**error_responses(400, 401, 403, 404, 409, 413, 422, 503), 202: _STILL_UNDER_WAY},
    summary="Capture a requires_capture payment, all or part of its authorization",
    description="200 with the payment once captured and posted (`amount_to_capture` of the "
    "authorization, all of it by default; the rest is released); 409 when the payment is not "
    "`requires_capture` (or is being captured or voided) or the amount is over what was "
    "authorized (`amount_too_large`).",
)
async def capture_payment(
    payment_id: PaymentId,
    request: Request,
    response: Response,
    body: PaymentCaptureRequest | None = None,
    wait: Wait = 10,
    client: ApiClient = Depends(require_scope("payments:write")),
) -> PaymentResource:
    await load_payment(request, payment_id, client)  # 404 for another client's payment
    result = await ask_workflow(
        request,
        payment_id,
        PaymentWorkflow.capture_authorization,
        CaptureSignal(amount_to_capture=body.amount_to_capture if body else None),
        f"capture-{payment_id}",
        wait,
        refusal_param="amount_to_capture",
    )
    return await answer_with_payment(request, payment_id, response, result)


@router.post(
    "/payments/{payment_id}/void",
    response_model=PaymentResource,
    responses={**error_responses(401, 403, 404, 409, 413, 422, 503), 202: _STILL_UNDER_WAY},
    summary="Void a requires_capture payment: its whole authorization is released",
    description="200 with the payment `canceled` once the acquirer released the hold; 409 when "
    "it is not `requires_capture` (a captured payment is refunded instead).",
)
async def void_payment(
    call: PaymentWrite = Depends(payment_write), wait: Wait = 10
) -> PaymentResource:
    state = await call.payment()
    if state.status == PaymentStatus.CANCELED:
        return PaymentResource.of(state)
    result = await call.ask(
        PaymentWorkflow.void_authorization, VoidSignal(reason="voided by request"), "void", wait
    )
    return await call.answer(result)
