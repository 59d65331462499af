"""A follow-up that was accepted is always carried out or recorded as failed, whatever it races:
the dispute window closing, the outcome being recorded, a continue-as-new, an operator's cancel.

Each race is held open on purpose (the real ledger activity waits at a gate), so the follow-up
lands inside the window instead of near it by luck; one test also fires refunds across the
instant the window's timer fires. Real worker, ledger, broker and API on the dev server
(Updates are unreliable on the time-skipping server)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
)
from temporalio.exceptions import CancelledError

from domain.events import EventKind, event_id
from domain.payment import PaymentState, RefundSignal, payment_id_for
from ledger.store import Ledger
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.fake_crm import FakeCrmServer
from tests.helpers.follow_ups import (
    WEBHOOK_PATH,
    assert_ledger_balanced,
    close_dispute,
    new_merchant,
    open_dispute,
    refund,
    register_row,
)
from tests.helpers.ledger import OUTCOME, GatedLedger
from tests.helpers.saga import create_payment, payment_body, wait_for_payment
from worker import payment_worker

CLIENT = "test-client"


@dataclass
class Rig:
    settings: Settings
    temporal: Client
    ledger: GatedLedger

    def api(self, **settings: Any) -> Any:
        """The API on this rig's task queue; `settings` fix the policy of payments it creates."""
        return api_client(self.settings.model_copy(update=settings), self.temporal, TEST_API_KEY)


@pytest.fixture(scope="module")
async def rig(app_settings: Settings, temporal_client: Client) -> AsyncIterator[Rig]:
    settings = app_settings.model_copy(update={"task_queue": f"race-{uuid.uuid4().hex[:8]}"})
    made: list[GatedLedger] = []

    def gated(ledger: Ledger) -> GatedLedger:
        made.append(GatedLedger(ledger))
        return made[0]

    async with payment_worker(settings, temporal_client, ledger_activities=gated):
        yield Rig(settings, temporal_client, made[0])


async def _paid(api: httpx.AsyncClient, amount: int, *, before: Any = None) -> str:
    """A captured payment; `before(payment_id)` runs before it is created (to set a gate)."""
    key = f"race-{uuid.uuid4().hex}"
    pid = payment_id_for(CLIENT, key)
    if before is not None:
        before(pid)
    created = await create_payment(
        api, payment_body(amount=amount, merchant_id=new_merchant()), key=key
    )
    assert created.status_code == 201 and created.json()["status"] == "succeeded", created.text
    return pid


async def _final(handle: WorkflowHandle[Any, Any]) -> PaymentState:
    return PaymentState.model_validate(await asyncio.wait_for(handle.result(), 60))


