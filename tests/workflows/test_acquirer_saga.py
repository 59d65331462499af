"""The saga through the acquirer (issue 15): the session's sandbox acquirer, started by the same
`Stack` as `make run`, behind a worker and an API of this module's own whose settings point at
it (the shared worker books payments without an acquirer, as before).

Each path is driven by a test payment method of the sandbox (docs/acquirer.md) and checked
where it matters: the payment, the sandbox's own record of our reference (its request log says
how many times each instruction really ran), the ledger, the events and the CRM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from activities.acquirer import HttpAcquirer
from api.app import create_app
from checker.report import HOLDS_RELEASED, CheckScope
from checker.runner import run_checks
from domain.acquirer import (
    AcquirerAuthorization,
    AuthorizationRequest,
    AuthorizationState,
    acquirer_refund_reference,
)
from domain.events import EventKind, event_id
from domain.ledger import merchant_account
from domain.payment import AttentionResolution, FollowUpStatus, PaymentState, ResolutionRecord
from infra.embedded.process import free_port
from infra.embedded.stack import Stack
from ledger.store import Ledger
from settings import Settings
from tests.conftest import ACQUIRER_HANG_SECONDS, TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.fake_crm import FakeCrmServer
from tests.helpers.follow_ups import (
    assert_ledger_balanced,
    crm_hooks,
    new_merchant,
    payment_events,
    refund,
    refund_rows_total,
)
from tests.helpers.saga import (
    account_balance,
    create_payment,
    ledger_rows,
    payment_body,
    wait_for_payment,
)
from worker import payment_worker
from workflows import search_attributes as sa

# The worker gives up on an answer well before pm_card_timeout's held one comes back.
IMPATIENT_SECONDS = 1.0
RESOLVE_SECONDS = 60.0
# Every payment this module made through the sandbox, for the checker's verdict at the end.
PAID: list[str] = []


@dataclass
class AcquirerRig:
    api: httpx.AsyncClient
    settings: Settings
    temporal: Client

    def connector(self) -> HttpAcquirer:
        return HttpAcquirer.from_settings(self.settings)

    async def record(self, reference: str) -> AcquirerAuthorization:
        acquirer = self.connector()
        try:
            record = await acquirer.status(reference)
        finally:
            await acquirer.aclose()
        assert record is not None, f"the acquirer has no record of {reference}"
        return record

    async def operations(self, reference: str) -> list[dict[str, Any]]:
        """The sandbox's request log for `reference`, oldest first."""
        async with httpx.AsyncClient() as http:
            answer = await http.get(
                f"{self.settings.acquirer_url}/v1/operations",
                params={"reference": reference},
                headers={
                    "Authorization": f"Bearer {self.settings.acquirer_api_key.get_secret_value()}"
                },
            )
        assert answer.status_code == 200, answer.text
        return list(reversed(answer.json()["data"]))


