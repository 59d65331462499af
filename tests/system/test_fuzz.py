"""The API fuzzed from its own OpenAPI document with schemathesis, over real HTTP: the document
is the contract a generated client trusts, and this holds the API to it.

The app runs under uvicorn inside the test's event loop, backed by the real stack (Temporal
with the in-process worker, PostgreSQL, the broker); schemathesis runs as its own process
(`st run`), as an operator would point it at a deployment. Every phase runs: the coverage
phase's boundary and type-mutation cases, random positive and negative cases, and stateful
sequences that follow the document's links (create a payment -> get, refund, dispute, cancel
it; open a dispute -> close it; create a webhook endpoint -> get, update, rotate, delete it).

Every check runs (`--checks all`): no 5xx; every response matches the document (status code,
content type, headers, body schema); schema-violating input is refused; **schema-valid input is
accepted** (2xx, or a status that means the resource or the business said no: 404, 409); a
missing API key is a 401; unsupported methods answer 405 with an `Allow` header listing the
path's methods; a created resource can be read back, a deleted one cannot. (Schemathesis'
`object_level_authorization` only acts with several identities configured; it runs with one
here, and tenants apart are proved by tests/api/test_tenants.py.)

Two schema-valid requests the document cannot rule out are refused with 400, on two operations
only, and configured so: a payments `cursor` the API never issued (a cursor is opaque and
checked; JSON Schema cannot say "one we issued"), and `/v1/events` given both
`starting_after` and `ending_before` (OpenAPI cannot say "not both"). Positive cases carrying
a card number are dropped by tests/system/fuzz_hooks.py: Luhn's check is not JSON Schema either.

Half of the generated payment, dispute and webhook endpoint ids are replaced by real ones — a
succeeded payment, one waiting for review, one with an open dispute, a paused endpoint — so
refunds, disputes, closes and cancels are fuzzed against live workflows too.

The fuzzer is its own API client (`fuzz-client`): the session's stack is shared, and other
tests leave `test-client` payments running on task queues whose private workers have stopped.
The fuzzer lists payments and acts on the ids it finds; such a payment rightly answers
`503 payment_unavailable` (no worker serves it), which is the other test's leftover, not the
API's fault (CI on branch int, seed 20250301: a reconciliation test's payment, captured and
disputed). As its own client it sees only payments it made, which the session's worker serves.

Reproducible: the seed is `PAYSAGA_FUZZ_SEED` (default below) and is printed with any failure;
`PAYSAGA_FUZZ_EXAMPLES` scales the cases per operation (default 50, three times that for
creating payments; the test needs >= 1,000 cases in all).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from temporalio.client import Client

from api.app import create_app
from domain.bounds import TEXT_PATTERN
from domain.fraud import amount_for_limit_share
from domain.money import CURRENCIES, MAX_JSON_INTEGER, MAX_PAYMENT_MINOR
from domain.payment import MAX_METADATA_KEYS
from infra.embedded.process import free_port
from settings import ApiKey, Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.paths import REPO
from tests.helpers.saga import create_payment, payment_body, wait_for_payment
from worker import payment_worker

MIN_CASES = 1000
EXAMPLES = int(os.environ.get("PAYSAGA_FUZZ_EXAMPLES", "50"))
PAYMENT_EXAMPLES = 3 * EXAMPLES
SEED = int(os.environ.get("PAYSAGA_FUZZ_SEED", "20250301"))
CHECKS = ("all",)
# positive_data_acceptance's own defaults, plus 400 where the document cannot rule it out.
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
# The fuzzer's own client, with the suite's everything-key's scopes (module docstring).
FUZZ_API_KEY = "psk_test_fuzzer_key_0123456789abcdefghij"
FUZZ_CLIENT = "fuzz-client"


@pytest.fixture(scope="module")
def fuzz_settings(app_settings: Settings) -> Settings:
    """The session's settings (its worker's task queue) with the fuzzer's key added."""
    everything = next(k for k in app_settings.api_keys if k.key_sha256 == ApiKey.hash(TEST_API_KEY))
    fuzzer = ApiKey(
        client_id=FUZZ_CLIENT, key_sha256=ApiKey.hash(FUZZ_API_KEY), scopes=everything.scopes
    )
    return app_settings.model_copy(update={"api_keys": [*app_settings.api_keys, fuzzer]})


