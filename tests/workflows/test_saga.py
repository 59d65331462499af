"""The payment saga end to end: REST → workflow → Kafka → ledger → Kafka → CRM."""

from __future__ import annotations

import asyncio
import json

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from activities.crm import verify_webhook
from infra.embedded.stack import Stack
from tests.conftest import WEBHOOK_SECRET
from tests.helpers.fake_crm import FakeCrmServer
from tests.helpers.kafka import consume_events
from tests.helpers.saga import create_payment, ledger_rows, payment_body, wait_for_payment
from workflows import search_attributes as sa


async def test_happy_path_moves_money_once_and_tells_everyone(
    api: httpx.AsyncClient,
    engine: AsyncEngine,
    stack: Stack,
    crm_server: FakeCrmServer,
    temporal_client: Client,
) -> None:
    body = payment_body(amount=4250, currency="EUR")
    created = await create_payment(api, body)
    assert created.status_code == 201, created.text
    payment = created.json()
    pid = payment["id"]
    assert payment["amount"] == 4250 and payment["currency"] == "EUR"

    payment = await wait_for_payment(api, pid, lambda p: p["crm_sync"] == "synced")
    assert payment["status"] == "succeeded"
    assert payment["amount_captured"] == 4250

    # Ledger: one capture transaction, balanced, debit customer / credit merchant.
    rows = await ledger_rows(engine, pid)
    assert [(r["kind"], r["total"], r["entries"]) for r in rows] == [("payment", 0, 2)]

    # Kafka: raw then confirmed, keyed by payment id, CloudEvents headers, deterministic ids.
    events = await asyncio.to_thread(
        consume_events,
        stack.kafka_bootstrap_servers,
        ["payments.raw", "payments.confirmed"],
        until=lambda evs: (
            {e.topic for e in evs if e.key == pid} == {"payments.raw", "payments.confirmed"}
        ),
    )
    mine = [e for e in events if e.key == pid]
    assert {e.topic for e in mine} == {"payments.raw", "payments.confirmed"}
    for event in mine:
        assert event.headers["ce_specversion"] == "1.0"
        assert event.headers["ce_type"].startswith("com.paysaga.payment.")
        assert event.headers["content-type"] == "application/json"
        assert event.body["event_id"] == event.headers["ce_id"]
        assert event.body["schema_version"] == 1
        assert event.body["data"]["amount"] == 4250

    # CRM: a signed webhook for the confirmation that verifies with the shared secret.
    hooks = [r for r in crm_server.requests_for("/hooks/paysaga") if r.json()["payment_id"] == pid]
    assert len(hooks) == 1
    hook = hooks[0]
    assert verify_webhook(WEBHOOK_SECRET, hook.body, hook.header("Paysaga-Signature") or "")
    confirmed = next(e for e in mine if e.topic == "payments.confirmed")
    assert hook.header("Idempotency-Key") == confirmed.id

    # Temporal: search attributes operators filter on.
    described = await temporal_client.get_workflow_handle(pid).describe()
    attrs = described.typed_search_attributes
    assert attrs.get(sa.PAYMENT_STATUS) == "succeeded"
    assert attrs.get(sa.AMOUNT_MINOR) == 4250
    assert attrs.get(sa.CURRENCY) == "EUR"
    assert attrs.get(sa.CRM_SYNC) == "synced"
    assert attrs.get(sa.CUSTOMER_ID) == body["customer_id"]
    assert attrs.get(sa.FRAUD_SCORE) is not None

    # The list endpoint finds it through visibility.
    async def listed() -> list[str]:
        response = await api.get("/v1/payments", params={"customer_id": body["customer_id"]})
        return [item["id"] for item in response.json()["data"]]

    for _ in range(50):
        if pid in await listed():
            break
        await asyncio.sleep(0.1)
    assert await listed() == [pid]
    json.dumps(payment)
