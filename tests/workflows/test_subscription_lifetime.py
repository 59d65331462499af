"""A subscription's year on the time-skipping server (issue 17's done-when), with the real
activities, the session's sandbox acquirer, broker and database: a trial, renewals through the
acquirer, a price change prorated onto the next renewal, a declined renewal that recovers on its
dunning retry, and a last renewal that declines on every retry and cancels the subscription.
The money is checked in the ledger, payment by payment, against the subscription's own record.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.api.workflowservice.v1 import DescribeWorkflowExecutionRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from domain.subscription import (
    DunningPolicy,
    PeriodStatus,
    SubscriptionPolicy,
    SubscriptionRequest,
    SubscriptionState,
    SubscriptionStatus,
    SubscriptionWorkflowInput,
    change_adjustment,
    renewal_payment_id,
    subscription_id_for,
)
from infra.embedded import temporal as temporal_server
from infra.embedded.stack import Stack
from service.start import subscription_policy
from settings import Settings
from tests.helpers.follow_ups import assert_ledger_balanced, new_merchant, register_row
from worker import payment_worker
from workflows import search_attributes as sa
from workflows.subscription import SubscriptionWorkflow, initial_subscription_search_attributes

CLIENT_ID = "test-client"
DECLINING = "pm_card_decline_insufficient_funds"
APPROVING = "pm_card_visa"


@pytest.fixture(scope="module")
async def skipping(
    stack: Stack, app_settings: Settings
) -> AsyncIterator[tuple[WorkflowEnvironment, Settings]]:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=temporal_server.test_server_binary(),
        data_converter=pydantic_data_converter,
    )
    async with env:
        await env.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=env.client.namespace,
                search_attributes={
                    key.name: IndexedValueType.ValueType(int(key.indexed_value_type))
                    for key in sa.ALL_KEYS
                },
            )
        )
        at_the_sandbox = stack.service_settings()
        settings = app_settings.model_copy(
            update={
                "task_queue": f"subscriptions-{uuid.uuid4().hex[:8]}",
                "local_activities": False,
                "acquirer_url": at_the_sandbox.acquirer_url,
                "acquirer_api_key": at_the_sandbox.acquirer_api_key,
            }
        )
        async with payment_worker(settings, env.client):
            yield env, settings


def _renewals_outlive_the_test(policy: SubscriptionPolicy) -> SubscriptionPolicy:
    """The renewal payments' dispute window outlasts the test's year. The time-skipping test
    server stalls its clock when an abandoned child completes after the run that started it
    continued as new (found here: the first renewal's 120-day window closes in month 4). On a
    real server a child outliving its parent's run is ordinary (ParentClosePolicy.ABANDON);
    that completion is not exercised by this suite."""
    payment = policy.payment.model_copy(update={"dispute_window_seconds": 500 * 86400.0})
    return policy.model_copy(update={"payment": payment})


async def _state_when(
    handle: WorkflowHandle[Any, Any],
    done: Callable[[SubscriptionState], bool],
    # Generous: on a loaded 2-core machine a renewal's activities may take their time.
    timeout: float = 120,
) -> SubscriptionState:
    deadline = asyncio.get_running_loop().time() + timeout
    state: SubscriptionState | None = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            state = await handle.query("state", result_type=SubscriptionState)
            if done(state):
                return state
        except RPCError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"never got there; last state: {state}")


def _due(state: SubscriptionState) -> datetime:
    assert state.next_renewal_at is not None
    return state.next_renewal_at


def _period(state: SubscriptionState, number: int) -> Any:
    return next((p for p in state.periods if p.number == number), None)


async def _described(client: Client, workflow_id: str) -> tuple[str, dict[str, Any]]:
    """The current run's id and its search attributes as stored. Raw: the time-skipping server
    answers an unset datetime attribute in a form the SDK's describe() cannot decode."""
    described = await client.workflow_service.describe_workflow_execution(
        DescribeWorkflowExecutionRequest(
            namespace=client.namespace, execution=WorkflowExecution(workflow_id=workflow_id)
        )
    )
    info = described.workflow_execution_info
    fields = info.search_attributes.indexed_fields
    return info.execution.run_id, {
        name: json.loads(payload.data) if payload.data else None for name, payload in fields.items()
    }


def _tried(number: int, attempts: int) -> Callable[[SubscriptionState], bool]:
    """Period `number` has `attempts` settled attempts, or the subscription ended."""

    def done(state: SubscriptionState) -> bool:
        period = _period(state, number)
        settled = sum(a.status != "pending" for a in period.attempts) if period else 0
        return state.status.ended or settled >= attempts

    return done


def _settled(number: int) -> Callable[[SubscriptionState], bool]:
    def done(state: SubscriptionState) -> bool:
        period = _period(state, number)
        return period is not None and period.status != PeriodStatus.PENDING

    return done


async def _skip_to(env: WorkflowEnvironment, when: datetime) -> None:
    now = await env.get_current_time()
    if when > now:
        await env.sleep(when - now)


async def _captured(engine: AsyncEngine, payment_id: str) -> int:
    """What the ledger says the payment captured (its register row, which the ledger's capture
    posting writes), with every transaction of it balanced."""
    await assert_ledger_balanced(engine, payment_id)
    row = await register_row(engine, payment_id)
    return int(row["captured"]) if row is not None else 0


async def _subscription_events(engine: AsyncEngine, subscription_id: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT event_type, payload FROM outbox_events WHERE subject = :s "
                "ORDER BY (payload->'data'->>'sequence')::int"
            ),
            {"s": subscription_id},
        )
        return [dict(r._mapping) for r in rows]


