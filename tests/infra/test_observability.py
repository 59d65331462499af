"""Observability against the real stack: Prometheus endpoints after real payments, Temporal
SDK metrics, one trace from the HTTP request through the workflow to every activity, and JSON
logs that carry the payment, workflow and trace ids (and never a card number)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.service import RPCError

from activities.crm import CRM_UNAVAILABLE
from domain.fraud import amount_for_limit_share
from domain.payment import PaymentRequest
from infra.embedded.process import free_port
from infra.idempotency import IdempotencyRegister
from infra.logs import REDACTED, JsonFormatter
from infra.metrics import serve_metrics
from infra.observability import (
    client_interceptors,
    configure_tracing,
    temporal_runtime,
    tracing_interceptor,
)
from infra.temporal_client import connect_client
from service.start import start_payment
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.fake_crm import FakeCrmServer
from tests.helpers.saga import create_payment, payment_body
from worker import payment_worker

SAGA_STEPS = ("assess_payment", "publish_payment_event", "post_ledger_transaction", "notify_crm")


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text exposition; 0 when absent."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


def registry_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class Snapshot:
    succeeded: float
    steps: dict[str, float]
    confirmed_deliveries: float
    crm_delivered: float

    @classmethod
    def take(cls) -> Snapshot:
        return cls(
            succeeded=registry_value("paysaga_payments_total", outcome="succeeded"),
            steps={
                step: registry_value(
                    "paysaga_activity_duration_seconds_count", activity=step, outcome="succeeded"
                )
                for step in SAGA_STEPS
            },
            confirmed_deliveries=registry_value(
                "paysaga_kafka_delivery_seconds_count", topic="payments.confirmed"
            ),
            crm_delivered=registry_value(
                "paysaga_crm_attempts_total", target="webhook", outcome="delivered"
            ),
        )


async def _until(check: Any, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def test_a_payment_shows_up_on_the_api_and_worker_metrics(
    api: httpx.AsyncClient, app_settings: Settings, temporal_client: Client
) -> None:
    before = Snapshot.take()
    created = await create_payment(api, payment_body())
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "succeeded"
    # The CRM is told right after the status flips to succeeded.
    await _until(lambda: Snapshot.take().crm_delivered > before.crm_delivered)
    after = Snapshot.take()

    assert after.succeeded >= before.succeeded + 1
    for step in SAGA_STEPS:
        assert after.steps[step] > before.steps[step], step
    assert after.confirmed_deliveries >= before.confirmed_deliveries + 1

    # The API's own metrics, on their own port and not on the public API's: its request was
    # counted under the route template, not the path.
    metrics_port = free_port()
    own_port = app_settings.model_copy(update={"api_metrics_port": metrics_port})
    async with api_client(own_port, temporal_client, TEST_API_KEY) as with_metrics:
        assert (await with_metrics.get("/metrics")).status_code == 404
        async with httpx.AsyncClient() as http:
            scraped = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):  # closed with the app
            await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    assert (
        sample(
            text, "paysaga_http_requests_total", method="POST", route="/v1/payments", status="201"
        )
        >= 1
    )
    assert "pay_" not in text  # no payment ids in labels
    # The worker runs in this process: its metrics server serves the same registry over HTTP.
    server = serve_metrics(free_port())
    assert server is not None
    try:
        async with httpx.AsyncClient() as http:
            worker_text = (await http.get(f"http://127.0.0.1:{server.port}/metrics")).text
    finally:
        server.close()
    assert sample(worker_text, "paysaga_payments_total", outcome="succeeded") >= after.succeeded
    assert (
        sample(
            worker_text,
            "paysaga_activity_duration_seconds_count",
            activity="post_ledger_transaction",
            outcome="succeeded",
        )
        >= after.steps["post_ledger_transaction"]
    )
    assert sample(worker_text, "paysaga_kafka_delivery_seconds_sum", topic="payments.raw") > 0


async def test_a_rejected_payment_is_counted_under_its_own_outcome(
    api: httpx.AsyncClient,
) -> None:
    before = registry_value("paysaga_payments_total", outcome="rejected")
    # A first-time customer paying 90 % of the limit scores 1.00 (domain/fraud.py).
    body = payment_body(amount=amount_for_limit_share("USD", 90))
    created = await create_payment(api, body)
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "rejected"
    await _until(lambda: registry_value("paysaga_payments_total", outcome="rejected") > before)


async def test_a_failed_attempt_is_timed_and_counted_under_its_error(
    api: httpx.AsyncClient, crm_server: FakeCrmServer
) -> None:
    def counts() -> tuple[float, float, float]:
        return (
            registry_value("paysaga_crm_attempts_total", target="webhook", outcome=CRM_UNAVAILABLE),
            registry_value("paysaga_crm_attempts_total", target="webhook", outcome="delivered"),
            registry_value(
                "paysaga_activity_duration_seconds_count", activity="notify_crm", outcome="failed"
            ),
        )

    unavailable, delivered, failed = counts()
    crm_server.respond_with(503, times=1, path_prefix="/hooks/paysaga")
    created = await create_payment(api, payment_body())
    assert created.status_code == 201 and created.json()["status"] == "succeeded"
    await _until(lambda: counts()[1] > delivered)  # retried after the 503, then delivered
    # Other payments may be retrying their CRM calls too: at least ours was counted.
    assert counts()[0] >= unavailable + 1
    assert counts()[2] >= failed + 1


def test_tracing_is_off_unless_an_otlp_endpoint_is_configured(app_settings: Settings) -> None:
    assert client_interceptors(app_settings) == []
    assert configure_tracing(app_settings, "paysaga-test") is None
    traced = app_settings.model_copy(update={"otlp_endpoint": "http://collector:4318"})
    [interceptor] = client_interceptors(traced)
    assert type(interceptor).__name__ == "TracingInterceptor"


async def test_the_worker_serves_temporal_sdk_metrics(
    app_settings: Settings, temporal_client: Client, engine: AsyncEngine
) -> None:
    port = free_port()
    settings = app_settings.model_copy(
        update={"temporal_metrics_port": port, "task_queue": f"sdk-metrics-{uuid.uuid4().hex[:8]}"}
    )
    runtime = temporal_runtime(settings, "paysaga-test")
    assert runtime is not None
    client = await connect_client(settings, runtime=runtime)
    async with payment_worker(settings, client):
        started = await start_payment(
            client,
            IdempotencyRegister(engine),
            settings,
            "test-client",
            f"sdk-{uuid.uuid4().hex}",
            _request(),
        )
        await _until_status(started.handle, "succeeded")
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
    queue = settings.task_queue
    assert sample(text, "temporal_worker_start_total", task_queue=queue) == 1
    assert sample(text, "temporal_workflow_task_queue_poll_succeed_total", task_queue=queue) >= 1
    # The fraud assessment runs as a local activity or a regular one, by the payment's policy.
    kind = "local_activity" if settings.local_activities else "activity"
    latency = f"temporal_{kind}_execution_latency_count"
    assert sample(text, latency, activity_type="assess_payment") >= 1
    assert 'paysaga_service="paysaga-test"' in text


def _request() -> PaymentRequest:
    return PaymentRequest.model_validate(payment_body())


async def _until_status(handle: Any, status: str, timeout: float = 30.0) -> None:
    from domain.payment import PaymentState

    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        with contextlib.suppress(RPCError):  # not picked up by the worker yet
            state = await handle.query("state", result_type=PaymentState)
            if state.status == status:
                return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"payment never reached {status}")
        await asyncio.sleep(0.1)


# ── tracing ───────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process records from now on. The API's server spans come from the
    global provider, so one is installed (or extended) here."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()  # later spans are dropped, not kept in memory


@pytest.fixture(scope="module")
async def traced_api(
    app_settings: Settings, temporal_client: Client, spans: InMemorySpanExporter
) -> AsyncIterator[httpx.AsyncClient]:
    """The API and a worker sharing a client with the tracing interceptor, on their own task
    queue, as `connect_client` builds them when PAYSAGA_OTLP_ENDPOINT is set."""
    settings = app_settings.model_copy(update={"task_queue": f"traced-{uuid.uuid4().hex[:8]}"})
    tracer = trace.get_tracer_provider().get_tracer("paysaga.test")
    config = temporal_client.config()
    config["interceptors"] = [tracing_interceptor(tracer)]
    traced = Client(**config)
    async with (
        payment_worker(settings, traced),
        api_client(settings, traced, TEST_API_KEY) as client,
    ):
        yield client


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """What the JSON formatter writes for Temporal's activity logs during the test."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    target = logging.getLogger("temporalio.activity")
    old_level = target.level
    target.addHandler(handler)
    target.setLevel(logging.INFO)
    yield out
    target.removeHandler(handler)
    target.setLevel(old_level)