@pytest.fixture(scope="module")
async def fuzz_api(
    fuzz_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[httpx.AsyncClient]:
    """The API as the fuzzer's client, to make the live ids it aims at."""
    async with api_client(fuzz_settings, temporal_client, FUZZ_API_KEY) as client:
        yield client


@pytest.fixture(scope="module")
async def served_api(
    fuzz_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[str]:
    """The real app on a real port, in this event loop (next to the worker)."""
    app = create_app(fuzz_settings, temporal_client)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=free_port(),
        lifespan="on",
        log_config=None,  # leave the test's logging alone
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()  # raises why it could not start
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        await serving


@pytest.fixture(scope="module")
async def live_ids(fuzz_api: httpx.AsyncClient) -> dict[str, list[str]]:
    """Real payment and dispute ids for the fuzzer to aim at, the fuzzer's own."""
    api = fuzz_api
    succeeded = (await create_payment(api, payment_body(amount=90_000))).json()["id"]
    disputed = (await create_payment(api, payment_body(amount=50_000))).json()["id"]
    review_amount = amount_for_limit_share("USD", 60)  # a first payment this big waits
    in_review = (await create_payment(api, payment_body(amount=review_amount))).json()["id"]
    await wait_for_payment(api, succeeded, lambda p: p["status"] == "succeeded")
    await wait_for_payment(api, disputed, lambda p: p["status"] == "succeeded")
    await wait_for_payment(api, in_review, lambda p: p["status"] == "requires_review")
    opened = await api.post(
        f"/v1/payments/{disputed}/disputes",
        json={"amount": 10_000, "reason_code": "13.1", "network_reference": "nr-fuzz-1"},
    )
    assert opened.status_code == 201, opened.text
    # A paused endpoint: read, listed, updated and rotated, never delivered to.
    endpoint = await api.post(
        "/v1/webhook_endpoints", json={"url": "https://hooks.example.com/fuzz", "enabled": False}
    )
    assert endpoint.status_code == 201, endpoint.text
    # A subscription in its trial: read, listed, changed, paused, canceled by the fuzzer.
    subscription = await api.post(
        "/v1/subscriptions",
        json={
            "customer_id": "cus_fuzz",
            "merchant_id": "mer_fuzz",
            "payment_method": "pm_card_visa_0001",
            "unit_amount": 1000,
            "currency": "USD",
            "interval": "month",
            "trial_days": 30,
        },
        headers={"Idempotency-Key": f"fuzz-sub-{uuid.uuid4().hex}"},
    )
    assert subscription.status_code == 201, subscription.text
    return {
        "payments": [succeeded, disputed, in_review],
        "disputes": [opened.json()["id"]],
        "endpoints": [endpoint.json()["id"]],
        "subscriptions": [subscription.json()["id"]],
    }


def _config_file(path: Path, live_ids: dict[str, list[str]]) -> Path:
    def values(ids: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in ids) + "]"

    path.write_text(
        f"""
hooks = "tests.system.fuzz_hooks"

[cache]
enabled = false

[dictionaries.payments]
values = {values(live_ids["payments"])}

[dictionaries.disputes]
values = {values(live_ids["disputes"])}

[dictionaries.endpoints]
values = {values(live_ids["endpoints"])}

[dictionaries.subscriptions]
values = {values(live_ids["subscriptions"])}

[parameters]
"path.payment_id" = {{ dictionary = "payments", probability = 0.5 }}
"path.dispute_id" = {{ dictionary = "disputes", probability = 0.5 }}
"path.endpoint_id" = {{ dictionary = "endpoints", probability = 0.5 }}
"path.subscription_id" = {{ dictionary = "subscriptions", probability = 0.5 }}

[generation]
unique-inputs = true

# Creating payments is the route that matters most: more cases.
[[operations]]
include-path = "/v1/payments"
include-method = "POST"
generation = {{ max-examples = {PAYMENT_EXAMPLES} }}

# A cursor is opaque and checked: one the API never issued is a 400 `cursor_invalid`.
[[operations]]
include-path = "/v1/payments"
include-method = "GET"
checks.positive_data_acceptance.expected-statuses = {json.dumps([*ACCEPTED, "400"])}

# The same for subscriptions' cursors.
[[operations]]
include-path = "/v1/subscriptions"
include-method = "GET"
checks.positive_data_acceptance.expected-statuses = {json.dumps([*ACCEPTED, "400"])}

# `starting_after` and `ending_before` together are a 400 `parameters_exclusive`.
[[operations]]
include-path = "/v1/events"
include-method = "GET"
checks.positive_data_acceptance.expected-statuses = {json.dumps([*ACCEPTED, "400"])}
"""
    )
    return path


async def run_schemathesis(config: Path, base_url: str, report: Path, *args: str) -> str:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
        "run", f"{base_url}/openapi.json",
        "--header", f"Authorization: Bearer {FUZZ_API_KEY}",
        "--checks", ",".join(CHECKS),
        "--report", "json", "--report-json-path", str(report),
        "--request-timeout", "45",
        "--suppress-health-check", "too_slow,filter_too_much",
        *args,
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=config.parent,  # anything schemathesis leaves behind stays out of the repo
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=600)
    text = output.decode(errors="replace")
    assert process.returncode == 0, f"{text}\nReproduce with PAYSAGA_FUZZ_SEED={SEED}"
    return text


@pytest.mark.slow
async def test_fuzzing_from_the_openapi_document_finds_no_5xx_and_no_schema_mismatch(
    served_api: str, live_ids: dict[str, list[str]], temporal_client: Client, tmp_path: Path
) -> None:
    report_path = tmp_path / "schemathesis.json"
    started = datetime.now(UTC) - timedelta(seconds=1)
    output = await run_schemathesis(
        _config_file(tmp_path / "schemathesis.toml", live_ids),
        served_api,
        report_path,
        "--max-examples", str(EXAMPLES),
        "--seed", str(SEED),
    )  # fmt: skip
    print(output)  # shown with -s or on failure: phases, cases, warnings
    print(f"PAYSAGA_FUZZ_SEED={SEED}")
    report: dict[str, Any] = json.loads(report_path.read_text())
    assert report["complete"] and report["stop_reason"] == "completed", report
    assert report["failures"] == [] and report["errors"] == []
    cases = report["test_cases"]
    assert cases["generated"] >= MIN_CASES, cases
    assert cases["with_failures"] == 0 and cases["errored"] == 0, cases
    # 21, + the reconciliation exceptions' list, retrieve and resolve (issue 16), + the
    # subscriptions' 8 (issue 17).
    assert report["operations"]["tested"] == report["operations"]["total"] == 32
    phases = report["phases"]
    assert {name: phases[name]["status"] for name in ("coverage", "fuzzing", "stateful")} == {
        "coverage": "success",
        "fuzzing": "success",
        "stateful": "success",
    }, phases
    # The stateful phase followed the document's links (created payment -> get, refund, …).
    links = re.search(r"API Links:\s+(\d+) covered", output)
    assert links is not None and int(links[1]) >= 5, output
    # Valid payments got through to the workflow path (invalid ones are most of the rest).
    started_workflows = await temporal_client.count_workflows(
        f'WorkflowType = "PaymentWorkflow" AND StartTime >= "{started.isoformat()}"'
    )
    assert started_workflows.count >= 20, started_workflows.count


async def test_a_cursor_the_api_never_issued_is_refused_at_once(api: httpx.AsyncClient) -> None:
    """Found by the fuzzer: a well-formed but invented cursor went to Temporal, which retried
    for ~15 s and failed with an internal error (500). Cursors now carry a check."""
    invented = base64.urlsafe_b64encode(b"\x00" * 64).decode()
    started = time.monotonic()
    response = await api.get("/v1/payments", params={"cursor": invented})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "cursor_invalid"
    assert time.monotonic() - started < 2

    # A real cursor still pages, and only for the client it was issued to.
    for _ in range(3):
        await create_payment(api, payment_body(), wait=0)
    first = (await api.get("/v1/payments", params={"limit": 1})).json()
    assert first["has_more"] and first["next_cursor"]
    second = await api.get("/v1/payments", params={"limit": 1, "cursor": first["next_cursor"]})
    assert second.status_code == 200, second.text
    assert second.json()["data"][0]["id"] != first["data"][0]["id"]


async def test_every_post_route_documents_the_413_it_answers_to_an_oversized_body(
    api: httpx.AsyncClient, app_settings: Settings
) -> None:
    """Found reading the routes for the fuzzer: the size limit applies to every route, but only
    POST /v1/payments documented its 413 (fuzzers rarely send 64 KiB, so this is checked here)."""
    document = (await api.get("/openapi.json")).json()
    oversized = b"x" * (app_settings.max_body_bytes + 1)
    posts = [path for path, methods in document["paths"].items() if "post" in methods]
    # + capture, void (issue 15), resolve an exception (issue 16), the subscriptions' 6 (issue 17)
    assert len(posts) == 18
    for path in posts:
        assert "413" in document["paths"][path]["post"]["responses"], path
        concrete = (
            path.replace("{payment_id}", "pay_" + "0" * 24)
            .replace("{dispute_id}", "dp_" + "0" * 24)
            .replace("{event_id}", "0" * 8 + "-0000-0000-0000-" + "0" * 12)
            .replace("{endpoint_id}", "we_" + "0" * 24)
            .replace("{exception_id}", "rex_" + "0" * 24)
            .replace("{subscription_id}", "sub_" + "0" * 24)
        )
        response = await api.post(
            concrete,
            content=oversized,
            headers={"Content-Type": "application/json", "Idempotency-Key": "oversized-1"},
        )
        assert response.status_code == 413, (path, response.text)
        assert response.json()["error"]["code"] == "request_too_large"


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


async def test_the_document_declares_the_rules_the_validators_enforce(
    api: httpx.AsyncClient,
) -> None:
    """The bounds a generated client reads are the ones enforced, from the same values: the
    per-currency limits and the currencies from domain/money.py, the text and metadata rules
    from the payment request's types, the cursor's form."""
    document = (await api.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    payment = schemas["PaymentRequest"]
    props = payment["properties"]
    assert (props["amount"]["minimum"], props["amount"]["maximum"]) == (1, MAX_JSON_INTEGER)
    assert props["currency"]["enum"] == sorted(CURRENCIES)
    limits = {
        rule["if"]["properties"]["currency"]["const"]: rule["then"]["properties"]["amount"][
            "maximum"
        ]
        for rule in payment["allOf"]
    }
    assert limits == {code: unit.max_minor for code, unit in CURRENCIES.items()}
    metadata = props["metadata"]
    assert metadata["maxProperties"] == MAX_METADATA_KEYS
    assert metadata["propertyNames"]["pattern"] == "^[A-Za-z0-9_.-]+$"
    assert metadata["additionalProperties"]["pattern"] == TEXT_PATTERN
    assert props["description"]["anyOf"][0]["pattern"] == TEXT_PATTERN
    for follow_up in ("RefundRequest", "DisputeRequest"):
        amount = schemas[follow_up]["properties"]["amount"]["anyOf"][0]
        assert (amount["minimum"], amount["maximum"]) == (1, MAX_PAYMENT_MINOR)
    parameters = document["paths"]["/v1/payments"]["get"]["parameters"]
    listing = {p["name"]: p["schema"] for p in parameters}
    cursor = listing["cursor"]["anyOf"][0]
    assert cursor["pattern"] and cursor["minLength"] >= 12
    assert (listing["limit"]["minimum"], listing["limit"]["maximum"]) == (1, 100)
    # Pydantic spells a constraint it could not place as its own keyword (`ge`, `le`…), which
    # JSON Schema ignores: none may hide in the document.
    keywords = {key for node in _walk(schemas) for key in node}
    assert not keywords & {"ge", "gt", "le", "lt", "max_length", "min_length"}, keywords

    # Each rule is enforced as declared: the limit itself passes, one more does not.
    usd = CURRENCIES["USD"].max_minor
    refused = await create_payment(api, payment_body(amount=usd + 1), wait=0)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "amount_too_large"
    accepted = await create_payment(api, payment_body(amount=usd, currency="USD"), wait=0)
    assert accepted.status_code == 201, accepted.text
    # JSON Schema's `integer` admits 2500.0 (the same number): taken as 2500.
    whole = await create_payment(api, {**payment_body(), "amount": 2500.0}, wait=0)
    assert whole.status_code == 201 and whole.json()["amount"] == 2500, whole.text


async def test_a_method_a_path_does_not_take_is_405_with_every_method_it_does(
    api: httpx.AsyncClient,
) -> None:
    """Found by the fuzzer: `/v1/payments` is two routes (GET and POST), and the 405 named
    only the one that matched first."""
    document = (await api.get("/openapi.json")).json()
    for path, methods in document["paths"].items():
        concrete = path.replace("{", "x").replace("}", "")
        response = await api.request("PATCH", concrete)
        assert response.status_code == 405, (path, response.text)
        assert response.json()["error"]["code"] == "method_not_allowed"
        allowed = {m.strip().lower() for m in response.headers["Allow"].split(",")}
        assert allowed == set(methods), (path, response.headers["Allow"])


async def test_the_fuzzer_cannot_reach_a_payment_another_test_left_unserved(
    fuzz_api: httpx.AsyncClient, app_settings: Settings, temporal_client: Client, worker: None
) -> None:
    """CI on branch int (seed 20250301): the fuzzer listed its client's payments, found one a
    reconciliation test had made on its private task queue, whose worker had stopped, and
    captured and disputed it: `503 payment_unavailable`, rightly (no worker serves it), and
    a 5xx for the fuzz test. The fuzzer is its own client: it finds only its own payments,
    which the session's worker serves. Fails with the fuzzer as the suite's `test-client`."""
    settings = app_settings.model_copy(
        update={"task_queue": f"gone-{uuid.uuid4().hex[:8]}", "api_query_timeout_seconds": 2.0}
    )
    async with (
        payment_worker(settings, temporal_client),
        api_client(settings, temporal_client, TEST_API_KEY) as suite,
    ):
        created = await create_payment(suite, payment_body())
        assert created.status_code == 201, created.text
        left = created.json()["id"]
        await wait_for_payment(suite, left, lambda p: p["status"] == "succeeded")
    async with api_client(settings, temporal_client, TEST_API_KEY) as suite:
        # Its worker is gone: what the fuzzer got, the honest answer to the suite's client.
        captured = await suite.post(f"/v1/payments/{left}/capture")
        assert captured.status_code == 503, captured.text
        assert captured.json()["error"]["code"] == "payment_unavailable"
    listed = await fuzz_api.get("/v1/payments", params={"limit": 100})
    assert listed.status_code == 200, listed.text
    assert left not in {p["id"] for p in listed.json()["data"]}
    assert (await fuzz_api.post(f"/v1/payments/{left}/capture")).status_code == 404
