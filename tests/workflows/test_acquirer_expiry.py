"""An uncaptured authorization expires (issue 15): `capture_method: manual`, nobody captures,
and after `authorization_expiry_seconds` (7 days by default) the workflow's durable timer voids
it at the sandbox acquirer and releases the hold in the ledger. On the time-skipping server,
with the real activities, the session's sandbox acquirer, broker and database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError

from activities.acquirer import HttpAcquirer
from domain.acquirer import AuthorizationState
from domain.payment import (
    PaymentRequest,
    PaymentState,
    PaymentStatus,
    PaymentWorkflowInput,
    payment_id_for,
)
from infra.embedded.stack import Stack
from service.start import payment_policy
from settings import Settings
from tests.helpers.follow_ups import assert_ledger_balanced, new_merchant, register_row
from tests.helpers.saga import payment_body
from tests.helpers.time_skipping import time_skipping_server
from worker import payment_worker
from workflows.acquirer_steps import AUTHORIZATION_EXPIRED
from workflows.payment import PaymentWorkflow, initial_search_attributes

CLIENT_ID = "test-client"


@pytest.fixture(scope="module")
async def skipping(stack: Stack, app_settings: Settings) -> AsyncIterator[tuple[Client, Settings]]:
    """The time-skipping server (tests/helpers/time_skipping.py) and a worker of
    regular activities pointed at the session's sandbox acquirer."""
    async with time_skipping_server() as env:
        at_the_sandbox = stack.service_settings()
        settings = app_settings.model_copy(
            update={
                "task_queue": f"expiry-{uuid.uuid4().hex[:8]}",
                "local_activities": False,
                "acquirer_url": at_the_sandbox.acquirer_url,
                "acquirer_api_key": at_the_sandbox.acquirer_api_key,
            }
        )
        async with payment_worker(settings, env.client):
            yield env.client, settings


async def _state_when(handle: WorkflowHandle[Any, Any], done: Any) -> PaymentState:
    deadline = asyncio.get_running_loop().time() + 30
    state: PaymentState | None = None
    while asyncio.get_running_loop().time() < deadline:
        try:
            state = await handle.query("state", result_type=PaymentState)
            if done(state):
                return state
        except RPCError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"never got there; last state: {state}")


async def test_an_uncaptured_authorization_expires_after_7_days_and_is_voided(
    skipping: tuple[Client, Settings], engine: AsyncEngine
) -> None:
    client, settings = skipping
    request = PaymentRequest.model_validate(
        payment_body(
            amount=3300,
            merchant_id=new_merchant(),
            payment_method="pm_card_visa",
            capture_method="manual",
        )
    )
    payment_id = payment_id_for(CLIENT_ID, f"key-{uuid.uuid4().hex}")
    workflow_input = PaymentWorkflowInput(
        payment_id=payment_id,
        client_id=CLIENT_ID,
        request=request,
        fingerprint=request.fingerprint(),
        policy=payment_policy(settings, request),
    )
    assert workflow_input.policy.acquirer
    assert workflow_input.policy.authorization_expiry_seconds == 7 * 86400  # the default
    handle = await client.start_workflow(
        PaymentWorkflow.run,
        workflow_input,
        id=payment_id,
        task_queue=settings.task_queue,
        search_attributes=initial_search_attributes(workflow_input),
    )
    waiting = await _state_when(handle, lambda s: s.status == PaymentStatus.REQUIRES_CAPTURE)
    assert waiting.held == 3300 and waiting.authorization_expires_at is not None

    final = PaymentState.model_validate(await asyncio.wait_for(handle.result(), 120))
    assert final.status == PaymentStatus.CANCELED
    assert final.history[-1].note == AUTHORIZATION_EXPIRED
    assert (final.captured, final.held) == (0, 0)
    described = await handle.describe()
    assert described.close_time is not None
    assert described.close_time - described.start_time >= timedelta(days=7)

    acquirer = HttpAcquirer.from_settings(settings)
    try:
        record = await acquirer.status(payment_id)
    finally:
        await acquirer.aclose()
    assert record is not None
    assert (record.state, record.released_amount) == (AuthorizationState.VOIDED, 3300)
    rows = await assert_ledger_balanced(engine, payment_id)
    assert [r["kind"] for r in rows] == ["authorization_hold", "hold_voided"]
    register = await register_row(engine, payment_id)
    assert register is not None and (register["status"], register["captured"]) == ("canceled", 0)
