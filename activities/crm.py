"""Tells the CRMs what happened to a payment: a Salesforce Platform Event, a HubSpot deal update
and/or a signed generic webhook.

Every call carries `Idempotency-Key: <event_id>`, and the event id is deterministic per payment +
event kind, so a retried activity can only ever repeat the same notification. Secrets (tokens,
the webhook secret) travel in headers only and are scrubbed from every error message and log line.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import quote, urlsplit

import aiohttp
from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.http import HttpAnswer, OwnsAiohttpSession, phase_timeout, transport_error_name
from domain.errors import FailureType
from domain.messages import CrmNotification, CrmTarget
from settings import Settings

# Retryable failures carry this type so dashboards and tests can tell "CRM down" from a bug.
CRM_UNAVAILABLE = "CrmUnavailable"
SIGNATURE_HEADER = "Paysaga-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
DEFAULT_SIGNATURE_TOLERANCE_SECONDS = 300

# 408/425/429 say "not now", not "never"; every 5xx is the CRM's problem, not the payment's.
_TRANSIENT_STATUSES = frozenset({408, 425, 429})
# A Retry-After longer than this is ignored: the workflow's retry policy knows better.
_MAX_RETRY_AFTER_SECONDS = 300
_SNIPPET_CHARS = 200
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]+")
_USER_AGENT = "paysaga-crm/1"


class CrmDelivery(BaseModel):
    target: CrmTarget
    status_code: int
    attempt: int


def crm_targets_for(settings: Settings, n: CrmNotification) -> list[CrmTarget]:
    """The CRMs this notification goes to: configured ones that can place it on a record."""
    targets: list[CrmTarget] = []
    if settings.crm_webhook_url:
        targets.append(CrmTarget.WEBHOOK)
    if settings.salesforce_base_url and n.salesforce_opportunity_id:
        targets.append(CrmTarget.SALESFORCE)
    if settings.hubspot_base_url and n.hubspot_deal_id:
        targets.append(CrmTarget.HUBSPOT)
    return targets


# --- Webhook signatures (Stripe-style: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "t.body")>`)


def _signature(secret: str, body: bytes, timestamp: int) -> str:
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def sign_webhook(secret: str | Sequence[str], body: bytes, timestamp: int) -> str:
    """The `Paysaga-Signature` header value for `body` sent at `timestamp`. Several secrets
    (a rotation's overlap) give one `v1=` per secret; a receiver accepts any that matches."""
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets or not all(secrets):
        raise ValueError("a webhook cannot be signed with an empty secret")
    signatures = ",".join(f"v1={_signature(s, body, timestamp)}" for s in secrets)
    return f"t={timestamp},{signatures}"


def _parse_signature_header(header: str) -> tuple[int, list[str]] | None:
    timestamps: list[str] = []
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            return None
        if key == "t":
            timestamps.append(value)
        elif key == "v1":
            signatures.append(value)
        # Other schemes (v0, future v2) are ignored, as receivers of Stripe-style headers do.
    if len(timestamps) != 1 or not timestamps[0].isascii() or not timestamps[0].isdigit():
        return None
    if not signatures:
        return None
    return int(timestamps[0]), signatures


def verify_webhook(
    secret: str,
    body: bytes,
    header: str,
    tolerance_seconds: int = DEFAULT_SIGNATURE_TOLERANCE_SECONDS,
    now: int | None = None,
) -> bool:
    """True only if some v1 signature matches and the timestamp is within `tolerance_seconds`
    of `now` either way: an old (replayed) or future-dated signature is refused."""
    if not secret:
        return False  # a receiver without a secret must not accept anything
    parsed = _parse_signature_header(header)
    if parsed is None:
        return False
    timestamp, candidates = parsed
    current = int(time.time()) if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        return False
    expected = _signature(secret, body, timestamp).encode()
    # Check every candidate (no early exit) so timing does not reveal which one matched.
    matches = [hmac.compare_digest(expected, c.encode()) for c in candidates]
    return any(matches)


# --- What each CRM receives


def salesforce_event_fields(n: CrmNotification) -> dict[str, object]:
    """The Platform Event record. Salesforce has no idempotency header of its own, so
    subscribers deduplicate on Event_Id__c."""
    return {
        "Event_Id__c": n.event_id,
        "Event_Type__c": n.event_kind.value,
        "Payment_Id__c": n.payment_id,
        "Status__c": n.status,
        "Amount_Minor__c": n.amount,
        "Currency__c": n.currency,
        "Opportunity_Id__c": n.salesforce_opportunity_id,
        "Customer_Id__c": n.customer_id,
        "Merchant_Id__c": n.merchant_id,
        "Occurred_At__c": n.occurred_at.isoformat(),
        "Details__c": json.dumps(n.details, sort_keys=True) if n.details else None,
    }


def hubspot_deal_properties(n: CrmNotification) -> dict[str, object]:
    """The deal update. A PATCH of the same properties is idempotent by nature."""
    return {
        "properties": {
            "paysaga_payment_id": n.payment_id,
            "paysaga_payment_status": n.status,
            # HubSpot property values are strings; a string also keeps int64 amounts exact.
            "paysaga_amount_minor": str(n.amount),
            "paysaga_currency": n.currency,
            "paysaga_last_event_id": n.event_id,
        }
    }


def webhook_body(n: CrmNotification) -> bytes:
    """The exact bytes that are signed and sent."""
    return n.model_dump_json().encode()


@dataclass(frozen=True)
class _CrmCall:
    target: CrmTarget
    method: str
    url: str
    # How messages name the endpoint: method + path, never a credential-bearing URL.
    shown_as: str
    headers: dict[str, str]
    body: bytes


class _NotDeliverable(Exception):
    """The notification cannot be sent to this target as configured."""


def _common_headers(n: CrmNotification) -> dict[str, str]:
    return {
        IDEMPOTENCY_HEADER: n.event_id,
        "Content-Type": "application/json",
        "User-Agent": _USER_AGENT,
    }


def _salesforce_platform_event(settings: Settings, n: CrmNotification) -> _CrmCall:
    if not settings.salesforce_base_url:
        raise _NotDeliverable("PAYSAGA_SALESFORCE_BASE_URL is not set")
    if not n.salesforce_opportunity_id:
        raise _NotDeliverable("the payment has no salesforce_opportunity_id")
    path = (
        f"/services/data/{quote(settings.salesforce_api_version, safe='')}"
        f"/sobjects/{quote(settings.salesforce_event_name, safe='')}"
    )
    headers = _common_headers(n)
    headers["Authorization"] = f"Bearer {settings.salesforce_token.get_secret_value()}"
    return _CrmCall(
        target=CrmTarget.SALESFORCE,
        method="POST",
        url=settings.salesforce_base_url.rstrip("/") + path,
        shown_as=f"POST {path}",
        headers=headers,
        body=json.dumps(salesforce_event_fields(n)).encode(),
    )


def _hubspot_deal_update(settings: Settings, n: CrmNotification) -> _CrmCall:
    if not settings.hubspot_base_url:
        raise _NotDeliverable("PAYSAGA_HUBSPOT_BASE_URL is not set")
    if not n.hubspot_deal_id:
        raise _NotDeliverable("the payment has no hubspot_deal_id")
    path = f"/crm/v3/objects/deals/{quote(n.hubspot_deal_id, safe='')}"
    headers = _common_headers(n)
    headers["Authorization"] = f"Bearer {settings.hubspot_token.get_secret_value()}"
    return _CrmCall(
        target=CrmTarget.HUBSPOT,
        method="PATCH",
        url=settings.hubspot_base_url.rstrip("/") + path,
        shown_as=f"PATCH {path}",
        headers=headers,
        body=json.dumps(hubspot_deal_properties(n)).encode(),
    )


def _webhook_origin(url: str) -> str:
    """Scheme and host only: webhook paths and queries often embed a token (Slack, Zapier)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/…"


def _signed_webhook(settings: Settings, n: CrmNotification, now: int) -> _CrmCall:
    if not settings.crm_webhook_url:
        raise _NotDeliverable("PAYSAGA_CRM_WEBHOOK_URL is not set")
    secret = settings.crm_webhook_secret.get_secret_value()
    if not secret:
        raise _NotDeliverable("PAYSAGA_CRM_WEBHOOK_SECRET is empty; refusing to send unsigned")
    body = webhook_body(n)
    headers = _common_headers(n)
    # Signed per attempt: a retry hours later still lands within the receiver's tolerance.
    headers[SIGNATURE_HEADER] = sign_webhook(secret, body, now)
    return _CrmCall(
        target=CrmTarget.WEBHOOK,
        method="POST",
        url=settings.crm_webhook_url,
        shown_as=f"POST {_webhook_origin(settings.crm_webhook_url)}",
        headers=headers,
        body=body,
    )


def _crm_call(settings: Settings, target: CrmTarget, n: CrmNotification) -> _CrmCall:
    if target is CrmTarget.SALESFORCE:
        return _salesforce_platform_event(settings, n)
    if target is CrmTarget.HUBSPOT:
        return _hubspot_deal_update(settings, n)
    return _signed_webhook(settings, n, int(time.time()))


# --- Classifying the CRM's answer


def _is_transient(status_code: int) -> bool:
    return status_code >= 500 or status_code in _TRANSIENT_STATUSES


def _retry_after(response: HttpAnswer) -> timedelta | None:
    """Honour a delta-seconds Retry-After (429/503); HTTP-date forms are left to the policy."""
    value = response.headers.get("Retry-After", "").strip()
    if not value.isdigit():
        return None
    return timedelta(seconds=min(int(value), _MAX_RETRY_AFTER_SECONDS))


def _credential_hint(target: CrmTarget, status_code: int) -> str:
    if status_code not in (401, 403):
        return ""
    setting = {
        CrmTarget.SALESFORCE: "PAYSAGA_SALESFORCE_TOKEN",
        CrmTarget.HUBSPOT: "PAYSAGA_HUBSPOT_TOKEN",
        CrmTarget.WEBHOOK: "PAYSAGA_CRM_WEBHOOK_SECRET",
    }[target]
    return f" (check {setting})"


class CrmActivities(OwnsAiohttpSession):
    """The `notify_crm` activity. Register `CrmActivities(settings).notify_crm` on the worker.
    Over aiohttp, not httpx: this call is on every payment's path (activities/http.py)."""

    def __init__(self, settings: Settings, http: aiohttp.ClientSession | None = None) -> None:
        self._settings = settings
        self._session = http
        self._owns_session = http is None
        self._timeout = phase_timeout(settings.crm_timeout_seconds)

    @activity.defn(name="notify_crm")
    async def notify_crm(self, target: CrmTarget, notification: CrmNotification) -> CrmDelivery:
        attempt = activity.info().attempt
        try:
            call = _crm_call(self._settings, target, notification)
        except _NotDeliverable as exc:
            raise self._rejected(f"{target} not notified: {exc}") from None
        try:
            response = await self._exchange(
                call.method, call.url, body=call.body, headers=call.headers, timeout=self._timeout
            )
        except TimeoutError as exc:  # aiohttp's timeouts are TimeoutErrors, checked first
            reason = (
                f"timed out after {self._settings.crm_timeout_seconds:g}s"
                f" ({transport_error_name(exc)})"
            )
            raise self._unavailable(call, reason, attempt) from None
        except aiohttp.ClientError as exc:
            what = f"failed: {transport_error_name(exc)}: {exc}"
            raise self._unavailable(call, what, attempt) from None
        return self._settle(call, response, notification, attempt)

    def _settle(
        self, call: _CrmCall, response: HttpAnswer, n: CrmNotification, attempt: int
    ) -> CrmDelivery:
        status = response.status_code
        if 200 <= status < 300:
            activity.logger.info(
                "%s accepted %s for payment %s (event %s, attempt %d)",
                call.target,
                n.event_kind,
                n.payment_id,
                n.event_id,
                attempt,
            )
            return CrmDelivery(target=call.target, status_code=status, attempt=attempt)
        if _is_transient(status):
            raise self._unavailable(
                call, f"answered {status}", attempt, retry_after=_retry_after(response)
            )
        # 3xx lands here too: a redirecting API means a wrong base URL; retrying won't fix it.
        snippet = _UNPRINTABLE.sub(" ", response.text[:_SNIPPET_CHARS]).strip()
        raise self._rejected(
            f"{call.target} {call.shown_as} rejected the notification with {status}"
            f"{_credential_hint(call.target, status)}: {snippet or '(empty body)'}; not retrying"
        )

    def _unavailable(
        self,
        call: _CrmCall,
        what_happened: str,
        attempt: int,
        retry_after: timedelta | None = None,
    ) -> ApplicationError:
        message = self._scrub(
            f"{call.target} {call.shown_as} {what_happened} (attempt {attempt}); will retry"
        )
        activity.logger.warning(message)
        return ApplicationError(message, type=CRM_UNAVAILABLE, next_retry_delay=retry_after)

    def _rejected(self, message: str) -> ApplicationError:
        message = self._scrub(message)
        activity.logger.warning(message)
        return ApplicationError(message, type=FailureType.CRM_REJECTED.value, non_retryable=True)

    def _scrub(self, text: str) -> str:
        """Last line of defence: a CRM echoing a header back must not leak it into history."""
        for secret in (
            self._settings.salesforce_token,
            self._settings.hubspot_token,
            self._settings.crm_webhook_secret,
        ):
            value = secret.get_secret_value()
            if value:
                text = text.replace(value, "[redacted]")
        webhook_url = self._settings.crm_webhook_url
        if webhook_url:
            text = text.replace(webhook_url, _webhook_origin(webhook_url))
        return text
