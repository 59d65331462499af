"""Merchant webhook endpoints: where they are, what they want, and how a delivery retries.

Pure: the endpoint store, the HTTP delivery and the API live in
activities/webhook_endpoints.py, activities/webhooks.py, workflows/webhook_delivery.py and
api/webhooks.py (docs/webhooks.md for integrators).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from datetime import datetime, timedelta
from enum import StrEnum
from urllib.parse import urlsplit

from pydantic import BaseModel

ENDPOINT_ID_PATTERN = r"^we_[0-9a-f]{24}$"
MAX_URL_LENGTH = 2048
# Each endpoint multiplies every event into deliveries: a bound keeps one client's fan-out sane.
MAX_ENDPOINTS_PER_CLIENT = 16
_UNPRINTABLE_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")
# What the API takes as a webhook URL, declared in its schema so a client knows before it asks:
# http(s), an ASCII host name or IPv4 address (IDNs in punycode; no IPv6 literal), a port
# 1-65535, then a path and query of printable ASCII; no user name or password, no #fragment.
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
WEBHOOK_URL_PATTERN = rf"^[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9._-]+(?::{_PORT})?(?:[/?][!$-~]*)?$"


def new_endpoint_id() -> str:
    return "we_" + secrets.token_hex(12)


def new_signing_secret() -> str:
    """256 random bits; shown to the merchant once, then only used to sign."""
    return "whsec_" + secrets.token_urlsafe(32)


class EndpointStatus(StrEnum):
    ENABLED = "enabled"
    # Switched off by the merchant, or by paysaga after persistent failure (with a
    # `webhook_endpoint.disabled` event saying why).
    DISABLED = "disabled"


class WebhookUrlRefused(ValueError):
    """A merchant-supplied URL paysaga will not send to; the message says why."""


def check_webhook_url(url: str, *, block_private_networks: bool) -> str:
    """The URL as it will be called, or WebhookUrlRefused. Names are resolved (and their
    addresses judged) at delivery time, when `block_private_networks` is on."""
    if len(url) > MAX_URL_LENGTH or _UNPRINTABLE_OR_SPACE.search(url):
        raise WebhookUrlRefused("the URL is too long or contains spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookUrlRefused("the URL cannot be parsed") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise WebhookUrlRefused("only http and https URLs can receive webhooks")
    if "@" in parts.netloc:
        # Credentials in a URL end up in logs; the signature authenticates the sender instead.
        raise WebhookUrlRefused("the URL must not contain a user name or password")
    host = parts.hostname
    if not host:
        raise WebhookUrlRefused("the URL has no host")
    if port == 0:
        raise WebhookUrlRefused("the URL's port must be 1-65535")
    if parts.fragment:
        raise WebhookUrlRefused("the URL must not have a #fragment")
    address = literal_address(host)
    if block_private_networks and address is not None and not is_public_address(address):
        raise WebhookUrlRefused("the URL points at a loopback, private or reserved address")
    return url


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_public_address(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Globally routable unicast: not loopback, private, link-local (cloud metadata lives at
    169.254.169.254), shared, multicast, reserved or unspecified."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


class WebhookRetryPolicy(BaseModel):
    """Fixed for a delivery when it starts, like a payment's policy: running deliveries never
    change schedule under their feet."""

    initial_seconds: float
    backoff: float
    max_interval_seconds: float
    # Past this since the first attempt, the delivery gives up (then the endpoint may be
    # disabled). 0: one attempt only (a manual redelivery).
    give_up_after_seconds: float
    attempt_timeout_seconds: float

    def delay_after(self, attempt: int, jitter: float) -> timedelta:
        """The wait after failed attempt number `attempt` (1-based): exponential, capped,
        spread ±10 % by `jitter` in [0, 1) so a recovering endpoint is not hit all at once."""
        base = min(self.initial_seconds * self.backoff ** (attempt - 1), self.max_interval_seconds)
        return timedelta(seconds=base * (0.9 + 0.2 * jitter))


class WebhookDeliveryInput(BaseModel):
    endpoint_id: str
    event_id: str
    client_id: str
    manual: bool = False  # a redelivery asked for through the API: one attempt, never disables
    retry: WebhookRetryPolicy


class DeliveryAttempt(BaseModel):
    endpoint_id: str
    event_id: str
    delivery_id: str  # the delivery workflow's id
    attempt: int
    manual: bool
    timeout_seconds: float


class AttemptOutcome(BaseModel):
    delivered: bool
    status_code: int | None = None
    latency_ms: int = 0
    error: str | None = None
    # Set when there is nothing left to try: the endpoint was deleted or disabled, the event
    # is not one it wants any more, or the event is gone.
    stopped: str | None = None


class AttemptLog(BaseModel):
    """One line of an endpoint's delivery log, as the store keeps it and the API shows it
    (`GET /v1/webhook_endpoints/{id}/deliveries`): which attempt, when, and what came of it."""

    attempt: int
    manual: bool
    attempted_at: datetime
    status_code: int | None
    latency_ms: int
    succeeded: bool
    error: str | None


class DeliveryGaveUp(BaseModel):
    endpoint_id: str
    event_id: str
    delivery_id: str
    began_at: datetime
    attempts: int
    last_error: str | None


class DeliveryResult(BaseModel):
    status: str  # delivered, stopped, failed
    attempts: int
    detail: str | None = None
    endpoint_disabled: bool = False


def delivery_workflow_id(endpoint_id: str, event_id: str, manual_reference: str = "") -> str:
    """One automatic delivery per (endpoint, event): starting it twice finds the first."""
    base = f"whdel_{endpoint_id}_{event_id}"
    return f"{base}_manual_{manual_reference}" if manual_reference else base