async def test_one_trace_runs_from_the_request_through_the_workflow_to_every_activity(
    traced_api: httpx.AsyncClient, spans: InMemorySpanExporter, json_logs: io.StringIO
) -> None:
    created = await create_payment(traced_api, payment_body())
    assert created.status_code == 201, created.text
    payment_id = created.json()["id"]

    def of_payment() -> list[ReadableSpan]:
        return [
            s
            for s in spans.get_finished_spans()
            if (s.attributes or {}).get("temporalWorkflowID") == payment_id
        ]

    await _until(lambda: any(s.name == "RunActivity:notify_crm" for s in of_payment()))
    mine = of_payment()
    names = {s.name for s in mine}
    assert {
        "StartWorkflow:PaymentWorkflow",
        "RunWorkflow:PaymentWorkflow",
        *(f"StartActivity:{step}" for step in SAGA_STEPS),
        *(f"RunActivity:{step}" for step in SAGA_STEPS),
    } <= names
    trace_ids = {s.context.trace_id for s in mine if s.context is not None}
    assert len(trace_ids) == 1, f"the payment's spans are split across {len(trace_ids)} traces"
    trace_id = trace_ids.pop()

    # The trace starts at the HTTP request, and each activity run hangs under its scheduling.
    in_trace = {
        s.context.span_id: s
        for s in spans.get_finished_spans()
        if s.context is not None and s.context.trace_id == trace_id
    }
    roots = [s for s in in_trace.values() if s.parent is None]
    assert [r.name for r in roots] == ["POST /v1/payments"]
    start = next(s for s in mine if s.name == "StartWorkflow:PaymentWorkflow")
    ancestors = []
    parent = start.parent
    while parent is not None:
        ancestors.append(in_trace[parent.span_id].name)
        parent = in_trace[parent.span_id].parent
    assert ancestors[-1] == "POST /v1/payments"
    by_id = {s.context.span_id: s for s in mine if s.context is not None}
    for run in (s for s in mine if s.name.startswith("RunActivity:")):
        assert run.parent is not None
        scheduled_by = by_id[run.parent.span_id]
        assert scheduled_by.name == run.name.replace("RunActivity:", "StartActivity:")

    # The activities' JSON logs carry the same ids.
    records = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    ours = [r for r in records if r.get("payment_id") == payment_id]
    assert ours, "no activity log line named the payment"
    published = next(r for r in ours if r.get("activity") == "publish_payment_event")
    assert published["workflow_id"] == payment_id
    assert published["trace_id"] == format(trace_id, "032x")
    assert published["attempt"] == 1
    assert published["logger"] == "temporalio.activity"


