"""Starting a payment: the one way a PaymentWorkflow comes to exist, shared by the REST API
(`POST /v1/payments`) and the Kafka intake (`payments.requests`).

The workflow id is the payment id derived from (client id, idempotency key), and the
idempotency register (infra/idempotency.py) remembers every key with the fingerprint of its
body before anything starts. So a retried request can only find the payment it started, at any
later time: while Temporal still holds the workflow, and after it has forgotten it (retention,
`workflow delete`, a `reset`, the intake reading old messages again), when the payments register
answers instead and nothing is started a second time. A key reused with another body is the
client's bug and is refused rather than answered with someone else's payment.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from temporalio.client import Client, WorkflowHandle
from temporalio.common import TypedSearchAttributes, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.crm import crm_targets_for
from domain.events import EventKind
from domain.messages import CrmNotification
from domain.payment import PaymentPolicy, PaymentRequest, PaymentWorkflowInput, payment_id_for
from domain.subscription import (
    DunningPolicy,
    SubscriptionPolicy,
    SubscriptionRequest,
    SubscriptionWorkflowInput,
    subscription_id_for,
)
from infra.idempotency import IdempotencyRegister
from infra.metrics import PAYMENT_STARTS
from settings import Settings
from workflows.payment import PaymentWorkflow, initial_search_attributes
from workflows.subscription import SubscriptionWorkflow, initial_subscription_search_attributes

StartSource = Literal["api", "kafka"]
log = logging.getLogger(__name__)


class IdempotencyKeyReused(Exception):
    """The key already started a payment with a different body (the API answers 409)."""

    def __init__(self, payment_id: str) -> None:
        super().__init__(
            f"idempotency key already used for {payment_id} with a different request body"
        )
        self.payment_id = payment_id


@dataclass(frozen=True)
class PaymentStart:
    payment_id: str
    # The key had already started this payment: nothing new was started.
    replayed: bool
    # The payment's workflow, or None when Temporal no longer holds it: then only the payments
    # register knows the payment (its recorded summary, or its ledger row).
    handle: WorkflowHandle[Any, Any] | None


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
        acquirer=bool(settings.acquirer_url),
        acquirer_resolve_seconds=settings.acquirer_resolve_seconds,
        authorization_expiry_seconds=settings.authorization_expiry_seconds,
    )


async def start_payment(
    temporal: Client,
    register: IdempotencyRegister,
    settings: Settings,
    client_id: str,
    idempotency_key: str,
    body: PaymentRequest,
    *,
    source: StartSource = "api",
) -> PaymentStart:
    """Start the payment's workflow, or find the payment this key already started.

    Raises `IdempotencyKeyReused` when the key started a payment with another body. Errors of
    the database or of Temporal propagate: then nothing was started, and a retry is safe.
    """
    payment_id = payment_id_for(client_id, idempotency_key)
    fingerprint = body.fingerprint()
    claim = await register.claim(payment_id, client_id, fingerprint, source)
    if claim.fingerprint != fingerprint:
        raise IdempotencyKeyReused(payment_id)
    if claim.started:
        # Started once: found in Temporal, or answered from the payments register. Never again.
        PAYMENT_STARTS.labels(source, "true").inc()
        return PaymentStart(payment_id, True, await _still_held(temporal, payment_id))

    # New, or claimed by a request that died before Temporal accepted its start.
    workflow_input = PaymentWorkflowInput(
        payment_id=payment_id,
        client_id=client_id,
        request=body,
        fingerprint=fingerprint,
        policy=payment_policy(settings, body),
    )
    handle, started_before, started_with = await _start_once(
        temporal,
        settings,
        PaymentWorkflow.run,
        workflow_input,
        payment_id,
        initial_search_attributes(workflow_input),
        fingerprint,
        f"{body.amount} {body.currency} minor units from {body.customer_id}",
    )
    if started_before:
        # A concurrent request with the same key won, or the payment predates the register.
        if isinstance(started_with, str) and started_with != fingerprint:
            await register.adopt(payment_id, started_with)
            raise IdempotencyKeyReused(payment_id)
        await _mark_started(register, payment_id)
        PAYMENT_STARTS.labels(source, "true").inc()
        return PaymentStart(payment_id, True, handle)
    await _mark_started(register, payment_id)
    PAYMENT_STARTS.labels(source, "false").inc()
    return PaymentStart(payment_id, False, handle)


async def _mark_started(register: IdempotencyRegister, payment_id: str) -> None:
    """The payment is started whatever happens here (the answer says so). A mark the database
    did not take is tried again in the background until it does; meanwhile the next request
    with the key finds the workflow through Temporal's duplicate check and marks it."""
    try:
        await register.mark_started(payment_id)
    except Exception as exc:
        log.warning(
            "payment %s started but not yet marked in the idempotency register (%s): marking "
            "it once the database answers",
            payment_id,
            type(exc).__name__,
        )
        register.mark_later(payment_id)


