"""No compensation failure leaves money stranded: a reversal the ledger refuses for good (the
merchant's account was closed meanwhile) never fails the workflow. The saga still voids
payments.raw and tells the CRM, the payment waits in `requires_attention` (search attribute,
current details, a metric), and an operator resolves it: retry once the cause is fixed, or
settle it by hand against the suspense account. Each path fails the compensation on purpose.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.exceptions import ApplicationError, CancelledError

from activities.kafka import EventPublisher
from checker.report import CheckScope
from checker.runner import run_checks
from domain.events import EventKind, event_id
from domain.ledger import merchant_account
from domain.payment import AttentionResolution, PaymentState, ResolutionRecord, payment_id_for
from infra.embedded.process import free_port
from infra.embedded.stack import Stack
from infra.observability import temporal_runtime
from infra.temporal_client import connect_client
from ledger.store import Ledger
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.fake_crm import FakeCrmServer
from tests.helpers.follow_ups import (
    assert_ledger_balanced,
    captured_payment,
    crm_hooks,
    new_merchant,
    payment_events,
    refund,
    register_row,
)
from tests.helpers.kafka import GatedKafka
from tests.helpers.saga import account_balance, create_payment, payment_body, wait_for_payment
from worker import payment_worker
from workflows import search_attributes as sa


@dataclass
class Rig:
    settings: Settings
    temporal: Client  # connected through a runtime that serves the SDK's metrics
    api: httpx.AsyncClient
    kafka: GatedKafka
    metrics_url: str


@pytest.fixture(scope="module")
async def rig(app_settings: Settings) -> AsyncIterator[Rig]:
    # Regular activities: the test holds payments.confirmed and cancels meanwhile (a local
    # activity's workflow task would only see the cancel after the forward steps).
    port = free_port()
    settings = app_settings.model_copy(
        update={
            "task_queue": f"attention-{uuid.uuid4().hex[:8]}",
            "local_activities": False,
            "temporal_metrics_port": port,
        }
    )
    runtime = temporal_runtime(settings, "paysaga-attention-test")
    assert runtime is not None
    client = await connect_client(settings, runtime=runtime)
    made: list[GatedKafka] = []

    def gated(publisher: EventPublisher, *recording: Any) -> GatedKafka:
        made.append(GatedKafka(publisher, *recording))
        return made[0]

    async with (
        payment_worker(settings, client, kafka_activities=gated),
        api_client(settings, client, TEST_API_KEY) as api,
    ):
        yield Rig(settings, client, api, made[0], f"http://127.0.0.1:{port}/metrics")


def _merchant_account(body: dict[str, Any]) -> str:
    """The merchant's account of the test client's payment (accounts are per API client)."""
    return merchant_account(body["merchant_id"], "USD", "test-client").code


async def _reversal_refused(rig: Rig, engine: AsyncEngine) -> tuple[str, dict[str, Any]]:
    """Canceled by an operator between the capture and its confirmation, after the merchant's
    account was closed: the reversal is refused for good."""
    key = f"attention-{uuid.uuid4().hex}"
    pid = payment_id_for("test-client", key)
    body = payment_body(amount=4200, merchant_id=new_merchant())
    rig.kafka.hold(pid, EventKind.CONFIRMED)
    created = await create_payment(rig.api, body, key=key, wait=0)
    assert created.status_code == 201, created.text
    await rig.kafka.wait_held(pid)
    await Ledger(engine).close_account(_merchant_account(body))
    await rig.temporal.get_workflow_handle(pid).cancel()
    await asyncio.sleep(0.5)  # the cancel lands while the confirmation is held
    rig.kafka.release(pid)
    await wait_for_payment(rig.api, pid, lambda p: p["status"] == "requires_attention")
    return pid, body


async def _state(handle: WorkflowHandle[Any, Any]) -> PaymentState:
    state: PaymentState = await handle.query("state", result_type=PaymentState)
    return state


async def _reopen(engine: AsyncEngine, code: str) -> None:
    """The runbook's fix for a closed account (there is no API for it)."""
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE accounts SET status = 'open' WHERE code = :c"), {"c": code})


