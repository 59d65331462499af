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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from temporalio.client import Client, WorkflowHandle
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from activities.crm import crm_targets_for
from domain.events import EventKind
from domain.messages import CrmNotification
from domain.payment import (
    SAGA_REVISION,
    SECONDS_PER_DAY,
    PaymentPolicy,
    PaymentRequest,
    PaymentWorkflowInput,
    payment_id_for,
)
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
    """The key already started a payment (or a subscription) with a different body (the API
    answers 409)."""

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
        revision=SAGA_REVISION,
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
    workflow_input = PaymentWorkflowInput(
        payment_id=payment_id,
        client_id=client_id,
        request=body,
        fingerprint=fingerprint,
        policy=payment_policy(settings, body),
    )

    async def start() -> WorkflowHandle[Any, Any]:
        return await temporal.start_workflow(
            PaymentWorkflow.run,
            workflow_input,
            id=payment_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=initial_search_attributes(workflow_input),
            memo={"fingerprint": fingerprint},
            static_summary=f"{body.amount} {body.currency} minor units from {body.customer_id}",
        )

    replayed, handle = await _start_once(
        temporal, register, client_id, payment_id, fingerprint, source, start
    )
    PAYMENT_STARTS.labels(source, "true" if replayed else "false").inc()
    return PaymentStart(payment_id, replayed, handle)


async def _start_once(
    temporal: Client,
    register: IdempotencyRegister,
    client_id: str,
    workflow_id: str,
    fingerprint: str,
    source: StartSource,
    start: Callable[[], Awaitable[WorkflowHandle[Any, Any]]],
) -> tuple[bool, WorkflowHandle[Any, Any] | None]:
    """The one idempotent start, for payments and subscriptions alike: claim the key's id in the
    register, start the workflow unless the key started it once, mark it started. Returns
    (replayed, handle); the handle is None when Temporal no longer holds a replayed workflow.

    Raises `IdempotencyKeyReused` when the key started its workflow with another body. Errors of
    the database or of Temporal propagate: then nothing was started, and a retry is safe."""
    claim = await register.claim(workflow_id, client_id, fingerprint, source)
    if claim.fingerprint != fingerprint:
        raise IdempotencyKeyReused(workflow_id)
    if claim.started:
        # Started once: found in Temporal, or forgotten by it. Never started again.
        return True, await _still_held(temporal, workflow_id)
    # New, or claimed by a request that died before Temporal accepted its start.
    try:
        handle = await start()
    except WorkflowAlreadyStartedError:
        # A concurrent request with the same key won, or the workflow predates the register.
        handle = temporal.get_workflow_handle(workflow_id)
        described = await handle.describe()
        started_with = await described.memo_value("fingerprint", None)
        if isinstance(started_with, str) and started_with != fingerprint:
            await register.adopt(workflow_id, started_with)
            raise IdempotencyKeyReused(workflow_id) from None
        await _mark_started(register, workflow_id)
        return True, handle
    await _mark_started(register, workflow_id)
    return False, handle


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
    # None when Temporal no longer holds the subscription the key started (deleted by an
    # operator, past retention): it is never started a second time.
    handle: WorkflowHandle[Any, Any] | None


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
            retry_after_seconds=[d * SECONDS_PER_DAY for d in settings.subscription_retry_days],
            when_exhausted=settings.subscription_when_exhausted,
        ),
        payment=payment_policy(settings, probe),
    )


async def start_subscription(
    temporal: Client,
    register: IdempotencyRegister,
    settings: Settings,
    client_id: str,
    idempotency_key: str,
    body: SubscriptionRequest,
) -> SubscriptionStart:
    """Start the subscription's workflow, or find the one this key started: the same register
    and the same start as a payment's (`_start_once`). The id is derived from (client, key) in
    the subscriptions' own hash domain (`sub_…`), so one key may name one payment and one
    subscription, each answered only by its own endpoint; the register keeps the key after
    Temporal forgets the subscription, and a retry then never starts a second one."""
    subscription_id = subscription_id_for(client_id, idempotency_key)
    fingerprint = body.fingerprint()
    workflow_input = SubscriptionWorkflowInput(
        subscription_id=subscription_id,
        client_id=client_id,
        request=body,
        fingerprint=fingerprint,
        policy=subscription_policy(settings, body),
    )

    async def start() -> WorkflowHandle[Any, Any]:
        return await temporal.start_workflow(
            SubscriptionWorkflow.run,
            workflow_input,
            id=subscription_id,
            task_queue=settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=initial_subscription_search_attributes(workflow_input),
            memo={"fingerprint": fingerprint},
            static_summary=f"{body.unit_amount}×{body.quantity} {body.currency} minor units "
            f"every {body.interval_count} {body.interval} from {body.customer_id}",
        )

    replayed, handle = await _start_once(
        temporal, register, client_id, subscription_id, fingerprint, "api", start
    )
    return SubscriptionStart(subscription_id, replayed, handle)
