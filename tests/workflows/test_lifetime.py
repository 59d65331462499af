"""A payment's lifetime: the dispute window and the review timeout on Temporal's time-skipping
test server (real activities, real broker and PostgreSQL), the final summary served from the
ledger once the history is gone, and continue-as-new under many refunds."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowHandle
from temporalio.service import RPCError

from domain.events import EventKind, event_id
from domain.fraud import amount_for_limit_share
from domain.payment import (
    FollowUpStatus,
    PaymentRequest,
    PaymentState,
    PaymentStatus,
    PaymentWorkflowInput,
    RefundSignal,
    payment_id_for,
)
from infra.embedded.stack import Stack
from service.start import payment_policy
from settings import Settings
from tests.conftest import OTHER_CLIENT_KEY, TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.follow_ups import (
    assert_ledger_balanced,
    captured_payment,
    new_merchant,
    payment_events,
    refund,
    register_row,
)
from tests.helpers.saga import payment_body
from tests.helpers.time_skipping import time_skipping_server
from worker import payment_worker
from workflows import search_attributes as sa
from workflows.payment import PaymentWorkflow, initial_search_attributes

CLIENT_ID = "test-client"  # the client TEST_API_KEY belongs to


def _workflow_input(settings: Settings, amount: int, **policy: Any) -> PaymentWorkflowInput:
    request = PaymentRequest.model_validate(payment_body(amount=amount, merchant_id=new_merchant()))
    payment_id = payment_id_for(CLIENT_ID, f"key-{uuid.uuid4().hex}")
    return PaymentWorkflowInput(
        payment_id=payment_id,
        client_id=CLIENT_ID,
        request=request,
        fingerprint=request.fingerprint(),
        policy=payment_policy(settings, request).model_copy(update=policy),
    )


async def _start(
    client: Client, settings: Settings, input: PaymentWorkflowInput
) -> WorkflowHandle[Any, Any]:
    handle: WorkflowHandle[Any, Any] = await client.start_workflow(
        PaymentWorkflow.run,
        input,
        id=input.payment_id,
        task_queue=settings.task_queue,
        search_attributes=initial_search_attributes(input),
    )
    return handle


async def _state_when(
    handle: WorkflowHandle[Any, Any], done: Any, timeout: float = 30
) -> PaymentState:
    """Poll the `state` query (in real time: queries never skip time) until `done(state)`."""
    deadline = asyncio.get_running_loop().time() + timeout
    state: PaymentState | None = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            state = await handle.query("state", result_type=PaymentState)
            if done(state):
                return state
        except RPCError:
            pass  # no workflow task has run yet
        await asyncio.sleep(0.1)
    raise AssertionError(f"never got there; last state: {state}")


# ── the time-skipping server ───────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
async def skipping(app_settings: Settings) -> AsyncIterator[tuple[Client, Settings]]:
    """The time-skipping test server (tests/helpers/time_skipping.py) with a worker running
    the real activities."""
    async with time_skipping_server() as env:
        settings = app_settings.model_copy(
            update={"task_queue": f"skip-{uuid.uuid4().hex[:8]}", "local_activities": False}
        )
        async with payment_worker(settings, env.client):
            yield env.client, settings


async def test_the_workflow_completes_when_the_dispute_window_closes(
    skipping: tuple[Client, Settings], engine: AsyncEngine, stack: Stack, api: httpx.AsyncClient
) -> None:
    client, settings = skipping
    input = _workflow_input(settings, 6000)
    assert input.policy.dispute_window_seconds == 120 * 86400  # the default window
    handle = await _start(client, settings, input)
    pid = input.payment_id

    await _state_when(handle, lambda s: s.status == "succeeded" and s.crm_sync == "synced")
    await handle.signal(PaymentWorkflow.refund, RefundSignal(refund_id="re_window_1", amount=2500))
    await _state_when(handle, lambda s: s.refunds and s.refunds[0].status != "pending")

    # Awaiting the result lets the server skip the 120 days.
    final = PaymentState.model_validate(await asyncio.wait_for(handle.result(), 60))
    assert final.status == PaymentStatus.PARTIALLY_REFUNDED
    assert (final.captured, final.refunded) == (6000, 2500)
    assert [(r.id, r.status) for r in final.refunds] == [("re_window_1", FollowUpStatus.SUCCEEDED)]
    described = await handle.describe()
    assert described.status == WorkflowExecutionStatus.COMPLETED
    assert described.close_time is not None
    assert described.close_time - described.start_time >= timedelta(days=120)
    assert described.typed_search_attributes.get(sa.PAYMENT_STATUS) == "partially_refunded"

    # The final word is in the ledger, with the whole summary, for after the history is gone.
    register = await register_row(engine, pid)
    assert register is not None
    assert (register["captured"], register["refunded"], register["status"]) == (
        6000,
        2500,
        "partially_refunded",
    )
    summary = PaymentState.model_validate(register["summary"])
    assert summary.status == PaymentStatus.PARTIALLY_REFUNDED
    assert [r.id for r in summary.refunds] == ["re_window_1"]
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "refund"]
    events = await payment_events(
        stack.kafka_bootstrap_servers,
        pid,
        ["payments.refunded"],
        until=lambda mine: len(mine) >= 1,
    )
    assert [e.id for e in events] == [event_id(pid, EventKind.REFUNDED, "re_window_1")]

    # The API's own Temporal server has no history of this payment (it ran on the time-skipping
    # server): just what GET meets once a closed payment's history is deleted. The ledger's
    # summary answers, to its owner only.
    response = await api.get(f"/v1/payments/{pid}")
    assert response.status_code == 200, response.text
    payment = response.json()
    assert payment["status"] == "partially_refunded"
    assert (payment["amount_captured"], payment["amount_refunded"]) == (6000, 2500)
    assert [(r["id"], r["status"]) for r in payment["refunds"]] == [("re_window_1", "succeeded")]
    assert [c["status"] for c in payment["status_history"]][-2:] == [
        "succeeded",
        "partially_refunded",
    ]
    stranger = await api.get(
        f"/v1/payments/{pid}", headers={"Authorization": f"Bearer {OTHER_CLIENT_KEY}"}
    )
    assert stranger.status_code == 404
    late = await refund(api, pid, 100)
    assert late.status_code == 409 and late.json()["error"]["code"] == "payment_closed"


async def test_an_unreviewed_payment_is_declined_after_the_review_timeout(
    skipping: tuple[Client, Settings], engine: AsyncEngine, stack: Stack
) -> None:
    client, settings = skipping
    input = _workflow_input(settings, amount_for_limit_share("USD", 60))
    assert input.policy.review_timeout_seconds == 24 * 3600  # the default timeout
    handle = await _start(client, settings, input)
    await _state_when(handle, lambda s: s.status == "requires_review")

    final = PaymentState.model_validate(await asyncio.wait_for(handle.result(), 60))
    assert final.status == PaymentStatus.DECLINED
    assert final.review is not None and final.review.reviewer == "system"
    assert "timed out" in final.review.note
    described = await handle.describe()
    assert described.close_time is not None
    assert described.close_time - described.start_time >= timedelta(hours=24)

    assert await assert_ledger_balanced(engine, input.payment_id) == []
    register = await register_row(engine, input.payment_id)
    assert register is not None
    assert (register["status"], register["captured"]) == ("declined", 0)
    events = await payment_events(
        stack.kafka_bootstrap_servers,
        input.payment_id,
        ["payments.rejected", "payments.raw"],
        until=lambda mine: len(mine) >= 1,
    )
    assert [e.topic for e in events] == ["payments.rejected"]


# ── a closed payment on the dev server ─────────────────────────────────────────────────────


async def test_a_closed_payment_still_answers_and_refuses_follow_ups(
    api: httpx.AsyncClient, engine: AsyncEngine, app_settings: Settings, temporal_client: Client
) -> None:
    input = _workflow_input(app_settings, 3000, dispute_window_seconds=3.0)
    handle = await _start(temporal_client, app_settings, input)
    pid = input.payment_id
    await _state_when(handle, lambda s: s.status == "succeeded")
    assert (await refund(api, pid, 1000)).status_code == 201

    final = PaymentState.model_validate(await asyncio.wait_for(handle.result(), 30))
    assert final.status == PaymentStatus.PARTIALLY_REFUNDED
    payment = (await api.get(f"/v1/payments/{pid}")).json()
    assert (payment["status"], payment["amount_refunded"]) == ("partially_refunded", 1000)
    closed = await refund(api, pid, 500)
    assert closed.status_code == 409 and closed.json()["error"]["code"] == "payment_closed"
    dispute = await api.post(
        f"/v1/payments/{pid}/disputes",
        json={"reason_code": "fraudulent", "network_reference": f"nr_{uuid.uuid4().hex}"},
    )
    assert dispute.status_code == 409 and dispute.json()["error"]["code"] == "payment_closed"
    register = await register_row(engine, pid)
    assert register is not None and register["summary"]["status"] == "partially_refunded"


# ── continue-as-new ────────────────────────────────────────────────────────────────────────


@pytest.fixture
async def short_history_api(
    app_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[httpx.AsyncClient]:
    """The API with payments whose history continues as new after 60 events."""
    settings = app_settings.model_copy(update={"continue_as_new_after_events": 60})
    async with api_client(settings, temporal_client, TEST_API_KEY) as client:
        yield client


async def test_many_refunds_continue_as_new_without_losing_state_or_signals(
    short_history_api: httpx.AsyncClient, engine: AsyncEngine, temporal_client: Client
) -> None:
    api = short_history_api
    payment = await captured_payment(api, 10_000)
    pid = payment["id"]
    handle = temporal_client.get_workflow_handle(pid)
    first_run = (await handle.describe()).run_id

    # 30 refunds: a burst through the API (queued follow-ups the next run must inherit), then
    # operators' signals trickling in while runs hand over to each other.
    async def through_api(n: int) -> None:
        response = await refund(api, pid, 10 + n, wait=0)
        assert response.status_code == 201, response.text

    async def as_signals(numbers: range) -> None:
        for n in numbers:
            await handle.signal(
                PaymentWorkflow.refund, RefundSignal(refund_id=f"re_can_{n}", amount=10 + n)
            )
            await asyncio.sleep(0.1)

    await asyncio.gather(*(through_api(n) for n in range(5)), as_signals(range(5, 30)))
    expected = sum(10 + n for n in range(30))
    state = await _state_when(
        handle,
        lambda s: len(s.refunds) == 30 and all(r.status != "pending" for r in s.refunds),
        timeout=60,
    )
    assert all(r.status == FollowUpStatus.SUCCEEDED for r in state.refunds)
    assert state.refunded == expected
    assert state.status == PaymentStatus.PARTIALLY_REFUNDED
    assert state.captured == 10_000

    runs = await _runs(temporal_client, pid)
    assert len(runs) >= 3, "the workflow should have continued as new several times"
    assert runs[0][0] == first_run
    first = temporal_client.get_workflow_handle(pid, run_id=first_run)
    assert (await first.describe()).status == WorkflowExecutionStatus.CONTINUED_AS_NEW
    # Each later run started from the state its predecessor carried; at least one inherited
    # refunds that had been signalled but not yet run.
    carried = [input for _, input in runs[1:]]
    assert all(input.carried_state is not None for input in carried)
    assert any(input.pending_follow_ups for input in carried)

    # Exactly once each in the ledger; the register agrees with the workflow.
    rows = await assert_ledger_balanced(engine, pid)
    refunds = [r["reference"] for r in rows if r["kind"] == "refund"]
    assert len(refunds) == len(set(refunds)) == 30
    register = await register_row(engine, pid)
    assert register is not None
    assert register["refunded"] == expected

    # The carried state keeps serving: one more refund in the newest run.
    last = await refund(api, pid, 1)
    assert last.status_code == 201 and last.json()["status"] == "succeeded"
    payment = (await api.get(f"/v1/payments/{pid}")).json()
    assert payment["amount_refunded"] == expected + 1


async def _runs(client: Client, workflow_id: str) -> list[tuple[str, PaymentWorkflowInput]]:
    """Every run of the workflow, oldest first, with the input it started with: walked back
    through the history's continued-from links (visibility may lag; history does not)."""
    runs: list[tuple[str, PaymentWorkflowInput]] = []
    run_id: str | None = None
    while True:
        handle = client.get_workflow_handle(workflow_id, run_id=run_id)
        started = (await handle.fetch_history()).events[0]
        attributes = started.workflow_execution_started_event_attributes
        [input] = await client.data_converter.decode(
            attributes.input.payloads, [PaymentWorkflowInput]
        )
        runs.append((run_id or (await handle.describe()).run_id, input))
        if not attributes.continued_execution_run_id:
            return runs[::-1]
        run_id = attributes.continued_execution_run_id


