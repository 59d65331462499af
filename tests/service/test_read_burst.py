"""A burst of reads of one payment is answered while its workflow task is held open.

A GET of a running payment asks its workflow a query. While a local activity runs (here the
capture's ledger posting, held by the test longer than the API's 10 s query timeout), the
workflow task stays open and Temporal holds the queries for the next one; the worker's task
heartbeat (at 80 % of the 10 s task timeout) completes the open task, and every held query is
answered by the next. Stop 22 saw 503s from a burst of reads while refund Updates piled up on one
payment; this pins down that reads alone, during the longest local step, are all answered."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from temporalio.client import Client

from domain.payment import payment_id_for
from ledger.store import Ledger
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.follow_ups import new_merchant
from tests.helpers.ledger import GatedLedger
from tests.helpers.saga import create_payment, payment_body
from worker import payment_worker

CLIENT = "test-client"  # TEST_API_KEY's client
READERS = 25
HELD_SECONDS = 12.0  # the refund's posting stays held this long while the reads arrive


@dataclass
class Rig:
    api: httpx.AsyncClient
    ledger: GatedLedger


@pytest.fixture(scope="module")
async def rig(app_settings: Settings, temporal_client: Client) -> AsyncIterator[Rig]:
    settings = app_settings.model_copy(update={"task_queue": f"burst-{uuid.uuid4().hex[:8]}"})
    made: list[GatedLedger] = []

    def gated(ledger: Ledger) -> GatedLedger:
        made.append(GatedLedger(ledger))
        return made[0]

    async with (
        payment_worker(settings, temporal_client, ledger_activities=gated),
        api_client(settings, temporal_client, TEST_API_KEY) as api,
    ):
        try:
            yield Rig(api, made[0])
        finally:
            made[0].release_all()


async def test_a_burst_of_reads_while_the_workflow_task_is_held_is_answered_not_503(
    rig: Rig,
) -> None:
    key = f"burst-{uuid.uuid4().hex}"
    payment_id = payment_id_for(CLIENT, key)
    rig.ledger.hold(payment_id, "payment")  # the capture posting: a local activity
    body = payment_body(amount=5_000, merchant_id=new_merchant())
    creating = asyncio.ensure_future(create_payment(rig.api, body, key=key, wait=0))
    await rig.ledger.wait_held(payment_id, "payment")

    reads = [
        asyncio.ensure_future(rig.api.get(f"/v1/payments/{payment_id}")) for _ in range(READERS)
    ]
    await asyncio.sleep(HELD_SECONDS)
    rig.ledger.release(payment_id, "payment")
    answers = await asyncio.wait_for(asyncio.gather(*reads), 60)
    created = await asyncio.wait_for(creating, 60)

    assert created.status_code in (201, 202), created.text
    assert [a.status_code for a in answers] == [200] * READERS, [
        a.text for a in answers if a.status_code != 200
    ]
    assert {a.json()["id"] for a in answers} == {payment_id}
