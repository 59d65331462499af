"""`/v1/subscriptions` on the real stack (dev server, the session's worker): creation with its
Idempotency-Key, reading and listing, the changes and their refusals, the renewal payment the
first period makes, and the events the transitions leave."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from typer.testing import CliRunner

from api.app import create_app
from checker.report import CheckScope
from checker.subscriptions import check_renewals_once
from cli.main import app as paysaga
from domain.subscription import renewal_payment_id
from infra.embedded.process import free_port
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.fake_crm import FakeCrmServer
from tests.helpers.follow_ups import crm_hooks, new_merchant
from tests.helpers.saga import wait_for_payment


def subscription_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_id": f"cus_{uuid.uuid4().hex[:10]}",
        "merchant_id": new_merchant(),
        "payment_method": "pm_card_visa_0001",
        "unit_amount": 1500,
        "currency": "EUR",
        "quantity": 2,
        "interval": "month",
        "metadata": {"plan": "team"},
    }
    body.update(overrides)
    return body


async def create(
    api: httpx.AsyncClient, body: dict[str, Any], key: str | None = None
) -> httpx.Response:
    return await api.post(
        "/v1/subscriptions",
        json=body,
        headers={"Idempotency-Key": key or f"sub-{uuid.uuid4().hex}"},
    )


async def wait_for(
    api: httpx.AsyncClient, subscription_id: str, predicate: Any, timeout: float = 30
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    seen: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        response = await api.get(f"/v1/subscriptions/{subscription_id}")
        if response.status_code == 200:
            seen = response.json()
            if predicate(seen):
                return seen
        await asyncio.sleep(0.1)
    raise AssertionError(f"subscription never got there; last seen: {seen}")


async def test_a_subscription_without_trial_charges_its_first_period_once_and_replays_by_key(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    body = subscription_body()
    key = f"sub-{uuid.uuid4().hex}"
    created = await create(api, body, key)
    assert created.status_code == 201, created.text
    subscription = created.json()
    assert subscription["id"].startswith("sub_")
    assert created.headers["Location"] == f"/v1/subscriptions/{subscription['id']}"
    assert subscription["status"] == "active" and subscription["unit_amount"] == 1500

    paid = await wait_for(
        api,
        subscription["id"],
        lambda s: s["current_period"] is not None and s["current_period"]["status"] == "paid",
    )
    period = paid["current_period"]
    assert period["amount"] == 3000 and period["number"] == 0
    assert paid["paid_total"] == 3000 and paid["mrr"] == 3000
    assert paid["next_renewal_at"] is not None
    # The renewal is an ordinary payment, readable through the payments API.
    payment = await wait_for_payment(
        api, period["paid_by"], lambda p: p["status"] == "succeeded" and p["crm_sync"] != "pending"
    )
    assert payment["amount"] == 3000 and payment["currency"] == "EUR"
    assert payment["metadata"]["subscription_id"] == subscription["id"]

    again = await create(api, body, key)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == subscription["id"]
    assert again.json()["paid_total"] == 3000
    reused = await create(api, subscription_body(), key)
    assert reused.status_code == 409 and reused.json()["error"]["code"] == "idempotency_key_reused"

    # The checker holds the period to one capture: it passes, then catches a second capture
    # planted for the same period under its next attempt's id.
    paying = period["paid_by"]
    assert paying == renewal_payment_id(subscription["id"], 0, 0)
    scope = CheckScope(payment_ids=frozenset({paying}))
    honest = await check_renewals_once(engine, scope, 10)
    assert honest.passed and honest.checked == 1
    second = renewal_payment_id(subscription["id"], 0, 1)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO ledger_transactions (id, payment_id, kind, reference, description, "
                "created_at) VALUES (gen_random_uuid(), :p, 'payment', '', 'planted', now())"
            ),
            {"p": second},
        )
    try:
        caught = await check_renewals_once(engine, scope, 10)
    finally:
        async with engine.begin() as conn:  # the ledger is append-only: as test_checker does
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
            await conn.execute(
                text("DELETE FROM ledger_transactions WHERE payment_id = :p"), {"p": second}
            )
    details = [v.detail for v in caught.examples]
    assert not caught.passed and caught.violation_count == 2, details
    assert any("captured by 2 payments" in d for d in details)
    assert any(f"paid by {paying}" in d for d in details)


async def test_changes_are_answered_by_the_workflow_and_refused_when_they_cannot_apply(
    api: httpx.AsyncClient, engine: AsyncEngine, crm_server: FakeCrmServer
) -> None:
    created = await create(api, subscription_body(trial_days=30))
    assert created.status_code == 201, created.text
    sub_id = created.json()["id"]
    assert created.json()["status"] == "trialing" and created.json()["mrr"] == 0

    # Only an active subscription pauses; a trialing one is refused with the workflow's reason.
    refused = await api.post(f"/v1/subscriptions/{sub_id}/pause", json={})
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["code"] == "subscription_not_pausable"
    resumed = await api.post(f"/v1/subscriptions/{sub_id}/resume")
    assert resumed.status_code == 409
    assert resumed.json()["error"]["code"] == "subscription_not_paused"
    empty = await api.post(f"/v1/subscriptions/{sub_id}/price", json={})
    assert empty.status_code == 409 and empty.json()["error"]["code"] == "parameter_missing"

    # During the trial a price change has nothing to prorate.
    changed = await api.post(f"/v1/subscriptions/{sub_id}/price", json={"quantity": 5})
    assert changed.status_code == 200, changed.text
    assert changed.json()["quantity"] == 5 and changed.json()["pending_adjustment"] == 0

    at_end = await api.post(f"/v1/subscriptions/{sub_id}/cancel", json={"at_period_end": True})
    assert at_end.status_code == 200 and at_end.json()["cancel_at_period_end"] is True
    assert at_end.json()["status"] == "trialing"

    now = await api.post(f"/v1/subscriptions/{sub_id}/cancel", json={})
    assert now.status_code == 200, now.text
    assert now.json()["status"] == "canceled" and now.json()["next_renewal_at"] is None
    after = await api.post(f"/v1/subscriptions/{sub_id}/price", json={"unit_amount": 1})
    assert after.status_code == 409
    assert after.json()["error"]["code"] == "subscription_canceled"
    # A canceled subscription is still read (its workflow answers from its history).
    final = await wait_for(api, sub_id, lambda s: s["status"] == "canceled")
    assert final["periods"] == [] and final["paid_total"] == 0

    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT event_type FROM outbox_events WHERE subject = :s "
                "ORDER BY (payload->'data'->>'sequence')::int"
            ),
            {"s": sub_id},
        )
        types = [r[0] for r in rows]
    assert types == [
        "com.paysaga.subscription.created",
        "com.paysaga.subscription.updated",
        "com.paysaga.subscription.updated",
        "com.paysaga.subscription.canceled",
    ]
    events = await api.get("/v1/events", params={"type": "subscription.*", "limit": 100})
    assert events.status_code == 200, events.text
    assert any(e["data"]["subscription_id"] == sub_id for e in events.json()["data"])

    # The CRM heard every transition: status, next renewal date and MRR, one signed webhook each.
    hooks = await crm_hooks(crm_server, sub_id, lambda hs: len(hs) >= 4)
    told = [h.json() for h in hooks]
    assert [t["status"] for t in told] == ["trialing", "trialing", "trialing", "canceled"]
    assert [t["event_kind"] for t in told][-1] == "subscription.canceled"
    assert told[0]["details"]["next_renewal_at"] is not None and told[0]["details"]["mrr"] == 0
    assert told[-1]["details"]["next_renewal_at"] is None
    assert len({t["event_id"] for t in told}) == 4


async def test_a_renewal_that_is_due_but_not_started_is_under_way_for_changes(
    api: httpx.AsyncClient, crm_server: FakeCrmServer
) -> None:
    """Simulation interleavings seed 1 on a loaded box: a subscription without a trial is
    charged at once, but its workflow first sends `subscription.created` (Kafka, then the CRM),
    and changes that came meanwhile were taken as if the first period lay ahead: a cancel at
    the period's end canceled it before its first charge, a pause then a resume skipped the
    first period (active, nothing charged). A renewal whose time has come is under way: the
    pause is refused like one during the charge, the cancel waits for the next boundary. The
    CRM failing for 3 s keeps the first renewal due and not started while the changes arrive."""
    crm_server.fail_for(3.0)
    created = await create(api, subscription_body())
    assert created.status_code == 201, created.text
    sub_id = created.json()["id"]
    waiting = await api.get(f"/v1/subscriptions/{sub_id}")
    assert waiting.status_code == 200 and waiting.json()["status"] == "active"
    assert waiting.json()["periods"] == []  # due, not started: the window the changes meet

    paused = await api.post(f"/v1/subscriptions/{sub_id}/pause", json={})
    assert paused.status_code == 409, paused.text
    assert paused.json()["error"]["code"] == "renewal_in_progress"
    at_end = await api.post(f"/v1/subscriptions/{sub_id}/cancel", json={"at_period_end": True})
    assert at_end.status_code == 200, at_end.text
    assert at_end.json()["cancel_at_period_end"] is True

    paid = await wait_for(
        api,
        sub_id,
        lambda s: s["current_period"] is not None and s["current_period"]["status"] == "paid",
        timeout=60,
    )
    assert paid["status"] == "active" and paid["cancel_at_period_end"] is True
    assert paid["paid_total"] == 3000 and paid["next_renewal_at"] is not None
    assert [p["number"] for p in paid["periods"]] == [0]


async def test_list_filters_by_status_and_customer_and_unknown_ids_are_not_found(
    api: httpx.AsyncClient,
) -> None:
    customer = f"cus_{uuid.uuid4().hex[:10]}"
    one = (await create(api, subscription_body(customer_id=customer, trial_days=7))).json()["id"]
    two = (await create(api, subscription_body(customer_id=customer, trial_days=7))).json()["id"]
    canceled = await api.post(f"/v1/subscriptions/{two}/cancel")
    assert canceled.status_code == 200

    async def listed(**params: Any) -> set[str]:
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            response = await api.get(
                "/v1/subscriptions", params={"customer_id": customer, **params}
            )
            assert response.status_code == 200, response.text
            ids = {item["id"] for item in response.json()["data"]}
            if len(ids) >= 1 or asyncio.get_running_loop().time() > deadline:
                return ids
            await asyncio.sleep(0.2)

    await asyncio.sleep(1)  # visibility lags the upsert a little
    assert await listed(status="trialing") == {one}
    assert await listed(status="canceled") == {two}

    for unknown in ("sub_" + "0" * 24, "nope", "pay_" + "0" * 24):
        missing = await api.get(f"/v1/subscriptions/{unknown}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "resource_missing"
    too_large = await create(
        api, subscription_body(unit_amount=60_000_000, quantity=2, currency="USD")
    )
    assert too_large.status_code == 409 and too_large.json()["error"]["code"] == "amount_too_large"
    bad = await create(api, subscription_body(interval="fortnight"))
    assert bad.status_code == 422


@pytest.fixture(scope="module")
async def served(
    app_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[str]:
    """The app on a real port in this event loop, for the CLI (a separate thread) to call."""
    config = uvicorn.Config(
        create_app(app_settings, temporal_client),
        host="127.0.0.1",
        port=free_port(),
        lifespan="on",
        log_config=None,
        access_log=False,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        await serving


def _cli(api_url: str, *args: str) -> Any:
    """`paysaga --api-url … --api-key … subscriptions …`: the connection options go before the
    command group, one callback for every client command."""
    common = ["--api-url", api_url, "--api-key", TEST_API_KEY]
    return CliRunner().invoke(paysaga, [*common, "subscriptions", *args])


async def test_the_cli_creates_shows_changes_and_cancels_a_subscription(served: str) -> None:
    created = await asyncio.to_thread(
        _cli, served, "create", "990", "GBP", "--interval", "week", "--trial-days", "3",
        "--customer", "cus_cli_1",
    )  # fmt: skip
    assert created.exit_code == 0, created.output
    sub_id = next(w for w in created.output.split() if w.startswith("sub_"))
    assert "trialing" in created.output and "9.90 GBP × 1 every 1 week(s)" in created.output

    priced = await asyncio.to_thread(_cli, served, "price", sub_id, "--quantity", "3")
    assert priced.exit_code == 0, priced.output
    assert "9.90 GBP × 3" in priced.output
    refused = await asyncio.to_thread(_cli, served, "resume", sub_id)
    assert refused.exit_code == 1 and "subscription_not_paused" in refused.output
    canceled = await asyncio.to_thread(_cli, served, "cancel", sub_id)
    assert canceled.exit_code == 0 and "canceled" in canceled.output
    shown = await asyncio.to_thread(_cli, served, "show", sub_id)
    assert shown.exit_code == 0 and "canceled" in shown.output
