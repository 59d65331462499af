"""How a payment ends when it is not the happy path: fraud reject, manual review (approve,
decline, timeout) and a CRM that fails transiently or refuses for good.

Fraud bands come from `domain.fraud` (a first-time customer paying 50-80 % of the
currency's limit scores 0.80: review; 80 % or more scores 1.00: reject). The CRM tests script
failures, so they run on a private rig: their own fake CRM, worker and task queue, and an API
wired to them, so no other payment in the session can consume a scripted failure.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle

from activities.crm import verify_webhook
from domain.events import EventKind, event_id
from domain.fraud import amount_for_limit_share
from domain.payment import (
    PaymentPolicy,
    PaymentRequest,
    PaymentState,
    PaymentWorkflowInput,
    ReviewDecision,
    payment_id_for,
)
from infra.embedded.stack import Stack
from settings import Settings
from tests.conftest import TEST_API_KEY, WEBHOOK_SECRET
from tests.helpers.api_client import api_client
from tests.helpers.fake_crm import FakeCrmServer, RecordedRequest
from tests.helpers.kafka import ConsumedEvent, consume_events, dedupe_by_id
from tests.helpers.saga import (
    account_balance,
    create_payment,
    ledger_rows,
    payment_body,
    wait_for_payment,
)
from worker import payment_worker
from workflows import search_attributes as sa
from workflows.payment import PaymentWorkflow, initial_search_attributes

TEST_CLIENT = "test-client"  # the client id of conftest's TEST_API_KEY
WEBHOOK_PATH = "/hooks/paysaga"
CAPTURE = [("payment", 0, 2)]  # one balanced capture: debit customer, credit merchant
REVIEW_AMOUNT = amount_for_limit_share("USD", 50)  # first payment: score 0.80
REJECT_AMOUNT = amount_for_limit_share("USD", 80)  # first payment: score 1.00


def _captures(rows: list[dict[str, Any]]) -> list[tuple[str, int, int]]:
    return [(r["kind"], r["total"], r["entries"]) for r in rows]


async def _state(handle: WorkflowHandle[Any, Any]) -> PaymentState:
    state: PaymentState = await handle.query("state", result_type=PaymentState)
    return state


async def _current_details(handle: WorkflowHandle[Any, Any]) -> str:
    """What the Temporal UI shows as the workflow's current details (set_current_details)."""
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    details: str = metadata.current_details
    return details


async def _events_of(stack: Stack, payment_id: str, topic: str) -> list[ConsumedEvent]:
    """The payment's events on `topic`, once at least one has arrived."""
    events = await asyncio.to_thread(
        consume_events,
        stack.kafka_bootstrap_servers,
        [topic],
        until=lambda evs: any(e.key == payment_id for e in evs),
    )
    return [e for e in events if e.key == payment_id]


async def _all_events_of(stack: Stack, payment_id: str, topics: list[str]) -> list[ConsumedEvent]:
    """Every event of the payment on `topics`, read to the end of each partition."""
    events = await asyncio.to_thread(consume_events, stack.kafka_bootstrap_servers, topics)
    return [e for e in events if e.key == payment_id]


