"""A tiny `paysaga bench` run keeps the command working. Speed is never asserted here: these
machines are shared and noisy; the README's Performance section has the real figures."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydantic import SecretStr
from temporalio.client import Client

from api.app import create_app
from infra.embedded.process import free_port
from infra.embedded.stack import Stack
from sandboxes.crm import RECEIVER_PATH
from sandboxes.crm import create_app as create_sandbox
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.served import served_aiohttp
from worker import payment_worker


@pytest.fixture(scope="module")
async def crm_sandbox(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[str, str]]:
    """The CRM sandbox `make run` starts, as a real server: the saga's fifth step goes there."""
    secret = "whsec_bench_sandbox_secret"
    async with served_aiohttp(create_sandbox(tmp_path_factory.mktemp("crm"), secret)) as url:
        yield url, secret


@pytest.fixture(scope="module")
async def http_api(
    app_settings: Settings, temporal_client: Client, crm_sandbox: tuple[str, str]
) -> AsyncIterator[str]:
    """The API on a real port, so the bench drives it from another process as a client would,
    with a worker of its own whose CRM is the sandbox."""
    url, secret = crm_sandbox
    settings = app_settings.model_copy(
        update={
            "task_queue": f"bench-{uuid.uuid4().hex[:8]}",
            "crm_webhook_url": url + RECEIVER_PATH,
            "crm_webhook_secret": SecretStr(secret),
        }
    )
    async with (
        payment_worker(settings, temporal_client),
        _served(create_app(settings, temporal_client)) as api,
    ):
        yield api


@asynccontextmanager
async def _served(app: Any) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await serving


async def test_a_small_bench_run_reports_every_figure(
    http_api: str, stack: Stack, crm_sandbox: tuple[str, str]
) -> None:
    bench = Path(sys.executable).parent / "paysaga"
    process = await asyncio.create_subprocess_exec(
        str(bench), "bench", "--payments", "30", "--concurrency", "10", "--json",
        "--api-url", http_api, "--api-key", TEST_API_KEY,
        "--kafka", stack.kafka_bootstrap_servers, "--temporal", stack.temporal_address,
        "--crm-sandbox-url", crm_sandbox[0], "--completion-timeout", "120",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, stderr.decode()[-3000:]
    result = json.loads(stdout)
    assert result["payments"] == 30
    assert result["succeeded"] == 30
    assert result["errors"] == {}
    assert result["throughput_per_s"] > 0
    assert 1 <= result["peak_in_flight"] <= 30
    # A payment counts once the CRM sandbox has it: all five steps, confirmation first.
    assert result["completion"] == "crm"
    for figure in ("post_latency_ms", "confirm_latency_ms", "crm_latency_ms", "fraud_scoring_ms"):
        assert set(result[figure]) == {"p50", "p90", "p99", "max"}
        assert all(value is not None and value >= 0 for value in result[figure].values())
    assert result["crm_latency_ms"]["p50"] >= result["confirm_latency_ms"]["p50"]
    # The floor ran the same activities as a real payment, with empty bodies: the CRM step too,
    # whose first attempt is local like the other four (workflows/local_first.py).
    assert result["shape"] == ["local"] * 5, result["shape_steps"]
    assert len(result["shape_steps"]) == len(result["shape"])
    assert result["floor_throughput_per_s"] > 0
    assert result["floor_ratio"] == pytest.approx(
        result["throughput_per_s"] / result["floor_throughput_per_s"], rel=0.01
    )
