"""Record one workflow history per path into tests/histories/, for
tests/workflows/test_replay.py: every path of PaymentWorkflow, of WebhookDeliveryWorkflow
(`webhook_*`), of DailyReconciliation and of SubscriptionWorkflow (`subscription_*`).

    .venv/bin/python -m scripts.record_histories --version v2     # every path: <path>.v2.json
    .venv/bin/python -m scripts.record_histories --version v2 success review_approve
    .venv/bin/python -m scripts.record_histories --overwrite      # re-record <path>.json

Starts a private stack (Temporal, broker, PostgreSQL on free ports), a worker and a fake CRM
webhook, drives each path with the Temporal client and signals, waits for the path's end state
and writes `<path>.json` (`WorkflowHistory.to_json()`). Payloads stay unencrypted (no
encryption keys here) so the replayer reads them without a key; every id is synthetic.
Re-record only after a deliberate, `workflow.patched()` change: docs/upgrades.md.

Over 400 lines: one short scenario function per recorded history, all on the same harness; a
scenario is found by its history's name here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr
from sqlalchemy import text
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError

from activities.event_store import EventStore
from activities.kafka import EventPublisher
from activities.webhook_endpoints import WebhookEndpoints
from domain.events import EventKind, PaymentEvent, event_id
from domain.fraud import amount_for_limit_share
from domain.payment import (
    AttentionResolution,
    CancelSignal,
    CaptureSignal,
    CrmSync,
    DisputeClosedSignal,
    DisputeOpenedSignal,
    FollowUpStatus,
    PaymentRequest,
    PaymentState,
    PaymentStatus,
    PaymentWorkflowInput,
    Refund,
    RefundSignal,
    ResolutionRecord,
    ReviewDecision,
    VoidSignal,
    payment_id_for,
)
from domain.subscription import (
    CancelChange,
    DunningPolicy,
    Interval,
    PauseChange,
    PriceChange,
    ResumeChange,
    SubscriptionRequest,
    SubscriptionState,
    SubscriptionStatus,
    SubscriptionWorkflowInput,
)
from domain.webhooks import DeliveryResult
from infra.codec import secret_sealer
from infra.database import make_engine
from infra.embedded.stack import Stack
from infra.temporal_client import connect_client
from ledger.store import Ledger
from service.start import payment_policy, subscription_policy
from service.webhook_dispatch import start_delivery
from settings import Settings
from tests.helpers.fake_crm import FakeCrmServer
from tests.helpers.kafka import GatedKafka
from tests.helpers.private_stack import private_stack_settings
from worker import event_worker, payment_worker
from workflows.payment import PaymentWorkflow, initial_search_attributes
from workflows.reconciliation import DailyReconciliationRequest, DailyReconciliationWorkflow
from workflows.subscription import SubscriptionWorkflow, initial_subscription_search_attributes

HISTORIES = Path(__file__).parent.parent / "tests" / "histories"
CLIENT_ID = "replay-recorder"
REVIEW_AMOUNT = amount_for_limit_share("USD", 50)  # a first payment this large: review band
REJECT_AMOUNT = amount_for_limit_share("USD", 80)  # a first payment this large: rejected
CONTINUE_AFTER_EVENTS = 40  # a captured payment (~22 events) + one refund (~26) passes it
IDLE_PREFIX = "refunds or disputes until"  # waiting_for of a succeeded payment with nothing to do

log = logging.getLogger("paysaga.record_histories")


@dataclass
class Recorder:
    client: Client
    settings: Settings
    gated_queue: str
    gate: GatedKafka
    ledger: Ledger
    events: EventStore
    endpoints: WebhookEndpoints
    merchant: FakeCrmServer  # the merchants' webhook receivers, one path each
    webhook_settings: Settings

    async def start(
        self,
        path: str,
        amount: int = 2500,
        *,
        queue: str | None = None,
        payment_id: str | None = None,
        payment_method: str = "pm_card_visa_0001",
        capture_method: Literal["automatic", "manual"] = "automatic",
        **policy: Any,
    ) -> WorkflowHandle[Any, Any]:
        """A payment of a first-time customer and a merchant of the path's own, started the way
        service.start does it (policy from the settings, overridden by `policy`)."""
        request = PaymentRequest(
            amount=amount,
            currency="USD",
            customer_id=f"cus_replay_{path}",
            merchant_id=f"mer_replay_{path}",
            payment_method=payment_method,
            capture_method=capture_method,
            description=f"replay history: {path}",
        )
        payment_id = payment_id or new_payment_id(path)
        workflow_input = PaymentWorkflowInput(
            payment_id=payment_id,
            client_id=CLIENT_ID,
            request=request,
            fingerprint=request.fingerprint(),
            # Through the sandbox acquirer only where a path asks for it (`acquirer=True`).
            policy=payment_policy(self.settings, request).model_copy(
                update={"acquirer": False, **policy}
            ),
        )
        return await self.client.start_workflow(
            PaymentWorkflow.run,
            workflow_input,
            id=payment_id,
            task_queue=queue or self.settings.task_queue,
            search_attributes=initial_search_attributes(workflow_input),
        )


def new_payment_id(path: str) -> str:
    return payment_id_for(CLIENT_ID, f"{path}-{uuid.uuid4().hex}")


# ── waiting for a path's end state ───────────────────────────────────────────────────────────


async def state_of(handle: WorkflowHandle[Any, Any]) -> PaymentState:
    state: PaymentState = await handle.query("state", result_type=PaymentState)
    return state


async def wait_until(
    handle: WorkflowHandle[Any, Any],
    predicate: Callable[[PaymentState], bool],
    timeout: float = 30,
) -> PaymentState:
    """Poll the state until `predicate` holds and the workflow sits idle (its last event a
    completed workflow task, no activity pending): the history then ends at a clean point."""
    deadline = time.monotonic() + timeout
    state: PaymentState | None = None
    while time.monotonic() < deadline:
        state = await state_of(handle)
        if predicate(state) and await _idle(handle):
            return state
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{handle.id} never got there; last state: {state}")


async def _idle(handle: WorkflowHandle[Any, Any]) -> bool:
    described = await handle.describe()
    if described.raw_description.pending_activities:
        return False
    history = await handle.fetch_history()
    # Commands' events (a timer started, …) follow the completed task: look at tasks only.
    last_task = next(e for e in reversed(history.events) if e.event_type in _WORKFLOW_TASK)
    return last_task.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED


_WORKFLOW_TASK = frozenset(
    {
        EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT,
    }
)


async def ended(handle: WorkflowHandle[Any, Any], status: PaymentStatus) -> None:
    state = PaymentState.model_validate(await asyncio.wait_for(handle.result(), 60))
    assert state.status == status, (handle.id, state.status, status)


async def operator_canceled(handle: WorkflowHandle[Any, Any]) -> None:
    await handle.cancel()
    await operator_canceled_already(handle)


def succeeded_and_synced(state: PaymentState) -> bool:
    return (
        state.status == PaymentStatus.SUCCEEDED
        and state.crm_sync == CrmSync.SYNCED
        and state.waiting_for.startswith(IDLE_PREFIX)
    )


def follow_ups_settled(status: PaymentStatus) -> Callable[[PaymentState], bool]:
    def settled(state: PaymentState) -> bool:
        pending = any(r.status == FollowUpStatus.PENDING for r in state.refunds) or any(
            d.status == "pending" for d in state.disputes
        )
        return state.status == status and not pending and state.waiting_for.startswith(IDLE_PREFIX)

    return settled


# ── the paths ────────────────────────────────────────────────────────────────────────────────


async def success(r: Recorder) -> WorkflowHandle[Any, Any]:
    handle = await r.start("success")
    await wait_until(handle, succeeded_and_synced)
    return handle


async def success_regular_activities(r: Recorder) -> WorkflowHandle[Any, Any]:
    """The same happy path with the policy's local activities off: every step is scheduled on
    the server, so this history holds ActivityTaskScheduled where `success` holds markers."""
    handle = await r.start("success_regular_activities", local_activities=False)
    await wait_until(handle, succeeded_and_synced)
    return handle


async def fraud_reject(r: Recorder) -> WorkflowHandle[Any, Any]:
    handle = await r.start("fraud_reject", REJECT_AMOUNT)
    await ended(handle, PaymentStatus.REJECTED)
    return handle


async def _in_review(r: Recorder, path: str, **policy: Any) -> WorkflowHandle[Any, Any]:
    handle = await r.start(path, REVIEW_AMOUNT, **policy)
    await wait_until(handle, lambda s: s.status == PaymentStatus.REQUIRES_REVIEW)
    return handle


async def review_approve(r: Recorder) -> WorkflowHandle[Any, Any]:
    handle = await _in_review(r, "review_approve")
    await handle.signal("approve", ReviewDecision(reviewer="analyst-1", note="known customer"))
    await wait_until(handle, succeeded_and_synced)
    return handle


async def review_decline(r: Recorder) -> WorkflowHandle[Any, Any]:
    handle = await _in_review(r, "review_decline")
    await handle.signal("decline", ReviewDecision(reviewer="analyst-1", note="no"))
    await ended(handle, PaymentStatus.DECLINED)
    return handle


async def review_timeout(r: Recorder) -> WorkflowHandle[Any, Any]:
    handle = await r.start("review_timeout", REVIEW_AMOUNT, review_timeout_seconds=2)
    await ended(handle, PaymentStatus.DECLINED)
    return handle


async def refund_partial_then_full(r: Recorder) -> WorkflowHandle[Any, Any]:
    handle = await r.start("refund", 10_000)
    await wait_until(handle, succeeded_and_synced)
    await handle.signal("refund", RefundSignal(refund_id="re_replay_1", amount=3000, reason="x"))
    await wait_until(handle, follow_ups_settled(PaymentStatus.PARTIALLY_REFUNDED))
    await handle.signal("refund", RefundSignal(refund_id="re_replay_2"))  # all that remains
    await wait_until(handle, follow_ups_settled(PaymentStatus.REFUNDED))
    return handle


async def _disputed(
    r: Recorder, path: str, outcome: Literal["won", "lost"]
) -> WorkflowHandle[Any, Any]:
    handle = await r.start(path, 8000)
    await wait_until(handle, succeeded_and_synced)
    opened = DisputeOpenedSignal(
        dispute_id="dp_replay_1", reason_code="fraudulent", network_reference="nr_replay_1"
    )
    await handle.signal("dispute_opened", opened)
    await wait_until(handle, follow_ups_settled(PaymentStatus.DISPUTED))
    closed = DisputeClosedSignal(dispute_id="dp_replay_1", outcome=outcome)
    await handle.signal("dispute_closed", closed)
    await wait_until(
        handle,
        lambda s: s.disputes[0].status == outcome and s.waiting_for.startswith(IDLE_PREFIX),
    )
    return handle


async def dispute_won(r: Recorder) -> WorkflowHandle[Any, Any]:
    return await _disputed(r, "dispute_won", "won")


async def dispute_lost(r: Recorder) -> WorkflowHandle[Any, Any]:
    return await _disputed(r, "dispute_lost", "lost")


async def cancel_before_posting(r: Recorder) -> WorkflowHandle[Any, Any]:
    """The `cancel` signal while the payment waits for a reviewer: nothing moved yet."""
    handle = await _in_review(r, "cancel_before_posting")
    await handle.signal("cancel", CancelSignal(reason="requested_by_customer"))
    await ended(handle, PaymentStatus.CANCELED)
    return handle


async def held_before_confirmation(r: Recorder, path: str, amount: int) -> WorkflowHandle[Any, Any]:
    """Started with regular activities on the gated queue, its payments.confirmed held there."""
    payment_id = new_payment_id(path)
    r.gate.hold(payment_id, EventKind.CONFIRMED)
    handle = await r.start(
        path, amount, queue=r.gated_queue, payment_id=payment_id, local_activities=False
    )
    await r.gate.wait_held(handle.id)
    return handle


async def operator_cancel_after_posting(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Cancel from the Temporal UI while payments.confirmed is in flight after the posting:
    the saga reverses the posting, voids payments.raw with payments.canceled, tells the CRM.
    Regular activities (as tests/workflows/test_compensations.py): local ones all run inside one
    workflow task, which sees the cancel request only after payments.confirmed."""
    handle = await held_before_confirmation(r, "operator_cancel_after_posting", 4200)
    await handle.cancel()
    await asyncio.sleep(0.5)  # the cancel request lands while the confirmation is held
    r.gate.release(handle.id)
    try:
        await asyncio.wait_for(handle.result(), 60)
    except Exception as stop:
        log.info("%s ended by the operator's cancel: %s", handle.id, stop)
    state = await state_of(handle)
    assert state.status == PaymentStatus.CANCELED and state.captured == 0, state
    return handle


