"""The private test stack: real Temporal, broker and PostgreSQL on free ports, torn down at
the end. Coexists with `make run` (never the default ports)."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from infra.database import make_engine
from infra.embedded.stack import Stack
from infra.temporal_client import connect_client
from settings import ApiKey, Scope, Settings
from tests.helpers.api_client import api_client
from tests.helpers.fake_crm import FakeCrmServer
from tests.helpers.private_stack import private_stack_settings
from worker import payment_worker

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


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("stack")
    stack = Stack(
        private_stack_settings(home),
        home=home,
        temporal_ui=True,
        acquirer=True,
        acquirer_sandbox_args=list(ACQUIRER_SANDBOX_ARGS),
    )
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


# ── the saga: settings, a worker in this process, the API over ASGI ─────────────────────────

TEST_API_KEY = "psk_test_writer_key_0123456789abcdefghij"
READONLY_API_KEY = "psk_test_reader_key_0123456789abcdefghij"
OTHER_CLIENT_KEY = "psk_test_other_client_0123456789abcdefgh"
# A finance operator's key: the reconciliation exception queue, nothing of any merchant's.
FINANCE_API_KEY = "psk_test_finance_key_0123456789abcdefghi"
WEBHOOK_SECRET = "whsec_test_0123456789"
# The session's sandbox acquirer: pm_card_timeout holds its first answers ACQUIRER_HANG_SECONDS,
# which tests/workflows/test_acquirer_saga.py's workers give up on much sooner.
ACQUIRER_HANG_SECONDS = 3.0
ACQUIRER_SANDBOX_ARGS = ("--hang-seconds", str(ACQUIRER_HANG_SECONDS), "--delay-seconds", "0.5")
# What the test clients may do: every payment operation, named (a key without scopes gets
# payments:read + payments:write only).
MERCHANT_SCOPES: tuple[Scope, ...] = (
    "payments:read",
    "payments:write",
    "refunds:write",
    "disputes:write",
    "events:read",
    "webhooks:read",
    "webhooks:write",
)


@pytest.fixture(scope="session")
def crm_server() -> Iterator[FakeCrmServer]:
    with FakeCrmServer() as server:
        yield server


@pytest.fixture(scope="session")
def app_settings(stack: Stack, crm_server: FakeCrmServer) -> Settings:
    return stack.service_settings().model_copy(
        update={
            "task_queue": f"payments-{uuid.uuid4().hex[:8]}",
            "api_keys": [
                # The suite's everything-key: also the platform's reconciliation queue, so the
                # fuzzer and the id-shape tests reach those routes (a merchant's key has neither).
                ApiKey(
                    client_id="test-client",
                    key_sha256=ApiKey.hash(TEST_API_KEY),
                    scopes=[*MERCHANT_SCOPES, "reconciliation:read", "reconciliation:write"],
                ),
                ApiKey(
                    client_id="test-client",
                    key_sha256=ApiKey.hash(READONLY_API_KEY),
                    scopes=["payments:read"],
                ),
                ApiKey(
                    client_id="other-client",
                    key_sha256=ApiKey.hash(OTHER_CLIENT_KEY),
                    scopes=list(MERCHANT_SCOPES),
                ),
                ApiKey(
                    client_id="finance",
                    key_sha256=ApiKey.hash(FINANCE_API_KEY),
                    scopes=["reconciliation:read", "reconciliation:write"],
                ),
            ],
            "crm_webhook_url": crm_server.url("/hooks/paysaga"),
            "crm_webhook_secret": SecretStr(WEBHOOK_SECRET),
            "crm_timeout_seconds": 2.0,
            # The shared worker books payments without an acquirer, as before issue 15, so the
            # suite's exact event sequences hold; tests/workflows/test_acquirer_saga.py runs its own
            # worker against the session's sandbox acquirer (stack.service_settings()).
            "acquirer_url": None,
            # Every in-process test worker runs workflows in the sandbox, so nondeterministic
            # workflow code fails here even though production may run unsandboxed.
            "workflow_sandbox": True,
        }
    )


@pytest.fixture(scope="session")
async def temporal_client(app_settings: Settings) -> Client:
    return await connect_client(app_settings)


@pytest.fixture(scope="session")
async def worker(app_settings: Settings, temporal_client: Client) -> AsyncIterator[None]:
    async with payment_worker(app_settings, temporal_client):
        yield


@pytest.fixture(scope="session")
async def api(
    app_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(app_settings, temporal_client, TEST_API_KEY) as client:
        yield client
