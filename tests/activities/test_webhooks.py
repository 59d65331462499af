"""Merchant webhooks end to end: endpoints through the API, events delivered by the real
worker (dispatcher, delivery workflows on their own task queue) to real local HTTP receivers
that fail, hang and recover on cue (tests/helpers/fake_crm.py: the merchant's far side).

The module runs its own event worker with a fast retry schedule (0.5 s doubling to 2 s, giving
up after 8 s instead of 3 days) and two API clients of its own.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from activities.crm import verify_webhook
from activities.webhook_endpoints import WebhookEndpoints
from domain.events import EventKind, event_id
from infra.codec import (
    SEALED_PREFIX,
    EncryptionCodec,
    PayloadDecryptionError,
    UnknownEncryptionKeyError,
    generate_key,
    is_sealed,
    load_or_create_dev_key,
    sealed_key_id,
)
from infra.embedded.process import free_port
from infra.embedded.stack import Stack
from settings import ApiKey, EncryptionKey, Settings
from tests.conftest import MERCHANT_SCOPES
from tests.helpers.api_client import api_client
from tests.helpers.fake_crm import FakeCrmServer, RecordedRequest
from tests.helpers.paths import REPO
from tests.helpers.saga import create_payment, payment_body
from worker import event_worker

KEY_A = "psk_test_hooks_alpha_0123456789abcdefghi"
KEY_B = "psk_test_hooks_beta_0123456789abcdefghij"
HOOK = "/hook"
GIVE_UP_AFTER = 8.0


HOOK_KEY = EncryptionKey.model_validate({"key_id": "hooks1", "key_b64": generate_key()})


@pytest.fixture(scope="module")
def hook_settings(app_settings: Settings) -> Settings:
    suffix = uuid.uuid4().hex[:6]
    return app_settings.model_copy(
        update={
            "api_keys": [
                *app_settings.api_keys,
                ApiKey(
                    client_id=f"hooks-a-{suffix}",
                    key_sha256=ApiKey.hash(KEY_A),
                    scopes=list(MERCHANT_SCOPES),
                ),
                ApiKey(
                    client_id=f"hooks-b-{suffix}",
                    key_sha256=ApiKey.hash(KEY_B),
                    scopes=list(MERCHANT_SCOPES),
                ),
            ],
            "webhook_task_queue": f"webhooks-{suffix}",
            # The signing secrets are sealed at rest with these (PAYSAGA_ENCRYPTION_KEYS).
            "encryption_keys": [HOOK_KEY],
            "webhook_retry_initial_seconds": 0.5,
            "webhook_retry_backoff": 2.0,
            "webhook_retry_max_interval_seconds": 2.0,
            "webhook_retry_for_seconds": GIVE_UP_AFTER,
            "webhook_timeout_seconds": 1.0,
            "webhook_max_concurrent_deliveries": 6,
            "webhook_max_in_flight_per_endpoint": 2,
            "relay_interval_seconds": 0.2,
            # The Kafka side of the relay is test_relay.py's business, on a stack of its own.
            "relay_detect_broker_loss": False,
        }
    )


@pytest.fixture(scope="module")
async def deliveries(
    hook_settings: Settings, temporal_client: Client, engine: AsyncEngine, worker: None
) -> AsyncIterator[None]:
    # Events of earlier modules are not this module's to deliver (another module's endpoints
    # may still exist): the dispatcher starts from now.
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE outbox_events SET dispatched_at = now() WHERE dispatched_at IS NULL")
        )
    async with event_worker(hook_settings, temporal_client):
        yield


@pytest.fixture(scope="module")
async def merchant_a(
    hook_settings: Settings, temporal_client: Client, deliveries: None
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(hook_settings, temporal_client, KEY_A) as client:
        yield client


@pytest.fixture(scope="module")
async def merchant_b(
    hook_settings: Settings, temporal_client: Client, deliveries: None
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(hook_settings, temporal_client, KEY_B) as client:
        yield client


@pytest.fixture(autouse=True)
async def one_test_one_set_of_endpoints(
    merchant_a: httpx.AsyncClient, merchant_b: httpx.AsyncClient
) -> AsyncIterator[None]:
    """Each test sees only the endpoints it made: deliveries in flight to earlier ones stop."""
    yield
    for merchant in (merchant_a, merchant_b):
        listed = (await merchant.get("/v1/webhook_endpoints", params={"limit": 100})).json()
        for endpoint in listed["data"]:
            await merchant.delete(f"/v1/webhook_endpoints/{endpoint['id']}")


@pytest.fixture
def receiver() -> Iterator[FakeCrmServer]:
    with FakeCrmServer() as server:
        yield server


async def _endpoint(
    api: httpx.AsyncClient, url: str, events: list[str] | None = None
) -> dict[str, Any]:
    created = await api.post(
        "/v1/webhook_endpoints",
        json={"url": url, "enabled_events": events or ["payment.confirmed"]},
    )
    assert created.status_code == 201, created.text
    endpoint: dict[str, Any] = created.json()
    return endpoint


async def _pay(api: httpx.AsyncClient, **overrides: Any) -> str:
    created = await create_payment(api, payment_body(**overrides), wait=20)
    assert created.status_code == 201 and created.json()["status"] == "succeeded", created.text
    payment_id: str = created.json()["id"]
    return payment_id


async def _attempts(
    api: httpx.AsyncClient, endpoint_id: str, until: Any, timeout: float = 30
) -> list[dict[str, Any]]:
    """The endpoint's delivery log (oldest first) once `until(log)` holds."""
    deadline = time.monotonic() + timeout
    log: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        answer = await api.get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries?limit=100")
        assert answer.status_code == 200, answer.text
        log = list(reversed(answer.json()["data"]))
        if until(log):
            return log
        await asyncio.sleep(0.2)
    raise AssertionError(f"the delivery log never got there: {log}")


