"""A follow-up that Temporal refuses for now is asked again, not answered 503.

Temporal bounds the Updates in flight on one workflow (the dev server's
`history.maxInFlightUpdates`, 10): past it, it refuses an Update with RESOURCE_EXHAUSTED, and
once the SDK's own retries gave up, service/follow_ups.ask_payment asks it again with the same
id within the request's patience. Here that happens for sure: the payment's refunds are carried
out one at a time, and the real ledger posting of the first one is held (tests/helpers/ledger.py)
so every refund Update accepted meanwhile stays in flight; two refunds more than the limit are
asked through the real API, all of them in flight together. The Temporal client under the API
records each Update it saw refused; only once one refusal came back through the SDK is the
posting released, so a request that was not asked again has already been answered 503
(`payment_unavailable`: with the retry disabled, this test fails so every time)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import (
    Client,
    OutboundInterceptor,
    StartWorkflowUpdateInput,
    WorkflowUpdateHandle,
)
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.service import RPCError, RPCStatusCode

from domain.payment import payment_id_for
from ledger.store import Ledger
from service.follow_ups import follow_up_id
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.follow_ups import new_merchant, refund, refund_rows_total, register_row
from tests.helpers.ledger import GatedLedger
from tests.helpers.saga import create_payment, payment_body
from worker import payment_worker

CLIENT = "test-client"  # TEST_API_KEY's client
IN_FLIGHT_LIMIT = 10  # the dev server's history.maxInFlightUpdates
CAPTURED = 8_500
REFUND = 800  # 10 fit in what was captured (8,000); the others are refused for their amount
REFUNDS = IN_FLIGHT_LIMIT + 2


class WatchUpdates(ClientInterceptor):
    """The ids of the Updates the API started asking, and the statuses with which Temporal
    refused to start one (after the SDK's own retries)."""

    def __init__(self) -> None:
        self.asked: set[str] = set()
        self.refused: list[RPCStatusCode] = []
        self.first_refusal = asyncio.Event()

    async def wait_asked(self, update_id: str, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while update_id not in self.asked:
                await asyncio.sleep(0.01)

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        recorder = self

        class Outbound(OutboundInterceptor):
            async def start_workflow_update(
                self, input: StartWorkflowUpdateInput
            ) -> WorkflowUpdateHandle[object]:
                if input.update_id is not None:
                    recorder.asked.add(input.update_id)
                try:
                    return await super().start_workflow_update(input)
                except RPCError as exc:
                    recorder.refused.append(exc.status)
                    recorder.first_refusal.set()
                    raise

        return Outbound(next)


@dataclass
class Rig:
    api: httpx.AsyncClient
    ledger: GatedLedger
    updates: WatchUpdates


@pytest.fixture(scope="module")
async def rig(app_settings: Settings, temporal_client: Client) -> AsyncIterator[Rig]:
    settings = app_settings.model_copy(update={"task_queue": f"ask-again-{uuid.uuid4().hex[:8]}"})
    updates = WatchUpdates()
    config = temporal_client.config()
    config["interceptors"] = [*config["interceptors"], updates]
    api_temporal = Client(**config)
    made: list[GatedLedger] = []

    def gated(ledger: Ledger) -> GatedLedger:
        made.append(GatedLedger(ledger))
        return made[0]

    async with (
        payment_worker(settings, temporal_client, ledger_activities=gated),
        api_client(settings, api_temporal, TEST_API_KEY) as api,
    ):
        yield Rig(api, made[0], updates)


async def test_refunds_past_the_in_flight_update_limit_are_asked_again_not_answered_503(
    rig: Rig, engine: AsyncEngine
) -> None:
    key = f"ask-again-{uuid.uuid4().hex}"
    payment_id = payment_id_for(CLIENT, key)
    created = await create_payment(
        rig.api, payment_body(amount=CAPTURED, merchant_id=new_merchant()), key=key
    )
    assert created.status_code == 201 and created.json()["status"] == "succeeded", created.text

    keys = [f"refund-{n}-{uuid.uuid4().hex[:8]}" for n in range(REFUNDS)]
    refund_ids = [follow_up_id("re", payment_id, k) for k in keys]
    for refund_id in refund_ids:  # whichever is carried out first holds the rest behind it
        rig.ledger.hold(payment_id, "refund", refund_id)
    # Each request first reads the payment (a query) and then asks its Update; the next one
    # starts once it asked, so the reads do not pile up on the workflow (a burst of queries can
    # outwait the API's query timeout: a 503 that is not this test's). The Updates still pile
    # up: none is carried out before the posting is released.
    asked: list[asyncio.Future[httpx.Response]] = []
    for refund_key, refund_id in zip(keys, refund_ids, strict=True):
        asked.append(
            asyncio.ensure_future(refund(rig.api, payment_id, REFUND, key=refund_key, wait=30))
        )
        await rig.updates.wait_asked(refund_id)
    # Temporal refused at least one refund and the SDK gave up on it: without asking again,
    # that request is answered 503 before the posting is released.
    await asyncio.wait_for(rig.updates.first_refusal.wait(), 30)
    for refund_id in refund_ids:
        rig.ledger.release(payment_id, "refund", refund_id)
    responses = await asyncio.wait_for(asyncio.gather(*asked), 60)

    assert RPCStatusCode.RESOURCE_EXHAUSTED in rig.updates.refused, rig.updates.refused
    statuses = sorted(r.status_code for r in responses)
    assert 503 not in statuses, [r.text for r in responses if r.status_code == 503]
    succeeded = [r.json() for r in responses if r.status_code == 201]
    assert all(r["status"] == "succeeded" and r["amount"] == REFUND for r in succeeded)
    assert len(succeeded) == CAPTURED // REFUND
    for refused in (r for r in responses if r.status_code != 201):
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "amount_too_large", refused.text

    total = len(succeeded) * REFUND
    assert total <= CAPTURED
    assert await refund_rows_total(engine, payment_id) == total
    register = await register_row(engine, payment_id)
    assert register is not None
    assert (register["captured"], register["refunded"]) == (CAPTURED, total)
