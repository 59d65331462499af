"""The Temporal worker: runs PaymentWorkflow and every activity, webhook deliveries on their own
task queue, and (with `relay_enabled`) the events store's consumers: the outbox relay and the
webhook dispatcher. Scale out by running more.

python worker.py        # reads PAYSAGA_* settings; stops gracefully on SIGTERM / Ctrl-C
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import Interceptor, UnsandboxedWorkflowRunner, Worker, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.acquirer import AcquirerActivities
from activities.crm import CrmActivities
from activities.event_store import AckRecorder, EventStore
from activities.fraud import FraudActivities
from activities.kafka import EventPublisher, KafkaActivities
from activities.reconciliation import ReconciliationActivities
from activities.webhook_endpoints import WebhookEndpoints
from activities.webhooks import WebhookActivities
from infra.codec import secret_sealer
from infra.database import make_bookkeeping_engine, make_engine
from infra.exit import stop_on_signals
from infra.logs import configure_logging
from infra.observability import PaymentMetricsInterceptor, temporal_runtime, worker_telemetry
from infra.relay import running_relay
from infra.temporal_client import connect_client
from ledger.activity import LedgerActivities
from ledger.store import Ledger
from service.webhook_dispatch import running_dispatcher
from settings import Settings, get_settings
from workflows.payment import PaymentWorkflow
from workflows.reconciliation import DailyReconciliationWorkflow
from workflows.subscription import SubscriptionWorkflow
from workflows.webhook_delivery import WebhookDeliveryWorkflow

log = logging.getLogger("paysaga.worker")


def workflow_runner(settings: Settings) -> WorkflowRunner:
    """The sandbox re-imports the workflow's modules for every workflow instance it creates;
    passing our own (deterministic, side-effect free) modules through keeps that cost to the
    workflow file itself. `workflow_sandbox=false` drops the sandbox altogether for throughput:
    determinism is then guarded by the replay tests alone (README "Performance")."""
    if not settings.workflow_sandbox:
        return UnsandboxedWorkflowRunner()
    restrictions = SandboxRestrictions.default.with_passthrough_modules(
        "activities", "domain", "infra", "settings", "pydantic", "pydantic_core", "sqlalchemy",
        "httpx", "confluent_kafka",
    )  # fmt: skip
    return SandboxedWorkflowRunner(restrictions=restrictions)


@asynccontextmanager
async def payment_worker(
    settings: Settings,
    client: Client,
    *,
    kafka_activities: Callable[..., KafkaActivities] = KafkaActivities,
    ledger_activities: Callable[[Ledger], LedgerActivities] = LedgerActivities,
    interceptors: Sequence[Interceptor] = (),
) -> AsyncIterator[Worker]:
    """A worker with its own clients (database pool, Kafka producer, HTTP), closed on exit.
    Tests pass subclasses of the Kafka or ledger activities to hold or fail a step, and
    interceptors to lose a workflow task as a killed worker would."""
    assert settings.database_url and settings.kafka_bootstrap_servers
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size)
    publisher = EventPublisher(settings.kafka_bootstrap_servers, settings)
    crm = CrmActivities(settings)
    # Registered ahead of the saga's acquirer steps; it connects on first use only.
    acquirer = AcquirerActivities(settings)
    fraud = FraudActivities(engine, settings)
    ledger = ledger_activities(Ledger(engine, max_attempts=settings.db_max_retries))
    events = EventStore(engine, max_attempts=settings.db_max_retries)
    # Kafka's acknowledgements are noted at READ COMMITTED (infra.database: bookkeeping).
    bookkeeping = make_bookkeeping_engine(settings.database_url, pool_size=1)
    acks = AckRecorder(EventStore(bookkeeping, max_attempts=settings.db_max_retries))
    kafka = kafka_activities(publisher, events, acks)
    reconciliation = ReconciliationActivities(settings, engine)
    worker = Worker(
        client,
        task_queue=settings.task_queue,
        workflows=[PaymentWorkflow, DailyReconciliationWorkflow, SubscriptionWorkflow],
        activities=[
            fraud.assess_payment,
            kafka.publish_payment_event,
            kafka.publish_subscription_event,
            ledger.post_ledger_transaction,
            ledger.captured_in_ledger,
            ledger.held_in_ledger,
            ledger.record_payment_outcome,
            crm.notify_crm,
            acquirer.authorize_payment,
            acquirer.capture_payment,
            acquirer.void_authorization,
            acquirer.refund_payment,
            acquirer.acquirer_status,
            reconciliation.import_settlement_day,
        ],
        max_concurrent_activities=settings.max_concurrent_activities,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        max_cached_workflows=settings.max_cached_workflows,
        graceful_shutdown_timeout=timedelta(seconds=10),
        workflow_runner=workflow_runner(settings),
        # Tracing, when configured, comes with the client (infra.temporal_client).
        interceptors=[PaymentMetricsInterceptor(), *interceptors],
    )
    acks.start()
    try:
        async with worker:
            yield worker
    finally:
        await acks.stop()
        await crm.aclose()
        await acquirer.aclose()
        await asyncio.to_thread(publisher.close, 10.0)
        await engine.dispose()
        await bookkeeping.dispose()


@asynccontextmanager
async def event_worker(settings: Settings, client: Client) -> AsyncIterator[Worker]:
    """Webhook deliveries on their own task queue, with a bounded number of activity slots (a
    slow merchant endpoint cannot take the payments' slots, nor all of these), and, when
    `relay_enabled`, the outbox relay and the webhook dispatcher. Its own database pool and
    Kafka producer: the payments' are never queued behind a relay sweep. The relay and the
    dispatcher run at READ COMMITTED (infra.database: bookkeeping), the deliveries do not."""
    assert settings.database_url and settings.kafka_bootstrap_servers
    engine = make_engine(settings.database_url, pool_size=4)
    bookkeeping = make_bookkeeping_engine(settings.database_url, pool_size=2)
    publisher = EventPublisher(settings.kafka_bootstrap_servers, settings)
    sealer = secret_sealer(settings)
    endpoints = WebhookEndpoints(engine, max_attempts=settings.db_max_retries, sealer=sealer)
    webhooks = WebhookActivities(
        endpoints, EventStore(engine, max_attempts=settings.db_max_retries), settings
    )
    events = EventStore(bookkeeping, max_attempts=settings.db_max_retries)
    # The dispatcher only matches events to endpoints: it is given no key to open secrets with.
    matched = WebhookEndpoints(bookkeeping, max_attempts=settings.db_max_retries)
    worker = Worker(
        client,
        task_queue=settings.webhook_task_queue,
        workflows=[WebhookDeliveryWorkflow],
        activities=[webhooks.deliver_webhook, webhooks.give_up_webhook_delivery],
        max_concurrent_activities=settings.webhook_max_concurrent_deliveries,
        max_concurrent_workflow_tasks=settings.max_concurrent_workflow_tasks,
        graceful_shutdown_timeout=timedelta(seconds=5),
        workflow_runner=workflow_runner(settings),
    )
    try:
        async with AsyncExitStack() as running:
            await running.enter_async_context(worker)
            if settings.relay_enabled:
                await running.enter_async_context(running_relay(settings, events, publisher))
                await running.enter_async_context(
                    running_dispatcher(settings, events, matched, client)
                )
            yield worker
    finally:
        await webhooks.aclose()
        await asyncio.to_thread(publisher.close, 10.0)
        await engine.dispose()
        await bookkeeping.dispose()


async def main() -> None:
    settings = get_settings()
    configure_logging(settings)
    stop = stop_on_signals()
    with worker_telemetry(settings):
        runtime = temporal_runtime(settings, "paysaga-worker")
        client = await connect_client(settings, runtime=runtime)
        async with AsyncExitStack() as running:
            await running.enter_async_context(payment_worker(settings, client))
            await running.enter_async_context(event_worker(settings, client))
            if settings.kafka_intake_enabled:
                from intake.consumer import running_intake

                await running.enter_async_context(running_intake(settings, client))
            log.info("worker polling task queue %s", settings.task_queue)
            await stop.wait()
            log.info("shutting down: finishing in-flight activities")


if __name__ == "__main__":
    from infra.exit import run_and_exit

    run_and_exit(main)
