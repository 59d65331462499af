"""The authorization's hold when the workflow task that posted it is lost (issue 15).

A local activity runs inside a workflow task: a worker killed after the hold posting committed
but before the task completed leaves the posting in the ledger and no marker in the history, so
the next attempt runs from the history as if the posting never happened. Whatever that attempt
meets first (an operator's cancel, the API's void, the authorization's expiry), the hold must
be released exactly once and posted once.

The task is lost for real: an interceptor on this module's worker fails the workflow task right
after the chosen payment's hold posting answered (as a dead worker's task times out), and the
server hands the history to a new attempt. The posting itself is the real ledger's; a test
subclass of the ledger activity can hold its answer back after the commit, so that an
operator's cancel reaches the server while the task is still in flight."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowFailureError

from activities.acquirer import HttpAcquirer
from domain.acquirer import AuthorizationState
from domain.ledger import TransactionKind
from domain.payment import payment_id_for
from infra.embedded.stack import Stack
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.follow_ups import assert_ledger_balanced, new_merchant
from tests.helpers.lost_tasks import LoseTheTask, PostingGate, lost_tasks, worker_losing_tasks
from tests.helpers.saga import create_payment, payment_body, wait_for_payment

CLIENT = "test-client"  # TEST_API_KEY's client
SHORT_EXPIRY_SECONDS = 3.0


@dataclass
class Rig:
    api: httpx.AsyncClient
    short_expiry_api: httpx.AsyncClient
    settings: Settings
    temporal: Client
    ledger: PostingGate
    loser: LoseTheTask

    async def acquirer_state(self, payment_id: str) -> AuthorizationState | None:
        acquirer = HttpAcquirer.from_settings(self.settings)
        try:
            record = await acquirer.status(payment_id)
        finally:
            await acquirer.aclose()
        return record.state if record is not None else None


@pytest.fixture(scope="module")
async def rig(stack: Stack, app_settings: Settings, temporal_client: Client) -> AsyncIterator[Rig]:
    at_the_sandbox = stack.service_settings()
    settings = app_settings.model_copy(
        update={
            "task_queue": f"lost-{uuid.uuid4().hex[:8]}",
            "acquirer_url": at_the_sandbox.acquirer_url,
            "acquirer_api_key": at_the_sandbox.acquirer_api_key,
        }
    )
    short = settings.model_copy(update={"authorization_expiry_seconds": SHORT_EXPIRY_SECONDS})
    hold = TransactionKind.AUTHORIZATION_HOLD
    async with (
        worker_losing_tasks(settings, temporal_client, hold) as (gate, loser),
        api_client(settings, temporal_client, TEST_API_KEY) as api,
        api_client(short, temporal_client, TEST_API_KEY) as short_api,
    ):
        yield Rig(api, short_api, settings, temporal_client, gate, loser)


async def _holds(engine: AsyncEngine, payment_id: str) -> tuple[list[str], int]:
    """The payment's postings (each balanced), and what its hold account still holds."""
    rows = await assert_ledger_balanced(engine, payment_id)
    async with engine.connect() as conn:
        held = await conn.scalar(
            text(
                "SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e "
                "JOIN ledger_transactions t ON t.id = e.transaction_id "
                "JOIN accounts a ON a.id = e.account_id "
                "WHERE t.payment_id = :p AND a.type = 'authorization_hold'"
            ),
            {"p": payment_id},
        )
    return [r["kind"] for r in rows], int(held)


async def test_a_hold_posted_in_a_lost_task_is_released_when_an_operator_cancels(
    rig: Rig, engine: AsyncEngine
) -> None:
    """The operator's cancel reaches the next attempt together with the authorization's
    answer: that attempt never posts the hold, yet the ledger holds it. Released once."""
    key = f"key-{uuid.uuid4().hex}"
    payment_id = payment_id_for(CLIENT, key)
    rig.ledger.gate(payment_id)
    rig.loser.payments.add(payment_id)
    body = payment_body(amount=3100, payment_method="pm_card_visa", merchant_id=new_merchant())
    created = await create_payment(rig.api, body, key=key, wait=0)
    assert created.status_code == 201, created.text
    await asyncio.wait_for(rig.ledger.committed[payment_id].wait(), 30)

    handle = rig.temporal.get_workflow_handle(payment_id)
    await handle.cancel()  # recorded while the task that posted the hold is still in flight
    rig.ledger.open(payment_id)
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 60)

    payment = await wait_for_payment(rig.api, payment_id, lambda p: p["status"] == "canceled")
    assert payment["amount_captured"] == 0
    assert await lost_tasks(rig.temporal, payment_id) >= 1
    assert await rig.acquirer_state(payment_id) is AuthorizationState.VOIDED
    assert await _holds(engine, payment_id) == (["authorization_hold", "hold_voided"], 0)
    assert rig.ledger.postings[payment_id] == 1


@pytest.mark.parametrize("end", ["void", "expiry"])
async def test_a_hold_posted_in_a_lost_task_is_posted_once_and_released_once(
    rig: Rig, engine: AsyncEngine, end: str
) -> None:
    """`capture_method: manual`: the next attempt posts the hold again (the ledger answers the
    first posting: one hold), waits for a capture and is voided by the API or expires."""
    key = f"key-{uuid.uuid4().hex}"
    payment_id = payment_id_for(CLIENT, key)
    rig.loser.payments.add(payment_id)
    api = rig.api if end == "void" else rig.short_expiry_api
    body = payment_body(amount=2700, payment_method="pm_card_visa", merchant_id=new_merchant())
    body["capture_method"] = "manual"
    created = await create_payment(api, body, key=key, wait=0)
    assert created.status_code == 201, created.text
    if end == "void":
        await wait_for_payment(api, payment_id, lambda p: p["status"] == "requires_capture")
        voided = await api.post(f"/v1/payments/{payment_id}/void", json={})
        assert voided.status_code == 200 and voided.json()["status"] == "canceled", voided.text

    payment = await wait_for_payment(
        api, payment_id, lambda p: p["status"] == "canceled", timeout=30
    )
    assert (payment["amount_authorized"], payment["amount_captured"]) == (2700, 0)
    assert await lost_tasks(rig.temporal, payment_id) == 1
    assert rig.ledger.postings[payment_id] == 2  # the lost task's, and the next attempt's
    assert await rig.acquirer_state(payment_id) is AuthorizationState.VOIDED
    assert await _holds(engine, payment_id) == (["authorization_hold", "hold_voided"], 0)