async def _canceled(handle: WorkflowHandle[Any, Any]) -> None:
    with pytest.raises(WorkflowFailureError) as ended:
        await asyncio.wait_for(handle.result(), 30)
    assert isinstance(ended.value.cause, CancelledError)


async def test_a_refused_reversal_waits_for_an_operator_who_retries_it(
    rig: Rig,
    engine: AsyncEngine,
    stack: Stack,
    crm_server: FakeCrmServer,
    app_settings: Settings,
) -> None:
    pid, body = await _reversal_refused(rig, engine)
    handle = rig.temporal.get_workflow_handle(pid)
    merchant_account = _merchant_account(body)

    # Waiting for an operator, findable and explained; the workflow did not fail.
    described = await handle.describe()
    assert described.status == WorkflowExecutionStatus.RUNNING
    assert described.typed_search_attributes.get(sa.PAYMENT_STATUS) == "requires_attention"
    state = await _state(handle)
    assert state.attention is not None and state.attention.ends_as == "canceled"
    [failure] = state.attention.failures
    assert failure.step == "reverse the ledger posting"
    assert "AccountClosed" in failure.error and merchant_account in failure.error
    payment = (await rig.api.get(f"/v1/payments/{pid}")).json()
    assert payment["status"] == "requires_attention"
    assert "resolve_attention" in payment["waiting_for"]
    assert "AccountClosed" in payment["waiting_for"]

    # The other compensations ran: payments.raw voided by payments.canceled, the CRM told.
    events = await payment_events(
        stack.kafka_bootstrap_servers,
        pid,
        ["payments.canceled"],
        until=lambda mine: len(mine) >= 1,
    )
    assert [e.id for e in events] == [event_id(pid, EventKind.CANCELED)]
    hooks = await crm_hooks(
        crm_server, pid, lambda hs: any(h.json()["event_kind"] == "canceled" for h in hs)
    )
    assert [h.json()["event_kind"] for h in hooks] == ["canceled"]  # never a confirmation

    # Nothing else is taken meanwhile; the money is still where the capture left it.
    refused = await refund(rig.api, pid, 100, wait=5)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "payment_not_captured"
    assert [r["kind"] for r in await assert_ledger_balanced(engine, pid)] == ["payment"]
    assert await account_balance(engine, merchant_account) == -4200
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(rig.metrics_url)).text
    assert 'paysaga_payments_requiring_attention{ends_as="canceled"' in metrics

    # A retry before the cause is fixed: still refused, counted, still waiting.
    first = await handle.execute_update(
        "resolve_attention",
        AttentionResolution(action="retry", operator="alice", reason="first try"),
        id=f"resolve-{uuid.uuid4().hex[:8]}",
        result_type=ResolutionRecord,
    )
    assert not first.resolved and first.remaining[0].attempts == 2
    assert (await _state(handle)).status == "requires_attention"

    await _reopen(engine, merchant_account)
    second = await handle.execute_update(
        "resolve_attention",
        AttentionResolution(action="retry", operator="alice", reason="account reopened"),
        id=f"resolve-{uuid.uuid4().hex[:8]}",
        result_type=ResolutionRecord,
    )
    assert second.resolved and second.remaining == []
    await _canceled(handle)

    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "payment_reversal"]
    assert await account_balance(engine, merchant_account) == 0
    assert await account_balance(engine, f"customer:{body['customer_id']}:USD") == 0
    register = await register_row(engine, pid)
    assert register is not None
    assert (register["status"], register["captured"]) == ("canceled", 0)
    summary = PaymentState.model_validate(register["summary"])
    assert summary.status == "canceled" and summary.attention is None
    assert [(r.action, r.resolved) for r in summary.resolutions] == [
        ("retry", False),
        ("retry", True),
    ]
    report = await run_checks(
        app_settings,
        scope=CheckScope(payment_ids=frozenset({pid})),
        engine=engine,
        temporal=rig.temporal,
        settle_seconds=10,
    )
    assert report.passed, report.model_dump_json(indent=2)


