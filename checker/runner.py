"""Running every check of `paysaga check` once, or again while anything fails until the system
settles; a service that does not answer fails its checks with the reason instead of crashing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from checker.holds import check_holds_released
from checker.kafka import (
    LEDGER_TOPICS,
    check_kafka_has_outbox,
    check_outbox_in_kafka,
    load_outbox,
    scan_topics,
)
from checker.ledger import (
    PaymentLedger,
    check_ledger_balanced,
    check_posted_once,
    check_register_matches,
    check_within_captured,
    load_payments,
)
from checker.reconciliation import check_receivable_matches, check_settled_lines_accounted
from checker.report import (
    HOLDS_RELEASED,
    KAFKA_HAS_OUTBOX,
    LEDGER_BALANCED,
    OUTBOX_IN_KAFKA,
    POSTED_ONCE,
    PROMISES,
    RECEIVABLE_MATCHES,
    REGISTER_MATCHES,
    RENEWALS_ONCE,
    SETTLED_LINES_ACCOUNTED,
    WITHIN_CAPTURED,
    WORKFLOW_AGREES,
    CheckReport,
    CheckResult,
    CheckScope,
)
from checker.subscriptions import check_renewals_once
from checker.workflows import check_workflows_agree, describe_workflows, visible_workflows
from infra.database import make_engine
from infra.embedded.postgres import DATABASE
from infra.temporal_client import connect_client
from settings import Settings


# ── where the services are ───────────────────────────────────────────────────────────────────
def resolve_endpoints(settings: Settings) -> Settings:
    """Services not configured by URL are the embedded ones `paysaga run` starts, on the ports in
    settings: the checker talks to them directly."""
    return settings.model_copy(
        update={
            "temporal_address": settings.temporal_address or f"127.0.0.1:{settings.temporal_port}",
            "kafka_bootstrap_servers": settings.kafka_bootstrap_servers
            or f"127.0.0.1:{settings.kafka_port}",
            "database_url": settings.database_url
            or f"postgresql+psycopg://postgres@127.0.0.1:{settings.postgres_port}/{DATABASE}",
        }
    )


# ── running it all ──────────────────────────────────────────────────────────────────────────
def _reason(exc: BaseException) -> str:
    """One line on why a service did not answer (drivers add pages of background)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


async def _guarded(name: str, work: Any) -> CheckResult:
    """A check whose service does not answer fails with the reason instead of crashing the run."""
    try:
        result: CheckResult = await work
        return result
    except Exception as exc:  # reported in the result, which fails the run
        return CheckResult(name=name, promise=PROMISES[name], error=_reason(exc))


async def _check_once(
    settings: Settings,
    engine: AsyncEngine,
    temporal: Client | Exception,
    scope: CheckScope,
    max_examples: int,
    kafka_timeout: float,
) -> list[CheckResult]:
    balanced = await _guarded(LEDGER_BALANCED, check_ledger_balanced(engine, scope, max_examples))
    kafka_checks = await _kafka_checks(settings, engine, scope, max_examples, kafka_timeout)
    try:
        payments = await load_payments(engine, scope)
    except Exception as exc:
        error = _reason(exc)
        payment_checks = [
            CheckResult(name=n, promise=PROMISES[n], error=error)
            for n in (WITHIN_CAPTURED, POSTED_ONCE, REGISTER_MATCHES, WORKFLOW_AGREES)
        ]
    else:
        payment_checks = [
            check_within_captured(payments, max_examples),
            check_posted_once(payments, max_examples),
            check_register_matches(payments, max_examples),
            await _guarded(
                WORKFLOW_AGREES, _workflow_check(temporal, payments, scope, max_examples)
            ),
        ]
    holds = await _guarded(HOLDS_RELEASED, check_holds_released(engine, scope, max_examples))
    reconciliation = [
        await _guarded(
            SETTLED_LINES_ACCOUNTED, check_settled_lines_accounted(engine, max_examples)
        ),
        await _guarded(RECEIVABLE_MATCHES, check_receivable_matches(engine, max_examples)),
    ]
    renewals = await _guarded(RENEWALS_ONCE, check_renewals_once(engine, scope, max_examples))
    results = [balanced, *payment_checks, *kafka_checks, holds, *reconciliation, renewals]
    return sorted(results, key=lambda r: list(PROMISES).index(r.name))


async def _kafka_checks(
    settings: Settings,
    engine: AsyncEngine,
    scope: CheckScope,
    max_examples: int,
    kafka_timeout: float,
) -> list[CheckResult]:
    try:
        # The outbox is read before Kafka: an event committed by now and published by the end
        # of the scan is found; one published later is in flight (see `settle_seconds`).
        outbox = await load_outbox(engine, scope)
        topics = sorted({*LEDGER_TOPICS, *(row.topic for row in outbox)})
        bootstrap = settings.kafka_bootstrap_servers or ""
        scan = await asyncio.to_thread(scan_topics, bootstrap, topics, kafka_timeout)
    except Exception as exc:
        error = _reason(exc)
        return [
            CheckResult(name=n, promise=PROMISES[n], error=error)
            for n in (OUTBOX_IN_KAFKA, KAFKA_HAS_OUTBOX)
        ]
    return [
        check_outbox_in_kafka(outbox, scan, max_examples),
        await _guarded(
            KAFKA_HAS_OUTBOX, check_kafka_has_outbox(engine, outbox, scan, scope, max_examples)
        ),
    ]


async def _workflow_check(
    temporal: Client | Exception,
    payments: Sequence[PaymentLedger],
    scope: CheckScope,
    max_examples: int,
) -> CheckResult:
    if isinstance(temporal, Exception):
        raise temporal
    workflows = await visible_workflows(temporal, scope)
    if scope.since is not None:
        # Listed by start time: a payment started earlier but refunded since is looked up.
        unlisted = [p.payment_id for p in payments if p.payment_id not in workflows]
        workflows = {**workflows, **await describe_workflows(temporal, unlisted)}
    return check_workflows_agree(payments, workflows, max_examples)


async def run_checks(
    settings: Settings,
    *,
    scope: CheckScope | None = None,
    engine: AsyncEngine | None = None,
    temporal: Client | None = None,
    max_examples: int = 10,
    settle_seconds: float = 0.0,
    kafka_timeout_seconds: float = 60.0,
) -> CheckReport:
    """Run every check once; with `settle_seconds`, run again (every 2 s) while anything fails,
    until it passes or the time is up, so payments still finishing are not called violations.

    `engine` and `temporal` are used as given (and left open); otherwise they are made from
    `settings` (services not configured are the embedded ones of `paysaga run`)."""
    settings = resolve_endpoints(settings)
    scope = scope or CheckScope()
    started_at, started = datetime.now(UTC), time.monotonic()
    own_engine = engine is None
    db = engine or make_engine(settings.database_url or "", pool_size=2)
    try:
        client: Client | Exception
        try:
            client = temporal or await connect_client(settings)
        except Exception as exc:  # the workflow check reports it and fails
            client = exc
        attempts = 0
        while True:
            attempts += 1
            results = await _check_once(
                settings, db, client, scope, max_examples, kafka_timeout_seconds
            )
            remaining = started + settle_seconds - time.monotonic()
            if all(r.passed for r in results) or remaining <= 0:
                break
            await asyncio.sleep(min(2.0, remaining))
    finally:
        if own_engine:
            await db.dispose()
    return CheckReport(
        scope=scope,
        results=results,
        started_at=started_at,
        elapsed_seconds=round(time.monotonic() - started, 3),
        attempts=attempts,
    )