async def _change(handle: WorkflowHandle[Any, Any], change: dict[str, Any]) -> None:
    # The time-skipping server's Updates are unreliable (sdk-java#1903): operators' signal.
    await handle.signal("change_requested", change)


async def test_a_year_of_a_monthly_subscription_with_trial_price_change_dunning_and_cancel(
    skipping: tuple[WorkflowEnvironment, Settings], engine: AsyncEngine
) -> None:
    env, settings = skipping
    client: Client = env.client
    request = SubscriptionRequest.model_validate(
        {
            "customer_id": f"cus_{uuid.uuid4().hex[:10]}",
            "merchant_id": new_merchant(),
            "payment_method": APPROVING,
            "unit_amount": 1000,
            "currency": "USD",
            "interval": "month",
            "trial_days": 14,
        }
    )
    subscription_id = subscription_id_for(CLIENT_ID, f"key-{uuid.uuid4().hex}")
    policy = subscription_policy(settings, request).model_copy(
        update={
            "dunning": DunningPolicy(when_exhausted="canceled"),  # 1, 3, 5 and 7 days
            # Several runs in a year: the state crosses continue-as-new.
            "continue_as_new_after_periods": 4,
        }
    )
    policy = _renewals_outlive_the_test(policy)
    assert policy.payment.acquirer
    workflow_input = SubscriptionWorkflowInput(
        subscription_id=subscription_id,
        client_id=CLIENT_ID,
        request=request,
        fingerprint=request.fingerprint(),
        policy=policy,
    )
    started = await client.start_workflow(
        SubscriptionWorkflow.run,
        workflow_input,
        id=subscription_id,
        task_queue=settings.task_queue,
        search_attributes=initial_subscription_search_attributes(workflow_input),
    )
    # Without a run id: queries, signals and the result follow the runs continue-as-new makes.
    handle = client.get_workflow_handle(subscription_id)

    state = await _state_when(handle, lambda s: s.next_renewal_at is not None)
    assert state.status == SubscriptionStatus.TRIALING and state.periods == []
    assert state.next_renewal_at == state.created_at + timedelta(days=14) == state.trial_end
    assert state.billing_anchor == state.trial_end.date()

    async def renew(number: int) -> SubscriptionState:
        current = await handle.query("state", result_type=SubscriptionState)
        assert current.next_period == number
        await _skip_to(env, _due(current) + timedelta(minutes=1))
        return await _state_when(handle, _settled(number))

    # Period 0 at the trial's end: in full (the anchor is the trial's end date); then period 1.
    for number in (0, 1):
        state = await renew(number)
        assert _period(state, number).status == PeriodStatus.PAID
        assert _period(state, number).amount == 1000
    assert state.status == SubscriptionStatus.ACTIVE and state.mrr == 1000

    # Mid period 1: the price doubles. The new price's part of the days left minus the old's.
    period_1 = _period(state, 1)
    await _skip_to(env, _due(state) - timedelta(days=12))
    await _change(handle, {"kind": "price", "unit_amount": 2000})
    state = await _state_when(handle, lambda s: s.unit_amount == 2000)
    change_day = state.updated_at.date()
    proration = change_adjustment(1000, 2000, change_day, period_1.start, period_1.end)
    assert 0 < proration < 1000
    assert state.adjustment == proration and state.mrr == 2000

    state = await renew(2)
    assert _period(state, 2).amount == 2000 + proration
    assert _period(state, 2).status == PeriodStatus.PAID and state.adjustment == 0

    # Period 3 declines, the customer replaces the card, the first dunning retry (a day later)
    # is paid by a second payment: one captured payment for the period, the first one nothing.
    await _change(handle, {"kind": "payment_method", "payment_method": DECLINING})
    await _state_when(handle, lambda s: s.payment_method == DECLINING)
    current = await handle.query("state", result_type=SubscriptionState)
    await _skip_to(env, _due(current) + timedelta(minutes=1))
    state = await _state_when(handle, lambda s: s.status == SubscriptionStatus.PAST_DUE)
    declined = _period(state, 3).attempts[0]
    assert declined.status == "declined" and declined.decline_code == "insufficient_funds"
    # While past due, NextRenewalAt stays at the unpaid period's due time: the runbook's
    # "past_due for more than N days" is `SubscriptionStatus="past_due" AND NextRenewalAt < …`.
    _, attributes = await _described(client, subscription_id)
    assert attributes["SubscriptionStatus"] == "past_due"
    assert datetime.fromisoformat(attributes["NextRenewalAt"]) == state.next_renewal_at
    assert state.next_renewal_at == _due(current)
    await _change(handle, {"kind": "payment_method", "payment_method": APPROVING})
    await _state_when(handle, lambda s: s.payment_method == APPROVING)
    await _skip_to(env, declined.at + timedelta(days=1, minutes=1))
    state = await _state_when(handle, _settled(3))
    period_3 = _period(state, 3)
    assert period_3.status == PeriodStatus.PAID and state.status == SubscriptionStatus.ACTIVE
    assert [a.payment_id for a in period_3.attempts] == [
        renewal_payment_id(subscription_id, 3, 0),
        renewal_payment_id(subscription_id, 3, 1),
    ]
    assert period_3.paid_by == renewal_payment_id(subscription_id, 3, 1)

    for number in range(4, 11):
        state = await renew(number)
        assert _period(state, number).status == PeriodStatus.PAID
        assert _period(state, number).amount == 2000

    # Period 11: every retry declines (1, 3, 5 and 7 days after the first attempt): canceled.
    await _change(handle, {"kind": "payment_method", "payment_method": DECLINING})
    await _state_when(handle, lambda s: s.payment_method == DECLINING)
    current = await handle.query("state", result_type=SubscriptionState)
    await _skip_to(env, _due(current) + timedelta(minutes=1))
    state = await _state_when(handle, lambda s: s.status == SubscriptionStatus.PAST_DUE)
    first_try = _period(state, 11).attempts[0].at
    for attempts, days in enumerate((1, 3, 5, 7), start=2):
        await _skip_to(env, first_try + timedelta(days=days, minutes=1))
        await _state_when(handle, _tried(11, attempts))
    # The test server answers a run-less wait for the result with no completion event: the
    # current run's.
    last_run, _ = await _described(client, subscription_id)
    running = client.get_workflow_handle(subscription_id, run_id=last_run)
    final = SubscriptionState.model_validate(await asyncio.wait_for(running.result(), 120))
    assert final.status == SubscriptionStatus.CANCELED and final.mrr == 0
    assert final.next_renewal_at is None
    period_11 = _period(final, 11)
    assert period_11.status == PeriodStatus.UNPAID and period_11.paid_by is None
    assert [a.status for a in period_11.attempts] == ["declined"] * 5
    tried = [a.at - period_11.attempts[0].at for a in period_11.attempts[1:]]
    assert [t >= timedelta(days=d) for t, d in zip(tried, (1, 3, 5, 7), strict=True)] == [True] * 4
    # The year ran over several runs (continue-as-new), the state carried across them.
    run_id, attributes = await _described(client, subscription_id)
    assert run_id != started.result_run_id
    assert attributes["SubscriptionStatus"] == "canceled"
    assert attributes.get("NextRenewalAt") in (None, [])  # unset

    # The money, in the ledger: each paid period captured its amount by exactly one payment;
    # every declined attempt captured nothing; the total is what the subscription says.
    expected = 1000 + 1000 + (2000 + proration) + 2000 * 8
    paid = [p for p in final.periods if p.status == PeriodStatus.PAID]
    assert [p.number for p in paid] == list(range(11))
    total = 0
    for period in final.periods:
        for attempt in period.attempts:
            captured = await _captured(engine, attempt.payment_id)
            if attempt.payment_id == period.paid_by:
                assert captured == period.amount
                total += captured
            else:
                assert captured == 0, (period.number, attempt)
    assert total == final.paid_total == expected

    # Every transition is an event in the events store (which Kafka, /v1/events and webhooks
    # are fed from), numbered in order.
    events = await _subscription_events(engine, subscription_id)
    types = [e["event_type"] for e in events]
    assert types[0] == "com.paysaga.subscription.created"
    assert types.count("com.paysaga.subscription.renewed") == 11
    assert types.count("com.paysaga.subscription.past_due") == 2
    assert types[-1] == "com.paysaga.subscription.canceled"
    sequences = [e["payload"]["data"]["sequence"] for e in events]
    assert sequences == list(range(1, len(events) + 1))