def _verifies(request: RecordedRequest, secret: str) -> bool:
    return verify_webhook(secret, request.body, request.header("Paysaga-Signature") or "")


async def test_an_endpoints_secret_is_shown_once_and_bad_urls_are_refused(
    merchant_a: httpx.AsyncClient, receiver: FakeCrmServer
) -> None:
    created = await _endpoint(merchant_a, receiver.url(HOOK), ["payment.*", "payment.refunded"])
    assert created["secret"].startswith("whsec_") and created["status"] == "enabled"
    assert created["enabled_events"] == ["payment.*", "payment.refunded"]
    fetched = (await merchant_a.get(f"/v1/webhook_endpoints/{created['id']}")).json()
    assert fetched["secret"] is None
    assert fetched == {**created, "secret": None}
    listed = (await merchant_a.get("/v1/webhook_endpoints")).json()
    assert listed["data"][0] == fetched and all(e["secret"] is None for e in listed["data"])

    for url, code in [
        ("ftp://example.com/hook", "parameter_invalid_format"),
        # Declared by the schema's pattern, so refused as a format a client can check first.
        ("http://user:password@example.com/hook", "parameter_invalid_format"),
        ("https://example.com/hook#frag", "parameter_invalid_format"),
    ]:
        refused = await merchant_a.post("/v1/webhook_endpoints", json={"url": url})
        assert refused.status_code == 422, (url, refused.text)
        assert (refused.json()["error"]["code"], refused.json()["error"]["param"]) == (code, "url")
    unknown = await merchant_a.post(
        "/v1/webhook_endpoints",
        json={"url": receiver.url(HOOK), "enabled_events": ["payment.teleported"]},
    )
    assert unknown.status_code == 422

    deleted = await merchant_a.delete(f"/v1/webhook_endpoints/{created['id']}")
    assert deleted.json() == {"object": "webhook_endpoint", "id": created["id"], "deleted": True}
    gone = await merchant_a.get(f"/v1/webhook_endpoints/{created['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "resource_missing"


async def test_a_matching_event_is_delivered_signed_as_the_events_api_shows_it(
    merchant_a: httpx.AsyncClient, receiver: FakeCrmServer
) -> None:
    endpoint = await _endpoint(merchant_a, receiver.url(HOOK))
    payment_id = await _pay(merchant_a)
    the_id = event_id(payment_id, EventKind.CONFIRMED)

    [request] = await receiver.wait_for_requests(1, HOOK, timeout=20)
    assert _verifies(request, endpoint["secret"])
    assert not _verifies(request, "whsec_someone_else")
    assert request.header("Idempotency-Key") == the_id
    assert request.json() == (await merchant_a.get(f"/v1/events/{the_id}")).json()
    [attempt] = await _attempts(merchant_a, endpoint["id"], lambda log: len(log) == 1)
    assert attempt["event_id"] == the_id and attempt["event_type"] == "payment.confirmed"
    assert (attempt["attempt"], attempt["status_code"], attempt["succeeded"]) == (1, 200, True)
    assert attempt["error"] is None and attempt["latency_ms"] >= 0 and not attempt["manual"]
    await asyncio.sleep(1)  # payments.raw is not one it asked for
    assert len(receiver.requests_for(HOOK)) == 1


async def test_a_subscriptions_transitions_reach_an_endpoint_that_asked_for_them(
    merchant_a: httpx.AsyncClient, receiver: FakeCrmServer
) -> None:
    """Issue 17: `subscription.*` events go the payments' way (events store, dispatcher,
    signed delivery), and only to endpoints subscribed to them."""
    endpoint = await _endpoint(merchant_a, receiver.url(HOOK), ["subscription.*"])
    created = await merchant_a.post(
        "/v1/subscriptions",
        json={
            "customer_id": "cus_hooks",
            "merchant_id": "mer_hooks",
            "payment_method": "pm_card_visa_0001",
            "unit_amount": 900,
            "currency": "USD",
            "interval": "month",
            "trial_days": 10,
        },
        headers={"Idempotency-Key": f"sub-{uuid.uuid4().hex}"},
    )
    assert created.status_code == 201, created.text
    subscription_id = created.json()["id"]
    canceled = await merchant_a.post(f"/v1/subscriptions/{subscription_id}/cancel")
    assert canceled.status_code == 200, canceled.text

    requests = await receiver.wait_for_requests(2, HOOK, timeout=20)
    assert all(_verifies(r, endpoint["secret"]) for r in requests)
    delivered = sorted((r.json() for r in requests), key=lambda e: e["data"]["sequence"])
    assert [e["type"] for e in delivered] == ["subscription.created", "subscription.canceled"]
    assert {e["data"]["subscription_id"] for e in delivered} == {subscription_id}
    assert delivered[0] == (await merchant_a.get(f"/v1/events/{delivered[0]['id']}")).json()


async def test_a_failing_then_recovering_receiver_gets_the_event_after_backed_off_retries(
    merchant_a: httpx.AsyncClient, receiver: FakeCrmServer
) -> None:
    endpoint = await _endpoint(merchant_a, receiver.url(HOOK))
    receiver.delay_for(3.0, times=1, path_prefix=HOOK)  # hangs past the 1 s timeout
    receiver.fail_for(3.0, status=503, path_prefix=HOOK)  # then answers 503 for a while
    payment_id = await _pay(merchant_a)

    log = await _attempts(merchant_a, endpoint["id"], lambda log: any(a["succeeded"] for a in log))
    assert [a["attempt"] for a in log] == list(range(1, len(log) + 1))
    assert len(log) >= 3 and [a["succeeded"] for a in log] == [False] * (len(log) - 1) + [True]
    assert (log[0]["status_code"], log[0]["error"]) == (None, "timed out after 1s")
    assert log[0]["latency_ms"] >= 900
    assert all(a["status_code"] == 503 for a in log[1:-1])
    assert all(a["error"].startswith("answered 503") for a in log[1:-1])
    assert log[-1]["status_code"] == 200 and log[-1]["error"] is None
    # Exponential backoff: a workflow timer never fires early, so each pause between attempts
    # is at least the policy's (0.5 s doubling, capped at 2 s, less the 10 % jitter).
    starts = [datetime.fromisoformat(a["attempted_at"]) for a in log]
    pauses = [
        (later - earlier).total_seconds() - attempt["latency_ms"] / 1000
        for attempt, (earlier, later) in zip(log, itertools.pairwise(starts), strict=False)
    ]
    floors = [0.9 * min(0.5 * 2**n, 2.0) - 0.05 for n in range(len(pauses))]
    assert all(p >= f for p, f in zip(pauses, floors, strict=True)), (pauses, floors)
    requests = receiver.requests_for(HOOK)
    assert {r.header("Idempotency-Key") for r in requests} == {
        event_id(payment_id, EventKind.CONFIRMED)
    }
    assert all(_verifies(r, endpoint["secret"]) for r in requests)  # signed afresh each time


async def test_an_event_can_be_redelivered_on_request(
    merchant_a: httpx.AsyncClient, merchant_b: httpx.AsyncClient, receiver: FakeCrmServer
) -> None:
    endpoint = await _endpoint(merchant_a, receiver.url(HOOK))
    payment_id = await _pay(merchant_a)
    the_id = event_id(payment_id, EventKind.CONFIRMED)
    await receiver.wait_for_requests(1, HOOK, timeout=20)

    redelivered = await merchant_a.post(f"/v1/events/{the_id}/redeliver")
    assert redelivered.status_code == 202, redelivered.text
    [started] = redelivered.json()["data"]
    assert (started["event"], started["webhook_endpoint"]) == (the_id, endpoint["id"])
    first, second = await receiver.wait_for_requests(2, HOOK, timeout=20)
    assert first.body == second.body and second.header("Idempotency-Key") == the_id
    assert _verifies(second, endpoint["secret"])
    log = await _attempts(merchant_a, endpoint["id"], lambda log: len(log) == 2)
    assert [(a["manual"], a["succeeded"]) for a in log] == [(False, True), (True, True)]
    assert log[1]["delivery"] == started["delivery"] != log[0]["delivery"]

    # Naming the endpoint works too; another client can neither redeliver nor name it.
    named = await merchant_a.post(
        f"/v1/events/{the_id}/redeliver", json={"webhook_endpoint": endpoint["id"]}
    )
    assert named.status_code == 202
    assert (await merchant_b.post(f"/v1/events/{the_id}/redeliver")).status_code == 404
    payment_b = await _pay(merchant_b)
    foreign = await merchant_b.post(
        f"/v1/events/{event_id(payment_b, EventKind.CONFIRMED)}/redeliver",
        json={"webhook_endpoint": endpoint["id"]},
    )
    assert foreign.status_code == 404 and foreign.json()["error"]["param"] == "webhook_endpoint"


async def test_an_endpoint_failing_for_the_whole_retry_window_is_disabled_with_an_event(
    merchant_a: httpx.AsyncClient, receiver: FakeCrmServer
) -> None:
    endpoint = await _endpoint(merchant_a, receiver.url(HOOK))
    receiver.respond_with(500, path_prefix=HOOK, body="database exploded")
    payment_id = await _pay(merchant_a)

    deadline = time.monotonic() + GIVE_UP_AFTER + 20
    while time.monotonic() < deadline:
        current = (await merchant_a.get(f"/v1/webhook_endpoints/{endpoint['id']}")).json()
        if current["status"] == "disabled":
            break
        await asyncio.sleep(0.3)
    assert current["status"] == "disabled", current
    assert "every delivery failed since" in current["disabled_reason"]
    log = await _attempts(merchant_a, endpoint["id"], lambda log: len(log) >= 3)
    assert not any(a["succeeded"] for a in log)
    assert log[-1]["error"] == "answered 500: database exploded"
    span = datetime.fromisoformat(log[-1]["attempted_at"]) - datetime.fromisoformat(
        log[0]["attempted_at"]
    )
    # Attempts only within the retry window (plus the time an attempt takes to be picked up).
    assert span.total_seconds() <= GIVE_UP_AFTER + 2

    events = (await merchant_a.get("/v1/events", params={"type": "webhook_endpoint.*"})).json()
    [disabled] = [e for e in events["data"] if e["data"]["webhook_endpoint_id"] == endpoint["id"]]
    assert disabled["type"] == "webhook_endpoint.disabled" and disabled["payment_id"] is None
    assert disabled["data"]["last_event_id"] == event_id(payment_id, EventKind.CONFIRMED)

    # Disabled: new events do not go there; redelivering to it is refused until re-enabled.
    tried = len(receiver.requests_for(HOOK))
    await _pay(merchant_a)
    await asyncio.sleep(2)
    assert len(receiver.requests_for(HOOK)) == tried
    refused = await merchant_a.post(
        f"/v1/events/{event_id(payment_id, EventKind.CONFIRMED)}/redeliver",
        json={"webhook_endpoint": endpoint["id"]},
    )
    assert (
        refused.status_code == 409
        and refused.json()["error"]["code"] == "webhook_endpoint_disabled"
    )
    enabled = await merchant_a.post(
        f"/v1/webhook_endpoints/{endpoint['id']}", json={"enabled": True}
    )
    assert enabled.json()["status"] == "enabled" and enabled.json()["disabled_reason"] is None


async def test_a_rotated_secret_and_the_previous_one_both_sign_during_the_overlap(
    merchant_a: httpx.AsyncClient, receiver: FakeCrmServer, engine: AsyncEngine
) -> None:
    endpoint = await _endpoint(merchant_a, receiver.url(HOOK))
    old = endpoint["secret"]
    rotated = await merchant_a.post(
        f"/v1/webhook_endpoints/{endpoint['id']}/rotate_secret",
        json={"expire_previous_after_seconds": 3600},
    )
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["secret"]
    assert new != old and rotated.json()["previous_secret_expires_at"] is not None
    assert (await merchant_a.get(f"/v1/webhook_endpoints/{endpoint['id']}")).json()[
        "secret"
    ] is None

    await _pay(merchant_a)
    [during] = await receiver.wait_for_requests(1, HOOK, timeout=20)
    assert (during.header("Paysaga-Signature") or "").count("v1=") == 2
    assert _verifies(during, new) and _verifies(during, old)

    retired = await merchant_a.post(
        f"/v1/webhook_endpoints/{endpoint['id']}/rotate_secret",
        json={"expire_previous_after_seconds": 0},
    )
    newest = retired.json()["secret"]
    await _pay(merchant_a)
    _, after = await receiver.wait_for_requests(2, HOOK, timeout=20)
    assert (after.header("Paysaga-Signature") or "").count("v1=") == 1
    assert _verifies(after, newest) and not _verifies(after, new) and not _verifies(after, old)
    # At rest, neither the current nor the previous secret is readable.
    async with engine.connect() as conn:
        stored = (
            await conn.execute(
                text("SELECT secret, previous_secret FROM webhook_endpoints WHERE id = :i"),
                {"i": endpoint["id"]},
            )
        ).one()
    assert all(value.startswith(SEALED_PREFIX) for value in stored), stored
    assert not {old, new, newest} & {*stored} and not any(
        plain in value for value in stored for plain in (old, new, newest)
    )


async def test_a_sealed_secret_opens_only_for_its_own_endpoint_and_legacy_ones_still_read(
    engine: AsyncEngine,
) -> None:
    """The store seals with the payload keys and binds each secret to its endpoint's id; a
    secret stored before sealing (in the clear) is still read; without the keys a sealed one
    is refused, never used as it stands."""
    sealer = EncryptionCodec.from_keys([HOOK_KEY])
    store = WebhookEndpoints(engine, sealer=sealer)
    client = f"seal-{uuid.uuid4().hex[:6]}"
    first = await store.create(client, "https://a.example/hook", ["*"], None, True)
    second = await store.create(client, "https://b.example/hook", ["*"], None, True)
    legacy = await store.create(client, "https://c.example/hook", ["*"], None, True)
    assert first.revealed_secret and first.revealed_secret.startswith("whsec_")
    assert first.revealed_secret != second.revealed_secret
    assert first.revealed_secret not in first.secret  # what is kept is sealed
    now = datetime.now(UTC)

    async def signing_secrets(of: WebhookEndpoints, endpoint_id: str) -> list[str]:
        found = await of.get(client, endpoint_id)
        assert found is not None and found.revealed_secret is None  # never shown again
        return of.signing_secrets(found, now)

    async with engine.begin() as conn:
        # Another endpoint's sealed secret copied over this one's does not open here.
        await conn.execute(
            text(
                "UPDATE webhook_endpoints SET secret = (SELECT secret FROM webhook_endpoints "
                "WHERE id = :from_id) WHERE id = :to_id"
            ),
            {"from_id": first.id, "to_id": second.id},
        )
        # A secret stored in the clear before sealing began.
        await conn.execute(
            text("UPDATE webhook_endpoints SET secret = 'whsec_legacy' WHERE id = :i"),
            {"i": legacy.id},
        )
    with pytest.raises(PayloadDecryptionError):
        await signing_secrets(store, second.id)
    assert await signing_secrets(store, first.id) == [first.revealed_secret]
    assert await signing_secrets(store, legacy.id) == ["whsec_legacy"]
    with pytest.raises(UnknownEncryptionKeyError, match="'hooks1'"):  # names the missing key
        await signing_secrets(WebhookEndpoints(engine), first.id)


async def test_an_endpoint_whose_key_was_retired_still_reads_and_only_its_deliveries_fail(
    merchant_a: httpx.AsyncClient,
    merchant_b: httpx.AsyncClient,
    receiver: FakeCrmServer,
    engine: AsyncEngine,
) -> None:
    """Its secret sealed with a key no longer in PAYSAGA_ENCRYPTION_KEYS: the API still shows,
    lists and changes the endpoint (no 500), its attempts fail saying why, in its delivery log,
    and every other endpoint's deliveries go on (the dispatcher matches without opening)."""
    stranded = await _endpoint(merchant_a, receiver.url("/stranded"))
    healthy = await _endpoint(merchant_b, receiver.url(HOOK))
    retired = EncryptionCodec.from_keys(
        [EncryptionKey.model_validate({"key_id": "retired1", "key_b64": generate_key()})]
    )
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE webhook_endpoints SET secret = :s WHERE id = :i"),
            {"s": retired.seal_text("whsec_of_the_past", stranded["id"]), "i": stranded["id"]},
        )

    path = f"/v1/webhook_endpoints/{stranded['id']}"
    assert (await merchant_a.get(path)).json() == {**stranded, "secret": None}
    listed = await merchant_a.get("/v1/webhook_endpoints")
    assert listed.status_code == 200 and [e["id"] for e in listed.json()["data"]] == [
        stranded["id"]
    ]
    changed = await merchant_a.post(path, json={"description": "key retired"})
    assert changed.status_code == 200 and changed.json()["description"] == "key retired"

    await asyncio.gather(_pay(merchant_a), _pay(merchant_b))
    [delivered] = await receiver.wait_for_requests(1, HOOK, timeout=20)
    assert _verifies(delivered, healthy["secret"])
    [failed, *_] = await _attempts(merchant_a, stranded["id"], lambda log: len(log) >= 1)
    assert failed["succeeded"] is False and failed["status_code"] is None
    assert "cannot be opened" in failed["error"] and "'retired1'" in failed["error"]
    assert not receiver.requests_for("/stranded")