async def _updates_in_history(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """The update ids that entered the workflow's history (accepted ones only)."""
    history = await handle.fetch_history()
    return [
        e.workflow_execution_update_accepted_event_attributes.accepted_request.meta.update_id
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
    ]


def _code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


# ── the window closing ───────────────────────────────────────────────────────────────────────


async def test_a_refund_while_the_outcome_is_recorded_is_refused_not_left_pending(
    rig: Rig, temporal_client: Client, engine: AsyncEngine
) -> None:
    """The window has closed and the workflow is recording its outcome (held here): it still
    answers, and it refuses instead of accepting what it would never carry out."""
    async with rig.api(dispute_window_days=2 / 86400) as api:
        pid = await _paid(api, 5000, before=lambda p: rig.ledger.hold(p, OUTCOME))
        await rig.ledger.wait_held(pid, OUTCOME)
        handle = temporal_client.get_workflow_handle(pid)

        late = await refund(api, pid, 500, key=f"late-{uuid.uuid4().hex}", wait=5)
        assert late.status_code == 409, late.text
        assert _code(late) == "payment_closed"
        assert "window closed" in late.json()["error"]["message"]
        dispute = await open_dispute(api, pid, 500)
        assert dispute.status_code == 409 and _code(dispute) == "payment_closed"
        assert await _updates_in_history(handle) == []  # refused before entering the history

        # An operator's signal at the same moment is recorded failed with the reason.
        await handle.signal("refund", RefundSignal(refund_id="re_ops_late", amount=500))
        rig.ledger.release(pid, OUTCOME)
        final = await _final(handle)

    assert [(r.id, r.status) for r in final.refunds] == [("re_ops_late", "failed")]
    assert "window closed" in (final.refunds[0].failure_reason or "")
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment"]
    register = await register_row(engine, pid)
    assert register is not None and register["refunded"] == 0


async def test_refunds_fired_across_the_window_closing_are_carried_out_or_refused(
    rig: Rig, temporal_client: Client, engine: AsyncEngine
) -> None:
    """Refunds in a steady stream while the window's timer fires: each one is either executed
    and in the ledger (201 succeeded) or refused (409 payment_closed). None pending. (The
    stream stays under Temporal's 10 Updates in flight per workflow.)"""
    window = 3.0
    async with rig.api(dispute_window_days=window / 86400) as api:
        pid = await _paid(api, 100_000)
        loop = asyncio.get_running_loop()
        stop_at = loop.time() + window + 2.0
        sent: list[Awaitable[httpx.Response]] = []
        while loop.time() < stop_at:
            sent.append(asyncio.ensure_future(refund(api, pid, 10, wait=20)))
            await asyncio.sleep(0.1)
        responses = await asyncio.gather(*sent)
        final = await _final(temporal_client.get_workflow_handle(pid))

    outcomes = [(r.status_code, r.json().get("status") or _code(r)) for r in responses]
    assert set(outcomes) <= {(201, "succeeded"), (409, "payment_closed")}, outcomes
    assert (201, "succeeded") in outcomes and (409, "payment_closed") in outcomes
    made = {r.json()["id"] for r in responses if r.status_code == 201}
    assert {r.id for r in final.refunds} == made
    assert all(r.status == "succeeded" for r in final.refunds)
    rows = await assert_ledger_balanced(engine, pid)
    assert {r["reference"] for r in rows if r["kind"] == "refund"} == made
    register = await register_row(engine, pid)
    assert register is not None and register["refunded"] == 10 * len(made)


# ── continue-as-new ──────────────────────────────────────────────────────────────────────────


async def test_a_refund_during_continue_as_new_is_carried_out_by_the_next_run(
    rig: Rig, temporal_client: Client, engine: AsyncEngine
) -> None:
    """While the run hands over (its queued refund held at the ledger), a new refund is
    refused as busy, retried by the API, and accepted and carried out by the next run."""
    async with rig.api(continue_as_new_after_events=15) as api:
        pid = await _paid(api, 10_000)
        handle = temporal_client.get_workflow_handle(pid)
        rig.ledger.hold(pid, "refund", "re_first")
        rig.ledger.hold(pid, "refund", "re_queued")
        first_run = await _run_id_when_idle(handle)

        await handle.signal("refund", RefundSignal(refund_id="re_first", amount=100))
        await rig.ledger.wait_held(pid, "refund", "re_first")
        await handle.signal("refund", RefundSignal(refund_id="re_queued", amount=200))
        rig.ledger.release(pid, "refund", "re_first")
        # The history is long now: the run drains its queue (re_queued, held) before it
        # continues as new, and takes nothing new meanwhile.
        await rig.ledger.wait_held(pid, "refund", "re_queued")
        during = asyncio.ensure_future(refund(api, pid, 300, wait=20))
        await asyncio.sleep(1.0)
        assert not during.done()  # refused as busy and retried, not accepted by this run
        rig.ledger.release(pid, "refund", "re_queued")
        response = await during

    assert response.status_code == 201 and response.json()["status"] == "succeeded", response.text
    later_run = (await handle.describe()).run_id
    assert later_run != first_run
    old = temporal_client.get_workflow_handle(pid, run_id=first_run)
    assert response.json()["id"] not in await _updates_in_history(old)
    rows = await assert_ledger_balanced(engine, pid)
    assert sorted(r["reference"] for r in rows if r["kind"] == "refund") == sorted(
        ["re_first", "re_queued", response.json()["id"]]
    )
    state = await handle.query("state", result_type=PaymentState)
    assert [r.status for r in state.refunds] == ["succeeded"] * 3
    assert state.refunded == 600


async def _run_id_when_idle(handle: WorkflowHandle[Any, Any]) -> str:
    """The current run, once the payment serves follow-ups (after any early hand-over)."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        described = await handle.describe()
        state = await handle.query("state", result_type=PaymentState)
        if state.waiting_for.startswith("refunds or disputes until") and not (
            described.raw_description.pending_activities
        ):
            await asyncio.sleep(0.3)
            if (await handle.describe()).run_id == described.run_id:
                return described.run_id
        assert asyncio.get_running_loop().time() < deadline, state.waiting_for
        await asyncio.sleep(0.1)


# ── an operator's cancel ─────────────────────────────────────────────────────────────────────


async def test_an_operator_cancel_carries_out_the_refunds_it_had_accepted(
    rig: Rig, temporal_client: Client, engine: AsyncEngine
) -> None:
    """Canceled while an accepted refund is at the ledger: that refund and the one queued
    behind it are carried out; from the moment the workflow sees the cancel, new ones are
    refused; then it ends."""
    async with rig.api() as api:
        pid = await _paid(api, 8000)
        handle = temporal_client.get_workflow_handle(pid)
        held_key, queued_key = f"a-{uuid.uuid4().hex}", f"b-{uuid.uuid4().hex}"
        rig.ledger.hold(pid, "refund", _refund_id(pid, held_key))
        held = await refund(api, pid, 1000, key=held_key, wait=0)
        assert held.status_code == 201 and held.json()["status"] == "pending", held.text
        await rig.ledger.wait_held(pid, "refund", _refund_id(pid, held_key))
        queued = await refund(api, pid, 2000, key=queued_key, wait=0)
        assert queued.status_code == 201 and queued.json()["status"] == "pending", queued.text

        await handle.cancel()
        await asyncio.sleep(0.5)  # the workflow sees the cancel while the refund is held
        refused = await refund(api, pid, 100, wait=5)
        assert refused.status_code == 409 and _code(refused) == "payment_closed", refused.text
        rig.ledger.release(pid, "refund", _refund_id(pid, held_key))
        with pytest.raises(WorkflowFailureError) as ended:
            await asyncio.wait_for(handle.result(), 30)
        assert isinstance(ended.value.cause, CancelledError)
        payment = (await api.get(f"/v1/payments/{pid}")).json()

    assert [(r["amount"], r["status"]) for r in payment["refunds"]] == [
        (1000, "succeeded"),
        (2000, "succeeded"),
    ]
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "refund", "refund"]
    register = await register_row(engine, pid)
    assert register is not None and register["refunded"] == 3000
    assert register["summary"]["refunded"] == 3000


def _refund_id(payment_id: str, key: str) -> str:
    from service.follow_ups import follow_up_id

    return follow_up_id("re", payment_id, key)


async def test_an_operator_cancel_keeps_the_payment_until_its_open_disputes_close(
    rig: Rig, temporal_client: Client, engine: AsyncEngine
) -> None:
    """Canceling the workflow must not leave disputed funds held forever: it takes no new
    refunds or disputes, but it waits for the open dispute to close, then ends."""
    async with rig.api() as api:
        pid = await _paid(api, 6000)
        handle = temporal_client.get_workflow_handle(pid)
        opened = await open_dispute(api, pid, 2500)
        assert opened.status_code == 201 and opened.json()["status"] == "open", opened.text

        await handle.cancel()
        await asyncio.sleep(1.0)
        state = await handle.query("state", result_type=PaymentState)
        assert state.status == "disputed"
        assert "open disputes to close" in state.waiting_for
        assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
        refused = await refund(api, pid, 100, wait=5)
        assert refused.status_code == 409 and _code(refused) == "payment_closed"

        closed = await close_dispute(api, pid, opened.json()["id"], "won")
        assert closed.status_code == 200 and closed.json()["status"] == "won", closed.text
        with pytest.raises(WorkflowFailureError) as ended:
            await asyncio.wait_for(handle.result(), 30)
        assert isinstance(ended.value.cause, CancelledError)

    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "dispute_opened", "dispute_won"]
    register = await register_row(engine, pid)
    assert register is not None
    assert (register["disputed"], register["status"]) == (0, "succeeded")
    assert register["summary"]["disputes"][0]["status"] == "won"


async def test_an_operator_cancel_during_the_crm_step_still_tells_the_crm(
    api: httpx.AsyncClient, temporal_client: Client, crm_server: FakeCrmServer
) -> None:
    """Found by the simulation (seed 1): canceled while the CRM was being told of the confirmed
    payment, the notification was abandoned and the payment's record said, forever, that it
    waited for the CRM. The payment is succeeded and keeps its money: the CRM step runs to its
    end, then the cancel takes effect."""
    crm_server.fail_for(4.0, 503)  # the CRM step retries meanwhile
    body = payment_body(amount=3100, merchant_id=new_merchant())
    pid = (await create_payment(api, body, wait=0)).json()["id"]
    await wait_for_payment(
        api, pid, lambda p: p["status"] == "succeeded" and p["crm_sync"] == "pending"
    )
    handle = temporal_client.get_workflow_handle(pid)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as ended:
        await asyncio.wait_for(handle.result(), 60)
    assert isinstance(ended.value.cause, CancelledError)

    payment = (await api.get(f"/v1/payments/{pid}")).json()
    assert (payment["status"], payment["crm_sync"], payment["waiting_for"]) == (
        "succeeded",
        "synced",
        "",
    ), payment
    confirmed = event_id(pid, EventKind.CONFIRMED)
    told = [
        r for r in crm_server.requests_for(WEBHOOK_PATH) if r.header("Idempotency-Key") == confirmed
    ]
    assert told, "the CRM never heard of the confirmed payment"
