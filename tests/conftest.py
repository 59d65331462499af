"""The private test stack: real Temporal, broker and PostgreSQL on free ports, torn down at
the end. Coexists with `make run` (never the default ports)."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from infra.database import make_engine
from infra.process import free_port
from infra.stack import Stack
from settings import Settings

_exit_status: int | None = None


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """temporalio can abort during interpreter shutdown after all work succeeded
    (sdk-python#300). Everything is reported and flushed by now, so leave with pytest's own
    status instead of letting the crash turn a green run red."""
    if _exit_status is None or os.environ.get("PAYSAGA_NO_HARD_EXIT"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


def _test_settings(home: Path) -> Settings:
    # Explicit values: a developer's PAYSAGA_* environment must not redirect the tests.
    return Settings(
        home=home,
        temporal_address=None,
        kafka_bootstrap_servers=None,
        database_url=None,
        temporal_port=free_port(),
        temporal_ui_port=free_port(),
        kafka_port=free_port(),
        postgres_port=free_port(),
        kafka_session_timeout_ms=2000,
        log_json=False,
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("stack")
    stack = Stack(_test_settings(home), home=home, temporal_ui=True)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
async def engine(stack: Stack) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(stack.database_url, pool_size=20)
    yield engine
    await engine.dispose()