async def test_endpoints_and_their_events_are_scoped_to_their_client(
    merchant_a: httpx.AsyncClient, merchant_b: httpx.AsyncClient, receiver: FakeCrmServer
) -> None:
    with FakeCrmServer() as receiver_b:
        mine = await _endpoint(merchant_a, receiver.url(HOOK), ["*"])
        theirs = await _endpoint(merchant_b, receiver_b.url(HOOK), ["*"])
        for method, path in [
            ("GET", ""),
            ("POST", ""),
            ("DELETE", ""),
            ("POST", "/rotate_secret"),
            ("GET", "/deliveries"),
        ]:
            answer = await merchant_b.request(
                method,
                f"/v1/webhook_endpoints/{mine['id']}{path}",
                json={} if method == "POST" else None,
            )
            assert answer.status_code == 404, (method, path, answer.text)
        assert mine["id"] not in {
            e["id"] for e in (await merchant_b.get("/v1/webhook_endpoints")).json()["data"]
        }

        payment_a = await _pay(merchant_a)
        await receiver.wait_for_requests(2, HOOK, timeout=20)  # raw and confirmed
        await asyncio.sleep(1)
        assert receiver_b.requests_for(HOOK) == []
        assert {r.json()["payment_id"] for r in receiver.requests_for(HOOK)} == {payment_a}
        assert theirs["id"] != mine["id"]