async def _still_held(temporal: Client, payment_id: str) -> WorkflowHandle[Any, Any] | None:
    handle: WorkflowHandle[Any, Any] = temporal.get_workflow_handle(payment_id)
    try:
        await handle.describe()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return None
    return handle


# ── subscriptions (issue 17) ───────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class SubscriptionStart:
    subscription_id: str
    replayed: bool
    handle: WorkflowHandle[Any, Any]


def subscription_policy(settings: Settings, body: SubscriptionRequest) -> SubscriptionPolicy:
    """Fixed at creation: the subscription's dunning and the rules of every renewal payment."""
    probe = PaymentRequest(
        amount=1,
        currency=body.currency,
        customer_id=body.customer_id,
        merchant_id=body.merchant_id,
        payment_method=body.payment_method,
    )
    return SubscriptionPolicy(
        dunning=DunningPolicy(
            retry_after_seconds=[d * 86400.0 for d in settings.subscription_retry_days],
            when_exhausted=settings.subscription_when_exhausted,
        ),
        payment=payment_policy(settings, probe),
    )


async def start_subscription(
    temporal: Client,
    settings: Settings,
    client_id: str,
    idempotency_key: str,
    body: SubscriptionRequest,
) -> SubscriptionStart:
    """Start the subscription's workflow, or find the one this key started. The workflow id is
    derived from (client, key) and Temporal refuses a second start of it (REJECT_DUPLICATE);
    the body's fingerprint, kept in the memo, tells a retry from a reused key."""
    subscription_id = subscription_id_for(client_id, idempotency_key)
    fingerprint = body.fingerprint()
    workflow_input = SubscriptionWorkflowInput(
        subscription_id=subscription_id,
        client_id=client_id,
        request=body,
        fingerprint=fingerprint,
        policy=subscription_policy(settings, body),
    )
    handle, started_before, started_with = await _start_once(
        temporal,
        settings,
        SubscriptionWorkflow.run,
        workflow_input,
        subscription_id,
        initial_subscription_search_attributes(workflow_input),
        fingerprint,
        f"{body.unit_amount}×{body.quantity} {body.currency} minor units "
        f"every {body.interval_count} {body.interval} from {body.customer_id}",
    )
    if started_before and started_with != fingerprint:
        raise IdempotencyKeyReused(subscription_id)
    return SubscriptionStart(subscription_id, started_before, handle)


async def _start_once(
    temporal: Client,
    settings: Settings,
    run: Any,
    workflow_input: Any,
    workflow_id: str,
    search_attributes: TypedSearchAttributes,
    fingerprint: str,
    summary: str,
) -> tuple[WorkflowHandle[Any, Any], bool, Any]:
    """Start the workflow under an id derived from (client, key), which Temporal refuses to
    start twice (REJECT_DUPLICATE). Its handle, whether it was started before, and the body
    fingerprint it was started with (kept in its memo; None if it has none)."""
    try:
        handle: WorkflowHandle[Any, Any] = await temporal.start_workflow(
            run,
            workflow_input,
            id=workflow_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=search_attributes,
            memo={"fingerprint": fingerprint},
            static_summary=summary,
        )
    except WorkflowAlreadyStartedError:
        handle = temporal.get_workflow_handle(workflow_id)
        described = await handle.describe()
        return handle, True, await described.memo_value("fingerprint", None)
    return handle, False, fingerprint
