"""API clients are tenants: two clients using the same customer id and merchant id never see
or influence each other — fraud history and scores, ledger accounts and their limits, lists,
gets, refunds and disputes, error messages and events. Real API, worker, Temporal, ledger
and broker; the second client is conftest's OTHER_CLIENT_KEY."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from domain.events import EventKind
from domain.ledger import customer_account, merchant_account
from infra.embedded.stack import Stack
from ledger.store import Ledger
from settings import Settings
from tests.conftest import OTHER_CLIENT_KEY
from tests.helpers.api_client import api_client
from tests.helpers.kafka import ConsumedEvent, consume_events
from tests.helpers.saga import account_balance, create_payment, payment_body, wait_for_payment

A, B = "test-client", "other-client"  # the clients of TEST_API_KEY and OTHER_CLIENT_KEY


@pytest.fixture
async def other_api(
    app_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(app_settings, temporal_client, OTHER_CLIENT_KEY) as client:
        yield client


def shared_ids() -> dict[str, str]:
    """A customer id and a merchant id both clients use: each client chose them on its own."""
    run = uuid.uuid4().hex[:10]
    return {"customer_id": f"cus_shared_{run}", "merchant_id": f"mer_shared_{run}"}


async def pay(api: httpx.AsyncClient, amount: int, **ids: str) -> dict[str, Any]:
    created = await create_payment(api, payment_body(amount=amount, **ids))
    assert created.status_code == 201, created.text
    settled: dict[str, Any] = await wait_for_payment(
        api, created.json()["id"], lambda p: p["status"] not in ("received", "processing")
    )
    return settled


async def listed_ids(api: httpx.AsyncClient, customer_id: str) -> list[str]:
    """The ids the client lists for the customer, once visibility has indexed its payment."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        listed = await api.get("/v1/payments", params={"customer_id": customer_id})
        assert listed.status_code == 200, listed.text
        found = [item["id"] for item in listed.json()["data"]]
        if found or asyncio.get_running_loop().time() > deadline:
            return found
        await asyncio.sleep(0.2)


async def test_fraud_history_and_scores_are_per_client(
    api: httpx.AsyncClient, other_api: httpx.AsyncClient
) -> None:
    ids = shared_ids()
    for _ in range(5):
        assert (await pay(api, 1_000, **ids))["status"] == "succeeded"

    # B's first payment from "the same" customer: B's customer has no history at all.
    theirs = await pay(other_api, 1_000, **ids)
    assert theirs["status"] == "succeeded"
    assert theirs["fraud_reasons"] == ["first payment from this customer"]
    assert theirs["fraud_score"] == pytest.approx(0.20)

    # A's sixth payment sees A's five (velocity) and not B's one: six would be 6.
    mine = await pay(api, 1_000, **ids)
    assert mine["fraud_reasons"] == ["5 payments from this customer in the last hour"]
    assert mine["fraud_score"] == pytest.approx(0.30)

    # B's second: B's history only (one payment), nothing of A's velocity.
    again = await pay(other_api, 1_000, **ids)
    assert again["fraud_reasons"] == [] and again["fraud_score"] == 0.0


async def test_ledger_accounts_and_their_limits_are_per_client(
    api: httpx.AsyncClient, other_api: httpx.AsyncClient, engine: AsyncEngine, stack: Stack
) -> None:
    ids = shared_ids()
    customer, merchant = ids["customer_id"], ids["merchant_id"]
    mine = await pay(api, 3_000, **ids)
    theirs = await pay(other_api, 700, **ids)
    assert (mine["status"], theirs["status"]) == ("succeeded", "succeeded")

    # Two customers and two merchants, each holding its own client's money only.
    codes = {
        client: (
            customer_account(customer, "USD", client).code,
            merchant_account(merchant, "USD", client).code,
        )
        for client in (A, B)
    }
    assert codes[A] == (f"customer:{A}:{customer}:USD", f"merchant:{A}:{merchant}:USD")
    assert [await account_balance(engine, code) for code in codes[A]] == [3_000, -3_000]
    assert [await account_balance(engine, code) for code in codes[B]] == [700, -700]
    assert await account_balance(engine, merchant_account(merchant, "USD").code) == 0

    # A limit on A's merchant (it holds 3,000) stops A's next payment, not B's.
    ledger = Ledger(engine)
    await ledger.set_account_limit(merchant_account(merchant, "USD", A), 3_500)
    try:
        over = await pay(api, 1_000, **ids)
        assert over["status"] == "failed"
        assert "MerchantOverLimit" in (over["failure_reason"] or "")
        within = await pay(other_api, 1_000, **ids)
        assert within["status"] == "succeeded"
    finally:
        await ledger.set_account_limit(merchant_account(merchant, "USD", A), None)
    assert await account_balance(engine, codes[A][1]) == -3_000  # the refused one never posted
    assert await account_balance(engine, codes[B][1]) == -1_700

    # Every event names its tenant, so consumers keep the two merchants apart too.
    wanted = {mine["id"], theirs["id"]}

    def arrived(events: list[ConsumedEvent]) -> bool:
        return wanted <= {e.key for e in events}

    confirmed = await asyncio.to_thread(
        consume_events,
        stack.kafka_bootstrap_servers,
        [EventKind.CONFIRMED.topic],
        until=arrived,
        timeout=30,
    )
    tenant_of = {e.key: e.body["data"]["client_id"] for e in confirmed if e.key in wanted}
    assert tenant_of == {mine["id"]: A, theirs["id"]: B}


async def test_another_clients_payment_does_not_exist_for_you(
    api: httpx.AsyncClient, other_api: httpx.AsyncClient
) -> None:
    ids = shared_ids()
    mine = await pay(api, 2_000, **ids)
    theirs = await pay(other_api, 2_000, **ids)
    never = f"pay_{uuid.uuid4().hex[:24]}"

    # Lists: each client sees its own payment under the shared customer id, only.
    for client, own in ((api, mine), (other_api, theirs)):
        assert await listed_ids(client, ids["customer_id"]) == [own["id"]]

    # Gets and every follow-up on A's payment answer B exactly as for a payment that never
    # existed: same status, same body. Nothing tells B that A's payment is there.
    attempts = {
        "get": ("GET", "", None, {}),
        "refund": ("POST", "/refunds", {"amount": 100}, {"Idempotency-Key": "refund-probe-1"}),
        "dispute": (
            "POST",
            "/disputes",
            {"reason_code": "fraudulent", "network_reference": "NW-probe-1"},
            {},
        ),
        "close": ("POST", f"/disputes/dp_{'0' * 24}/close", {"outcome": "lost"}, {}),
        "cancel": ("POST", "/cancel", None, {}),
    }
    for name, (method, suffix, body, headers) in attempts.items():
        foreign = await other_api.request(
            method, f"/v1/payments/{mine['id']}{suffix}", json=body, headers=headers
        )
        unknown = await other_api.request(
            method, f"/v1/payments/{never}{suffix}", json=body, headers=headers
        )
        assert foreign.status_code == 404, (name, foreign.text)
        assert foreign.json() == unknown.json(), name
        assert foreign.json()["error"]["code"] == "resource_missing"

    # …and none of them touched A's payment.
    after = await wait_for_payment(api, mine["id"], lambda p: True)
    assert (after["status"], after["refunds"], after["disputes"]) == ("succeeded", [], [])
    assert after["amount_refundable"] == 2_000