async def test_a_refused_reversal_settled_by_hand_is_posted_against_suspense(
    rig: Rig, engine: AsyncEngine, app_settings: Settings
) -> None:
    pid, body = await _reversal_refused(rig, engine)
    handle = rig.temporal.get_workflow_handle(pid)
    suspense_before = await account_balance(engine, "suspense:USD")

    # A manual resolution needs a reason (it is kept with the ledger transaction).
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(
            "resolve_attention",
            AttentionResolution(action="manual", operator="bob"),
            id=f"resolve-{uuid.uuid4().hex[:8]}",
        )
    assert isinstance(refused.value.cause, ApplicationError)
    assert refused.value.cause.type == "invalid_follow_up"

    # The operator's signal (the Temporal UI's "Send a Signal") takes the same path.
    await handle.signal(
        "resolve_attention",
        AttentionResolution(action="manual", operator="bob", reason="merchant offboarded; INV-9"),
    )
    await _canceled(handle)

    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "payment_reversal"]
    # The customer is made whole; the merchant keeps its credit; suspense holds the difference.
    assert await account_balance(engine, f"customer:{body['customer_id']}:USD") == 0
    assert await account_balance(engine, _merchant_account(body)) == -4200
    assert await account_balance(engine, "suspense:USD") == suspense_before + 4200
    async with engine.connect() as conn:
        description = await conn.scalar(
            text(
                "SELECT description FROM ledger_transactions "
                "WHERE payment_id = :p AND kind = 'payment_reversal'"
            ),
            {"p": pid},
        )
    assert description == "manual resolution by bob: merchant offboarded; INV-9"
    register = await register_row(engine, pid)
    assert register is not None and (register["status"], register["captured"]) == ("canceled", 0)
    [resolution] = PaymentState.model_validate(register["summary"]).resolutions
    assert (resolution.action, resolution.operator, resolution.resolved) == ("manual", "bob", True)
    report = await run_checks(
        app_settings,
        scope=CheckScope(payment_ids=frozenset({pid})),
        engine=engine,
        temporal=rig.temporal,
        settle_seconds=10,
    )
    assert report.passed, report.model_dump_json(indent=2)


async def test_the_checker_reports_a_payment_waiting_for_an_operator_without_failing(
    rig: Rig, engine: AsyncEngine, app_settings: Settings
) -> None:
    pid, body = await _reversal_refused(rig, engine)
    report = await run_checks(
        app_settings,
        scope=CheckScope(payment_ids=frozenset({pid})),
        engine=engine,
        temporal=rig.temporal,
    )
    assert report.passed, report.model_dump_json(indent=2)
    notes = report.result("workflow-agrees-with-ledger").notes
    assert any("require attention" in note for note in notes), notes
    # Resolve it (two operators at once: one settles it; the other, if it arrived in time,
    # is answered with nothing left), so the module leaves nothing waiting.
    await _reopen(engine, _merchant_account(body))
    handle = rig.temporal.get_workflow_handle(pid)
    await asyncio.gather(
        handle.signal("resolve_attention", AttentionResolution(action="retry", operator="carol")),
        handle.signal("resolve_attention", AttentionResolution(action="retry", operator="dave")),
    )
    await _canceled(handle)
    state = await _state(handle)
    assert len(state.resolutions) in (1, 2) and all(r.resolved for r in state.resolutions)
    assert [r["kind"] for r in await assert_ledger_balanced(engine, pid)] == [
        "payment",
        "payment_reversal",
    ]


async def test_nothing_to_resolve_is_refused_before_it_enters_the_history(
    api: httpx.AsyncClient, temporal_client: Client
) -> None:
    payment = await captured_payment(api, 1000)
    handle = temporal_client.get_workflow_handle(payment["id"])
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(
            "resolve_attention",
            AttentionResolution(action="retry", operator="alice"),
            id="resolve-nothing",
        )
    assert isinstance(refused.value.cause, ApplicationError)
    assert refused.value.cause.type == "nothing_to_resolve"
    history = await handle.fetch_history()
    assert EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED not in {
        e.event_type for e in history.events
    }
