"""`/v1/events` against the real stack: every event of a payment, with Kafka's ids, newest
first, paged by cursor, filtered, and visible only to the API client that owns it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from domain.events import EventKind, event_id
from domain.fraud import amount_for_limit_share
from settings import ApiKey, Settings
from tests.conftest import MERCHANT_SCOPES, OTHER_CLIENT_KEY, READONLY_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.kafka import consume_events, dedupe_by_id
from tests.helpers.saga import create_payment, payment_body

# Two clients of their own, so "all my events" is exactly what this module made.
ALPHA_KEY = "psk_test_events_alpha_0123456789abcdefgh"
BETA_KEY = "psk_test_events_beta_0123456789abcdefghi"


@pytest.fixture(scope="module")
def events_settings(app_settings: Settings) -> Settings:
    return app_settings.model_copy(
        update={
            "api_keys": [
                *app_settings.api_keys,
                ApiKey(
                    client_id=f"events-alpha-{uuid.uuid4().hex[:6]}",
                    key_sha256=ApiKey.hash(ALPHA_KEY),
                    scopes=list(MERCHANT_SCOPES),
                ),
                ApiKey(
                    client_id=f"events-beta-{uuid.uuid4().hex[:6]}",
                    key_sha256=ApiKey.hash(BETA_KEY),
                    scopes=list(MERCHANT_SCOPES),
                ),
            ]
        }
    )


@pytest.fixture(scope="module")
async def alpha(
    events_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(events_settings, temporal_client, ALPHA_KEY) as client:
        yield client


@pytest.fixture(scope="module")
async def beta(
    events_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(events_settings, temporal_client, BETA_KEY) as client:
        yield client


async def _paid(api: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    created = await create_payment(api, payment_body(**overrides), wait=20)
    assert created.status_code == 201, created.text
    payment: dict[str, Any] = created.json()
    return payment


async def _events(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    answer = await api.get("/v1/events", params=params)
    assert answer.status_code == 200, answer.text
    listing: dict[str, Any] = answer.json()
    return listing


async def _eventually(api: httpx.AsyncClient, count: int, **params: Any) -> list[dict[str, Any]]:
    """Events are recorded as the saga runs: wait until `count` are listed."""
    for _ in range(100):
        data: list[dict[str, Any]] = (await _events(api, limit=100, **params))["data"]
        if len(data) >= count:
            return data
        await asyncio.sleep(0.1)
    raise AssertionError(f"only {len(data)} of {count} events listed for {params}")


async def test_every_event_of_a_payment_is_listed_newest_first_with_its_kafka_id(
    alpha: httpx.AsyncClient, app_settings: Settings
) -> None:
    payment = await _paid(alpha)
    assert payment["status"] == "succeeded"
    pid = payment["id"]
    refunded = await alpha.post(
        f"/v1/payments/{pid}/refunds",
        json={"amount": 700},
        headers={"Idempotency-Key": "events-refund-1"},
    )
    assert refunded.status_code == 201, refunded.text
    refund_id = refunded.json()["id"]

    events = await _eventually(alpha, 3, payment_id=pid)
    assert [e["type"] for e in events] == [
        "payment.refunded",
        "payment.confirmed",
        "payment.raw",
    ]
    assert [e["id"] for e in events] == [
        event_id(pid, EventKind.REFUNDED, refund_id),
        event_id(pid, EventKind.CONFIRMED),
        event_id(pid, EventKind.RAW),
    ]
    assert all(e["object"] == "event" and e["payment_id"] == pid for e in events)
    # The saga's own order of the payment's events (data.sequence) is the listing's, reversed.
    assert [e["data"]["sequence"] for e in events] == [3, 2, 1]
    assert events[0]["data"]["refund_id"] == refund_id and events[0]["data"]["amount"] == 700

    # The same ids, types and data on Kafka: the events API is a catch-up for its consumers.
    topics = [EventKind.RAW.topic, EventKind.CONFIRMED.topic, EventKind.REFUNDED.topic]
    wanted = {e["id"] for e in events}
    on_kafka = dedupe_by_id(
        await asyncio.to_thread(
            consume_events,
            app_settings.kafka_bootstrap_servers or "",
            topics,
            until=lambda seen: wanted <= set(dedupe_by_id(seen)),
        )
    )
    for event in events:
        record = on_kafka[event["id"]]
        assert record.key == pid
        assert record.type == f"com.paysaga.{event['type']}"
        assert record.body["data"] == event["data"]
        assert datetime.fromisoformat(record.body["occurred_at"]) == datetime.fromisoformat(
            event["occurred_at"]
        )

    single = await alpha.get(f"/v1/events/{events[1]['id']}")
    assert single.status_code == 200
    assert single.json() == events[1]


async def test_a_rejected_payment_has_its_rejection_in_the_events(
    alpha: httpx.AsyncClient,
) -> None:
    payment = await _paid(alpha, amount=amount_for_limit_share("USD", 80))
    assert payment["status"] == "rejected"
    [event] = await _eventually(alpha, 1, payment_id=payment["id"])
    assert event["type"] == "payment.rejected"
    assert event["id"] == event_id(payment["id"], EventKind.REJECTED)
    assert event["data"]["status"] == "rejected"


async def test_paging_by_cursor_visits_every_event_once_both_ways(
    beta: httpx.AsyncClient,
) -> None:
    payments = [await _paid(beta, amount=1000 + n) for n in range(3)]
    everything = await _eventually(beta, 6)  # raw + confirmed each
    assert len(everything) == 6
    assert {e["payment_id"] for e in everything} == {p["id"] for p in payments}
    stamps = [e["created_at"] for e in everything]
    assert stamps == sorted(stamps, reverse=True)

    forward: list[str] = []
    cursor: str | None = None
    while True:
        page = await _events(beta, limit=4, **({"starting_after": cursor} if cursor else {}))
        forward += [e["id"] for e in page["data"]]
        if not page["has_more"]:
            break
        cursor = page["data"][-1]["id"]
    assert forward == [e["id"] for e in everything]

    backward: list[str] = []
    cursor = everything[-1]["id"]
    while True:
        page = await _events(beta, limit=4, ending_before=cursor)
        backward = [e["id"] for e in page["data"]] + backward
        if not page["has_more"]:
            break
        cursor = page["data"][0]["id"]
    assert backward == [e["id"] for e in everything[:-1]]

    both = await beta.get(
        "/v1/events", params={"starting_after": forward[0], "ending_before": forward[2]}
    )
    assert both.status_code == 400 and both.json()["error"]["code"] == "parameters_exclusive"


async def test_filters_by_type_and_payment(beta: httpx.AsyncClient) -> None:
    payment = await _paid(beta, amount=1234)
    await _eventually(beta, 2, payment_id=payment["id"])
    confirmed = await _events(beta, type="payment.confirmed", limit=100)
    assert confirmed["data"] and {e["type"] for e in confirmed["data"]} == {"payment.confirmed"}
    wildcard = await _events(beta, type="payment.*", limit=100)
    assert {e["type"] for e in wildcard["data"]} == {"payment.confirmed", "payment.raw"}
    one = await _events(beta, payment_id=payment["id"], type="payment.raw")
    assert [e["id"] for e in one["data"]] == [event_id(payment["id"], EventKind.RAW)]
    unknown = await beta.get("/v1/events", params={"type": "payment.teleported"})
    assert unknown.status_code == 422
    assert unknown.json()["error"]["param"] == "type"


async def test_events_are_scoped_to_the_client_that_owns_them(
    alpha: httpx.AsyncClient,
    beta: httpx.AsyncClient,
    events_settings: Settings,
    temporal_client: Client,
) -> None:
    payment = await _paid(alpha, amount=4321)
    mine = await _eventually(alpha, 2, payment_id=payment["id"])
    theirs = mine[0]["id"]

    assert (await beta.get(f"/v1/events/{theirs}")).status_code == 404
    assert (await _events(beta, payment_id=payment["id"]))["data"] == []
    everything_beta_sees = await _events(beta, limit=100)
    assert theirs not in {e["id"] for e in everything_beta_sees["data"]}
    cursor = await beta.get("/v1/events", params={"starting_after": theirs})
    assert cursor.status_code == 404
    assert cursor.json()["error"] == {
        "type": "invalid_request_error",
        "code": "resource_missing",
        "message": "No such event.",
        "param": "starting_after",
    }
    # The conftest's other client too: nothing of alpha's.
    async with api_client(events_settings, temporal_client, OTHER_CLIENT_KEY) as other:
        assert (await other.get(f"/v1/events/{theirs}")).status_code == 404
        listed = await other.get("/v1/events", params={"payment_id": payment["id"]})
        assert listed.status_code == 200 and listed.json()["data"] == []


@pytest.mark.parametrize(
    "unknown", [str(uuid.uuid4()), "evt_not_a_uuid", "00000000-0000-0000-0000-000000000000"]
)
async def test_an_unknown_event_id_is_a_404_resource_missing(
    alpha: httpx.AsyncClient, unknown: str
) -> None:
    answer = await alpha.get(f"/v1/events/{unknown}")
    assert answer.status_code == 404
    assert answer.json()["error"] == {
        "type": "invalid_request_error",
        "code": "resource_missing",
        "message": "No such event.",
        "param": "id",
    }


async def test_reading_events_needs_the_events_read_scope(
    app_settings: Settings, temporal_client: Client, worker: None
) -> None:
    async with api_client(app_settings, temporal_client, READONLY_API_KEY) as reader:
        answer = await reader.get("/v1/events")
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "insufficient_scope"