async def test_a_hanging_endpoint_does_not_hold_back_another_nor_the_payments(
    merchant_b: httpx.AsyncClient,
) -> None:
    with FakeCrmServer() as slow, FakeCrmServer() as fast:
        slow.delay_for(5.0, path_prefix=HOOK)  # every request hangs past the 1 s timeout
        hanging = await _endpoint(merchant_b, slow.url(HOOK), ["payment.*"])
        healthy = await _endpoint(merchant_b, fast.url(HOOK), ["payment.*"])
        started = time.monotonic()
        payments = await asyncio.gather(*(_pay(merchant_b, amount=2000 + n) for n in range(6)))
        paid_in = time.monotonic() - started
        # 12 events for each endpoint; the hanging one may only ever use 2 of the 6 slots.
        await fast.wait_for_requests(12, HOOK, timeout=20)
        delivered_in = time.monotonic() - started
        assert {r.json()["payment_id"] for r in fast.requests_for(HOOK)} == set(payments)
        log = await _attempts(merchant_b, hanging["id"], lambda log: len(log) >= 8)
        assert not any(a["succeeded"] for a in log)
        # Never more than its share in flight at once, though 12 deliveries wanted a slot.
        spans = [
            (start, start + timedelta(milliseconds=a["latency_ms"]))
            for a in log
            for start in [datetime.fromisoformat(a["attempted_at"])]
        ]
        most = max(sum(1 for s, e in spans if s <= moment < e) for moment, _ in spans)
        assert most <= 2, spans
        print(
            f"6 payments in {paid_in:.1f}s; 12 deliveries to the healthy one in {delivered_in:.1f}s"
        )
        for endpoint in (hanging, healthy):
            await merchant_b.delete(f"/v1/webhook_endpoints/{endpoint['id']}")


