"""A payment that cannot be reached right now is a 503 the client can retry, never a hang or a
500: no worker serving its workflow (`payment_unavailable`), or the database down when the
answer needs it (`database_unavailable`). Both were found while building the simulation
(issue 11 part 5, tests/system/test_simulation.py): a real Temporal server and real PostgreSQL
connections, no mocks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.api.failure.v1 import Failure
from temporalio.client import Client, WorkflowHandle
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.fraud import FraudActivities, FraudCheck
from activities.kafka import EventPublisher
from domain.events import EventKind
from domain.payment import PaymentRequest, payment_id_for
from domain.subscription import subscription_id_for
from infra.database import DATABASE_UNAVAILABLE, make_engine
from infra.embedded.process import free_port
from ledger.activity import LedgerActivities
from ledger.store import Ledger
from settings import Settings
from tests.conftest import OTHER_CLIENT_KEY, TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.kafka import GatedKafka
from tests.helpers.saga import create_payment, payment_body, wait_for_payment
from worker import payment_worker
from workflows import search_attributes as sa

CLIENT = "test-client"  # the client TEST_API_KEY belongs to


async def test_a_payment_no_worker_serves_answers_503_payment_unavailable_at_once(
    app_settings: Settings, temporal_client: Client
) -> None:
    """Before: GET waited for Temporal's own 30 s query deadline, then answered 500."""
    pid = payment_id_for(CLIENT, f"key-{uuid.uuid4().hex}")
    handle = await temporal_client.start_workflow(
        "PaymentWorkflow",
        "nobody runs this",
        id=pid,
        task_queue=f"unserved-{uuid.uuid4().hex}",
        search_attributes=TypedSearchAttributes([SearchAttributePair(sa.CLIENT_ID, CLIENT)]),
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
        async with api_client(settings, temporal_client, OTHER_CLIENT_KEY) as stranger:
            # Another client's payment is not found, served or not (was this 503).
            theirs = await stranger.get(f"/v1/payments/{pid}")
    finally:
        await handle.terminate("test over")
    assert theirs.status_code == 404, theirs.text
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


async def test_a_payment_whose_workflow_task_keeps_failing_is_503_never_404(
    app_settings: Settings, temporal_client: Client, worker: None
) -> None:
    """While a workflow's task is failing, Temporal refuses queries (FAILED_PRECONDITION, "workflow
    task in failed state"). The payment exists: before, the API answered 404 for it (the faults
    simulation, seed 2: a payment answered 201, then 404 on every read). Its own client gets
    `503 payment_unavailable` (retry); another client still finds nothing."""
    pid = payment_id_for(CLIENT, f"key-{uuid.uuid4().hex}")
    async with _failing_workflow(app_settings, temporal_client, "PaymentWorkflow", pid) as (
        api,
        stranger,
    ):
        read = await api.get(f"/v1/payments/{pid}")
        refund = await api.post(
            f"/v1/payments/{pid}/refunds",
            json={"amount": 100},
            headers={"Idempotency-Key": f"refund-{uuid.uuid4().hex}"},
        )
        cancel = await api.post(f"/v1/payments/{pid}/cancel")
        theirs = await stranger.get(f"/v1/payments/{pid}")
    for answer in (read, refund, cancel):
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "payment_unavailable"
        assert answer.headers["Retry-After"] == "1"
    assert theirs.status_code == 404, theirs.text
    assert theirs.json()["error"]["code"] == "resource_missing"


async def test_a_subscription_whose_workflow_task_keeps_failing_is_503_never_404(
    app_settings: Settings, temporal_client: Client, worker: None
) -> None:
    """As for a payment: a subscription whose workflow cannot answer (its task failing) exists.
    Its own client was answered 404; now `503 subscription_unavailable`, and another client
    still finds nothing (not a 503 that would tell it the subscription exists)."""
    sid = subscription_id_for(CLIENT, f"key-{uuid.uuid4().hex}")
    async with _failing_workflow(app_settings, temporal_client, "SubscriptionWorkflow", sid) as (
        api,
        stranger,
    ):
        read = await api.get(f"/v1/subscriptions/{sid}")
        theirs = await stranger.get(f"/v1/subscriptions/{sid}")
    assert read.status_code == 503, read.text
    assert read.json()["error"]["code"] == "subscription_unavailable"
    assert read.headers["Retry-After"] == "1"
    assert theirs.status_code == 404, theirs.text
    assert theirs.json()["error"]["code"] == "resource_missing"


@asynccontextmanager
async def _failing_workflow(
    settings: Settings, temporal: Client, workflow_type: str, workflow_id: str
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """A workflow of the client's (its search attributes say so) started with an input the
    worker cannot decode, so each attempt of its first task fails; once one has, the API as
    its client and as another client. Terminated on exit."""
    handle: WorkflowHandle[Any, Any] = await temporal.start_workflow(
        workflow_type,
        "not a workflow's input",
        id=workflow_id,
        task_queue=settings.task_queue,
        search_attributes=TypedSearchAttributes([SearchAttributePair(sa.CLIENT_ID, CLIENT)]),
    )
    patient = settings.model_copy(update={"api_query_timeout_seconds": 5.0})
    try:
        await _workflow_task_failed(handle)
        async with (
            api_client(patient, temporal, TEST_API_KEY) as api,
            api_client(patient, temporal, OTHER_CLIENT_KEY) as stranger,
        ):
            yield api, stranger
    finally:
        await handle.terminate("test over")


async def _workflow_task_failed(handle: WorkflowHandle[Any, Any]) -> None:
    await _history_has(handle, EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED)


# ── the database down under a payment's first step ─────────────────────────────────────────


def _dead_database(settings: Settings) -> Settings:
    """Nothing listens on the port: every connection is really refused."""
    dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"
    return settings.model_copy(update={"database_url": dead})


async def test_a_step_the_database_cannot_serve_fails_as_database_unavailable(
    app_settings: Settings,
) -> None:
    """The activity raises a plain, retryable `DatabaseUnavailable` with no cause chain, never
    the driver's error: converting psycopg's errors of a database shutting down into a Temporal
    failure recursed to the limit on every attempt (the faults simulation, seed 2: thousands of
    traceback lines a second, a worker too busy to finish its workflow tasks in time)."""
    settings = _dead_database(app_settings)
    engine = make_engine(settings.database_url or "", pool_size=1)
    body = PaymentRequest.model_validate(payment_body())
    try:
        steps = [
            lambda: FraudActivities(engine, settings).assess_payment(
                FraudCheck(client_id=CLIENT, request=body)
            ),
            lambda: LedgerActivities(Ledger(engine, max_attempts=1)).captured_in_ledger("pay_x"),
        ]
        for step in steps:
            with pytest.raises(ApplicationError) as failed:
                await ActivityEnvironment().run(step)
            assert failed.value.type == DATABASE_UNAVAILABLE and not failed.value.non_retryable
            assert failed.value.__cause__ is None
            encoded = Failure()
            await pydantic_data_converter.encode_failure(failed.value, encoded)
            assert encoded.application_failure_info.type == DATABASE_UNAVAILABLE
    finally:
        await engine.dispose()


async def test_a_payment_whose_first_step_waits_for_the_database_still_answers_reads(
    app_settings: Settings, temporal_client: Client
) -> None:
    """The fraud score (a local activity) cannot read the database. Its retries used to run
    inside the workflow task, which held queries until the task timed out and started over:
    the payment read as 404, then 503. Now its next attempts wait on a durable timer: the task
    completes and the payment answers, saying what it waits for."""
    queue = f"db-down-{uuid.uuid4().hex[:8]}"
    worker_settings = _dead_database(app_settings).model_copy(update={"task_queue": queue})
    api_settings = app_settings.model_copy(
        update={"task_queue": queue, "api_query_timeout_seconds": 3.0}
    )
    async with (
        payment_worker(worker_settings, temporal_client),
        api_client(api_settings, temporal_client, TEST_API_KEY) as api,
    ):
        created = await create_payment(api, payment_body(), wait=0)
        assert created.status_code == 201, created.text
        pid = created.json()["id"]
        handle = temporal_client.get_workflow_handle(pid)
        try:
            await _history_has(handle, EventType.EVENT_TYPE_TIMER_STARTED)  # the backoff
            read = await api.get(f"/v1/payments/{pid}")
            assert read.status_code == 200, read.text
            assert read.json()["status"] == "received"
            assert "fraud" in read.json()["waiting_for"]
        finally:
            await handle.terminate("test over")


async def _history_has(
    handle: WorkflowHandle[Any, Any], kind: EventType.ValueType, timeout: float = 30
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        kinds = [e.event_type async for e in handle.fetch_history_events()]
        if kind in kinds:
            return
        assert asyncio.get_running_loop().time() < deadline, f"no {EventType.Name(kind)} in time"
        await asyncio.sleep(0.2)


async def test_reads_piling_up_behind_a_workflow_task_under_way_are_503_never_500(
    app_settings: Settings, temporal_client: Client
) -> None:
    """A local step under way holds the payment's workflow task; Temporal keeps queries until
    the task completes and refuses those past its buffer ("consistent query buffer is full",
    RESOURCE_EXHAUSTED), which the API answered with a 500 (the faults simulation, seed 2)."""
    settings = app_settings.model_copy(
        update={"task_queue": f"held-{uuid.uuid4().hex[:8]}", "api_query_timeout_seconds": 3.0}
    )
    made: list[GatedKafka] = []

    def gated(publisher: EventPublisher, *recording: Any) -> GatedKafka:
        made.append(GatedKafka(publisher, *recording))
        return made[0]

    key = f"held-{uuid.uuid4().hex}"
    pid = payment_id_for(CLIENT, key)
    async with (
        payment_worker(settings, temporal_client, kafka_activities=gated),
        api_client(settings, temporal_client, TEST_API_KEY) as api,
    ):
        made[0].hold(pid, EventKind.RAW)
        created = await create_payment(api, payment_body(), key=key, wait=0)
        assert created.status_code == 201, created.text
        try:
            await made[0].wait_held(pid)
            reads = await asyncio.gather(*(api.get(f"/v1/payments/{pid}") for _ in range(12)))
        finally:
            made[0].release(pid)
        settled = await wait_for_payment(api, pid, lambda p: p["status"] == "succeeded")
    answers = [(r.status_code, r.json().get("error", {}).get("code")) for r in reads]
    assert set(answers) <= {(200, None), (503, "payment_unavailable")}, answers
    assert settled["amount_captured"] == settled["amount"]
