"""The CRM adapter against a real local HTTP server standing in for Salesforce, HubSpot and a
webhook receiver, run in the SDK's real activity context."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.crm import (
    CRM_UNAVAILABLE,
    CrmActivities,
    CrmDelivery,
    crm_targets_for,
    sign_webhook,
    verify_webhook,
    webhook_body,
)
from domain.errors import FailureType
from domain.events import EventKind, event_id
from domain.messages import CrmNotification, CrmTarget
from settings import Settings
from tests.helpers.fake_crm import FakeCrmServer

SF_TOKEN = "sf-token-00D5e000000XyZ!AQ4AQEzsecret"
HUBSPOT_TOKEN = "pat-na1-hubspot-secret-7f3c"
WEBHOOK_SECRET = "whsec_paysaga_test_secret_9b1e"
SECRETS = (SF_TOKEN, HUBSPOT_TOKEN, WEBHOOK_SECRET)
WEBHOOK_PATH = "/hooks/paysaga"
OPPORTUNITY_ID = "0065e00000AbCdEfGH"
DEAL_ID = "9876543210"


def _notification(**overrides: Any) -> CrmNotification:
    fields: dict[str, Any] = {
        "event_id": event_id("pay_0123456789abcdef01234567", EventKind.CONFIRMED),
        "event_kind": EventKind.CONFIRMED,
        "payment_id": "pay_0123456789abcdef01234567",
        "status": "succeeded",
        "amount": 12_345,
        "currency": "USD",
        "customer_id": "cus_42",
        "merchant_id": "acme",
        "salesforce_opportunity_id": OPPORTUNITY_ID,
        "hubspot_deal_id": DEAL_ID,
        "occurred_at": datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC),
    }
    fields.update(overrides)
    return CrmNotification(**fields)


def _settings(crm: FakeCrmServer, **overrides: Any) -> Settings:
    # Every CRM field explicit: a developer's PAYSAGA_* environment must not leak in.
    fields: dict[str, Any] = {
        "crm_webhook_url": crm.url(WEBHOOK_PATH),
        "crm_webhook_secret": WEBHOOK_SECRET,
        "salesforce_base_url": crm.base_url,
        "salesforce_token": SF_TOKEN,
        "salesforce_api_version": "v61.0",
        "salesforce_event_name": "Payment_Event__e",
        "hubspot_base_url": crm.base_url,
        "hubspot_token": HUBSPOT_TOKEN,
        "crm_timeout_seconds": 2.0,
    }
    fields.update(overrides)
    return Settings(**fields)


def _env(attempt: int = 1) -> ActivityEnvironment:
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, attempt=attempt, activity_type="notify_crm")
    return env


@pytest.fixture(scope="module")
def crm_server() -> Iterator[FakeCrmServer]:
    with FakeCrmServer() as server:
        yield server


@pytest.fixture
def crm(crm_server: FakeCrmServer) -> Iterator[FakeCrmServer]:
    crm_server.clear()
    yield crm_server
    crm_server.clear()


@pytest.fixture
async def activities(crm: FakeCrmServer) -> AsyncIterator[CrmActivities]:
    acts = CrmActivities(_settings(crm))
    yield acts
    await acts.aclose()


async def _notify(
    acts: CrmActivities, target: CrmTarget, n: CrmNotification | None = None, attempt: int = 1
) -> CrmDelivery:
    return await _env(attempt).run(acts.notify_crm, target, n or _notification())


async def _failure(
    acts: CrmActivities, target: CrmTarget, n: CrmNotification | None = None, attempt: int = 1
) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await _notify(acts, target, n, attempt)
    return caught.value


# --- which CRMs hear about a payment


def test_every_configured_target_that_can_place_the_event_is_chosen(crm: FakeCrmServer) -> None:
    assert crm_targets_for(_settings(crm), _notification()) == [
        CrmTarget.WEBHOOK,
        CrmTarget.SALESFORCE,
        CrmTarget.HUBSPOT,
    ]


def test_crm_records_are_only_targeted_when_the_payment_names_one(crm: FakeCrmServer) -> None:
    anonymous = _notification(salesforce_opportunity_id=None, hubspot_deal_id=None)
    assert crm_targets_for(_settings(crm), anonymous) == [CrmTarget.WEBHOOK]
    deal_only = _notification(salesforce_opportunity_id=None)
    assert crm_targets_for(_settings(crm), deal_only) == [CrmTarget.WEBHOOK, CrmTarget.HUBSPOT]


def test_unconfigured_crms_are_never_targeted(crm: FakeCrmServer) -> None:
    bare = _settings(crm, crm_webhook_url=None, salesforce_base_url=None, hubspot_base_url=None)
    assert crm_targets_for(bare, _notification()) == []


# --- webhook signatures


BODY = b'{"payment_id":"pay_1","amount":100}'
T = 1_700_000_000


def test_signature_verifies_for_the_exact_body_and_secret() -> None:
    header = sign_webhook(WEBHOOK_SECRET, BODY, T)
    assert header.startswith(f"t={T},v1=")
    assert verify_webhook(WEBHOOK_SECRET, BODY, header, now=T)
    assert verify_webhook(WEBHOOK_SECRET, BODY, header, now=T + 300)  # tolerance is inclusive


@pytest.mark.parametrize(
    ("secret", "body", "now"),
    [
        pytest.param(WEBHOOK_SECRET, BODY.replace(b"100", b"900"), T, id="tampered-body"),
        pytest.param("whsec_someone_else", BODY, T, id="wrong-secret"),
        pytest.param(WEBHOOK_SECRET, BODY, T + 301, id="stale-replay"),
        pytest.param(WEBHOOK_SECRET, BODY, T - 301, id="future-dated"),
        pytest.param("", BODY, T, id="receiver-without-secret"),
    ],
)
def test_signature_is_refused(secret: str, body: bytes, now: int) -> None:
    assert not verify_webhook(secret, body, sign_webhook(WEBHOOK_SECRET, BODY, T), now=now)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        f"v1={'0' * 64}",  # no timestamp
        f"t={T}",  # no signature
        f"t=abc,v1={'0' * 64}",
        f"t={T},t={T},v1={'0' * 64}",  # ambiguous timestamp
        f"t=-{T},v1={'0' * 64}",
        f"t=١٢٣,v1={'0' * 64}",  # non-ASCII digits
    ],
)
def test_malformed_signature_headers_are_refused(header: str) -> None:
    assert not verify_webhook(WEBHOOK_SECRET, BODY, header, now=T)


def test_any_matching_v1_is_accepted_so_secrets_can_rotate() -> None:
    old = sign_webhook("whsec_old", BODY, T).split("v1=")[1]
    new = sign_webhook(WEBHOOK_SECRET, BODY, T).split("v1=")[1]
    header = f"t={T},v1={old},v1={new}"
    assert verify_webhook(WEBHOOK_SECRET, BODY, header, now=T)
    assert verify_webhook("whsec_old", BODY, header, now=T)
    assert not verify_webhook("whsec_other", BODY, header, now=T)
    assert not verify_webhook(WEBHOOK_SECRET, BODY, f"t={T},v1=é{new}", now=T)


def test_a_webhook_cannot_be_signed_without_a_secret() -> None:
    with pytest.raises(ValueError, match="empty secret"):
        sign_webhook("", BODY, T)


# --- what each CRM receives


async def test_webhook_delivery_is_signed_over_the_raw_body(
    crm: FakeCrmServer, activities: CrmActivities
) -> None:
    n = _notification(details={"refund_id": "re_1", "refunded": 500, "note": None})
    delivery = await _notify(activities, CrmTarget.WEBHOOK, n, attempt=2)

    assert delivery == CrmDelivery(target=CrmTarget.WEBHOOK, status_code=200, attempt=2)
    [request] = crm.requests_for(WEBHOOK_PATH)
    assert request.method == "POST"
    assert request.path == WEBHOOK_PATH
    assert request.header("Idempotency-Key") == n.event_id
    assert request.body == webhook_body(n)
    assert CrmNotification.model_validate_json(request.body) == n
    signature = request.header("Paysaga-Signature")
    assert signature is not None
    assert verify_webhook(WEBHOOK_SECRET, request.body, signature)
    assert abs(int(signature.split(",")[0].removeprefix("t=")) - time.time()) < 5
    assert not verify_webhook(WEBHOOK_SECRET, request.body + b" ", signature)
    assert request.header("Authorization") is None  # the webhook is authenticated by signature


async def test_salesforce_receives_a_platform_event(
    crm: FakeCrmServer, activities: CrmActivities
) -> None:
    n = _notification()
    delivery = await _notify(activities, CrmTarget.SALESFORCE, n)

    assert delivery.status_code == 200
    [request] = crm.requests
    assert request.method == "POST"
    assert request.path == "/services/data/v61.0/sobjects/Payment_Event__e"
    assert request.header("Authorization") == f"Bearer {SF_TOKEN}"
    assert request.header("Idempotency-Key") == n.event_id
    assert request.header("Content-Type") == "application/json"
    event = request.json()
    assert event["Payment_Id__c"] == n.payment_id
    assert event["Event_Type__c"] == "confirmed"
    assert event["Status__c"] == "succeeded"
    assert event["Amount_Minor__c"] == 12_345
    assert event["Currency__c"] == "USD"
    assert event["Opportunity_Id__c"] == OPPORTUNITY_ID
    assert event["Event_Id__c"] == n.event_id


async def test_hubspot_deal_is_patched_with_payment_properties(
    crm: FakeCrmServer, activities: CrmActivities
) -> None:
    n = _notification(event_kind=EventKind.REFUNDED, status="partially_refunded")
    await _notify(activities, CrmTarget.HUBSPOT, n)

    [request] = crm.requests
    assert request.method == "PATCH"
    assert request.path == f"/crm/v3/objects/deals/{DEAL_ID}"
    assert request.header("Authorization") == f"Bearer {HUBSPOT_TOKEN}"
    assert request.header("Idempotency-Key") == n.event_id
    assert request.json() == {
        "properties": {
            "paysaga_payment_id": n.payment_id,
            "paysaga_payment_status": "partially_refunded",
            "paysaga_amount_minor": "12345",
            "paysaga_currency": "USD",
            "paysaga_last_event_id": n.event_id,
        }
    }


async def test_a_retried_notification_repeats_the_same_idempotent_request(
    crm: FakeCrmServer, activities: CrmActivities
) -> None:
    crm.respond_with(503, times=1)
    await _failure(activities, CrmTarget.SALESFORCE, attempt=1)
    delivery = await _notify(activities, CrmTarget.SALESFORCE, attempt=2)

    assert delivery.attempt == 2
    first, second = crm.requests
    assert first.header("Idempotency-Key") == second.header("Idempotency-Key")
    assert first.body == second.body


# --- failures: what retries, what does not, and what the operator reads


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
async def test_transient_answers_are_retryable_and_name_system_and_attempt(
    crm: FakeCrmServer, activities: CrmActivities, status: int
) -> None:
    crm.respond_with(status)
    error = await _failure(activities, CrmTarget.HUBSPOT, attempt=3)

    assert not error.non_retryable
    assert error.type == CRM_UNAVAILABLE
    assert error.message == (
        f"hubspot PATCH /crm/v3/objects/deals/{DEAL_ID} answered {status} (attempt 3); will retry"
    )


async def test_retry_after_sets_the_next_retry_delay(
    crm: FakeCrmServer, activities: CrmActivities
) -> None:
    crm.respond_with(429, headers={"Retry-After": "7"})
    error = await _failure(activities, CrmTarget.SALESFORCE)
    assert error.next_retry_delay == timedelta(seconds=7)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_client_errors_are_permanent_rejections(
    crm: FakeCrmServer, activities: CrmActivities, status: int
) -> None:
    crm.respond_with(status, body=[{"errorCode": "INVALID_FIELD", "message": "Amount_Minor__c"}])
    error = await _failure(activities, CrmTarget.SALESFORCE)

    assert error.non_retryable
    assert error.type == FailureType.CRM_REJECTED
    assert error.message.startswith(
        f"salesforce POST /services/data/v61.0/sobjects/Payment_Event__e "
        f"rejected the notification with {status}"
    )
    assert "INVALID_FIELD" in error.message  # the CRM's reason reaches the operator
    assert len(crm.requests) == 1


async def test_a_redirect_is_not_followed_but_rejected(
    crm: FakeCrmServer, activities: CrmActivities
) -> None:
    # A redirecting API means a wrong base URL; following it could send the token elsewhere.
    crm.respond_with(307, headers={"Location": crm.url("/elsewhere")}, body="moved")
    error = await _failure(activities, CrmTarget.SALESFORCE)

    assert error.non_retryable
    assert error.type == FailureType.CRM_REJECTED
    assert "rejected the notification with 307" in error.message
    assert error.message.endswith(": moved; not retrying")
    assert [r.path for r in crm.requests] == ["/services/data/v61.0/sobjects/Payment_Event__e"]


async def test_a_hung_crm_times_out_as_retryable(crm: FakeCrmServer) -> None:
    crm.delay_for(3.0)
    acts = CrmActivities(_settings(crm, crm_timeout_seconds=0.2))
    try:
        started = time.monotonic()
        error = await _failure(acts, CrmTarget.WEBHOOK, attempt=4)
        assert time.monotonic() - started < 2.0
    finally:
        await acts.aclose()

    assert not error.non_retryable
    assert error.type == CRM_UNAVAILABLE
    assert error.message.startswith("webhook POST http://127.0.0.1:")
    assert "timed out after 0.2s" in error.message
    assert error.message.endswith("(attempt 4); will retry")


async def test_an_unreachable_crm_is_retryable() -> None:
    with FakeCrmServer() as gone:
        settings = _settings(gone)
    acts = CrmActivities(settings)  # the server stopped: its port refuses connections
    try:
        error = await _failure(acts, CrmTarget.HUBSPOT, attempt=2)
    finally:
        await acts.aclose()

    assert not error.non_retryable
    assert error.message.startswith(f"hubspot PATCH /crm/v3/objects/deals/{DEAL_ID} failed: ")
    assert "ConnectError" in error.message
    assert error.message.endswith("(attempt 2); will retry")


async def test_an_unsigned_webhook_is_never_sent(crm: FakeCrmServer) -> None:
    acts = CrmActivities(_settings(crm, crm_webhook_secret=""))
    try:
        error = await _failure(acts, CrmTarget.WEBHOOK)
    finally:
        await acts.aclose()

    assert error.non_retryable
    assert error.type == FailureType.CRM_REJECTED
    assert "PAYSAGA_CRM_WEBHOOK_SECRET" in error.message
    assert crm.requests == []


async def test_a_target_the_payment_cannot_reach_is_rejected_without_a_request(
    crm: FakeCrmServer, activities: CrmActivities
) -> None:
    error = await _failure(activities, CrmTarget.HUBSPOT, _notification(hubspot_deal_id=None))
    assert error.non_retryable
    assert "hubspot_deal_id" in error.message
    assert crm.requests == []


async def test_secrets_never_reach_error_messages_or_logs(
    crm: FakeCrmServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # A careless CRM echoes the credential it was sent back in its error body.
    crm.respond_with(401, times=1, body={"error": f"bad token Bearer {SF_TOKEN}"})
    crm.respond_with(403, times=1, body=f"token {HUBSPOT_TOKEN} lacks crm.objects.deals.write")
    crm.respond_with(500, times=1, body={"echo": WEBHOOK_SECRET})
    crm.delay_for(3.0, times=1)
    acts = CrmActivities(_settings(crm, crm_timeout_seconds=0.2))
    try:
        errors = [
            await _failure(acts, CrmTarget.SALESFORCE),
            await _failure(acts, CrmTarget.HUBSPOT),
            await _failure(acts, CrmTarget.WEBHOOK),
            await _failure(acts, CrmTarget.SALESFORCE),  # the delayed one: a timeout
        ]
        await _notify(acts, CrmTarget.HUBSPOT)  # success is logged too
    finally:
        await acts.aclose()

    # The secrets did travel (in headers), so their absence below is not vacuous.
    assert crm.requests[0].header("Authorization") == f"Bearer {SF_TOKEN}"
    assert crm.requests[1].header("Authorization") == f"Bearer {HUBSPOT_TOKEN}"
    assert "check PAYSAGA_SALESFORCE_TOKEN" in errors[0].message
    assert "[redacted]" in errors[0].message
    texts = [e.message for e in errors] + [str(e) for e in errors] + [repr(e) for e in errors]
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]
    assert len(caplog.records) >= 5
    for secret in SECRETS:
        assert not any(secret in text for text in texts), secret
    assert all(e.__cause__ is None for e in errors)  # no chained httpx error carrying headers


# --- the fake itself: other suites script it, so its rules must hold


async def test_fake_crm_script_rules_apply_in_order_per_path(crm: FakeCrmServer) -> None:
    crm.respond_with(409, times=1, path_prefix="/crm")
    crm.fail_for(0.3, status=502)
    async with httpx.AsyncClient() as client:
        statuses = [
            (await client.post(crm.url("/crm/x"))).status_code,
            (await client.post(crm.url("/crm/x"))).status_code,
            (await client.post(crm.url("/other"))).status_code,
        ]
        await asyncio.sleep(0.35)
        after = await client.post(crm.url("/crm/x"))
    assert statuses == [409, 502, 502]
    assert after.status_code == 200 and after.json() == {"ok": True}
    assert [r.path for r in crm.requests_for("/crm")] == ["/crm/x"] * 3
    assert len(await crm.wait_for_requests(4, timeout=1)) == 4


async def test_fake_crm_restarts_on_the_same_port() -> None:
    server = FakeCrmServer().start()
    url = server.url("/ping")
    server.stop()
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(url)
        server.start()
        try:
            assert (await client.get(url)).status_code == 200
        finally:
            server.stop()