def acquirer_settings(stack: Stack, app_settings: Settings, **overrides: Any) -> Settings:
    at_the_sandbox = stack.service_settings()
    return app_settings.model_copy(
        update={
            "task_queue": f"acquirer-{uuid.uuid4().hex[:8]}",
            "acquirer_url": at_the_sandbox.acquirer_url,
            "acquirer_api_key": at_the_sandbox.acquirer_api_key,
            "acquirer_timeout_seconds": IMPATIENT_SECONDS,
            "acquirer_resolve_seconds": RESOLVE_SECONDS,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
async def rig(
    stack: Stack, app_settings: Settings, temporal_client: Client
) -> AsyncIterator[AcquirerRig]:
    settings = acquirer_settings(stack, app_settings)
    async with (
        payment_worker(settings, temporal_client),
        api_client(settings, temporal_client, TEST_API_KEY) as api,
    ):
        yield AcquirerRig(api=api, settings=settings, temporal=temporal_client)


def _performed(operations: list[dict[str, Any]], operation: str) -> list[dict[str, Any]]:
    """Instructions that changed something: answered 200 and were not replays."""
    return [
        o
        for o in operations
        if o["operation"] == operation
        and o["http_status"] == 200
        and not o["result"].startswith("replayed")
    ]


async def _pay(rig: AcquirerRig, payment_method: str, amount: int = 5000, **overrides: Any) -> str:
    body = payment_body(amount=amount, payment_method=payment_method, merchant_id=new_merchant())
    body.update(overrides)
    created = await create_payment(rig.api, body, wait=0)
    assert created.status_code == 201, created.text
    payment_id: str = created.json()["id"]
    PAID.append(payment_id)
    return payment_id


async def _settled(rig: AcquirerRig, payment_id: str, timeout: float = 40) -> dict[str, Any]:
    return await wait_for_payment(
        rig.api,
        payment_id,
        lambda p: p["status"] not in ("received", "processing") and p["crm_sync"] != "pending",
        timeout=timeout,
    )


async def _activities_scheduled(temporal_client: Client, payment_id: str) -> list[str]:
    """Every activity attempt the workflow made: regular ones scheduled, and local ones (the
    forward path's first attempts, workflows/local_first.py) by their markers."""
    history = await temporal_client.get_workflow_handle(payment_id).fetch_history()
    attempts = []
    for e in history.events:
        if e.HasField("activity_task_scheduled_event_attributes"):
            attempts.append(e.activity_task_scheduled_event_attributes.activity_type.name)
        elif e.HasField("marker_recorded_event_attributes"):
            marker = e.marker_recorded_event_attributes
            if marker.marker_name == "core_local_activity":
                data = json.loads(marker.details["data"].payloads[0].data)
                attempts.append(data["activity_type"])
    return attempts


async def _captured_once(
    rig: AcquirerRig, engine: AsyncEngine, payment_id: str, amount: int
) -> None:
    """The acquirer captured `amount` exactly once, after one authorization, and the ledger
    posted that amount once."""
    record = await rig.record(payment_id)
    assert record.state is AuthorizationState.CAPTURED
    assert record.captured_amount == amount
    operations = await rig.operations(payment_id)
    assert len(_performed(operations, "authorize")) == 1
    assert len(_performed(operations, "capture")) == 1
    await _ledger_holds_nothing(
        engine, payment_id, ["authorization_hold", "hold_captured", "payment"]
    )


async def _ledger_holds_nothing(engine: AsyncEngine, payment_id: str, kinds: list[str]) -> None:
    """The payment's postings, each balanced, in this order, and nothing left on hold."""
    rows = await assert_ledger_balanced(engine, payment_id)
    assert [r["kind"] for r in rows] == kinds
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
    assert held == 0


async def _event_types(rig: AcquirerRig, payment_id: str) -> list[str]:
    """The payment's events as the events API shows them, oldest first."""
    answer = await rig.api.get("/v1/events", params={"payment_id": payment_id, "limit": 100})
    assert answer.status_code == 200, answer.text
    return [e["type"] for e in reversed(answer.json()["data"])]


async def test_the_stack_starts_the_sandbox_acquirer_and_points_the_services_at_it(
    stack: Stack,
) -> None:
    settings = stack.service_settings()
    assert stack.acquirer_sandbox_url is not None
    assert settings.acquirer_url == stack.acquirer_sandbox_url
    key = settings.acquirer_api_key.get_secret_value()
    # A key of its own, kept under the home, never the documented public test key.
    assert key.startswith("sk_test_") and key != "sk_test_paysaga_sandbox"
    assert stack.service_env()["PAYSAGA_ACQUIRER_URL"] == stack.acquirer_sandbox_url
    async with httpx.AsyncClient() as http:
        health = await http.get(f"{stack.acquirer_sandbox_url}/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
    # The key the services got is the one the sandbox accepts, and only it.
    acquirer = HttpAcquirer.from_settings(settings)
    reference = f"pay_{uuid.uuid4().hex[:24]}"
    try:
        result = await acquirer.authorize(
            AuthorizationRequest(
                reference=reference, amount=1234, currency="USD", payment_method="pm_card_visa"
            )
        )
        assert result.approved and result.authorized_amount == 1234
        record = await acquirer.status(reference)
        assert record is not None and record.state is AuthorizationState.AUTHORIZED
    finally:
        await acquirer.aclose()
    stranger = HttpAcquirer(settings.acquirer_url or "", SecretStr("sk_test_paysaga_sandbox"))
    try:
        with pytest.raises(Exception, match="401"):
            await stranger.status(reference)
    finally:
        await stranger.aclose()


async def test_an_approved_payment_is_authorized_then_captured_at_once(
    rig: AcquirerRig, engine: AsyncEngine
) -> None:
    payment_id = await _pay(rig, "pm_card_visa", 5000)
    payment = await _settled(rig, payment_id)
    assert payment["status"] == "succeeded", payment
    assert (payment["amount_authorized"], payment["amount_captured"]) == (5000, 5000)
    assert payment["decline_code"] is None
    assert payment["acquirer_reference"].startswith("acq_")
    await _captured_once(rig, engine, payment_id, 5000)
    # The hold and its capture in the ledger, each with its event, before the confirmation.
    assert await _event_types(rig, payment_id) == [
        "payment.authorized",
        "payment.raw",
        "payment.captured",
        "payment.confirmed",
    ]


async def test_a_partial_approval_captures_what_was_authorized(
    rig: AcquirerRig, engine: AsyncEngine
) -> None:
    payment_id = await _pay(rig, "pm_card_partial_approval", 5001)
    payment = await _settled(rig, payment_id)
    assert payment["status"] == "succeeded", payment
    assert (payment["amount"], payment["amount_authorized"]) == (5001, 2500)
    assert (payment["amount_captured"], payment["amount_refundable"]) == (2500, 2500)
    await _captured_once(rig, engine, payment_id, 2500)


async def test_a_decline_is_the_payments_outcome_with_its_code_event_and_crm_notice(
    rig: AcquirerRig, engine: AsyncEngine, stack: Stack, crm_server: FakeCrmServer
) -> None:
    payment_id = await _pay(rig, "pm_card_decline_insufficient_funds")
    payment = await _settled(rig, payment_id)
    assert payment["status"] == "declined", payment
    assert payment["decline_code"] == "insufficient_funds"
    assert (payment["amount_authorized"], payment["amount_captured"]) == (0, 0)
    assert await ledger_rows(engine, payment_id) == []
    [declined] = await payment_events(
        stack.kafka_bootstrap_servers, payment_id, ["payments.declined"], until=bool
    )
    assert declined.id == event_id(payment_id, EventKind.DECLINED)
    assert declined.body["data"]["status"] == "declined"
    assert declined.body["data"]["decline_code"] == "insufficient_funds"
    hooks = await crm_hooks(crm_server, payment_id, bool)
    assert [h.json()["event_kind"] for h in hooks] == ["declined"]
    # Never raw, never confirmed: nothing was held.
    assert _performed(await rig.operations(payment_id), "capture") == []
    # A code paysaga has no name for is kept verbatim beside generic_decline.
    other = await _settled(rig, await _pay(rig, "pm_card_decline_restricted_card"))
    assert (other["status"], other["decline_code"]) == ("declined", "generic_decline")


async def test_a_timeout_is_resolved_by_status_and_never_authorizes_twice(
    rig: AcquirerRig, engine: AsyncEngine, temporal_client: Client
) -> None:
    """pm_card_timeout: the authorization and the capture both happen, their answers are held
    past the worker's patience; the saga learns each outcome from the status."""
    payment_id = await _pay(rig, "pm_card_timeout", 4200)
    payment = await _settled(rig, payment_id, timeout=40 + 4 * ACQUIRER_HANG_SECONDS)
    assert payment["status"] == "succeeded", payment
    assert payment["amount_captured"] == 4200
    await _captured_once(rig, engine, payment_id, 4200)
    # The saga asked for the status and never sent either instruction a second time.
    scheduled = await _activities_scheduled(temporal_client, payment_id)
    assert scheduled.count("authorize_payment") == 1, scheduled
    assert scheduled.count("capture_payment") == 1, scheduled
    assert scheduled.count("acquirer_status") == 2, scheduled


async def test_a_5xx_once_that_did_nothing_is_resolved_by_status_then_sent_again(
    rig: AcquirerRig, engine: AsyncEngine, temporal_client: Client
) -> None:
    """pm_card_error_once: the first authorize and the first capture answer 500 without doing
    anything; status says so (no record / not captured) and the same instruction goes again."""
    payment_id = await _pay(rig, "pm_card_error_once", 3100)
    payment = await _settled(rig, payment_id)
    assert payment["status"] == "succeeded", payment
    await _captured_once(rig, engine, payment_id, 3100)
    operations = await rig.operations(payment_id)
    errors = [o["operation"] for o in operations if o["http_status"] == 500]
    assert errors == ["authorize", "capture"], operations
    # Each 500 was followed by a status read that found it undone, then the same instruction.
    scheduled = await _activities_scheduled(temporal_client, payment_id)
    assert scheduled.count("authorize_payment") == 2, scheduled
    assert scheduled.count("capture_payment") == 2, scheduled
    assert scheduled.count("acquirer_status") == 2, scheduled


async def test_a_refund_after_capture_goes_to_the_acquirer_then_the_ledger(
    rig: AcquirerRig, engine: AsyncEngine
) -> None:
    payment_id = await _pay(rig, "pm_card_visa", 8000)
    assert (await _settled(rig, payment_id))["status"] == "succeeded"
    first = await refund(rig.api, payment_id, 3000)
    assert first.status_code == 201, first.text
    assert first.json()["status"] == "succeeded"
    second = await refund(rig.api, payment_id)  # the rest
    assert second.status_code == 201, second.text
    record = await rig.record(payment_id)
    assert record.refunded_amount == 8000
    assert {r.refund_reference for r in record.refunds} == {
        acquirer_refund_reference(payment_id, first.json()["id"]),
        acquirer_refund_reference(payment_id, second.json()["id"]),
    }
    assert await refund_rows_total(engine, payment_id) == 8000
    payment = (await rig.api.get(f"/v1/payments/{payment_id}")).json()
    assert payment["status"] == "refunded"


async def test_a_cancel_during_the_authorization_voids_the_hold_at_the_acquirer_and_in_the_ledger(
    rig: AcquirerRig, engine: AsyncEngine
) -> None:
    payment_id = await _pay(rig, "pm_card_approve_after_delay", 2600)
    await wait_for_payment(
        rig.api, payment_id, lambda p: "to authorize" in p["waiting_for"], timeout=20
    )
    canceled = await rig.api.post(f"/v1/payments/{payment_id}/cancel", json={})
    assert canceled.status_code in (200, 202), canceled.text
    payment = await _settled(rig, payment_id)
    assert payment["status"] == "canceled", payment
    record = await rig.record(payment_id)
    assert record.state is AuthorizationState.VOIDED
    assert record.released_amount == 2600
    await _ledger_holds_nothing(engine, payment_id, ["authorization_hold", "hold_voided"])
    types = await _event_types(rig, payment_id)
    assert "payment.authorized" in types and "payment.voided" in types, types
    assert "payment.captured" not in types and "payment.confirmed" not in types, types


# ── capture_method: manual ───────────────────────────────────────────────────────────────────


async def _requires_capture(rig: AcquirerRig, amount: int) -> str:
    payment_id = await _pay(rig, "pm_card_visa", amount, capture_method="manual")
    payment = await wait_for_payment(
        rig.api, payment_id, lambda p: p["status"] == "requires_capture", timeout=30
    )
    assert (payment["amount_authorized"], payment["amount_captured"]) == (amount, 0)
    assert "expires" in payment["waiting_for"]
    return payment_id


async def test_manual_capture_of_part_releases_the_rest_once_captured(
    rig: AcquirerRig, engine: AsyncEngine
) -> None:
    payment_id = await _requires_capture(rig, 5000)
    record = await rig.record(payment_id)
    assert record.state is AuthorizationState.AUTHORIZED
    await _ledger_holds_nothing_but(engine, payment_id, 5000)
    # Waiting for its capture, holding money, the payment keeps every promise of the checker.
    waiting = await run_checks(
        rig.settings,
        scope=CheckScope(payment_ids=frozenset({payment_id})),
        engine=engine,
        temporal=rig.temporal,
        max_examples=5,
    )
    assert waiting.passed, [r for r in waiting.results if not r.passed]

    too_much = await rig.api.post(
        f"/v1/payments/{payment_id}/capture", json={"amount_to_capture": 5001}
    )
    # Schema-valid, refused by the payment's state: a 409, like a refund over what remains.
    assert too_much.status_code == 409, too_much.text
    assert too_much.json()["error"]["code"] == "amount_too_large"

    captured = await rig.api.post(
        f"/v1/payments/{payment_id}/capture", json={"amount_to_capture": 3000}
    )
    assert captured.status_code == 200, captured.text
    payment = captured.json()
    assert (payment["status"], payment["amount_captured"]) == ("succeeded", 3000)
    record = await rig.record(payment_id)
    assert record.state is AuthorizationState.CAPTURED
    assert (record.captured_amount, record.released_amount) == (3000, 2000)
    await _ledger_holds_nothing(
        engine, payment_id, ["authorization_hold", "hold_captured", "payment"]
    )
    assert await account_balance_of_payment(engine, payment_id, "payment") == 3000

    # Asked again, the capture answers as it did (one capture per payment, one Update id).
    again = await rig.api.post(f"/v1/payments/{payment_id}/capture", json={})
    assert again.status_code == 200, again.text
    assert again.json()["amount_captured"] == 3000
    void = await rig.api.post(f"/v1/payments/{payment_id}/void")
    assert void.status_code == 409 and void.json()["error"]["code"] == "payment_not_capturable"
    assert len(_performed(await rig.operations(payment_id), "capture")) == 1


async def _listed(temporal: Client, query: str, payment_id: str, expected: bool) -> None:
    """Visibility is eventually consistent: poll until the payment is (not) listed."""
    for _ in range(100):
        found = [w.id async for w in temporal.list_workflows(query)]
        if (payment_id in found) == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{payment_id} listed={not expected} by {query}")


async def test_an_authorization_awaiting_capture_is_found_by_when_it_expires(
    rig: AcquirerRig,
) -> None:
    """The runbook's "authorizations expiring within 24 h" query, on AuthorizationExpiresAt:
    set on entering requires_capture to the moment the expiry timer voids the authorization."""
    payment_id = await _requires_capture(rig, 3300)
    state = await _state_of(rig.temporal, payment_id)
    expires = state.authorization_expires_at
    assert expires is not None
    described = await rig.temporal.get_workflow_handle(payment_id).describe()
    attribute = described.typed_search_attributes.get(sa.AUTHORIZATION_EXPIRES_AT)
    assert attribute is not None and abs((attribute - expires).total_seconds()) < 1

    def expiring_within_24h_of(now: datetime) -> str:
        return (
            'WorkflowType="PaymentWorkflow" AND ExecutionStatus="Running" AND '
            'PaymentStatus="requires_capture" AND '
            f'AuthorizationExpiresAt < "{now + timedelta(hours=24):%Y-%m-%dT%H:%M:%SZ}"'
        )

    # The default expiry is 7 days: not within 24 h today, within 24 h of its sixth day.
    now = datetime.now(UTC)
    await _listed(rig.temporal, expiring_within_24h_of(now), payment_id, expected=False)
    sixth_day = expires - timedelta(hours=12)
    await _listed(rig.temporal, expiring_within_24h_of(sixth_day), payment_id, expected=True)
    voided = await rig.api.post(f"/v1/payments/{payment_id}/void")
    assert voided.status_code == 200, voided.text


async def test_manual_void_releases_the_whole_authorization(
    rig: AcquirerRig, engine: AsyncEngine
) -> None:
    payment_id = await _requires_capture(rig, 4100)
    voided = await rig.api.post(f"/v1/payments/{payment_id}/void")
    assert voided.status_code == 200, voided.text
    assert voided.json()["status"] == "canceled"
    record = await rig.record(payment_id)
    assert (record.state, record.released_amount) == (AuthorizationState.VOIDED, 4100)
    await _ledger_holds_nothing(engine, payment_id, ["authorization_hold", "hold_voided"])
    late = await rig.api.post(f"/v1/payments/{payment_id}/capture", json={})
    assert late.status_code == 409, late.text
    # Voiding again answers with the same voided payment.
    assert (await rig.api.post(f"/v1/payments/{payment_id}/void")).json()["status"] == "canceled"


async def test_a_refund_of_an_uncaptured_payment_voids_its_authorization(
    rig: AcquirerRig, engine: AsyncEngine
) -> None:
    payment_id = await _requires_capture(rig, 2700)
    partial = await refund(rig.api, payment_id, 1000)
    assert partial.status_code == 400, partial.text
    assert partial.json()["error"]["code"] == "amount_invalid"
    whole = await refund(rig.api, payment_id)
    assert whole.status_code == 201, whole.text
    assert (whole.json()["status"], whole.json()["amount"]) == ("succeeded", 2700)
    payment = (await rig.api.get(f"/v1/payments/{payment_id}")).json()
    assert (payment["status"], payment["amount_captured"]) == ("canceled", 0)
    record = await rig.record(payment_id)
    assert (record.state, record.released_amount) == (AuthorizationState.VOIDED, 2700)
    assert record.refunds == ()  # nothing was captured, so nothing was refunded: voided
    await _ledger_holds_nothing(engine, payment_id, ["authorization_hold", "hold_voided"])


async def test_a_refund_by_void_still_under_way_is_answered_pending_never_a_500(
    rig: AcquirerRig, engine: AsyncEngine
) -> None:
    """Found by the simulation's faults profile with the acquirer (seed 1): the refund of a
    `requires_capture` payment is its void, recorded only once the void is done; answered past
    `wait` before that, the API looked for a refund not recorded yet and answered 500."""
    payment_id = await _requires_capture(rig, 2900)
    answer = await refund(rig.api, payment_id, wait=0)
    assert answer.status_code == 201, answer.text
    assert answer.json()["amount"] == 2900
    assert answer.json()["status"] in ("pending", "succeeded")
    payment = await _settled(rig, payment_id)
    assert (payment["status"], payment["amount_captured"]) == ("canceled", 0)
    assert [(r["amount"], r["status"]) for r in payment["refunds"]] == [(2900, "succeeded")]
    await _ledger_holds_nothing(engine, payment_id, ["authorization_hold", "hold_voided"])


async def test_a_refund_while_a_cancel_voids_the_authorization_is_refused_as_not_captured(
    rig: AcquirerRig, engine: AsyncEngine
) -> None:
    """Found by the simulation's faults profile with the acquirer (seed 1, manual_race): a
    cancel was accepted while the payment was `requires_capture`, its void held at the
    acquirer; a refund then, validated while the status was still `requires_capture`, went
    the refund-by-void way and was answered `succeeded` for the whole authorization, while
    the register and the ledger (rightly) refunded nothing: the void returned the money. A
    payment being canceled is refused a refund as a canceled one is: 409 payment_not_captured."""
    payment_id = await _pay(rig, "pm_card_timeout", 14870, capture_method="manual")
    await wait_for_payment(
        rig.api,
        payment_id,
        lambda p: p["status"] == "requires_capture",
        timeout=30 + 2 * ACQUIRER_HANG_SECONDS,
    )
    canceled = await rig.api.post(f"/v1/payments/{payment_id}/cancel", json={}, params={"wait": 0})
    assert canceled.status_code in (200, 202), canceled.text
    # pm_card_timeout holds the void's answer: the void is under way, the payment still
    # `requires_capture` until the saga learns the outcome from the status.
    await wait_for_payment(
        rig.api,
        payment_id,
        lambda p: "to void" in p["waiting_for"] or p["status"] != "requires_capture",
    )
    for amount in (None, 14870):
        refused = await refund(rig.api, payment_id, amount, wait=0)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "payment_not_captured", refused.text
    payment = await _settled(rig, payment_id, timeout=40 + 2 * ACQUIRER_HANG_SECONDS)
    assert (payment["status"], payment["amount_captured"]) == ("canceled", 0), payment
    assert payment["refunds"] == [], payment["refunds"]
    assert payment["amount_refunded"] == 0, payment
    record = await rig.record(payment_id)
    assert (record.state, record.released_amount) == (AuthorizationState.VOIDED, 14870)
    assert record.refunds == ()
    await _ledger_holds_nothing(engine, payment_id, ["authorization_hold", "hold_voided"])
    assert await refund_rows_total(engine, payment_id) == 0


async def test_the_cli_pays_with_manual_capture_then_captures_and_voids(
    rig: AcquirerRig, temporal_client: Client
) -> None:
    """`paysaga pay --manual-capture`, `paysaga capture --amount`, `paysaga void`: the commands
    the README and docs/signals.md show, against the API on a real port."""
    app = create_app(rig.settings, temporal_client)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    # The connection options go before the command (cli/main.py's one callback).
    api = ["--api-url", f"http://127.0.0.1:{port}", "--api-key", TEST_API_KEY]

    async def paysaga(*args: str) -> str:
        done = await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).parent / "paysaga"), *api, *args],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    try:
        paid = await paysaga(
            "pay", "6000", "USD", "--customer", "cus_cli_manual", "--merchant", new_merchant(),
            "--token", "pm_card_visa", "--manual-capture", "--wait", "15",
        )  # fmt: skip
        assert "requires_capture" in paid, paid
        first = re.findall(r"pay_[0-9a-f]{24}", paid)[0]
        captured = await paysaga("capture", first, "--amount", "3500", "--wait", "15")
        assert "succeeded" in captured, captured
        record = await rig.record(first)
        assert (record.captured_amount, record.released_amount) == (3500, 2500)

        paid = await paysaga(
            "pay", "1200", "USD", "--customer", "cus_cli_manual", "--merchant", new_merchant(),
            "--token", "pm_card_visa", "--manual-capture", "--wait", "15",
        )  # fmt: skip
        second = re.findall(r"pay_[0-9a-f]{24}", paid)[0]
        voided = await paysaga("void", second, "--wait", "15")
        assert "canceled" in voided, voided
        assert (await rig.record(second)).state is AuthorizationState.VOIDED
    finally:
        server.should_exit = True
        await serving


