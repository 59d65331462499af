"""Starting a payment: the one way a PaymentWorkflow comes to exist, shared by the REST API
(`POST /v1/payments`) and the Kafka intake (`payments.requests`).

The workflow id is the payment id derived from (client id, idempotency key) and ids are never
reused, so a retried request can only find the payment it started. A key reused with another
body is the client's bug and is refused rather than answered with someone else's payment.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities.crm import CrmNotification, crm_targets_for
from domain.events import EventKind
from domain.payment import PaymentPolicy, PaymentRequest, PaymentWorkflowInput, payment_id_for
from infra.metrics import PAYMENT_STARTS
from settings import Settings
from workflows.payment import PaymentWorkflow, initial_search_attributes

StartSource = Literal["api", "kafka"]


class IdempotencyKeyReused(Exception):
    """The key already started a payment with a different body (the API answers 409)."""

    def __init__(self, payment_id: str) -> None:
        super().__init__(
            f"idempotency key already used for {payment_id} with a different request body"
        )
        self.payment_id = payment_id


def payment_policy(settings: Settings, body: PaymentRequest) -> PaymentPolicy:
    """The rules this payment keeps for its whole life, fixed from today's settings."""
    probe = CrmNotification(
        event_id="",
        event_kind=EventKind.CONFIRMED,
        payment_id="",
        status="",
        amount=body.amount,
        currency=body.currency,
        customer_id=body.customer_id,
        merchant_id=body.merchant_id,
        salesforce_opportunity_id=body.salesforce_opportunity_id,
        hubspot_deal_id=body.hubspot_deal_id,
        occurred_at=datetime.now(UTC),
    )
    return PaymentPolicy(
        review_threshold=settings.fraud_review_threshold,
        reject_threshold=settings.fraud_reject_threshold,
        review_timeout_seconds=settings.review_timeout_seconds,
        dispute_window_seconds=settings.dispute_window_seconds,
        chargeback_fee_minor=settings.chargeback_fee_minor,
        continue_as_new_after_events=settings.continue_as_new_after_events,
        local_activities=settings.local_activities,
        crm_targets=[t.value for t in crm_targets_for(settings, probe)],
        tenant_accounts=True,
    )


async def start_payment(
    temporal: Client,
    settings: Settings,
    client_id: str,
    idempotency_key: str,
    body: PaymentRequest,
    *,
    source: StartSource = "api",
) -> tuple[WorkflowHandle[Any, Any], bool]:
    """Start the payment's workflow, or find the one this key already started.

    Returns (handle, replayed). Raises `IdempotencyKeyReused` when the key started a payment
    with another body; Temporal's own errors (unavailable, …) propagate: nothing was accepted.
    """
    payment_id = payment_id_for(client_id, idempotency_key)
    fingerprint = body.fingerprint()
    workflow_input = PaymentWorkflowInput(
        payment_id=payment_id,
        client_id=client_id,
        request=body,
        fingerprint=fingerprint,
        policy=payment_policy(settings, body),
    )
    try:
        handle: WorkflowHandle[Any, Any] = await temporal.start_workflow(
            PaymentWorkflow.run,
            workflow_input,
            id=payment_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=initial_search_attributes(workflow_input),
            memo={"fingerprint": fingerprint},
            static_summary=f"{body.amount} {body.currency} minor units from {body.customer_id}",
        )
    except WorkflowAlreadyStartedError:
        handle = temporal.get_workflow_handle(payment_id)
        described = await handle.describe()
        if await described.memo_value("fingerprint", None) != fingerprint:
            raise IdempotencyKeyReused(payment_id) from None
        PAYMENT_STARTS.labels(source, "true").inc()
        return handle, True
    PAYMENT_STARTS.labels(source, "false").inc()
    return handle, False
