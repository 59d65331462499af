"""A capture posted in a workflow task that is then lost, and a cancel that meets the next attempt.

A plain payment's forward path (its fraud score, payments.raw, the capture posting) is local
activities, and they can all run in one workflow task: a worker killed after the capture posting
committed but before the task completed leaves the posting in the ledger and no marker in the
history. The next attempt runs from the history as if nothing had been posted; a cancel that
reached the server meanwhile (the API's cancel Update, an operator's cancel) is taken in its
first activation, before the score, and the payment ended `canceled` without asking the ledger:
the customer's money stayed captured with no reversal (the faults simulation, seed 1:
"workflow closed (completed) says canceled; the ledger (captured 44895, 1 posting(s),
0 reversal(s)) implies succeeded"). PATCH_END_ASKS_THE_LEDGER: a payment that ends without
capture reverses whatever capture the ledger holds for it.

The task is lost for real: an interceptor on this module's worker fails the workflow task right
after the chosen payment's capture posting answered (as a dead worker's task times out), and
the server hands the history to a new attempt. The posting is the real ledger's; it holds its
answer back after the commit until the cancel has reached the server."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowFailureError

from domain.ledger import TransactionKind
from domain.payment import CancelSignal, PaymentStatus, payment_id_for
from infra.embedded.stack import Stack
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.follow_ups import assert_ledger_balanced, new_merchant, register_row
from tests.helpers.lost_tasks import LoseTheTask, PostingGate, lost_tasks, worker_losing_tasks
from tests.helpers.saga import create_payment, payment_body, wait_for_payment
from workflows.payment import PaymentWorkflow

CLIENT = "test-client"  # TEST_API_KEY's client


@dataclass
class Rig:
    api: httpx.AsyncClient
    temporal: Client
    ledger: PostingGate
    loser: LoseTheTask


@pytest.fixture(scope="module")
async def rig(stack: Stack, app_settings: Settings, temporal_client: Client) -> AsyncIterator[Rig]:
    settings = app_settings.model_copy(
        update={"task_queue": f"lost-capture-{uuid.uuid4().hex[:8]}", "acquirer_url": None}
    )
    async with (
        worker_losing_tasks(settings, temporal_client, TransactionKind.PAYMENT) as (gate, loser),
        api_client(settings, temporal_client, TEST_API_KEY) as api,
    ):
        yield Rig(api, temporal_client, gate, loser)


@pytest.mark.parametrize("cancel", ["api", "operator"])
async def test_a_capture_posted_in_a_lost_task_is_reversed_when_a_cancel_meets_the_next_attempt(
    rig: Rig, engine: AsyncEngine, cancel: str
) -> None:
    key = f"key-{uuid.uuid4().hex}"
    payment_id = payment_id_for(CLIENT, key)
    rig.ledger.gate(payment_id)
    rig.loser.payments.add(payment_id)
    body = payment_body(amount=4489, merchant_id=new_merchant())
    created = await create_payment(rig.api, body, key=key, wait=0)
    assert created.status_code == 201, created.text
    await asyncio.wait_for(rig.ledger.committed[payment_id].wait(), 30)

    handle = rig.temporal.get_workflow_handle(payment_id)
    canceling: asyncio.Future[Any]
    if cancel == "api":
        # The API's cancel Update (the API asks it after a query, which waits for the task in
        # flight: sent here directly) reaches the server while the task that posted the
        # capture is in flight; the next attempt takes it in its first activation.
        canceling = asyncio.ensure_future(
            handle.execute_update(
                PaymentWorkflow.cancel_payment,
                CancelSignal(reason="requested_by_customer"),
                id=f"cancel-{payment_id}",
            )
        )
        await asyncio.sleep(1.0)
    else:
        await handle.cancel()  # recorded while that task is still in flight
    rig.ledger.open(payment_id)

    if cancel == "api":
        answer = await asyncio.wait_for(canceling, 60)
        assert answer.status == PaymentStatus.CANCELED
        await asyncio.wait_for(handle.result(), 60)
    else:
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(handle.result(), 60)

    payment = await wait_for_payment(rig.api, payment_id, lambda p: p["status"] == "canceled")
    assert payment["amount_captured"] == 0
    assert await lost_tasks(rig.temporal, payment_id) >= 1
    assert rig.ledger.postings[payment_id] == 1  # the lost task's; the next attempt never posted
    rows = await assert_ledger_balanced(engine, payment_id)
    assert sorted({r["kind"] for r in rows}) == ["payment", "payment_reversal"]
    register = await register_row(engine, payment_id)
    assert register is not None
    assert (register["captured"], register["status"]) == (0, "canceled")