async def test_the_documented_receiver_takes_real_deliveries_through_a_rotation(
    merchant_a: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/webhooks.md's receiver, run as written, behind a real endpoint."""
    port = free_port()
    endpoint = await _endpoint(merchant_a, f"http://127.0.0.1:{port}/paysaga")
    monkeypatch.setenv("PAYSAGA_WEBHOOK_SECRETS", endpoint["secret"])
    receiver = _documented_receiver()
    server = ThreadingHTTPServer(("127.0.0.1", port), receiver["PaysagaEvents"])
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        first = await _pay(merchant_a)
        await _handled(receiver, event_id(first, EventKind.CONFIRMED))
        # Rotate, and deploy only the new secret: the overlap's second signature carries it.
        rotated = await merchant_a.post(f"/v1/webhook_endpoints/{endpoint['id']}/rotate_secret")
        receiver["SECRETS"][:] = [rotated.json()["secret"]]
        second = await _pay(merchant_a)
        await _handled(receiver, event_id(second, EventKind.CONFIRMED))
        # A forged delivery is refused and handles nothing.
        forged = await asyncio.to_thread(
            httpx.post,
            f"http://127.0.0.1:{port}/paysaga",
            content=b'{"id": "x", "type": "payment.confirmed"}',
            headers={"Paysaga-Signature": f"t={int(time.time())},v1={'0' * 64}"},
        )
        assert forged.status_code == 400 and "x" not in receiver["handled"]
    finally:
        server.shutdown()
        server.server_close()
    log = await _attempts(merchant_a, endpoint["id"], lambda log: len(log) == 2)
    assert [(a["status_code"], a["succeeded"]) for a in log] == [(204, True), (204, True)]


def _documented_receiver() -> dict[str, Any]:
    document = (REPO / "docs" / "webhooks.md").read_text()
    section = document.split("### A receiver", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "documented_receiver"}
    exec(compile(code, "docs/webhooks.md", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


async def _handled(receiver: dict[str, Any], the_id: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while the_id not in receiver["handled"]:
        assert time.monotonic() < deadline, f"the documented receiver never handled {the_id}"
        await asyncio.sleep(0.1)


async def test_reseal_moves_every_secret_under_the_current_key_and_names_what_it_cannot_open(
    engine: AsyncEngine, stack: Stack
) -> None:
    """`paysaga webhooks reseal` before retiring a key: the secrets (current and previous) are
    sealed with the first configured key and stay the same, so merchants change nothing and the
    old key can go; a secret in the clear is sealed too; one whose key is gone is named, exit 1."""
    old_key, new_key, lost_key = (
        EncryptionKey.model_validate({"key_id": name, "key_b64": generate_key()})
        for name in ("reseal-old", "reseal-new", "reseal-lost")
    )
    client = f"reseal-{uuid.uuid4().hex[:6]}"
    old_store = WebhookEndpoints(engine, sealer=EncryptionCodec.from_keys([old_key]))
    rotated = await old_store.create(client, "https://a.example/hook", ["*"], None, True)
    newest = await old_store.rotate_secret(client, rotated.id, timedelta(days=1))
    legacy = await WebhookEndpoints(engine).create(
        client, "https://b.example/hook", ["*"], None, True
    )
    lost = await WebhookEndpoints(engine, sealer=EncryptionCodec.from_keys([lost_key])).create(
        client, "https://c.example/hook", ["*"], None, True
    )
    assert newest is not None

    keys = json.dumps(
        [{"key_id": k.key_id, "key_b64": k.key_b64.get_secret_value()} for k in (new_key, old_key)]
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")},
        "PAYSAGA_DATABASE_URL": stack.database_url,
        "PAYSAGA_ENCRYPTION_KEYS": keys,
    }
    ran = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).parent / "paysaga"), "webhooks", "reseal"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "resealed" in ran.stdout and lost.id in ran.stderr, ran.stdout + ran.stderr

    async with engine.connect() as conn:
        stored = {
            row.id: (row.secret, row.previous_secret)
            for row in await conn.execute(
                text(
                    "SELECT id, secret, previous_secret FROM webhook_endpoints WHERE client_id = :c"
                ),
                {"c": client},
            )
        }
    for endpoint_id in (rotated.id, legacy.id):
        assert all(
            v is None or (is_sealed(v) and sealed_key_id(v) == "reseal-new")
            for v in stored[endpoint_id]
        ), stored[endpoint_id]
    assert sealed_key_id(stored[lost.id][0]) == "reseal-lost"  # left as it was

    # Only the new key from now on: the same secrets still sign.
    only_new = WebhookEndpoints(engine, sealer=EncryptionCodec.from_keys([new_key]))
    now = datetime.now(UTC)
    after_rotation = await only_new.get(client, rotated.id)
    assert after_rotation is not None
    assert only_new.signing_secrets(after_rotation, now) == [
        newest.revealed_secret,
        rotated.revealed_secret,
    ]
    after_legacy = await only_new.get(client, legacy.id)
    assert after_legacy is not None
    assert only_new.signing_secrets(after_legacy, now) == [legacy.revealed_secret]


async def test_reseal_on_the_development_stack_takes_the_key_paysaga_run_keeps(
    engine: AsyncEngine, stack: Stack, tmp_path: Path
) -> None:
    """Without PAYSAGA_ENCRYPTION_KEYS, `paysaga run` seals with the key under its home: reseal
    takes that one too (it said "nothing to seal with" on the very stack it describes), and
    says where it looked when there is none."""
    client = f"reseal-dev-{uuid.uuid4().hex[:6]}"
    legacy = await WebhookEndpoints(engine).create(
        client, "https://d.example/hook", ["*"], None, True
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")},
        "PAYSAGA_DATABASE_URL": stack.database_url,
        "PAYSAGA_HOME": str(tmp_path),
    }
    paysaga = str(Path(sys.executable).parent / "paysaga")

    def reseal() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [paysaga, "webhooks", "reseal"], env=env, capture_output=True, text=True, timeout=120
        )

    nothing = await asyncio.to_thread(reseal)
    assert nothing.returncode == 2, nothing.stdout + nothing.stderr
    assert str(tmp_path / "encryption-key") in nothing.stderr, nothing.stderr

    dev_key = load_or_create_dev_key(tmp_path / "encryption-key")
    ran = await asyncio.to_thread(reseal)
    # Other tests' endpoints sealed with their own keys may be named (exit 1); ours is resealed.
    assert ran.returncode in (0, 1) and "resealed" in ran.stdout, ran.stdout + ran.stderr
    async with engine.connect() as conn:
        secret = await conn.scalar(
            text("SELECT secret FROM webhook_endpoints WHERE id = :id"), {"id": legacy.id}
        )
    assert is_sealed(secret) and sealed_key_id(secret) == dev_key.key_id, secret
    with_dev_key = WebhookEndpoints(engine, sealer=EncryptionCodec.from_keys([dev_key]))
    reread = await with_dev_key.get(client, legacy.id)
    assert reread is not None
    assert with_dev_key.signing_secrets(reread, datetime.now(UTC)) == [legacy.revealed_secret]
