"""A tiny `paysaga bench` run keeps the command working. Speed is never asserted here: these
machines are shared and noisy; the README's Performance section has the real figures."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import uvicorn
from temporalio.client import Client

from api.app import create_app
from infra.process import free_port
from infra.stack import Stack
from settings import Settings
from tests.conftest import TEST_API_KEY


@pytest.fixture(scope="module")
async def http_api(
    app_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[str]:
    """The API on a real port, so the bench drives it from another process as a client would."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(app_settings, temporal_client),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await serving


async def test_a_small_bench_run_reports_every_figure(http_api: str, stack: Stack) -> None:
    bench = Path(sys.executable).parent / "paysaga"
    process = await asyncio.create_subprocess_exec(
        str(bench), "bench", "--payments", "30", "--concurrency", "10", "--json",
        "--api-url", http_api, "--api-key", TEST_API_KEY,
        "--kafka", stack.kafka_bootstrap_servers, "--temporal", stack.temporal_address,
        "--completion-timeout", "120",
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
    for figure in ("post_latency_ms", "confirm_latency_ms", "fraud_scoring_ms"):
        assert set(result[figure]) == {"p50", "p90", "p99", "max"}
        assert all(value is not None and value >= 0 for value in result[figure].values())
    # The floor ran the same activities as a real payment, with empty bodies.
    assert result["shape"] and set(result["shape"]) <= {"regular", "local"}
    assert result["floor_throughput_per_s"] > 0
    assert result["floor_ratio"] == pytest.approx(
        result["throughput_per_s"] / result["floor_throughput_per_s"], rel=0.01
    )
