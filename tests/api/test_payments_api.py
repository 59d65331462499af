"""The payments API over the real saga: idempotency, validation, reads, lists and `?wait=`.

Everything runs against the session stack (Temporal, the broker, PostgreSQL) through the API
over ASGI; each test uses its own customer and idempotency keys, so tests never see each
other's payments.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from domain.events import EventKind, event_id
from domain.fraud import amount_for_limit_share
from domain.payment import payment_id_for
from infra.embedded.stack import Stack
from tests.conftest import OTHER_CLIENT_KEY, READONLY_API_KEY
from tests.helpers.kafka import consume_events, dedupe_by_id
from tests.helpers.saga import create_payment, ledger_rows, payment_body, wait_for_payment

TEST_CLIENT = "test-client"  # the client id of conftest's TEST_API_KEY
OTHER_CLIENT = "other-client"
PAN = "4242424242424242"  # Luhn-valid test card number: must never be accepted
CAPTURE = [("payment", 0, 2)]  # one balanced capture: debit customer, credit merchant


def _key() -> str:
    return f"key-{uuid.uuid4().hex}"


def _as(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


def _error(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


async def _succeeded(api: httpx.AsyncClient, payment_id: str) -> dict[str, Any]:
    return await wait_for_payment(api, payment_id, lambda p: p["status"] == "succeeded")


async def _assert_no_workflow(temporal_client: Client, payment_id: str) -> None:
    with pytest.raises(RPCError) as raised:
        await temporal_client.get_workflow_handle(payment_id).describe()
    assert raised.value.status == RPCStatusCode.NOT_FOUND


async def _customer_footprint(engine: AsyncEngine, customer_id: str) -> dict[str, int]:
    """What the register and the ledger hold for a customer: all zero if no payment ever
    reached them."""
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT (SELECT count(*) FROM payments WHERE customer_id = :c) AS payments, "
                    "(SELECT count(*) FROM ledger_entries e JOIN accounts a "
                    " ON a.id = e.account_id WHERE a.code LIKE :code) AS entries"
                ),
                {"c": customer_id, "code": f"customer:%{customer_id}:%"},
            )
        ).one()
    return {"payments": int(row.payments), "entries": int(row.entries)}


async def _listed(api: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await api.get("/v1/payments", params=params)
    assert response.status_code == 200, response.text
    listing: dict[str, Any] = response.json()
    return listing


async def _until_listed(
    api: httpx.AsyncClient, expected: set[str], timeout: float = 10, **params: Any
) -> None:
    """Visibility is eventually consistent: poll until the filter shows exactly `expected`."""
    deadline = time.monotonic() + timeout
    ids: set[str] = set()
    while time.monotonic() < deadline:
        ids = {item["id"] for item in (await _listed(api, limit=100, **params))["data"]}
        if ids == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"listing {params} shows {ids}, expected {expected}")


# ── idempotency ──────────────────────────────────────────────────────────────────────────────


async def test_a_replayed_request_is_the_same_payment_and_moves_money_once(
    api: httpx.AsyncClient, engine: AsyncEngine, temporal_client: Client
) -> None:
    body = payment_body(amount=1999)
    key = _key()
    first = await create_payment(api, body, key=key, wait=10)
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    payment_id = first.json()["id"]
    assert payment_id == payment_id_for(TEST_CLIENT, key)
    assert first.headers["Location"] == f"/v1/payments/{payment_id}"

    # The same body with its keys in another order is the same request.
    replay = await create_payment(api, dict(reversed(body.items())), key=key, wait=0)
    assert replay.status_code == 201, replay.text
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == payment_id
    assert replay.json()["amount"] == 1999

    payment = await _succeeded(api, payment_id)
    assert payment["amount_captured"] == 1999
    late_replay = await create_payment(api, body, key=key, wait=0)
    assert late_replay.headers["Idempotent-Replayed"] == "true"
    assert late_replay.json()["status"] == "succeeded"  # the replay reports the live state

    assert (await temporal_client.count_workflows(f"WorkflowId = '{payment_id}'")).count == 1
    assert [
        (r["kind"], r["total"], r["entries"]) for r in await ledger_rows(engine, payment_id)
    ] == (CAPTURE)


@pytest.mark.parametrize(
    "change",
    [{"amount": 2001}, {"metadata": {"order_id": "1002"}}, {"description": None}],
    ids=["amount", "metadata", "description-dropped"],
)
async def test_a_key_reused_with_another_body_is_409_and_changes_nothing(
    api: httpx.AsyncClient, engine: AsyncEngine, change: dict[str, Any]
) -> None:
    body = payment_body(amount=2000)
    key = _key()
    created = await create_payment(api, body, key=key, wait=10)
    assert created.status_code == 201, created.text
    payment_id = created.json()["id"]

    reused = await create_payment(api, {**body, **change}, key=key, wait=0)
    assert reused.status_code == 409, reused.text
    error = _error(reused)
    assert error["type"] == "idempotency_error"
    assert error["code"] == "idempotency_key_reused"
    assert error["param"] == "Idempotency-Key"
    assert "Idempotent-Replayed" not in reused.headers

    payment = await _succeeded(api, payment_id)
    assert (payment["amount"], payment["amount_captured"]) == (2000, 2000)
    assert payment["metadata"] == body["metadata"]
    assert [
        (r["kind"], r["total"], r["entries"]) for r in await ledger_rows(engine, payment_id)
    ] == (CAPTURE)


async def test_20_concurrent_posts_with_one_key_make_one_payment_one_posting_one_event(
    api: httpx.AsyncClient, engine: AsyncEngine, stack: Stack, temporal_client: Client
) -> None:
    body = payment_body(amount=3300)
    key = _key()
    responses = await asyncio.gather(
        *(create_payment(api, body, key=key, wait=0) for _ in range(20))
    )

    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses]
    assert {r.json()["id"] for r in responses} == {payment_id_for(TEST_CLIENT, key)}
    payment_id = responses[0].json()["id"]
    # Exactly one request started the workflow; the others were told they replayed it.
    originals = [r for r in responses if r.headers.get("Idempotent-Replayed") != "true"]
    assert len(originals) == 1

    payment = await _succeeded(api, payment_id)
    assert payment["amount_captured"] == 3300
    assert (await temporal_client.count_workflows(f"WorkflowId = '{payment_id}'")).count == 1
    assert [
        (r["kind"], r["total"], r["entries"]) for r in await ledger_rows(engine, payment_id)
    ] == (CAPTURE)

    events = await asyncio.to_thread(
        consume_events,
        stack.kafka_bootstrap_servers,
        ["payments.confirmed"],
        until=lambda evs: any(e.key == payment_id for e in evs),
    )
    confirmed = dedupe_by_id(e for e in events if e.key == payment_id)
    assert list(confirmed) == [event_id(payment_id, EventKind.CONFIRMED)]


async def test_idempotency_keys_are_scoped_by_api_client(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    body = payment_body(amount=1234)
    key = _key()
    mine = await create_payment(api, body, key=key, wait=10)
    theirs = await api.post(
        "/v1/payments",
        json=body,
        params={"wait": 10},
        headers={**_as(OTHER_CLIENT_KEY), "Idempotency-Key": key},
    )
    assert (mine.status_code, theirs.status_code) == (201, 201), (mine.text, theirs.text)
    assert "Idempotent-Replayed" not in theirs.headers
    my_id, their_id = mine.json()["id"], theirs.json()["id"]
    assert my_id == payment_id_for(TEST_CLIENT, key)
    assert their_id == payment_id_for(OTHER_CLIENT, key)
    assert my_id != their_id

    # Two separate payments, each captured once; neither client can see the other's.
    await _succeeded(api, my_id)
    for payment_id in (my_id, their_id):
        rows = await ledger_rows(engine, payment_id)
        assert [(r["kind"], r["total"], r["entries"]) for r in rows] == CAPTURE
    foreign = await api.get(f"/v1/payments/{their_id}")
    assert foreign.status_code == 404, foreign.text
    assert _error(foreign)["code"] == "resource_missing"
    assert (await api.get(f"/v1/payments/{my_id}", headers=_as(OTHER_CLIENT_KEY))).status_code == (
        404
    )
    listed_by_them = await api.get(
        "/v1/payments", params={"customer_id": body["customer_id"]}, headers=_as(OTHER_CLIENT_KEY)
    )
    assert my_id not in {item["id"] for item in listed_by_them.json()["data"]}


# ── validation: every invalid field is named, and nothing starts ─────────────────────────────


def _without(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {k: v for k, v in body.items() if k != name}


def _with(**changes: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {**body, **changes}


_KEEP = _with()

# (case id, body change, Idempotency-Key (None: not sent), wait, code, param)
INVALID_REQUESTS: list[
    tuple[str, Callable[[dict[str, Any]], dict[str, Any]], str | None, float, str, str]
] = [
    ("amount-zero", _with(amount=0), "valid", 0, "amount_too_small", "amount"),
    ("amount-negative", _with(amount=-100), "valid", 0, "amount_too_small", "amount"),
    ("amount-string", _with(amount="2500"), "valid", 0, "parameter_invalid_integer", "amount"),
    ("amount-float", _with(amount=25.5), "valid", 0, "parameter_invalid_integer", "amount"),
    ("amount-over-limit", _with(amount=100_000_001), "valid", 0, "amount_too_large", "amount"),
    ("amount-missing", _without("amount"), "valid", 0, "parameter_missing", "amount"),
    ("currency-unknown", _with(currency="XYZ"), "valid", 0, "currency_unsupported", "currency"),
    ("currency-lowercase", _with(currency="usd"), "valid", 0, "currency_unsupported", "currency"),
    ("customer-blank", _with(customer_id=""), "valid", 0, "parameter_too_short", "customer_id"),
    (
        "customer-format",
        _with(customer_id="cus 1; drop"),
        "valid",
        0,
        "parameter_invalid_format",
        "customer_id",
    ),
    # Ids become parts of ledger account codes (`merchant:<client>:<merchant>:<CCY>`): no `:`
    # or `.`, and no more than 64 characters.
    (
        "customer-colon",
        _with(customer_id="cus:1"),
        "valid",
        0,
        "parameter_invalid_format",
        "customer_id",
    ),
    (
        "merchant-dot",
        _with(merchant_id="mer.acme"),
        "valid",
        0,
        "parameter_invalid_format",
        "merchant_id",
    ),
    ("merchant-long", _with(merchant_id="m" * 65), "valid", 0, "parameter_too_long", "merchant_id"),
    (
        "idempotency-key-colon",
        _KEEP,
        "order:1001:attempt-1",
        0,
        "parameter_invalid_format",
        "Idempotency-Key",
    ),
    ("merchant-missing", _without("merchant_id"), "valid", 0, "parameter_missing", "merchant_id"),
    (
        "method-card-number",
        _with(payment_method=PAN),
        "valid",
        0,
        "card_data_not_allowed",
        "payment_method",
    ),
    (
        "method-not-a-token",
        _with(payment_method="tok_visa_0001"),
        "valid",
        0,
        "parameter_invalid_format",
        "payment_method",
    ),
    (
        "description-too-long",
        _with(description="x" * 501),
        "valid",
        0,
        "parameter_too_long",
        "description",
    ),
    (
        "metadata-too-many-keys",
        _with(metadata={f"k{i}": "v" for i in range(21)}),
        "valid",
        0,
        "metadata_too_large",
        "metadata",
    ),
    (
        "metadata-card-number",
        _with(metadata={"note": f"card {PAN}"}),
        "valid",
        0,
        "card_data_not_allowed",
        "metadata[note]",
    ),
    ("unknown-field", _with(source="tok_123"), "valid", 0, "parameter_unknown", "source"),
    (
        "salesforce-id",
        _with(salesforce_opportunity_id="006-short"),
        "valid",
        0,
        "parameter_invalid_format",
        "salesforce_opportunity_id",
    ),
    (
        "hubspot-id",
        _with(hubspot_deal_id="deal-1"),
        "valid",
        0,
        "parameter_invalid_format",
        "hubspot_deal_id",
    ),
    ("key-missing", _KEEP, None, 0, "parameter_missing", "Idempotency-Key"),
    ("key-too-short", _KEEP, "k-1", 0, "parameter_too_short", "Idempotency-Key"),
    ("key-bad-chars", _KEEP, "key with spaces", 0, "parameter_invalid_format", "Idempotency-Key"),
    ("wait-too-long", _KEEP, "valid", 31, "parameter_out_of_range", "wait"),
    ("wait-negative", _KEEP, "valid", -1, "parameter_out_of_range", "wait"),
]


@pytest.mark.parametrize(
    ("change", "key", "wait", "code", "param"),
    [case[1:] for case in INVALID_REQUESTS],
    ids=[case[0] for case in INVALID_REQUESTS],
)
async def test_an_invalid_request_names_its_param_and_starts_nothing(
    api: httpx.AsyncClient,
    engine: AsyncEngine,
    temporal_client: Client,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    key: str | None,
    wait: float,
    code: str,
    param: str,
) -> None:
    body = change(payment_body())
    customer_id = str(body.get("customer_id") or payment_body()["customer_id"])
    idempotency_key = _key() if key == "valid" else key
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else {}

    response = await api.post("/v1/payments", json=body, headers=headers, params={"wait": wait})

    assert response.status_code in (400, 422), response.text
    error = _error(response)
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)
    assert PAN not in response.text
    if idempotency_key is not None:
        await _assert_no_workflow(temporal_client, payment_id_for(TEST_CLIENT, idempotency_key))
    assert await _customer_footprint(engine, customer_id) == {"payments": 0, "entries": 0}


# ── reads ────────────────────────────────────────────────────────────────────────────────────


async def test_a_read_only_key_can_read_but_cannot_create(
    api: httpx.AsyncClient, engine: AsyncEngine, temporal_client: Client
) -> None:
    created = await create_payment(api, payment_body(amount=1500), wait=10)
    assert created.status_code == 201, created.text
    payment_id = created.json()["id"]
    read = await api.get(f"/v1/payments/{payment_id}", headers=_as(READONLY_API_KEY))
    assert read.status_code == 200, read.text
    assert read.json()["id"] == payment_id
    assert (await api.get("/v1/payments", headers=_as(READONLY_API_KEY))).status_code == 200

    body = payment_body()
    key = _key()
    refused = await api.post(
        "/v1/payments", json=body, headers={**_as(READONLY_API_KEY), "Idempotency-Key": key}
    )
    assert refused.status_code == 403, refused.text
    assert (_error(refused)["type"], _error(refused)["code"]) == (
        "permission_error",
        "insufficient_scope",
    )
    await _assert_no_workflow(temporal_client, payment_id_for(TEST_CLIENT, key))
    assert await _customer_footprint(engine, body["customer_id"]) == {"payments": 0, "entries": 0}


# Ids no one was ever given: wrong prefix or length, other charsets, a NUL, very long, spaces.
NEVER_ISSUED = (
    "pay_123",
    "pay_" + "G" * 24,
    "ch_" + "0" * 24,
    "x" * 300,
    "a.b:c",
    "%00",
    "%C3%BC",
    "a%20b",
    "-",
    "0",
    "00000000-0000-0000-0000-000000000000",
)
# A body each route takes, so only the id is in question.
_BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/payments/{payment_id}/refunds"): {"amount": 100},
    ("post", "/v1/payments/{payment_id}/disputes"): {
        "reason_code": "10.4",
        "network_reference": "nr-unknown-1",
    },
    ("post", "/v1/payments/{payment_id}/disputes/{dispute_id}/close"): {"outcome": "won"},
    ("post", "/v1/webhook_endpoints/{endpoint_id}"): {"enabled": True},
    ("post", "/v1/reconciliation/exceptions/{exception_id}/resolve"): {
        "action": "write_off",
        "reason": "unknown",
    },
    ("post", "/v1/subscriptions/{subscription_id}/price"): {"unit_amount": 100},
    ("post", "/v1/subscriptions/{subscription_id}/payment_method"): {
        "payment_method": "pm_card_visa"
    },
}


async def test_an_unknown_id_of_any_shape_is_404_on_every_id_path(api: httpx.AsyncClient) -> None:
    """Every `{id}` in the document is a plain string: asking for an id nobody issued is a
    well-formed question whose answer is "not found" (404 `resource_missing`), never a 422
    about its shape. The routes come from the document, so a new one is covered too."""
    unknown = await api.get(f"/v1/payments/pay_{uuid.uuid4().hex[:24]}")
    assert unknown.status_code == 404, unknown.text
    assert (_error(unknown)["code"], _error(unknown)["param"]) == ("resource_missing", "id")

    document = (await api.get("/openapi.json")).json()
    operations = [
        (method, path)
        for path, methods in document["paths"].items()
        if "{" in path
        for method in methods
    ]
    # + capture and void (issue 15), a reconciliation exception and its resolve (issue 16),
    # a subscription's get and its five changes (issue 17)
    assert len(operations) == 22, operations
    for method, path in operations:
        parameters = document["paths"][path][method]["parameters"]
        for parameter in (p for p in parameters if p["in"] == "path"):
            assert parameter["schema"].keys() <= {"type", "title", "description"}, parameter
        for never in NEVER_ISSUED:
            concrete = path
            for name in (
                "payment_id",
                "dispute_id",
                "event_id",
                "endpoint_id",
                "exception_id",
                "subscription_id",
            ):
                concrete = concrete.replace("{" + name + "}", never)
            response = await api.request(
                method.upper(),
                concrete,
                json=_BODIES.get((method, path)),
                headers={"Idempotency-Key": "unknown-id-0001"},
            )
            assert response.status_code == 404, (method, path, never, response.text)
            assert _error(response)["code"] == "resource_missing", (path, never)

    # A real payment with a dispute id nobody issued: the dispute is not found.
    payment = (await create_payment(api, payment_body(amount=700))).json()
    for never in NEVER_ISSUED:
        close = await api.post(
            f"/v1/payments/{payment['id']}/disputes/{never}/close", json={"outcome": "won"}
        )
        assert close.status_code == 404, (never, close.text)
        assert (_error(close)["code"], _error(close)["param"]) == ("resource_missing", "dispute_id")


async def test_the_list_filters_by_status_and_customer_and_pages_with_a_cursor(
    api: httpx.AsyncClient,
) -> None:
    customer = payment_body()["customer_id"]
    created = await asyncio.gather(
        *(create_payment(api, payment_body(amount=1000, customer_id=customer)) for _ in range(3))
    )
    succeeded = {r.json()["id"] for r in created}
    assert len(succeeded) == 3
    for payment_id in succeeded:
        await _succeeded(api, payment_id)
    # 80 % of the USD limit after three 10.00 payments: far above their average: rejected.
    rejected = await create_payment(
        api, payment_body(amount=amount_for_limit_share("USD", 80), customer_id=customer), wait=10
    )
    assert rejected.json()["status"] == "rejected", rejected.text
    rejected_id = rejected.json()["id"]

    await _until_listed(api, succeeded, status="succeeded", customer_id=customer)
    await _until_listed(api, {rejected_id}, status="rejected", customer_id=customer)
    await _until_listed(api, succeeded | {rejected_id}, customer_id=customer)

    first = await _listed(api, status="succeeded", customer_id=customer, limit=2)
    assert len(first["data"]) == 2
    assert first["has_more"] is True and first["next_cursor"]
    second = await _listed(
        api, status="succeeded", customer_id=customer, limit=2, cursor=first["next_cursor"]
    )
    assert len(second["data"]) == 1
    assert second["has_more"] is False and second["next_cursor"] is None
    paged = [item["id"] for item in first["data"] + second["data"]]
    assert sorted(paged) == sorted(succeeded)
    for item in first["data"] + second["data"]:
        assert (item["status"], item["customer_id"], item["amount"]) == (
            "succeeded",
            customer,
            1000,
        )
        assert item["currency"] == "USD"

    # Outside the form the document declares (URL-safe base64): refused as a format, 422; a
    # well-formed cursor the API never issued is a 400 (test_fuzz.py).
    bad_cursor = await api.get("/v1/payments", params={"cursor": "not a cursor!"})
    assert bad_cursor.status_code == 422, bad_cursor.text
    assert (_error(bad_cursor)["code"], _error(bad_cursor)["param"]) == (
        "parameter_invalid_format",
        "cursor",
    )


# ── ?wait= ───────────────────────────────────────────────────────────────────────────────────


async def test_wait_returns_the_settled_payment_and_no_wait_answers_at_once(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    settled = await create_payment(api, payment_body(amount=4100), wait=15)
    assert settled.status_code == 201, settled.text
    payment = settled.json()
    assert payment["status"] == "succeeded"
    assert payment["amount_captured"] == 4100
    assert payment["fraud_score"] is not None
    assert [h["status"] for h in payment["status_history"]][-1] == "succeeded"
    # The capture had committed by the time the answer came back.
    rows = await ledger_rows(engine, payment["id"])
    assert [(r["kind"], r["total"], r["entries"]) for r in rows] == CAPTURE

    started = time.monotonic()
    accepted = await create_payment(api, payment_body(amount=4200), wait=0)
    assert accepted.status_code == 201, accepted.text
    assert time.monotonic() - started < 5
    early = accepted.json()
    assert early["status"] in ("received", "processing")
    assert early["amount_captured"] == 0
    assert early["waiting_for"]
    later = await _succeeded(api, early["id"])
    assert later["amount_captured"] == 4200