async def test_signals_that_queue_nothing_still_continue_as_new(
    short_history_api: httpx.AsyncClient, temporal_client: Client
) -> None:
    """Refused cancels move no money and queue no follow-up, but each one lengthens the
    history: the workflow still hands over to a fresh run."""
    payment = await captured_payment(short_history_api, 1200)
    pid = payment["id"]
    handle = temporal_client.get_workflow_handle(pid)
    before = len(await _runs(temporal_client, pid))

    # Until the run hands over: how many signals that takes depends on how many share a
    # workflow task (and on the payment's own history, shorter since saga revision 1).
    sent = 0
    deadline = asyncio.get_running_loop().time() + 30
    while len(runs := await _runs(temporal_client, pid)) == before:
        assert asyncio.get_running_loop().time() < deadline, f"never continued as new ({sent})"
        for _ in range(5):
            await handle.signal("cancel", {"reason": f"operator retry {sent}"})
            sent += 1
        await asyncio.sleep(0.2)
    assert sent <= 100  # the policy's 60 events: a bounded number of refused cancels
    assert runs[-1][1].carried_state is not None
    state = await _state_when(handle, lambda s: s.cancel_refused is not None)
    assert (state.status, state.captured) == (PaymentStatus.SUCCEEDED, 1200)
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
