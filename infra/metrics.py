"""Prometheus metrics: what an operator graphs and alerts on. One definition per metric, here.

Everything lives in prometheus_client's default registry, so the API's `/metrics` route and the
worker's metrics server (`serve_metrics`) expose whatever their process recorded. Temporal's own
SDK metrics (task slots, schedule-to-start latency, poll errors) are served separately by the
Temporal runtime (`infra.observability.temporal_runtime`).

Labels are bounded sets (activity names, topics, CRM targets, outcomes, route templates):
never payment ids, customer ids or anything a client controls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

log = logging.getLogger(__name__)

# Seconds. Fraud scoring and Kafka take milliseconds; the ledger tens of ms under contention;
# a CRM may take its whole timeout.
_STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_KAFKA_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 20.0)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# Reconciliation's exception queue (docs/reconciliation.md), refreshed by the API every
# `recon_gauge_refresh_seconds` and after each resolution through it: what finance has yet to
# resolve, by kind and by how long it has waited (0-1d, 1-3d, 3-7d, 7d+).
RECONCILIATION_EXCEPTIONS = Gauge(
    "paysaga_reconciliation_exceptions",
    "Open reconciliation exceptions by kind (missing, unexpected, amount_mismatch, "
    "currency_mismatch) and age bucket.",
    ["kind", "age"],
)
RECONCILIATION_EXCEPTION_VALUE = Gauge(
    "paysaga_reconciliation_exceptions_value_minor",
    "What the open reconciliation exceptions are worth (absolute, minor units) by kind, age "
    "bucket and currency.",
    ["kind", "age", "currency"],
)


def set_reconciliation_gauges(summary: list[tuple[str, str, str, int, int]]) -> None:
    """Replace the gauges with (kind, age, currency, count, value) rows: kinds and ages that
    emptied read zero rather than keeping their last value."""
    counts: dict[tuple[str, str], int] = {}
    RECONCILIATION_EXCEPTIONS.clear()
    RECONCILIATION_EXCEPTION_VALUE.clear()
    for kind, age, currency, count, value in summary:
        counts[(kind, age)] = counts.get((kind, age), 0) + count
        RECONCILIATION_EXCEPTION_VALUE.labels(kind, age, currency).set(value)
    for kind in ("missing", "unexpected", "amount_mismatch", "currency_mismatch"):
        for age in ("0-1d", "1-3d", "3-7d", "7d+"):
            RECONCILIATION_EXCEPTIONS.labels(kind, age).set(counts.get((kind, age), 0))


PAYMENTS = Counter(
    "paysaga_payments",
    "Payments that reached a final outcome: succeeded, rejected, declined, failed, canceled. "
    "Counted when the outcome's event is acknowledged by Kafka.",
    ["outcome"],
)
PAYMENT_STARTS = Counter(
    "paysaga_payment_starts",
    "Payment workflows requested, by source (api, kafka) and whether the idempotency key "
    "had already started one (replayed=true starts nothing).",
    ["source", "replayed"],
)
ACTIVITY_SECONDS = Histogram(
    "paysaga_activity_duration_seconds",
    "Saga step latency: one activity attempt, by activity name and outcome "
    "(succeeded, failed = will be retried, rejected = non-retryable, canceled).",
    ["activity", "outcome"],
    buckets=_STEP_BUCKETS,
)
KAFKA_DELIVERY_SECONDS = Histogram(
    "paysaga_kafka_delivery_seconds",
    "From produce to the broker's acks=all acknowledgement of a payment event, by topic.",
    ["topic"],
    buckets=_KAFKA_BUCKETS,
)
LEDGER_SERIALIZATION_RETRIES = Counter(
    "paysaga_ledger_serialization_retries",
    "Ledger transactions run again after SQLSTATE 40001 (serialization failure) or 40003 "
    "(CockroachDB ambiguous result). A steady rate means hot accounts.",
    ["sqlstate"],
)
CRM_ATTEMPTS = Counter(
    "paysaga_crm_attempts",
    "CRM notification attempts by target (webhook, salesforce, hubspot) and outcome "
    "(delivered, CrmUnavailable = will be retried, CrmRejected = given up, error).",
    ["target", "outcome"],
)
INTAKE_MESSAGES = Counter(
    "paysaga_intake_messages",
    "payments.requests messages by outcome: started, replayed, dead_lettered, retried "
    "(Temporal did not accept the start; the offset is not committed).",
    ["outcome"],
)
HTTP_REQUESTS = Counter(
    "paysaga_http_requests",
    "API requests by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "paysaga_http_request_duration_seconds",
    "API request latency by method and route template.",
    ["method", "route"],
    buckets=_HTTP_BUCKETS,
)


def exposition() -> tuple[bytes, str]:
    """The text format of every metric in this process, and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


@dataclass
class MetricsServer:
    """A `/metrics` HTTP server on its own thread (the worker has no web framework)."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_metrics(port: int, host: str = "127.0.0.1") -> MetricsServer | None:
    """Serve the default registry on `host:port`; None when `port` is 0. A port already in use
    is logged, not fatal: payments must not stop because a scrape target is unavailable."""
    if not port:
        return None
    try:
        server, thread = start_http_server(port, addr=host)
    except OSError as exc:
        log.error("metrics server not started on %s:%d: %s", host, port, exc)
        return None
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, port)
    return MetricsServer(server, thread)