async def test_an_automatic_payment_cannot_be_captured_or_voided(rig: AcquirerRig) -> None:
    payment_id = await _pay(rig, "pm_card_visa", 1500)
    assert (await _settled(rig, payment_id))["status"] == "succeeded"
    for action in ("capture", "void"):
        refused = await rig.api.post(f"/v1/payments/{payment_id}/{action}", json={})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "payment_not_capturable"


async def _ledger_holds_nothing_but(engine: AsyncEngine, payment_id: str, held: int) -> None:
    rows = await assert_ledger_balanced(engine, payment_id)
    assert [r["kind"] for r in rows] == ["authorization_hold"]
    assert await account_balance_of_payment(engine, payment_id, "authorization_hold") == held


async def account_balance_of_payment(engine: AsyncEngine, payment_id: str, kind: str) -> int:
    """What the payment's `kind` postings debited the customer's funding account by."""
    async with engine.connect() as conn:
        value = await conn.scalar(
            text(
                "SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e "
                "JOIN ledger_transactions t ON t.id = e.transaction_id "
                "JOIN accounts a ON a.id = e.account_id "
                "WHERE t.payment_id = :p AND t.kind = :k AND a.type = 'customer_funding'"
            ),
            {"p": payment_id, "k": kind},
        )
    return int(value or 0)