async def test_a_pause_skips_boundaries_and_exhausted_dunning_can_keep_it_unpaid(
    skipping: tuple[WorkflowEnvironment, Settings], engine: AsyncEngine
) -> None:
    env, settings = skipping
    client: Client = env.client
    request = SubscriptionRequest.model_validate(
        {
            "customer_id": f"cus_{uuid.uuid4().hex[:10]}",
            "merchant_id": new_merchant(),
            "payment_method": APPROVING,
            "unit_amount": 700,
            "currency": "EUR",
            "interval": "week",
        }
    )
    subscription_id = subscription_id_for(CLIENT_ID, f"key-{uuid.uuid4().hex}")
    policy = subscription_policy(settings, request).model_copy(
        update={"dunning": DunningPolicy(retry_after_seconds=[3600.0], when_exhausted="unpaid")}
    )
    policy = _renewals_outlive_the_test(policy)
    workflow_input = SubscriptionWorkflowInput(
        subscription_id=subscription_id,
        client_id=CLIENT_ID,
        request=request,
        fingerprint=request.fingerprint(),
        policy=policy,
    )
    await client.start_workflow(
        SubscriptionWorkflow.run,
        workflow_input,
        id=subscription_id,
        task_queue=settings.task_queue,
        search_attributes=initial_subscription_search_attributes(workflow_input),
    )
    handle = client.get_workflow_handle(subscription_id)

    # No trial: period 0 is charged at once, in full.
    state = await _state_when(handle, _settled(0))
    assert _period(state, 0).status == PeriodStatus.PAID and _period(state, 0).amount == 700
    due_1 = _due(state)

    await _change(handle, {"kind": "pause"})
    state = await _state_when(handle, lambda s: s.status == SubscriptionStatus.PAUSED)
    assert state.next_renewal_at is None and state.mrr == 0
    _, attributes = await _described(client, subscription_id)
    assert attributes.get("NextRenewalAt") in (None, [])  # unset while paused
    assert attributes["SubscriptionStatus"] == "paused"

    # Three weekly boundaries pass while paused: none is charged.
    await _skip_to(env, due_1 + timedelta(weeks=2, days=3))
    state = await handle.query("state", result_type=SubscriptionState)
    assert [p.number for p in state.periods] == [0]

    await _change(handle, {"kind": "resume"})
    state = await _state_when(handle, lambda s: s.status == SubscriptionStatus.ACTIVE)
    assert state.next_period == 4  # periods 1, 2 and 3 were skipped
    assert _due(state) == due_1 + timedelta(weeks=3)  # the anchor's calendar is kept

    # Period 4 declines, so does its one retry an hour later: kept unpaid, not renewed.
    await _change(handle, {"kind": "payment_method", "payment_method": DECLINING})
    await _state_when(handle, lambda s: s.payment_method == DECLINING)
    await _skip_to(env, _due(state) + timedelta(minutes=1))
    await _state_when(handle, lambda s: s.status == SubscriptionStatus.PAST_DUE)
    await _skip_to(env, _due(state) + timedelta(hours=1, minutes=1))
    state = await _state_when(handle, lambda s: s.status == SubscriptionStatus.UNPAID)
    assert _period(state, 4).status == PeriodStatus.UNPAID
    assert [a.status for a in _period(state, 4).attempts] == ["declined", "declined"]
    assert state.next_renewal_at is None and state.mrr == 0
    # Unpaid: two weeks later nothing more was tried.
    await _skip_to(env, due_1 + timedelta(weeks=6))
    later = await handle.query("state", result_type=SubscriptionState)
    assert [p.number for p in later.periods] == [0, 4]

    await _change(handle, {"kind": "cancel"})
    last_run, _ = await _described(client, subscription_id)
    running = client.get_workflow_handle(subscription_id, run_id=last_run)
    final = SubscriptionState.model_validate(await asyncio.wait_for(running.result(), 120))
    assert final.status == SubscriptionStatus.CANCELED
    assert final.paid_total == 700 == await _captured(engine, _period(final, 0).paid_by)
    for attempt in _period(final, 4).attempts:
        assert await _captured(engine, attempt.payment_id) == 0
    types = [
        e["event_type"].rsplit(".", 1)[-1]
        for e in await _subscription_events(engine, subscription_id)
    ]
    assert types == [
        "created",
        "renewed",
        "paused",
        "resumed",
        "updated",
        "past_due",
        "unpaid",
        "canceled",
    ]
