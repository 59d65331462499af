"""Starting webhook deliveries: the dispatcher (events store → one workflow per matching
endpoint) that the worker runs, and the manual redelivery the API asks for.

The dispatcher reads events not yet dispatched (`dispatched_at IS NULL`, a partial index),
finds the enabled endpoints of each event's client that want its type and existed when it was
recorded, starts a `WebhookDeliveryWorkflow` for each, and only then marks the events
dispatched: a crash in between starts the same workflow ids again, which Temporal refuses as
duplicates. A payment never waits for any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities.event_store import EventStore, StoredEvent
from activities.webhook_endpoints import WebhookEndpoint, WebhookEndpoints
from domain.webhooks import WebhookDeliveryInput, WebhookRetryPolicy, delivery_workflow_id
from settings import Settings
from workflows.webhook_delivery import WebhookDeliveryWorkflow

log = logging.getLogger("paysaga.webhooks")

_START_CONCURRENCY = 20
# The pass over events no endpoint can want is housekeeping (it keeps the partial index of
# undispatched events short): the dispatcher reads only wanted events, whatever it left.
PASS_OVER_EVERY_SECONDS = 5.0


def retry_policy(settings: Settings, *, manual: bool = False) -> WebhookRetryPolicy:
    return WebhookRetryPolicy(
        initial_seconds=settings.webhook_retry_initial_seconds,
        backoff=settings.webhook_retry_backoff,
        max_interval_seconds=settings.webhook_retry_max_interval_seconds,
        give_up_after_seconds=0.0 if manual else settings.webhook_retry_for_seconds,
        attempt_timeout_seconds=settings.webhook_timeout_seconds,
    )


async def start_delivery(
    temporal: Client,
    settings: Settings,
    endpoint: WebhookEndpoint,
    event_id: str,
    *,
    manual: bool = False,
) -> str:
    """Start delivering `event_id` to `endpoint`; the delivery's workflow id. An automatic
    delivery already started is left alone (same id); a manual one is always a new delivery."""
    workflow_id = delivery_workflow_id(
        endpoint.id, event_id, uuid.uuid4().hex[:12] if manual else ""
    )
    # An automatic delivery started before (a crash between start and mark) is found again.
    with contextlib.suppress(WorkflowAlreadyStartedError):
        await temporal.start_workflow(
            WebhookDeliveryWorkflow.run,
            WebhookDeliveryInput(
                endpoint_id=endpoint.id,
                event_id=event_id,
                client_id=endpoint.client_id,
                manual=manual,
                retry=retry_policy(settings, manual=manual),
            ),
            id=workflow_id,
            task_queue=settings.webhook_task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            static_summary=f"event {event_id} to {endpoint.id}",
        )
    return workflow_id


class WebhookDispatcher:
    def __init__(
        self,
        events: EventStore,
        endpoints: WebhookEndpoints,
        temporal: Client,
        settings: Settings,
    ) -> None:
        self.events = events
        self.endpoints = endpoints
        self.temporal = temporal
        self.settings = settings
        self.started = 0
        self._next_pass_over = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                while await self.dispatch_once() == self.settings.relay_batch_size:
                    pass  # a backlog: keep going
            except Exception as exc:  # the next round tries again; never kill the worker
                log.warning("webhook dispatch failed: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.relay_interval_seconds / 2)

    async def dispatch_once(self) -> int:
        """Match one batch of undispatched events; how many events it looked at."""
        if time.monotonic() >= self._next_pass_over:
            await self.endpoints.pass_over_unwanted_events()
            self._next_pass_over = time.monotonic() + PASS_OVER_EVERY_SECONDS
        # Only events some endpoint may want: those no endpoint wants that were recorded since
        # the pass are left to the next pass (under load, every round found a few: a read,
        # a look-up of endpoints and a write for nothing).
        batch = await self.events.undispatched(
            self.settings.relay_batch_size, only=self.endpoints.wanted_by_some_endpoint()
        )
        if not batch:
            return 0
        clients = sorted({e.record.client_id for e in batch if e.record.client_id})
        by_client: dict[str, list[WebhookEndpoint]] = defaultdict(list)
        for endpoint in await self.endpoints.enabled_for(clients):
            by_client[endpoint.client_id].append(endpoint)
        deliveries = [
            (endpoint, event)
            for event in batch
            for endpoint in by_client.get(event.record.client_id, [])
            if endpoint.wants(event.record.kind.api_type)
            and event.created_at >= endpoint.created_at
        ]
        failed = await self._start_all(deliveries)
        done = [e.record.id for e in batch if e.record.id not in failed]
        await self.events.mark_dispatched(done)
        self.started += len(deliveries) - len(failed)
        return len(batch)

    async def _start_all(
        self, deliveries: Sequence[tuple[WebhookEndpoint, StoredEvent]]
    ) -> set[str]:
        """Start every delivery; the ids of events whose start failed (tried again later)."""
        gate = asyncio.Semaphore(_START_CONCURRENCY)
        failed: set[str] = set()

        async def one(endpoint: WebhookEndpoint, event: StoredEvent) -> None:
            async with gate:
                try:
                    await start_delivery(self.temporal, self.settings, endpoint, event.record.id)
                except Exception as exc:
                    log.warning("could not start delivery of %s: %s", event.record.id, exc)
                    failed.add(event.record.id)

        await asyncio.gather(*(one(endpoint, event) for endpoint, event in deliveries))
        return failed


@asynccontextmanager
async def running_dispatcher(
    settings: Settings, events: EventStore, endpoints: WebhookEndpoints, temporal: Client
) -> AsyncIterator[WebhookDispatcher]:
    dispatcher = WebhookDispatcher(events, endpoints, temporal, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop), name="webhook-dispatcher")
    try:
        yield dispatcher
    finally:
        stop.set()
        await task
