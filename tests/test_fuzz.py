"""The API fuzzed from its own OpenAPI document with schemathesis, over real HTTP.

The app runs under uvicorn inside the test's event loop, backed by the real stack (Temporal
with the in-process worker, PostgreSQL, the broker); schemathesis runs as its own process
(`st run`), as an operator would point it at a deployment. Every phase runs: the coverage
phase's boundary and type-mutation cases, random positive and negative cases, and stateful
sequences that follow the Location header of created payments.

Verdict: no 5xx anywhere, and every response matches the document (status code, content type,
headers, body schema); schema-violating input is refused; a missing API key is a 401.

To reach past validation and 404s: tests/fuzz_hooks.py repairs a share of the generated payment
bodies (currency, amount), and half of the generated payment and dispute ids are replaced by
real ones — a succeeded payment, one waiting for review, one with an open dispute — so
refunds, disputes, closes and cancels are fuzzed against live workflows too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from temporalio.client import Client

from activities.fraud import amount_for_limit_share
from api.app import create_app
from infra.process import free_port
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.saga_helpers import create_payment, payment_body, wait_for_payment

REPO = Path(__file__).resolve().parent.parent
MIN_CASES = 1000
EXAMPLES = 100
PAYMENT_EXAMPLES = 200
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "unsupported_method",
    "ignored_auth",
)


@pytest.fixture(scope="module")
async def served_api(
    app_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[str]:
    """The real app on a real port, in this event loop (next to the worker)."""
    app = create_app(app_settings, temporal_client)
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
async def live_ids(api: httpx.AsyncClient) -> dict[str, list[str]]:
    """Real payment and dispute ids for the fuzzer to aim at."""
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
    return {"payments": [succeeded, disputed, in_review], "disputes": [opened.json()["id"]]}


def _config_file(path: Path, live_ids: dict[str, list[str]]) -> Path:
    def values(ids: list[str]) -> str:
        return "[" + ", ".join(json.dumps(i) for i in ids) + "]"

    path.write_text(
        f"""
hooks = "tests.fuzz_hooks"

[cache]
enabled = false

[dictionaries.payments]
values = {values(live_ids["payments"])}

[dictionaries.disputes]
values = {values(live_ids["disputes"])}

[parameters]
"path.payment_id" = {{ dictionary = "payments", probability = 0.5 }}
"path.dispute_id" = {{ dictionary = "disputes", probability = 0.5 }}

[generation]
unique-inputs = true

# Creating payments is the route that matters most: more cases, more of them valid.
[[operations]]
include-path = "/v1/payments"
include-method = "POST"
generation = {{ max-examples = {PAYMENT_EXAMPLES} }}
"""
    )
    return path


async def run_schemathesis(config: Path, base_url: str, report: Path, *args: str) -> str:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
        "run", f"{base_url}/openapi.json",
        "--header", f"Authorization: Bearer {TEST_API_KEY}",
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
    assert process.returncode == 0, text
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
        "--seed", "20250301",
    )  # fmt: skip
    print(output)  # shown with -s or on failure: phases, cases, warnings
    report: dict[str, Any] = json.loads(report_path.read_text())
    assert report["complete"] and report["stop_reason"] == "completed", report
    assert report["failures"] == [] and report["errors"] == []
    cases = report["test_cases"]
    assert cases["generated"] >= MIN_CASES, cases
    assert cases["with_failures"] == 0 and cases["errored"] == 0, cases
    assert report["operations"]["tested"] == report["operations"]["total"] == 21
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
    assert len(posts) == 11  # + capture, void (issue 15)
    for path in posts:
        assert "413" in document["paths"][path]["post"]["responses"], path
        concrete = (
            path.replace("{payment_id}", "pay_" + "0" * 24)
            .replace("{dispute_id}", "dp_" + "0" * 24)
            .replace("{event_id}", "0" * 8 + "-0000-0000-0000-" + "0" * 12)
            .replace("{endpoint_id}", "we_" + "0" * 24)
        )
        response = await api.post(
            concrete,
            content=oversized,
            headers={"Content-Type": "application/json", "Idempotency-Key": "oversized-1"},
        )
        assert response.status_code == 413, (path, response.text)
        assert response.json()["error"]["code"] == "request_too_large"
