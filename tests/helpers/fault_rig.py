"""A private stack whose services and worker a test may kill: the fault tests' and the
simulation's faults profile share it (the stack, the worker as a child process, the settings of
one merchant client, the engine and Temporal client beside them)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from infra.database import make_engine
from infra.embedded.process import ManagedProcess
from infra.embedded.stack import Stack
from infra.temporal_client import connect_client
from settings import ApiKey, Settings
from tests.conftest import ACQUIRER_SANDBOX_ARGS, MERCHANT_SCOPES
from tests.helpers.paths import REPO
from tests.helpers.private_stack import private_stack_settings

WORKER_READY_LINE = "worker polling task queue"


@dataclass
class WorkerProcess:
    """`python -m worker` as a child process: the thing a fault test SIGKILLs."""

    process: ManagedProcess

    async def start(self, timeout: float = 60.0) -> None:
        log = self.process.log_path
        seen = log.stat().st_size if log.exists() else 0
        await asyncio.to_thread(self.process.start)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.process.alive_or_raise()
            if log.exists():
                with log.open("rb") as f:
                    f.seek(seen)
                    if WORKER_READY_LINE.encode() in f.read():
                        return
            await asyncio.sleep(0.1)
        raise AssertionError(f"the worker did not start polling within {timeout:.0f}s ({log})")

    def kill(self) -> None:
        self.process.kill()

    async def stop(self) -> None:
        await asyncio.to_thread(self.process.stop, 20.0)

    @property
    def running(self) -> bool:
        return self.process.running


def worker_env(stack: Stack, settings: Settings) -> dict[str, str]:
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    return {
        **inherited,
        **stack.service_env(),
        "PAYSAGA_TASK_QUEUE": settings.task_queue,
        "PAYSAGA_CRM_WEBHOOK_URL": settings.crm_webhook_url or "",
        "PAYSAGA_CRM_WEBHOOK_SECRET": settings.crm_webhook_secret.get_secret_value(),
        "PAYSAGA_CRM_TIMEOUT_SECONDS": str(settings.crm_timeout_seconds),
        "PAYSAGA_KAFKA_MESSAGE_TIMEOUT_MS": str(settings.kafka_message_timeout_ms),
        "PAYSAGA_LOG_JSON": "false",
        # No fixed metrics ports: another worker on this machine may hold the defaults.
        "PAYSAGA_WORKER_METRICS_PORT": "0",
        "PAYSAGA_TEMPORAL_METRICS_PORT": "0",
    }


def started_stack(
    tmp_path_factory: pytest.TempPathFactory, name: str, *, acquirer: bool = False
) -> Iterator[Stack]:
    """A private stack for one test module (`yield from` it in a fixture), stopped after;
    with its own sandbox acquirer when asked."""
    home = tmp_path_factory.mktemp(name)
    stack = Stack(
        private_stack_settings(home),
        home=home,
        temporal_ui=False,
        acquirer=acquirer,
        acquirer_sandbox_args=list(ACQUIRER_SANDBOX_ARGS) if acquirer else [],
    )
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def client_settings(
    stack: Stack, queue: str, client_id: str, api_key: str, **update: Any
) -> Settings:
    """The stack's service settings on a fresh task queue, with one merchant client's key."""
    return stack.service_settings().model_copy(
        update={
            "task_queue": f"{queue}-{uuid.uuid4().hex[:8]}",
            "api_keys": [
                ApiKey(
                    client_id=client_id,
                    key_sha256=ApiKey.hash(api_key),
                    scopes=list(MERCHANT_SCOPES),
                )
            ],
            **update,
        }
    )


@asynccontextmanager
async def worker_and_clients(
    stack: Stack, settings: Settings
) -> AsyncIterator[tuple[WorkerProcess, AsyncEngine, Client]]:
    """The worker started as a child process, a database engine and a Temporal client."""
    worker = WorkerProcess(
        ManagedProcess(
            "payment worker",
            [sys.executable, "-m", "worker"],
            stack.home / "worker.log",
            env=worker_env(stack, settings),
            cwd=REPO,
        )
    )
    engine = make_engine(stack.database_url, pool_size=5)
    try:
        await worker.start()
        yield worker, engine, await connect_client(settings)
    finally:
        await engine.dispose()
        await worker.stop()