async def _found_by(temporal_client: Client, query: str, payment_id: str) -> None:
    """Visibility is eventually consistent: poll until `query` finds the payment."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [w.id async for w in temporal_client.list_workflows(query)]
        if payment_id in found:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{query!r} never found {payment_id}")


def _statuses(payment: dict[str, Any]) -> list[str]:
    return [change["status"] for change in payment["status_history"]]


async def _ends_without_money(
    engine: AsyncEngine, stack: Stack, payment_id: str, status: str
) -> None:
    """No ledger posting, payments.rejected carries the final status, and payments.raw (the
    start of capture) was never published."""
    assert await ledger_rows(engine, payment_id) == []
    [rejected] = dedupe_by_id(await _events_of(stack, payment_id, "payments.rejected")).values()
    assert rejected.id == event_id(payment_id, EventKind.REJECTED)
    assert rejected.type == EventKind.REJECTED.ce_type
    assert rejected.body["data"]["status"] == status
    later = await _all_events_of(stack, payment_id, ["payments.raw", "payments.confirmed"])
    assert later == []


# ── fraud reject ─────────────────────────────────────────────────────────────────────────────


async def test_a_score_at_the_reject_threshold_rejects_without_moving_money(
    api: httpx.AsyncClient,
    engine: AsyncEngine,
    stack: Stack,
    temporal_client: Client,
    crm_server: FakeCrmServer,
) -> None:
    body = payment_body(amount=REJECT_AMOUNT)
    key = f"reject-{uuid.uuid4().hex}"
    created = await create_payment(api, body, key=key, wait=10)
    assert created.status_code == 201, created.text
    payment = created.json()
    payment_id = payment["id"]
    assert payment["status"] == "rejected"
    assert payment["fraud_score"] >= 0.95
    assert any("first payment" in reason for reason in payment["fraud_reasons"])
    assert any("per-payment limit" in reason for reason in payment["fraud_reasons"])
    assert payment["amount_captured"] == 0

    await _ends_without_money(engine, stack, payment_id, "rejected")
    assert await account_balance(engine, f"customer:{TEST_CLIENT}:{body['customer_id']}:USD") == 0
    handle = temporal_client.get_workflow_handle(payment_id)
    described = await handle.describe()
    assert described.status == WorkflowExecutionStatus.COMPLETED
    assert described.typed_search_attributes.get(sa.PAYMENT_STATUS) == "rejected"
    assert described.typed_search_attributes.get(sa.FRAUD_SCORE) == payment["fraud_score"]
    assert not [
        r for r in crm_server.requests_for(WEBHOOK_PATH) if r.json()["payment_id"] == payment_id
    ]
    assert (await api.get(f"/v1/payments/{payment_id}")).json()["status"] == "rejected"
    # A retry of the request after the workflow closed is a replay, not a second attempt.
    replay = await create_payment(api, body, key=key, wait=0)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert (replay.json()["id"], replay.json()["status"]) == (payment_id, "rejected")


# ── manual review ────────────────────────────────────────────────────────────────────────────


async def _in_review(
    api: httpx.AsyncClient, temporal_client: Client
) -> tuple[dict[str, Any], WorkflowHandle[Any, Any]]:
    body = payment_body(amount=REVIEW_AMOUNT)
    created = await create_payment(api, body, wait=10)
    assert created.status_code == 201, created.text
    payment: dict[str, Any] = created.json()
    assert payment["status"] == "requires_review", payment
    assert 0.70 <= payment["fraud_score"] < 0.95
    assert "approve or decline" in payment["waiting_for"]
    return payment, temporal_client.get_workflow_handle(payment["id"])


async def test_review_then_approve_captures_the_payment(
    api: httpx.AsyncClient, engine: AsyncEngine, temporal_client: Client
) -> None:
    payment, handle = await _in_review(api, temporal_client)
    payment_id, customer = payment["id"], payment["customer_id"]

    # Operators find it by search attribute and see in plain words what it waits for.
    await _found_by(
        temporal_client,
        f'PaymentStatus = "requires_review" AND CustomerId = "{customer}"',
        payment_id,
    )
    details = await _current_details(handle)
    assert "requires_review" in details
    assert "Waiting for: a reviewer's approve or decline signal" in details
    assert await ledger_rows(engine, payment_id) == []  # nothing moves while it waits

    await handle.signal(
        PaymentWorkflow.approve, ReviewDecision(reviewer="analyst-7", note="known customer")
    )
    settled = await wait_for_payment(api, payment_id, lambda p: p["status"] == "succeeded")
    assert settled["amount_captured"] == REVIEW_AMOUNT
    assert _statuses(settled) == ["received", "requires_review", "processing", "succeeded"]
    assert _captures(await ledger_rows(engine, payment_id)) == CAPTURE
    state = await _state(handle)
    assert state.review == ReviewDecision(reviewer="analyst-7", note="known customer")


async def test_review_then_decline_ends_without_money(
    api: httpx.AsyncClient, engine: AsyncEngine, stack: Stack, temporal_client: Client
) -> None:
    payment, handle = await _in_review(api, temporal_client)
    payment_id = payment["id"]

    await handle.signal(PaymentWorkflow.decline, ReviewDecision(reviewer="analyst-7", note="no"))
    settled = await wait_for_payment(api, payment_id, lambda p: p["status"] == "declined")
    assert _statuses(settled) == ["received", "requires_review", "declined"]
    assert settled["amount_captured"] == 0
    await _ends_without_money(engine, stack, payment_id, "declined")
    assert (await _state(handle)).review == ReviewDecision(reviewer="analyst-7", note="no")
    described = await handle.describe()
    assert described.status == WorkflowExecutionStatus.COMPLETED
    assert described.typed_search_attributes.get(sa.PAYMENT_STATUS) == "declined"


async def test_an_unanswered_review_is_auto_declined_when_its_timeout_passes(
    api: httpx.AsyncClient, engine: AsyncEngine, app_settings: Settings, temporal_client: Client
) -> None:
    # Started directly with a 2 s review timeout: the API's policy would wait a day.
    request = PaymentRequest.model_validate(payment_body(amount=REVIEW_AMOUNT))
    payment_id = payment_id_for(TEST_CLIENT, f"review-timeout-{uuid.uuid4().hex}")
    workflow_input = PaymentWorkflowInput(
        payment_id=payment_id,
        client_id=TEST_CLIENT,
        request=request,
        fingerprint=request.fingerprint(),
        policy=PaymentPolicy(review_timeout_seconds=2, crm_targets=["webhook"]),
    )
    handle = await temporal_client.start_workflow(
        PaymentWorkflow.run,
        workflow_input,
        id=payment_id,
        task_queue=app_settings.task_queue,
        search_attributes=initial_search_attributes(workflow_input),
    )

    settled = await wait_for_payment(api, payment_id, lambda p: p["status"] == "declined", 20)
    assert _statuses(settled) == ["received", "requires_review", "declined"]
    review_started, declined = settled["status_history"][1:]
    waited = _seconds_between(review_started["at"], declined["at"])
    assert waited >= 2, waited
    state = await _state(handle)
    assert state.review is not None and state.review.reviewer == "system"
    assert "timed out" in state.review.note
    assert await ledger_rows(engine, payment_id) == []
    result = await handle.result()
    assert result.status == "declined"


def _seconds_between(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


# ── the CRM: transient failures are retried, permanent ones flag the payment ─────────────────


@dataclass
class CrmRig:
    crm: FakeCrmServer
    api: httpx.AsyncClient


@pytest.fixture(scope="module")
async def crm_rig(
    app_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[CrmRig]:
    with FakeCrmServer() as crm:
        settings = app_settings.model_copy(
            update={
                "task_queue": f"crm-outcomes-{uuid.uuid4().hex[:8]}",
                "crm_webhook_url": crm.url(WEBHOOK_PATH),
            }
        )
        async with (
            payment_worker(settings, temporal_client),
            api_client(settings, temporal_client, TEST_API_KEY) as api,
        ):
            yield CrmRig(crm=crm, api=api)


@pytest.fixture
def rig(crm_rig: CrmRig) -> CrmRig:
    crm_rig.crm.clear()
    return crm_rig


def _hooks_for(crm: FakeCrmServer, payment_id: str) -> list[RecordedRequest]:
    return [r for r in crm.requests_for(WEBHOOK_PATH) if r.json()["payment_id"] == payment_id]


async def test_crm_5xx_is_retried_with_one_idempotency_key_until_it_syncs(
    rig: CrmRig, engine: AsyncEngine, temporal_client: Client
) -> None:
    rig.crm.respond_with(503, times=2, path_prefix=WEBHOOK_PATH)
    created = await create_payment(rig.api, payment_body(amount=5100), wait=10)
    assert created.status_code == 201, created.text
    payment_id = created.json()["id"]

    payment = await wait_for_payment(rig.api, payment_id, lambda p: p["crm_sync"] == "synced", 20)
    assert payment["status"] == "succeeded"
    assert payment["amount_captured"] == 5100
    hooks = _hooks_for(rig.crm, payment_id)
    assert len(hooks) == 3  # two 503s, then accepted
    assert {h.header("Idempotency-Key") for h in hooks} == {
        event_id(payment_id, EventKind.CONFIRMED)
    }
    assert len({h.body for h in hooks}) == 1  # a retry repeats the same notification
    assert all(
        verify_webhook(WEBHOOK_SECRET, h.body, h.header("Paysaga-Signature") or "") for h in hooks
    )
    assert _captures(await ledger_rows(engine, payment_id)) == CAPTURE
    described = await temporal_client.get_workflow_handle(payment_id).describe()
    assert described.typed_search_attributes.get(sa.CRM_SYNC) == "synced"


@pytest.mark.parametrize("status", [400, 422])
async def test_a_crm_4xx_keeps_the_money_and_flags_crm_sync_failed(
    rig: CrmRig, engine: AsyncEngine, temporal_client: Client, status: int
) -> None:
    rig.crm.respond_with(status, times=1, path_prefix=WEBHOOK_PATH, body={"error": "bad field"})
    body = payment_body(amount=5200)
    created = await create_payment(rig.api, body, wait=10)
    assert created.status_code == 201, created.text
    payment_id = created.json()["id"]

    payment = await wait_for_payment(rig.api, payment_id, lambda p: p["crm_sync"] != "pending", 20)
    assert (payment["status"], payment["crm_sync"]) == ("succeeded", "failed")
    assert payment["amount_captured"] == 5200
    assert len(_hooks_for(rig.crm, payment_id)) == 1  # a refusal is not retried

    # The money is untouched: one capture, the customer debited once.
    assert _captures(await ledger_rows(engine, payment_id)) == CAPTURE
    assert (
        await account_balance(engine, f"customer:{TEST_CLIENT}:{body['customer_id']}:USD") == 5200
    )

    handle = temporal_client.get_workflow_handle(payment_id)
    state = await _state(handle)
    assert state.crm_error is not None and str(status) in state.crm_error
    described = await handle.describe()
    assert described.status == WorkflowExecutionStatus.RUNNING  # open for refunds still
    assert described.typed_search_attributes.get(sa.CRM_SYNC) == "failed"
    assert described.typed_search_attributes.get(sa.PAYMENT_STATUS) == "succeeded"
    await _found_by(
        temporal_client,
        f'CrmSync = "failed" AND CustomerId = "{body["customer_id"]}"',
        payment_id,
    )
