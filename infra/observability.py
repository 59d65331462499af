"""Metrics and traces for the worker and the API, wired in one place.

- `PaymentMetricsInterceptor` (worker): times every activity attempt and derives the payment
  metrics from the activities' own inputs and results, so no activity carries metrics code.
- `configure_tracing` + `client_interceptors`: OpenTelemetry spans API → workflow →
  activities via temporalio's `TracingInterceptor`, exported over OTLP/HTTP. Both do nothing
  unless `PAYSAGA_OTLP_ENDPOINT` is set: no interceptor, no headers, no provider.
- `temporal_runtime`: the Temporal SDK's own Prometheus metrics on their own port.
- `install_api_observability`: per-route request metrics and server spans; the API's
  `/metrics` is served on its own port (`PAYSAGA_API_METRICS_PORT`, api/app.py), never on
  the public API port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import temporalio.activity
import temporalio.client
import temporalio.worker
from opentelemetry import propagate, trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from domain.events import EventKind, PaymentEvent
from infra.metrics import (
    ACTIVITY_SECONDS,
    CRM_ATTEMPTS,
    HTTP_REQUESTS,
    HTTP_SECONDS,
    KAFKA_DELIVERY_SECONDS,
    PAYMENTS,
    serve_metrics,
)
from settings import Settings

if TYPE_CHECKING:
    from fastapi import FastAPI
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

PUBLISH_ACTIVITY = "publish_payment_event"
CRM_ACTIVITY = "notify_crm"

# The event that ends each kind of payment. A payment publishes exactly one of them (a
# succeeded payment's later refunds and disputes publish other kinds).
_FINAL_OUTCOME_OF = {
    EventKind.CONFIRMED: "succeeded",
    EventKind.FAILED: "failed",
    EventKind.CANCELED: "canceled",
}


# ── worker: activity metrics ──────────────────────────────────────────────────────────────


def payment_outcome(event: PaymentEvent) -> str | None:
    """The final outcome an event announces, or None for events that end nothing."""
    if event.kind == EventKind.REJECTED:
        # Fraud rejections and reviewer declines share the topic; the status tells them apart.
        status = event.data.get("status")
        return status if status in ("rejected", "declined") else "rejected"
    return _FINAL_OUTCOME_OF.get(event.kind)


def attempt_outcome(error: BaseException | None) -> str:
    if error is None:
        return "succeeded"
    if isinstance(error, asyncio.CancelledError | CancelledError):
        return "canceled"
    if isinstance(error, ApplicationError) and error.non_retryable:
        return "rejected"
    return "failed"


class PaymentMetricsInterceptor(temporalio.worker.Interceptor):
    """Register on the worker: `Worker(..., interceptors=[PaymentMetricsInterceptor()])`."""

    def intercept_activity(
        self, next: temporalio.worker.ActivityInboundInterceptor
    ) -> temporalio.worker.ActivityInboundInterceptor:
        return _TimedActivity(next)


class _TimedActivity(temporalio.worker.ActivityInboundInterceptor):
    async def execute_activity(self, input: temporalio.worker.ExecuteActivityInput) -> Any:
        name = temporalio.activity.info().activity_type
        started = time.perf_counter()
        error: BaseException | None = None
        result: Any = None
        try:
            result = await super().execute_activity(input)
            return result
        except BaseException as exc:
            error = exc
            raise
        finally:
            ACTIVITY_SECONDS.labels(name, attempt_outcome(error)).observe(
                time.perf_counter() - started
            )
            try:
                _observe_payment_step(name, input.args, result, error)
            except Exception:  # metrics must never fail a payment step
                log.exception("recording metrics for activity %s failed", name)


def _observe_payment_step(
    name: str, args: Sequence[Any], result: Any, error: BaseException | None
) -> None:
    if name == PUBLISH_ACTIVITY and error is None:
        latency_ms = getattr(result, "latency_ms", None)
        topic = getattr(result, "topic", None)
        if isinstance(latency_ms, int | float) and isinstance(topic, str):
            KAFKA_DELIVERY_SECONDS.labels(topic).observe(latency_ms / 1000)
        event = args[0] if args else None
        outcome = payment_outcome(event) if isinstance(event, PaymentEvent) else None
        if outcome is not None:
            PAYMENTS.labels(outcome).inc()
    elif name == CRM_ACTIVITY and args:
        CRM_ATTEMPTS.labels(str(args[0]), _crm_outcome(error)).inc()


def _crm_outcome(error: BaseException | None) -> str:
    if error is None:
        return "delivered"
    if isinstance(error, ApplicationError) and error.type:
        return error.type  # CrmUnavailable / CrmRejected: a closed set in activities/crm.py
    return "error"


# ── tracing ───────────────────────────────────────────────────────────────────────────────


def tracing_enabled(settings: Settings) -> bool:
    return bool(settings.otlp_endpoint)


def _traces_url(endpoint: str) -> str:
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else f"{endpoint}/v1/traces"


def configure_tracing(settings: Settings, service_name: str) -> TracerProvider | None:
    """Install the process's tracer provider, exporting in batches over OTLP/HTTP. Call once
    per process (entry points only); returns the provider to shut down on exit."""
    if not settings.otlp_endpoint:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=_traces_url(settings.otlp_endpoint)))
    )
    trace.set_tracer_provider(provider)
    log.info("exporting traces to %s", _traces_url(settings.otlp_endpoint))
    return provider


def tracing_interceptor(tracer: trace.Tracer | None = None) -> temporalio.client.Interceptor:
    """Spans for starting workflows, running them, scheduling and running activities. On a
    client it also applies to every worker built from that client."""
    from temporalio.contrib.opentelemetry import TracingInterceptor

    return TracingInterceptor(tracer)


def client_interceptors(settings: Settings) -> list[temporalio.client.Interceptor]:
    return [tracing_interceptor()] if tracing_enabled(settings) else []


# ── Temporal SDK metrics ──────────────────────────────────────────────────────────────────


def temporal_runtime(settings: Settings, service_name: str) -> Runtime | None:
    """A Temporal runtime whose SDK metrics are served for Prometheus on
    `metrics_host:temporal_metrics_port`; None (the default runtime) when the port is 0 or
    taken: the worker runs without SDK metrics rather than not at all."""
    if not settings.temporal_metrics_port:
        return None
    address = f"{settings.metrics_host}:{settings.temporal_metrics_port}"
    try:
        runtime = Runtime(
            telemetry=TelemetryConfig(
                metrics=PrometheusConfig(bind_address=address),
                # The core already tags service_name="temporal-core-sdk": a second one would
                # make the exposition unparseable.
                global_tags={"paysaga_service": service_name},
            )
        )
    except Exception as exc:
        log.error("Temporal SDK metrics not served on %s: %s", address, exc)
        return None
    log.info("serving Temporal SDK metrics on http://%s/metrics", address)
    return runtime


@contextmanager
def worker_telemetry(settings: Settings, service_name: str = "paysaga-worker") -> Iterator[None]:
    """For a worker process: tracing (when configured) and the `/metrics` server, both shut
    down (spans flushed) on exit."""
    provider = configure_tracing(settings, service_name)
    server = serve_metrics(settings.worker_metrics_port, settings.metrics_host)
    try:
        yield
    finally:
        if server is not None:
            server.close()
        if provider is not None:
            provider.shutdown()


# ── API: request metrics, server spans ────────────────────────────────────────────────────


def _route_of(scope: Scope) -> str:
    """The route template (`/v1/payments/{payment_id}`), never the raw path: bounded labels."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class HttpTelemetry:
    """Pure ASGI middleware: request count and latency per route template, and a SERVER span
    continuing the caller's W3C `traceparent`. With no tracer provider configured the span is
    OpenTelemetry's no-op: a few microseconds."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.tracer = trace.get_tracer("paysaga.api")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = str(scope.get("method", "GET"))
        status = 500
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        with self.tracer.start_as_current_span(
            f"HTTP {method}",
            context=propagate.extract(carrier),
            kind=trace.SpanKind.SERVER,
        ) as span:
            try:
                await self.app(scope, receive, send_and_note_status)
            finally:
                route = _route_of(scope)
                if span.is_recording():
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.request.method", method)
                    span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
                HTTP_REQUESTS.labels(method, route, str(status)).inc()
                HTTP_SECONDS.labels(method, route).observe(time.perf_counter() - started)


def install_api_observability(app: FastAPI) -> None:
    """Request metrics and spans for every route. The metrics are scraped from the API's own
    metrics port (unauthenticated, like every scrape target), not from a route of the app."""
    app.add_middleware(HttpTelemetry)


__all__ = [
    "HttpTelemetry",
    "PaymentMetricsInterceptor",
    "attempt_outcome",
    "client_interceptors",
    "configure_tracing",
    "install_api_observability",
    "payment_outcome",
    "temporal_runtime",
    "tracing_interceptor",
    "worker_telemetry",
]