async def test_the_checker_finds_every_promise_kept_by_the_payments_above(
    rig: AcquirerRig, app_settings: Settings, engine: AsyncEngine, temporal_client: Client
) -> None:
    """Holds released once, captures within them, the register, the outbox in Kafka, the
    workflows: `paysaga check` over every payment this module made through the acquirer."""
    assert len(PAID) >= 8
    report = await run_checks(
        app_settings,
        scope=CheckScope(payment_ids=frozenset(PAID)),
        engine=engine,
        temporal=temporal_client,
        max_examples=20,
        settle_seconds=20,
    )
    assert report.passed, [r for r in report.results if not r.passed]
    assert report.result(HOLDS_RELEASED).checked >= 6


# ── an acquirer that never answers: bounded, then an operator ────────────────────────────────


async def _always_500() -> AsyncIterator[str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            body = b'{"error": {"type": "internal_error", "message": "down"}}'
            writer.write(
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
                b"content-length: "
                + str(len(body)).encode()
                + b"\r\nconnection: close\r\n\r\n"
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def test_an_outcome_unknown_past_the_bound_requires_attention_never_a_guess(
    stack: Stack, app_settings: Settings, temporal_client: Client, engine: AsyncEngine
) -> None:
    """Every call answers 500: the authorization's outcome is unknown, the status cannot say,
    so past the bound the payment releases by status, cannot, and waits for an operator."""
    async for url in _always_500():
        settings = acquirer_settings(
            stack,
            app_settings,
            acquirer_url=url,
            acquirer_api_key=SecretStr("sk_test_unused"),
            acquirer_resolve_seconds=3.0,
        )
        async with (
            payment_worker(settings, temporal_client),
            api_client(settings, temporal_client, TEST_API_KEY) as api,
        ):
            body = payment_body(payment_method="pm_card_visa", merchant_id=new_merchant())
            created = await create_payment(api, body, wait=0)
            assert created.status_code == 201, created.text
            payment_id = created.json()["id"]
            payment = await wait_for_payment(
                api, payment_id, lambda p: p["status"] == "requires_attention", timeout=60
            )
            assert "AcquirerOutcomeUnresolved" in payment["waiting_for"], payment
            assert "release the authorization at the acquirer" in payment["waiting_for"]
            assert await ledger_rows(engine, payment_id) == []
            # The operator checked the acquirer by other means: settled by hand, it ends failed.
            handle = temporal_client.get_workflow_handle(payment_id)
            await handle.execute_update(
                "resolve_attention",
                {"action": "manual", "operator": "ops-1", "reason": "no hold at the acquirer"},
            )
            payment = await wait_for_payment(
                api, payment_id, lambda p: p["status"] == "failed", timeout=30
            )
            assert "AcquirerOutcomeUnresolved" in (payment["failure_reason"] or "")


# ── a refund whose money may have moved: an operator, never `failed` ─────────────────────────


async def _state_of(temporal: Client, payment_id: str) -> PaymentState:
    state: PaymentState = await temporal.get_workflow_handle(payment_id).query(
        "state", result_type=PaymentState
    )
    return state


async def test_a_refund_the_ledger_refuses_after_the_acquirer_paid_it_requires_attention(
    rig: AcquirerRig, engine: AsyncEngine
) -> None:
    """The acquirer refunded; the merchant's account is closed, so the ledger refuses the
    posting for good. The refund is not `failed` (the customer has the money): the payment
    waits for an operator, who settles it by hand against suspense; a second refund after the
    account is reopened is retried by the operator and posted against the merchant."""
    body = payment_body(amount=6000, payment_method="pm_card_visa", merchant_id=new_merchant())
    created = await create_payment(rig.api, body, wait=0)
    assert created.status_code == 201, created.text
    payment_id: str = created.json()["id"]
    assert (await _settled(rig, payment_id))["status"] == "succeeded"
    merchant = merchant_account(body["merchant_id"], "USD", "test-client").code
    await Ledger(engine).close_account(merchant)
    suspense_before = await account_balance(engine, "suspense:USD")

    asked = await refund(rig.api, payment_id, 2000, wait=0)
    assert asked.status_code in (201, 202), asked.text
    refund_id = asked.json()["id"]
    payment = await wait_for_payment(
        rig.api, payment_id, lambda p: p["status"] == "requires_attention", timeout=30
    )
    assert "The acquirer refunded" in payment["waiting_for"], payment
    assert "AccountClosed" in payment["waiting_for"], payment
    record = await rig.record(payment_id)
    assert record.refunded_amount == 2000  # the money moved at the acquirer
    state = await _state_of(rig.temporal, payment_id)
    assert [r.status for r in state.refunds] == [FollowUpStatus.PENDING]
    assert await refund_rows_total(engine, payment_id) == 0

    handle = rig.temporal.get_workflow_handle(payment_id)
    settled = await handle.execute_update(
        "resolve_attention",
        AttentionResolution(action="manual", operator="ops-1", reason="merchant offboarded"),
        result_type=ResolutionRecord,
    )
    assert settled.resolved, settled
    payment = await wait_for_payment(
        rig.api, payment_id, lambda p: p["status"] == "partially_refunded", timeout=30
    )
    state = await _state_of(rig.temporal, payment_id)
    assert [(r.id, r.status) for r in state.refunds] == [(refund_id, FollowUpStatus.SUCCEEDED)]
    # Against suspense, not the (closed) merchant; the acquirer refunded once.
    assert await refund_rows_total(engine, payment_id) == 0
    assert await account_balance(engine, "suspense:USD") == suspense_before + 2000
    assert (await rig.record(payment_id)).refunded_amount == 2000

    # Another refund, refused the same way; the account reopened, the operator retries.
    again = await refund(rig.api, payment_id, 1000, wait=0)
    assert again.status_code in (201, 202), again.text
    await wait_for_payment(
        rig.api, payment_id, lambda p: p["status"] == "requires_attention", timeout=30
    )
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE accounts SET status = 'open' WHERE code = :c"), {"c": merchant}
        )
    retried = await handle.execute_update(
        "resolve_attention",
        AttentionResolution(action="retry", operator="ops-1", reason="account reopened"),
        result_type=ResolutionRecord,
    )
    assert retried.resolved, retried
    await wait_for_payment(
        rig.api, payment_id, lambda p: p["status"] == "partially_refunded", timeout=30
    )
    assert await refund_rows_total(engine, payment_id) == 1000
    assert (await rig.record(payment_id)).refunded_amount == 3000
    await assert_ledger_balanced(engine, payment_id)


@contextlib.asynccontextmanager
async def _refunds_unanswered(sandbox: Settings) -> AsyncIterator[tuple[str, dict[str, bool]]]:
    """A proxy in front of the sandbox acquirer. While `broken`, a refund reaches the sandbox
    (the money moves) but its answer is a 500, and every status request answers 500 too: the
    refund's outcome cannot be known. With `drop_refunds` too, the refund never reaches it.
    Everything else passes through."""
    switch = {"broken": False, "drop_refunds": False}
    proxy = FastAPI()

    @proxy.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(path: str, request: Request) -> Response:
        is_status = request.method == "GET" and path.startswith("v1/authorizations/")
        lost = is_status or (switch["drop_refunds"] and path.endswith("/refunds"))
        if switch["broken"] and lost:
            return JSONResponse({"error": {"type": "internal_error"}}, status_code=500)
        async with httpx.AsyncClient() as http:
            answer = await http.request(
                request.method,
                f"{sandbox.acquirer_url}/{path}",
                params=request.query_params,
                content=await request.body(),
                headers={
                    k: v
                    for k, v in request.headers.items()
                    if k.lower() in ("authorization", "content-type")
                },
            )
        if switch["broken"] and path.endswith("/refunds"):
            return JSONResponse({"error": {"type": "internal_error"}}, status_code=500)
        return Response(
            answer.content,
            status_code=answer.status_code,
            media_type=answer.headers.get("content-type"),
        )

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(proxy, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", switch
    finally:
        server.should_exit = True
        await serving


async def test_a_refund_whose_outcome_stays_unknown_requires_attention_never_failed(
    stack: Stack, app_settings: Settings, temporal_client: Client, engine: AsyncEngine
) -> None:
    """The acquirer refunds but its answer is lost and its status never answers within the
    bound: the money may have moved, so the refund stays `pending` and the payment waits for an
    operator. Once the acquirer answers again, `retry` sends the same reference: the acquirer
    replays its refund (never a second one) and the ledger records it."""
    sandbox = acquirer_settings(stack, app_settings)
    async with _refunds_unanswered(sandbox) as (url, switch):
        settings = acquirer_settings(
            stack, app_settings, acquirer_url=url, acquirer_resolve_seconds=3.0
        )
        async with (
            payment_worker(settings, temporal_client),
            api_client(settings, temporal_client, TEST_API_KEY) as api,
        ):
            body = payment_body(amount=5000, payment_method="pm_card_visa")
            body["merchant_id"] = new_merchant()
            created = await create_payment(api, body, wait=0)
            assert created.status_code == 201, created.text
            payment_id: str = created.json()["id"]
            await wait_for_payment(api, payment_id, lambda p: p["status"] == "succeeded")
            switch["broken"] = True
            asked = await refund(api, payment_id, 1500, wait=0)
            assert asked.status_code in (201, 202), asked.text
            payment = await wait_for_payment(
                api, payment_id, lambda p: p["status"] == "requires_attention", timeout=60
            )
            assert "AcquirerOutcomeUnresolved" in payment["waiting_for"], payment
            assert "the money may have moved" in payment["waiting_for"], payment
            state = await _state_of(temporal_client, payment_id)
            assert [r.status for r in state.refunds] == [FollowUpStatus.PENDING]
            assert await refund_rows_total(engine, payment_id) == 0
            acquirer = HttpAcquirer.from_settings(sandbox)
            try:
                record = await acquirer.status(payment_id)
            finally:
                await acquirer.aclose()
            assert record is not None and record.refunded_amount == 1500  # it did move

            switch["broken"] = False
            handle = temporal_client.get_workflow_handle(payment_id)
            retried = await handle.execute_update(
                "resolve_attention",
                AttentionResolution(action="retry", operator="ops-1", reason="acquirer back"),
                result_type=ResolutionRecord,
            )
            assert retried.resolved, retried
            await wait_for_payment(
                api, payment_id, lambda p: p["status"] == "partially_refunded", timeout=30
            )
            state = await _state_of(temporal_client, payment_id)
            assert [r.status for r in state.refunds] == [FollowUpStatus.SUCCEEDED]
            assert await refund_rows_total(engine, payment_id) == 1500
            acquirer = HttpAcquirer.from_settings(sandbox)
            try:
                record = await acquirer.status(payment_id)
            finally:
                await acquirer.aclose()
            assert record is not None and record.refunded_amount == 1500
            assert len(record.refunds) == 1  # replayed, never refunded twice

            # A refund that never reached the acquirer, its outcome unknown all the same: the
            # operator learns from the acquirer that it did not refund and settles it by hand.
            switch["broken"] = switch["drop_refunds"] = True
            lost = await refund(api, payment_id, 500, wait=0)
            assert lost.status_code in (201, 202), lost.text
            await wait_for_payment(
                api, payment_id, lambda p: p["status"] == "requires_attention", timeout=60
            )
            switch["broken"] = switch["drop_refunds"] = False
            settled = await handle.execute_update(
                "resolve_attention",
                AttentionResolution(
                    action="manual", operator="ops-1", reason="acquirer has no such refund"
                ),
                result_type=ResolutionRecord,
            )
            assert settled.resolved, settled
            await wait_for_payment(
                api, payment_id, lambda p: p["status"] == "partially_refunded", timeout=30
            )
            state = await _state_of(temporal_client, payment_id)
            assert [r.status for r in state.refunds] == [
                FollowUpStatus.SUCCEEDED,
                FollowUpStatus.FAILED,
            ]
            assert "acquirer has no such refund" in (state.refunds[1].failure_reason or "")
            assert await refund_rows_total(engine, payment_id) == 1500
            acquirer = HttpAcquirer.from_settings(sandbox)
            try:
                record = await acquirer.status(payment_id)
            finally:
                await acquirer.aclose()
            assert record is not None and record.refunded_amount == 1500