async def operator_cancel_succeeded(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Cancel from the UI after success: the money stays, only the follow-up window closes."""
    handle = await r.start("operator_cancel_succeeded", 2200)
    await wait_until(handle, succeeded_and_synced)
    await operator_canceled(handle)
    return handle


async def operator_cancel_during_crm(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Cancel from the UI while the CRM is told of the confirmed payment (it answers 503 for a
    moment): the CRM step runs to its end, then the cancel takes effect."""
    r.merchant.fail_for(3.0, 503, path_prefix="/hooks/paysaga")
    handle = await r.start("operator_cancel_during_crm", 2300)
    deadline = time.monotonic() + 30
    while (state := await state_of(handle)).crm_sync != CrmSync.PENDING or (
        state.status != PaymentStatus.SUCCEEDED
    ):
        assert time.monotonic() < deadline, state
        await asyncio.sleep(0.05)
    await operator_canceled(handle)
    final = await state_of(handle)
    assert (final.status, final.crm_sync) == (PaymentStatus.SUCCEEDED, CrmSync.SYNCED), final
    return handle


async def ledger_refusal(r: Recorder) -> WorkflowHandle[Any, Any]:
    """The ledger refuses the capture (merchant account closed): raw voided, payment failed."""
    first = await r.start("ledger_refusal", 1000)
    await wait_until(first, succeeded_and_synced)  # opens the merchant's account
    await r.ledger.close_account(f"merchant:{CLIENT_ID}:mer_replay_ledger_refusal:USD")
    handle = await r.start("ledger_refusal", 1500)
    await ended(handle, PaymentStatus.FAILED)
    return handle


async def window_closes(r: Recorder) -> WorkflowHandle[Any, Any]:
    """The dispute window closes with nothing open: the workflow records its outcome, ends."""
    handle = await r.start("window_closes", dispute_window_seconds=4)
    await ended(handle, PaymentStatus.SUCCEEDED)
    return handle


async def _refund_until_continued(r: Recorder, path: str) -> WorkflowHandle[Any, Any]:
    """A refund grows the history past the policy's limit: the run continues as new."""
    handle = await r.start(path, 10_000, continue_as_new_after_events=CONTINUE_AFTER_EVENTS)
    await wait_until(handle, succeeded_and_synced)
    await handle.signal("refund", RefundSignal(refund_id="re_replay_1", amount=4000))
    latest = r.client.get_workflow_handle(handle.id)  # follows the run chain
    await wait_until(latest, follow_ups_settled(PaymentStatus.PARTIALLY_REFUNDED))
    assert (await latest.describe()).run_id != handle.result_run_id, "never continued as new"
    return handle


async def refund_continues_as_new(r: Recorder) -> WorkflowHandle[Any, Any]:
    """The first run: ends with ContinueAsNew, carrying its state."""
    handle = await _refund_until_continued(r, "refund_continues_as_new")
    return r.client.get_workflow_handle(handle.id, run_id=handle.result_run_id)


async def continued_as_new(r: Recorder) -> WorkflowHandle[Any, Any]:
    """The carried run (input with carried_state) serving one more refund."""
    handle = await _refund_until_continued(r, "continued_as_new")
    latest = r.client.get_workflow_handle(handle.id)
    await latest.signal("refund", RefundSignal(refund_id="re_replay_2"))
    await wait_until(latest, follow_ups_settled(PaymentStatus.REFUNDED))
    return latest


# ── follow-ups as Updates, their rules for signals, requires_attention ───────────────────────


async def refund_by_update(r: Recorder) -> WorkflowHandle[Any, Any]:
    """A refund through the Update (its result is the refund once posted), one refused by its
    validator (never in the history), and an operator's signal refused by the same rules
    (recorded failed)."""
    handle = await r.start("refund_by_update", 6000)
    await wait_until(handle, succeeded_and_synced)
    made = await handle.execute_update(
        "refund", RefundSignal(refund_id="re_replay_1", amount=2500), id="re_replay_1",
        result_type=Refund,
    )  # fmt: skip
    assert made.status == FollowUpStatus.SUCCEEDED, made
    try:
        await handle.execute_update(
            "refund", RefundSignal(refund_id="re_replay_2", amount=99_000), id="re_replay_2"
        )
    except WorkflowUpdateFailedError:
        pass  # amount_too_large: refused before entering the history
    else:
        raise AssertionError("a refund over the captured amount was accepted")
    await handle.signal("refund", RefundSignal(refund_id="re_replay_3", amount=99_000))
    await wait_until(handle, follow_ups_settled(PaymentStatus.PARTIALLY_REFUNDED))
    return handle


async def requires_attention_resolved(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Canceled in the UI between posting and confirmation while the merchant's account was
    closed: the reversal is refused, payments.raw voided, the CRM told, the payment waits in
    requires_attention; the account reopened, an operator's retry reverses it: canceled."""
    merchant_account = f"merchant:{CLIENT_ID}:mer_replay_requires_attention_resolved:USD"
    handle = await held_before_confirmation(r, "requires_attention_resolved", 4300)
    await r.ledger.close_account(merchant_account)
    await handle.cancel()
    await asyncio.sleep(0.5)
    r.gate.release(handle.id)
    await wait_until(handle, lambda s: s.status == PaymentStatus.REQUIRES_ATTENTION)
    await reopen_and_retry(r, handle, merchant_account)
    try:
        await asyncio.wait_for(handle.result(), 60)
    except Exception as stop:  # WorkflowFailureError(CancelledError): the expected end
        log.info("%s ended by the operator's cancel: %s", handle.id, stop)
    state = await state_of(handle)
    assert state.status == PaymentStatus.CANCELED and state.captured == 0, state
    return handle


async def reopen_and_retry(r: Recorder, handle: WorkflowHandle[Any, Any], account: str) -> None:
    """The operator's fix for a payment in requires_attention: the merchant's account reopened,
    then a `retry` resolution."""
    async with r.ledger.engine.begin() as conn:
        await conn.execute(
            text("UPDATE accounts SET status = 'open' WHERE code = :c"), {"c": account}
        )
    resolved = await handle.execute_update(
        "resolve_attention",
        AttentionResolution(action="retry", operator="replay", reason="account reopened"),
        id="resolve-1",
        result_type=ResolutionRecord,
    )
    assert resolved.resolved, resolved


async def _disputed_by_update(r: Recorder, path: str, **policy: Any) -> WorkflowHandle[Any, Any]:
    handle = await r.start(path, 7000, **policy)
    await wait_until(handle, succeeded_and_synced)
    opened = DisputeOpenedSignal(
        dispute_id="dp_replay_1", amount=3000, reason_code="fraudulent",
        network_reference="nr_replay_1",
    )  # fmt: skip
    await handle.execute_update("dispute_opened", opened, id="dp_replay_1")
    return handle


async def window_closes_with_open_dispute(r: Recorder) -> WorkflowHandle[Any, Any]:
    """The window closes while a dispute is open: the payment takes only that dispute's close
    (a refund signalled now is recorded failed), then completes."""
    handle = await _disputed_by_update(
        r, "window_closes_with_open_dispute", dispute_window_seconds=4
    )
    await wait_until(
        handle,
        lambda s: s.waiting_for.startswith("the open disputes to close"),
        timeout=30,
    )
    await handle.signal("refund", RefundSignal(refund_id="re_replay_late", amount=100))
    closed = DisputeClosedSignal(dispute_id="dp_replay_1", outcome="won")
    await handle.execute_update("dispute_closed", closed, id="dp_replay_1-won")
    await ended(handle, PaymentStatus.SUCCEEDED)
    return handle


async def operator_cancel_with_open_dispute(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Canceled in the UI with a dispute open: the payment waits for the dispute to close."""
    handle = await _disputed_by_update(r, "operator_cancel_with_open_dispute")
    await handle.cancel()
    await wait_until(handle, lambda s: s.waiting_for.startswith("the open disputes to close"))
    closed = DisputeClosedSignal(dispute_id="dp_replay_1", outcome="lost")
    await handle.execute_update("dispute_closed", closed, id="dp_replay_1-lost")
    await operator_canceled_already(handle)
    return handle


async def operator_canceled_already(handle: WorkflowHandle[Any, Any]) -> None:
    try:
        await asyncio.wait_for(handle.result(), 60)
    except Exception as stop:  # WorkflowFailureError(CancelledError): the expected end
        log.info("%s ended by the operator's cancel: %s", handle.id, stop)
    else:
        raise AssertionError(f"{handle.id} completed although canceled")


async def refund_drained_before_continue_as_new(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Two refunds queued together in a run whose history grows past the limit: the second
    is carried out before the run continues as new (an Update's caller waits for it)."""
    handle = await r.start(
        "refund_drained_before_continue_as_new",
        10_000,
        continue_as_new_after_events=CONTINUE_AFTER_EVENTS,
    )
    await wait_until(handle, succeeded_and_synced)
    await asyncio.gather(
        handle.signal("refund", RefundSignal(refund_id="re_replay_1", amount=1000)),
        handle.signal("refund", RefundSignal(refund_id="re_replay_2", amount=2000)),
    )
    latest = r.client.get_workflow_handle(handle.id)
    await wait_until(latest, follow_ups_settled(PaymentStatus.PARTIALLY_REFUNDED))
    assert (await latest.describe()).run_id != handle.result_run_id, "never continued as new"
    return r.client.get_workflow_handle(handle.id, run_id=handle.result_run_id)


# ── webhook deliveries ───────────────────────────────────────────────────────────────────────


async def _delivery(r: Recorder, path: str, *, manual: bool = False) -> WorkflowHandle[Any, Any]:
    """One event to a fresh endpoint at the receiver's `/<path>`, under the recorder's
    webhook schedule (0.2 s doubling, giving up after 3 s)."""
    endpoint = await r.endpoints.create(
        CLIENT_ID, r.merchant.url(f"/{path}"), ["*"], f"replay history: {path}", True
    )
    payment_id = new_payment_id(path)
    event = PaymentEvent(
        id=event_id(payment_id, EventKind.CONFIRMED),
        kind=EventKind.CONFIRMED,
        payment_id=payment_id,
        time=datetime.now(UTC),
        data={"payment_id": payment_id, "status": "processing", "amount": 2500, "sequence": 2},
        client_id=CLIENT_ID,
    )
    await r.events.record(event.record())
    workflow_id = await start_delivery(
        r.client, r.webhook_settings, endpoint, event.id, manual=manual
    )
    return r.client.get_workflow_handle(workflow_id)


async def _delivery_ends(handle: WorkflowHandle[Any, Any], status: str) -> DeliveryResult:
    result = DeliveryResult.model_validate(await asyncio.wait_for(handle.result(), 60))
    assert result.status == status, (handle.id, result)
    return result


async def webhook_delivered_after_retries(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Two failed attempts (backoff timers between them), then accepted."""
    r.merchant.respond_with(503, times=2, path_prefix="/webhook_delivered_after_retries")
    handle = await _delivery(r, "webhook_delivered_after_retries")
    assert (await _delivery_ends(handle, "delivered")).attempts == 3
    return handle


async def webhook_gave_up_disabled(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Every attempt fails for the whole window: the delivery gives up, the endpoint is
    disabled (with its event)."""
    r.merchant.respond_with(500, path_prefix="/webhook_gave_up_disabled")
    handle = await _delivery(r, "webhook_gave_up_disabled")
    assert (await _delivery_ends(handle, "failed")).endpoint_disabled
    return handle


async def webhook_manual_redelivery(r: Recorder) -> WorkflowHandle[Any, Any]:
    """A redelivery asked for through the API: one attempt, failed, and nothing disabled."""
    r.merchant.respond_with(502, path_prefix="/webhook_manual_redelivery")
    handle = await _delivery(r, "webhook_manual_redelivery", manual=True)
    result = await _delivery_ends(handle, "failed")
    assert result.attempts == 1 and not result.endpoint_disabled
    return handle


# ── through the sandbox acquirer (issue 15) ──────────────────────────────────────────────────


async def acquirer_capture(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Authorized, then captured at once (`automatic`); a partial approval's half."""
    handle = await r.start(
        "acquirer_capture", 5001, payment_method="pm_card_partial_approval", acquirer=True
    )
    state = await wait_until(handle, succeeded_and_synced)
    assert (state.authorized_amount, state.captured) == (2500, 2500), state
    return handle


async def acquirer_decline(r: Recorder) -> WorkflowHandle[Any, Any]:
    handle = await r.start(
        "acquirer_decline", payment_method="pm_card_decline_do_not_honor", acquirer=True
    )
    await ended(handle, PaymentStatus.DECLINED)
    return handle


async def acquirer_timeout_resolved(r: Recorder) -> WorkflowHandle[Any, Any]:
    """pm_card_timeout: authorize and capture each time out, resolved by status."""
    handle = await r.start(
        "acquirer_timeout_resolved", payment_method="pm_card_timeout", acquirer=True
    )
    await wait_until(handle, succeeded_and_synced, timeout=60)
    return handle


async def acquirer_refund(r: Recorder) -> WorkflowHandle[Any, Any]:
    handle = await r.start("acquirer_refund", 6000, payment_method="pm_card_visa", acquirer=True)
    await wait_until(handle, succeeded_and_synced)
    refunded = await handle.execute_update(
        "refund", RefundSignal(refund_id="re_replay_acquirer", amount=2000), result_type=Refund
    )
    assert refunded.status == FollowUpStatus.SUCCEEDED, refunded
    await wait_until(handle, follow_ups_settled(PaymentStatus.PARTIALLY_REFUNDED))
    return handle


async def acquirer_refund_needs_attention(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Refunded at the acquirer, refused by the ledger (the merchant's account closed): the
    payment waits in requires_attention, the refund pending; the account reopened, an
    operator's retry posts it (patch refund-that-may-have-moved-needs-attention)."""
    path = "acquirer_refund_needs_attention"
    handle = await r.start(path, 6000, payment_method="pm_card_visa", acquirer=True)
    await wait_until(handle, succeeded_and_synced)
    merchant_account = f"merchant:{CLIENT_ID}:mer_replay_{path}:USD"
    await r.ledger.close_account(merchant_account)
    await handle.signal("refund", RefundSignal(refund_id="re_replay_attention", amount=2000))
    await wait_until(handle, lambda s: s.status == PaymentStatus.REQUIRES_ATTENTION)
    await reopen_and_retry(r, handle, merchant_account)
    state = await wait_until(handle, follow_ups_settled(PaymentStatus.PARTIALLY_REFUNDED))
    assert [r.status for r in state.refunds] == [FollowUpStatus.SUCCEEDED], state
    return handle


async def acquirer_canceled_void(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Canceled while the acquirer takes its time to authorize: the hold is voided."""
    handle = await r.start(
        "acquirer_canceled_void", payment_method="pm_card_approve_after_delay", acquirer=True
    )
    deadline = time.monotonic() + 30
    while "to authorize" not in (await state_of(handle)).waiting_for:
        assert time.monotonic() < deadline, "never reached the authorization"
        await asyncio.sleep(0.05)
    await handle.signal("cancel", CancelSignal(reason="customer changed their mind"))
    await ended(handle, PaymentStatus.CANCELED)
    return handle


async def acquirer_operator_cancel_during_authorization(
    r: Recorder,
) -> WorkflowHandle[Any, Any]:
    """Canceled in the UI while the acquirer takes its time to authorize: the authorization
    runs to its end and is voided; the hold's release asks the ledger what it holds (patch
    patches-decided-at-start: a hold posted in a lost workflow task is released too)."""
    handle = await r.start(
        "acquirer_operator_cancel_during_authorization",
        payment_method="pm_card_approve_after_delay",
        acquirer=True,
    )
    deadline = time.monotonic() + 30
    while "to authorize" not in (await state_of(handle)).waiting_for:
        assert time.monotonic() < deadline, "never reached the authorization"
        await asyncio.sleep(0.05)
    await operator_canceled(handle)
    return handle


async def _requires_capture(r: Recorder, path: str, **policy: Any) -> WorkflowHandle[Any, Any]:
    handle = await r.start(
        path, 5000, payment_method="pm_card_visa", capture_method="manual", acquirer=True, **policy
    )
    await wait_until(handle, lambda s: s.status == PaymentStatus.REQUIRES_CAPTURE)
    return handle


async def acquirer_manual_capture(r: Recorder) -> WorkflowHandle[Any, Any]:
    """requires_capture; a capture over the authorization refused by the validator; a partial
    capture (the rest released)."""
    handle = await _requires_capture(r, "acquirer_manual_capture")
    try:
        await handle.execute_update(
            "capture", CaptureSignal(amount_to_capture=5001), id="capture-too-much"
        )
    except WorkflowUpdateFailedError:
        pass
    else:
        raise AssertionError("a capture over the authorization was accepted")
    state = await handle.execute_update(
        "capture", CaptureSignal(amount_to_capture=3000), id="capture", result_type=PaymentState
    )
    assert state.captured == 3000, state
    await wait_until(handle, succeeded_and_synced)
    return handle


async def acquirer_manual_void(r: Recorder) -> WorkflowHandle[Any, Any]:
    handle = await _requires_capture(r, "acquirer_manual_void")
    await handle.execute_update("void", VoidSignal(reason="replay"), id="void")
    await ended(handle, PaymentStatus.CANCELED)
    return handle


async def acquirer_authorization_expires(r: Recorder) -> WorkflowHandle[Any, Any]:
    """Nobody captures: the durable timer voids the authorization (2 s here, 7 days by default)."""
    handle = await _requires_capture(
        r, "acquirer_authorization_expires", authorization_expiry_seconds=2.0
    )
    await ended(handle, PaymentStatus.CANCELED)
    return handle


# ── subscriptions (issue 17) ─────────────────────────────────────────────────────────────────


async def _subscribe(
    r: Recorder,
    path: str,
    *,
    trial_days: int = 0,
    payment_method: str = "pm_card_visa_0001",
    acquirer: bool = False,
    start: dict[str, Any] | None = None,
    **policy: Any,
) -> WorkflowHandle[Any, Any]:
    """A monthly subscription started the way service.start does it (`start`: more arguments of
    `start_workflow`, a signal with the start)."""
    request = SubscriptionRequest(
        customer_id=f"cus_replay_{path}",
        merchant_id=f"mer_replay_{path}",
        payment_method=payment_method,
        unit_amount=1200,
        currency="USD",
        interval=Interval.MONTH,
        trial_days=trial_days,
        description=f"replay history: {path}",
    )
    subscription_id = f"sub_{uuid.uuid4().hex[:24]}"
    base = subscription_policy(r.settings, request)
    workflow_input = SubscriptionWorkflowInput(
        subscription_id=subscription_id,
        client_id=CLIENT_ID,
        request=request,
        fingerprint=request.fingerprint(),
        policy=base.model_copy(
            update={"payment": base.payment.model_copy(update={"acquirer": acquirer}), **policy}
        ),
    )
    return await r.client.start_workflow(
        SubscriptionWorkflow.run,
        workflow_input,
        id=subscription_id,
        task_queue=r.settings.task_queue,
        search_attributes=initial_subscription_search_attributes(workflow_input),
        **(start or {}),
    )


async def _subscription_when(
    handle: WorkflowHandle[Any, Any], done: Callable[[SubscriptionState], bool], timeout: float = 30
) -> SubscriptionState:
    deadline = time.monotonic() + timeout
    while True:
        state: SubscriptionState = await handle.query("state", result_type=SubscriptionState)
        if done(state):
            return state
        assert time.monotonic() < deadline, f"never got there: {state}"
        await asyncio.sleep(0.1)


async def subscription_trial_changed_and_canceled(r: Recorder) -> WorkflowHandle[Any, Any]:
    """In its trial: a quantity change (Update), a refused resume (validator), a cancel at the
    period's end (signal), then a cancel now (Update): the workflow completes."""
    handle = await _subscribe(r, "subscription_trial_changed_and_canceled", trial_days=30)
    await _subscription_when(handle, lambda s: s.event_sequence >= 1)
    await handle.execute_update("change", PriceChange(quantity=3), result_type=SubscriptionState)
    try:
        await handle.execute_update("change", ResumeChange())
    except WorkflowUpdateFailedError:
        pass
    else:
        raise AssertionError("resuming a trialing subscription was accepted")
    await handle.signal("change_requested", CancelChange(at_period_end=True))
    await _subscription_when(handle, lambda s: s.cancel_at_period_end)
    await handle.execute_update("change", CancelChange(), result_type=SubscriptionState)
    await handle.result()
    return handle


async def subscription_declined_until_canceled(r: Recorder) -> WorkflowHandle[Any, Any]:
    """The first renewal declines at the acquirer (a child PaymentWorkflow per attempt): past
    due, two retries 1 and 2 s later decline too, the policy cancels."""
    handle = await _subscribe(
        r,
        "subscription_declined_until_canceled",
        payment_method="pm_card_decline_insufficient_funds",
        acquirer=True,
        dunning=DunningPolicy(retry_after_seconds=[1.0, 2.0], when_exhausted="canceled"),
    )
    final = SubscriptionState.model_validate(await handle.result())
    assert [a.status for a in final.periods[0].attempts] == ["declined"] * 3, final
    return handle


async def _paid_and_continued(r: Recorder, path: str) -> WorkflowHandle[Any, Any]:
    handle = await _subscribe(r, path, continue_as_new_after_periods=1)
    latest = r.client.get_workflow_handle(handle.id)
    deadline = time.monotonic() + 30
    while (await latest.describe()).run_id == handle.result_run_id:
        assert time.monotonic() < deadline, "never continued as new"
        await asyncio.sleep(0.1)
    await _subscription_when(latest, lambda s: s.next_period == 1)
    return handle


async def subscription_paid_continues_as_new(r: Recorder) -> WorkflowHandle[Any, Any]:
    """The first period paid by its renewal payment (the child signals its outcome), then the
    run continues as new carrying the state."""
    handle = await _paid_and_continued(r, "subscription_paid_continues_as_new")
    return r.client.get_workflow_handle(handle.id, run_id=handle.result_run_id)


async def subscription_continued_paused_and_canceled(r: Recorder) -> WorkflowHandle[Any, Any]:
    """The carried run: paused, resumed, canceled (Updates); it completes."""
    handle = await _paid_and_continued(r, "subscription_continued_paused_and_canceled")
    latest = r.client.get_workflow_handle(handle.id)
    await latest.execute_update("change", PauseChange(), result_type=SubscriptionState)
    await latest.execute_update("change", ResumeChange(), result_type=SubscriptionState)
    await latest.execute_update("change", CancelChange(), result_type=SubscriptionState)
    await latest.result()
    return latest


async def subscription_changed_while_its_first_renewal_is_due(
    r: Recorder,
) -> WorkflowHandle[Any, Any]:
    """Changes signalled before the first renewal of a subscription without a trial is started
    (patch `subscription-due-renewal-is-under-way`, decided in the first task): a cancel at the
    period's end sent with the start, then a pause, refused and recorded; the first period is
    charged all the same, the cancel waits for the next boundary; a cancel now (Update) ends
    it."""
    handle = await _subscribe(
        r,
        "subscription_changed_while_its_first_renewal_is_due",
        start={
            "start_signal": "change_requested",
            "start_signal_args": [CancelChange(at_period_end=True)],
        },
    )
    await handle.signal("change_requested", PauseChange())
    paid = await _subscription_when(
        handle, lambda s: s.current_period is not None and s.current_period.paid_by is not None
    )
    assert paid.status == SubscriptionStatus.ACTIVE and paid.cancel_at_period_end, paid
    refused = paid.last_refused_change
    assert refused is not None and refused.code == "renewal_in_progress", paid
    await handle.execute_update("change", CancelChange(), result_type=SubscriptionState)
    await handle.result()
    return handle


async def subscription_pause_signalled_during_renewal(r: Recorder) -> WorkflowHandle[Any, Any]:
    """A pause signalled (`change_requested`) while the first renewal is charged at the acquirer
    (authorized after 2 s): refused and recorded (`last_refused_change`, patch
    `subscription-signal-pause-refused-during-renewal`); the renewal paid, the same signal
    pauses; a cancel (Update) ends it."""
    handle = await _subscribe(
        r,
        "subscription_pause_signalled_during_renewal",
        payment_method="pm_card_approve_after_delay",
        acquirer=True,
    )
    await _subscription_when(
        handle,
        lambda s: (
            s.current_period is not None
            and bool(s.current_period.attempts)
            and s.current_period.attempts[-1].status == "pending"
        ),
    )
    await handle.signal("change_requested", PauseChange())
    refused = await _subscription_when(handle, lambda s: s.last_refused_change is not None)
    assert refused.status == SubscriptionStatus.ACTIVE, refused
    await _subscription_when(
        handle, lambda s: s.current_period is not None and s.current_period.paid_by is not None
    )
    await handle.signal("change_requested", PauseChange())
    await _subscription_when(handle, lambda s: s.status == SubscriptionStatus.PAUSED)
    await handle.execute_update("change", CancelChange(), result_type=SubscriptionState)
    await handle.result()
    return handle


async def reconciliation_daily(r: Recorder) -> WorkflowHandle[Any, Any]:
    """DailyReconciliation: the sandbox's file of a quiet day fetched, then imported."""
    handle = await r.client.start_workflow(
        DailyReconciliationWorkflow.run,
        DailyReconciliationRequest(day=date(2020, 1, 1)),
        id=f"reconciliation-replay-{uuid.uuid4().hex[:8]}",
        task_queue=r.settings.task_queue,
    )
    await handle.result()
    return handle


PATHS: dict[str, Callable[[Recorder], Awaitable[WorkflowHandle[Any, Any]]]] = {
    "success": success,
    "success_regular_activities": success_regular_activities,
    "fraud_reject": fraud_reject,
    "review_approve": review_approve,
    "review_decline": review_decline,
    "review_timeout": review_timeout,
    "refund_partial_then_full": refund_partial_then_full,
    "dispute_won": dispute_won,
    "dispute_lost": dispute_lost,
    "cancel_before_posting": cancel_before_posting,
    "operator_cancel_after_posting": operator_cancel_after_posting,
    "operator_cancel_succeeded": operator_cancel_succeeded,
    "operator_cancel_during_crm": operator_cancel_during_crm,
    "ledger_refusal": ledger_refusal,
    "window_closes": window_closes,
    "refund_continues_as_new": refund_continues_as_new,
    "continued_as_new": continued_as_new,
    "refund_by_update": refund_by_update,
    "requires_attention_resolved": requires_attention_resolved,
    "window_closes_with_open_dispute": window_closes_with_open_dispute,
    "operator_cancel_with_open_dispute": operator_cancel_with_open_dispute,
    "refund_drained_before_continue_as_new": refund_drained_before_continue_as_new,
    "webhook_delivered_after_retries": webhook_delivered_after_retries,
    "webhook_gave_up_disabled": webhook_gave_up_disabled,
    "webhook_manual_redelivery": webhook_manual_redelivery,
    "acquirer_capture": acquirer_capture,
    "acquirer_decline": acquirer_decline,
    "acquirer_timeout_resolved": acquirer_timeout_resolved,
    "acquirer_refund": acquirer_refund,
    "acquirer_refund_needs_attention": acquirer_refund_needs_attention,
    "acquirer_canceled_void": acquirer_canceled_void,
    "acquirer_operator_cancel_during_authorization": acquirer_operator_cancel_during_authorization,
    "acquirer_manual_capture": acquirer_manual_capture,
    "acquirer_manual_void": acquirer_manual_void,
    "acquirer_authorization_expires": acquirer_authorization_expires,
    "reconciliation_daily": reconciliation_daily,
    "subscription_trial_changed_and_canceled": subscription_trial_changed_and_canceled,
    "subscription_declined_until_canceled": subscription_declined_until_canceled,
    "subscription_paid_continues_as_new": subscription_paid_continues_as_new,
    "subscription_continued_paused_and_canceled": subscription_continued_paused_and_canceled,
    "subscription_pause_signalled_during_renewal": subscription_pause_signalled_during_renewal,
    "subscription_changed_while_its_first_renewal_is_due": (
        subscription_changed_while_its_first_renewal_is_due
    ),
}


# ── the private stack and workers ────────────────────────────────────────────────────────────


# Webhook deliveries on a schedule of seconds; no relay or dispatcher (deliveries are started
# by the paths themselves).
WEBHOOK_SCHEDULE: dict[str, Any] = {
    "webhook_task_queue": "replay-recorder-webhooks",
    "webhook_retry_initial_seconds": 0.2,
    "webhook_retry_backoff": 2.0,
    "webhook_retry_max_interval_seconds": 1.0,
    "webhook_retry_for_seconds": 3.0,
    "webhook_timeout_seconds": 2.0,
    "relay_enabled": False,
}


def recording_settings(home: Path) -> Settings:
    # No encryption keys: the stored histories must be readable without one.
    return private_stack_settings(
        home, encryption_keys=[], workflow_sandbox=True, otlp_endpoint=None
    )


@asynccontextmanager
async def gated_worker(settings: Settings, client: Client) -> AsyncIterator[GatedKafka]:
    """The real activities with GatedKafka, on the settings' task queue."""
    made: list[GatedKafka] = []

    def gated(publisher: EventPublisher, *recording: Any) -> GatedKafka:
        made.append(GatedKafka(publisher, *recording))
        return made[-1]

    async with payment_worker(settings, client, kafka_activities=gated):
        yield made[0]


async def record(targets: dict[str, Path]) -> None:
    """Record each path named in `targets` into its file."""
    HISTORIES.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="paysaga-replay-") as tmp, FakeCrmServer() as crm:
        home = Path(tmp)
        stack = Stack(
            recording_settings(home),
            home=home,
            temporal_ui=False,
            acquirer=True,
            acquirer_sandbox_args=["--hang-seconds", "3", "--delay-seconds", "2"],
        )
        await asyncio.to_thread(stack.start)
        try:
            settings = stack.service_settings().model_copy(
                update={
                    "task_queue": "replay-recorder",
                    "crm_webhook_url": crm.url("/hooks/paysaga"),
                    # Signs the webhooks only; never part of a history.
                    "crm_webhook_secret": SecretStr(f"whsec_{uuid.uuid4().hex}"),
                    "crm_timeout_seconds": 2.0,
                    # pm_card_timeout's answers are held 3 s: the worker gives up after 1.
                    "acquirer_timeout_seconds": 1.0,
                }
            )
            gated = settings.model_copy(update={"task_queue": "replay-recorder-gated"})
            webhooks = settings.model_copy(update=WEBHOOK_SCHEDULE)
            client = await connect_client(settings)
            engine = make_engine(stack.database_url, pool_size=2)
            try:
                async with (
                    payment_worker(settings, client),
                    gated_worker(gated, client) as gate,
                    event_worker(webhooks, client),
                ):
                    endpoints = WebhookEndpoints(engine, sealer=secret_sealer(settings))
                    recorder = Recorder(
                        client, settings, gated.task_queue, gate, Ledger(engine),
                        EventStore(engine), endpoints, crm, webhooks,
                    )  # fmt: skip
                    await asyncio.gather(
                        *(_record_one(recorder, name, file) for name, file in targets.items())
                    )
            finally:
                await engine.dispose()
        finally:
            await asyncio.to_thread(stack.stop)


async def _record_one(recorder: Recorder, name: str, target: Path) -> None:
    handle = await PATHS[name](recorder)
    history = await handle.fetch_history()
    target.write_text(history.to_json() + "\n")
    print(f"tests/histories/{target.name}: {len(history.events)} events")


def history_file(name: str, version: str | None) -> Path:
    """`success.json`, or `success.v2.json` for a history of a later workflow version."""
    return HISTORIES / (f"{name}.{version}.json" if version else f"{name}.json")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.record_histories", description=__doc__.split("\n")[0]
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="default: all of them")
    parser.add_argument("--version", help="suffix for a new workflow version: success.v2.json")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing files (only for histories not yet committed)",
    )
    args = parser.parse_args(argv)
    unknown = sorted(set(args.paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown paths {unknown}; known: {', '.join(PATHS)}")
    return args


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # The ledger refusal path fails an activity on purpose: no traceback for it.
    logging.getLogger("temporalio.activity").setLevel(logging.ERROR)
    args = parse_args(sys.argv[1:])
    targets = {name: history_file(name, args.version) for name in args.paths or PATHS}
    existing = [f.name for f in targets.values() if f.exists()]
    if existing and not args.overwrite:
        # Old histories are what running payments look like: keep them, add a --version.
        print(f"{', '.join(existing)} exist: use --version vN (or --overwrite)", file=sys.stderr)
        raise SystemExit(2)
    await record(targets)


if __name__ == "__main__":
    from infra.exit import run_and_exit

    run_and_exit(main)
