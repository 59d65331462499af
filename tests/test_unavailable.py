"""A payment that cannot be reached right now is a 503 the client can retry, never a hang or a
500: no worker serving its workflow (`payment_unavailable`), or the database down when the
answer needs it (`database_unavailable`). Both were found while building the simulation
(issue 11 part 5, tests/test_simulation.py): a real Temporal server and real PostgreSQL
connections, no mocks."""

from __future__ import annotations

import time
import uuid

import pytest
from temporalio.client import Client

from domain.payment import payment_id_for
from infra.embedded.process import free_port
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client

CLIENT = "test-client"  # the client TEST_API_KEY belongs to


async def test_a_payment_no_worker_serves_answers_503_payment_unavailable_at_once(
    app_settings: Settings, temporal_client: Client
) -> None:
    """Before: GET waited for Temporal's own 30 s query deadline, then answered 500."""
    pid = payment_id_for(CLIENT, f"key-{uuid.uuid4().hex}")
    handle = await temporal_client.start_workflow(
        "PaymentWorkflow", "nobody runs this", id=pid, task_queue=f"unserved-{uuid.uuid4().hex}"
    )
    settings = app_settings.model_copy(update={"api_query_timeout_seconds": 1.0})
    try:
        async with api_client(settings, temporal_client, TEST_API_KEY) as api:
            began = time.monotonic()
            read = await api.get(f"/v1/payments/{pid}")
            assert time.monotonic() - began < 10
            refund = await api.post(
                f"/v1/payments/{pid}/refunds",
                json={"amount": 100},
                headers={"Idempotency-Key": f"refund-{uuid.uuid4().hex}"},
            )
            listed = await api.get("/v1/payments", params={"limit": 1})
    finally:
        await handle.terminate("test over")
    for answer in (read, refund):
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "payment_unavailable"
        assert answer.headers["Retry-After"] == "1"
    assert listed.status_code == 200  # the list is Temporal's visibility: no worker needed


@pytest.mark.parametrize("path", ["", "/refunds"])
async def test_a_payment_only_the_ledger_knows_answers_503_while_the_database_is_down(
    app_settings: Settings, temporal_client: Client, path: str
) -> None:
    """A payment Temporal has forgotten is read from the payments register; with the database
    away that was a 500. (Nothing listens on the port: a real connection refused.)"""
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"
    settings = app_settings.model_copy(update={"database_url": dead, "db_max_retries": 1})
    pid = payment_id_for(CLIENT, f"key-{uuid.uuid4().hex}")
    async with api_client(settings, temporal_client, TEST_API_KEY) as api:
        if path:
            answer = await api.post(
                f"/v1/payments/{pid}{path}",
                json={"amount": 100},
                headers={"Idempotency-Key": f"refund-{uuid.uuid4().hex}"},
            )
        else:
            answer = await api.get(f"/v1/payments/{pid}")
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "database_unavailable"