# ── the JSON formatter ───────────────────────────────────────────────────────────────────


def _format(msg: str, *args: Any, exc: bool = False, **extra: Any) -> dict[str, Any]:
    record = logging.LogRecord("paysaga.test", logging.INFO, __file__, 1, msg, args, None)
    if exc:
        try:
            raise ValueError("card 4242 4242 4242 4242 in a traceback")
        except ValueError:
            record.exc_info = sys.exc_info()
    record.__dict__.update(extra)
    parsed: dict[str, Any] = json.loads(JsonFormatter().format(record))
    return parsed


def test_temporal_activity_context_becomes_top_level_fields() -> None:
    entry = _format(
        "published %s",
        "payments.raw",
        temporal_activity={
            "activity_id": "3",
            "activity_type": "post_ledger_transaction",
            "attempt": 4,
            "namespace": "default",
            "task_queue": "payments",
            "workflow_id": "pay_0123456789abcdef01234567",
            "workflow_run_id": "run-1",
            "workflow_type": "PaymentWorkflow",
        },
    )
    assert entry["message"] == "published payments.raw"
    assert entry["payment_id"] == entry["workflow_id"] == "pay_0123456789abcdef01234567"
    assert entry["activity"] == "post_ledger_transaction"
    assert entry["attempt"] == 4
    assert entry["run_id"] == "run-1"
    assert "temporal_activity" not in entry
    assert "trace_id" not in entry  # no span is current


def test_temporal_workflow_context_and_current_trace_id() -> None:
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("step") as span:
        entry = _format(
            "waiting",
            temporal_workflow={
                "workflow_id": "pay_aaaaaaaaaaaaaaaaaaaaaaaa",
                "run_id": "r",
                "workflow_type": "PaymentWorkflow",
                "task_queue": "payments",
                "attempt": 1,
                "namespace": "default",
            },
        )
        expected = format(span.get_span_context().trace_id, "032x")
    assert entry["trace_id"] == expected
    assert entry["payment_id"] == "pay_aaaaaaaaaaaaaaaaaaaaaaaa"
    assert "activity" not in entry
    # A workflow that is not a payment keeps its workflow id and gets no payment id.
    other = _format("x", temporal_workflow={"workflow_id": "bench-1"})
    assert other["workflow_id"] == "bench-1" and "payment_id" not in other


def test_card_numbers_never_reach_the_log_even_by_mistake() -> None:
    entry = _format(
        "customer sent %s for order 12", "4242 4242 4242 4242", exc=True, note="4000056655665556"
    )
    serialized = json.dumps(entry)
    for pan in ("4242424242424242", "4242 4242 4242 4242", "4000056655665556"):
        assert pan not in serialized
    assert REDACTED in entry["message"] and entry["message"].endswith("for order 12")
    assert entry["note"] == REDACTED
    assert REDACTED in entry["exception"]
    # Ordinary numbers (amounts, offsets, timestamps) are left alone.
    plain = _format("captured %d minor units at offset %d", 250000, 1234567890123)
    assert plain["message"] == "captured 250000 minor units at offset 1234567890123"
