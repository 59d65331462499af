"""The delivery of one event to one merchant webhook endpoint (the endpoints' store is
activities/webhook_endpoints.py).

`deliver_webhook` makes exactly one HTTP attempt and reports it (the delivery workflow owns the
retry schedule, so every attempt is a row in the delivery log with its time, status code,
latency and error). It never holds a worker slot for long: the request is bounded by the
delivery's timeout, redirects are not followed, and at most `webhook_max_in_flight_per_endpoint`
attempts per endpoint run at once in a worker; past that it answers "busy" at once and Temporal
tries again shortly, so a slow endpoint queues behind itself, not in front of the others.

The body is the event exactly as `GET /v1/events/{id}` shows it, signed like every paysaga
webhook (`Paysaga-Signature: t=…,v1=…`; during a secret rotation's overlap one `v1` per secret).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.crm import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign_webhook
from activities.event_store import EventStore
from activities.http import OwnsHttpClient
from activities.webhook_endpoints import WebhookEndpoint, WebhookEndpoints
from domain.webhooks import (
    AttemptOutcome,
    DeliveryAttempt,
    DeliveryGaveUp,
    EndpointStatus,
    is_public_address,
    literal_address,
)
from infra.codec import PayloadDecryptionError
from settings import Settings

log = logging.getLogger(__name__)

ENDPOINT_BUSY = "WebhookEndpointBusy"
_USER_AGENT = "paysaga-webhooks/1"
_ERROR_CHARS = 300
_SNIPPET_CHARS = 120


class WebhookActivities(OwnsHttpClient):
    """Register `deliver_webhook` and `give_up_webhook_delivery` on the webhooks task queue."""

    def __init__(
        self,
        endpoints: WebhookEndpoints,
        events: EventStore,
        settings: Settings,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._events = events
        self._settings = settings
        self._http = http
        self._owns_http = http is None
        self._in_flight: dict[str, int] = {}

    @activity.defn(name="deliver_webhook")
    async def deliver_webhook(self, attempt: DeliveryAttempt) -> AttemptOutcome:
        endpoint = await self._endpoints.find(attempt.endpoint_id)
        if endpoint is None or endpoint.deleted_at is not None:
            return AttemptOutcome(delivered=False, stopped="the endpoint was deleted")
        if endpoint.status != EndpointStatus.ENABLED:
            return AttemptOutcome(delivered=False, stopped="the endpoint is disabled")
        stored = await self._events.get(attempt.event_id, endpoint.client_id)
        if stored is None:
            return AttemptOutcome(delivered=False, stopped="no such event for this endpoint")
        api_type = stored.record.kind.api_type
        if not attempt.manual and not endpoint.wants(api_type):
            return AttemptOutcome(
                delivered=False, stopped=f"the endpoint no longer wants {api_type}"
            )
        if self._in_flight.get(endpoint.id, 0) >= self._settings.webhook_max_in_flight_per_endpoint:
            # Not an attempt: the slot goes back at once and Temporal retries shortly.
            raise ApplicationError(
                f"endpoint {endpoint.id} already has its share of deliveries in flight",
                type=ENDPOINT_BUSY,
            )
        self._in_flight[endpoint.id] = self._in_flight.get(endpoint.id, 0) + 1
        try:
            at = datetime.now(UTC)
            outcome = await self._post(endpoint, stored.api_object().model_dump_json(), attempt, at)
        finally:
            self._in_flight[endpoint.id] -= 1
            if not self._in_flight[endpoint.id]:
                del self._in_flight[endpoint.id]
        await self._endpoints.record_attempt(attempt, api_type, at, outcome)
        activity.logger.info(
            "webhook %s to %s attempt %d: %s",
            attempt.event_id,
            endpoint.id,
            attempt.attempt,
            "delivered" if outcome.delivered else outcome.error,
        )
        return outcome

    @activity.defn(name="give_up_webhook_delivery")
    async def give_up_webhook_delivery(self, gave_up: DeliveryGaveUp) -> bool:
        disabled = await self._endpoints.disable_after_persistent_failure(gave_up)
        if disabled:
            activity.logger.warning(
                "webhook endpoint %s disabled after persistent failure", gave_up.endpoint_id
            )
        return disabled

    def _http_options(self) -> dict[str, Any]:
        limit = self._settings.webhook_max_concurrent_deliveries
        return {"limits": httpx.Limits(max_connections=limit)}

    async def _post(
        self, endpoint: WebhookEndpoint, body_json: str, attempt: DeliveryAttempt, at: datetime
    ) -> AttemptOutcome:
        started = time.monotonic()

        def outcome(status: int | None, error: str | None) -> AttemptOutcome:
            return AttemptOutcome(
                delivered=error is None,
                status_code=status,
                latency_ms=round((time.monotonic() - started) * 1000),
                error=error[:_ERROR_CHARS] if error else None,
            )

        try:
            secrets = self._endpoints.signing_secrets(endpoint, at)
        except PayloadDecryptionError as exc:
            # Its key retired (UnknownEncryptionKeyError), or the value altered. A failed attempt
            # like any other (logged, retried, in the endpoint's delivery log): restoring the key
            # in PAYSAGA_ENCRYPTION_KEYS lets the next attempt through.
            return outcome(None, f"not sent: the signing secret cannot be opened: {exc}")
        body = body_json.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": _USER_AGENT,
            IDEMPOTENCY_HEADER: attempt.event_id,
            # Signed per attempt: a retry days later still lands within the receiver's tolerance.
            SIGNATURE_HEADER: sign_webhook(secrets, body, int(time.time())),
        }
        refused = await self._refused_address(endpoint.url)
        if refused:
            return outcome(None, refused)
        try:
            response = await self._client().post(
                endpoint.url,
                content=body,
                headers=headers,
                timeout=httpx.Timeout(attempt.timeout_seconds),
            )
        except httpx.TimeoutException:
            return outcome(None, f"timed out after {attempt.timeout_seconds:g}s")
        except httpx.HTTPError as exc:
            return outcome(None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        if 200 <= response.status_code < 300:
            return outcome(response.status_code, None)
        snippet = " ".join(response.text[:_SNIPPET_CHARS].split())
        return outcome(
            response.status_code,
            f"answered {response.status_code}" + (f": {snippet}" if snippet else ""),
        )

    async def _refused_address(self, url: str) -> str | None:
        """With `webhook_block_private_networks`: every address the host resolves to must be
        public (the name is resolved again by the HTTP client, so an egress proxy that enforces
        the same rule is still advised: docs/webhooks.md)."""
        if not self._settings.webhook_block_private_networks:
            return None
        host = httpx.URL(url).host
        literal = literal_address(host)
        if literal is not None:
            addresses = [literal]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(host, None)
            except OSError as exc:
                return f"cannot resolve {host}: {exc}"
            addresses = [a for a in (literal_address(str(i[4][0])) for i in infos) if a]
        if not addresses or not all(is_public_address(a) for a in addresses):
            return f"{host} resolves to a loopback, private or reserved address; not sent"
        return None
