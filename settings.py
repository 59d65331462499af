"""The one typed settings object, read from `PAYSAGA_*` environment variables."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, StringConstraints, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from domain.events import REQUESTS_DLQ_TOPIC, REQUESTS_TOPIC
from domain.payment import IDENTIFIER_PATTERN, SECONDS_PER_DAY, PaymentPolicy
from domain.subscription import DunningPolicy

# `codec`: decrypt/encrypt Temporal payloads through /codec (operators' tooling; no payment powers).
# `events:read`: /v1/events. `webhooks:read` / `webhooks:write`: webhook endpoints, their
# delivery log, and (write) redelivering an event. `reconciliation:read` / `reconciliation:write`:
# the platform's settlement exception queue and resolving it (finance operators, not merchants).
Scope = Literal[
    "payments:read",
    "payments:write",
    "refunds:write",
    "disputes:write",
    "events:read",
    "webhooks:read",
    "webhooks:write",
    "codec",
    "reconciliation:read",
    "reconciliation:write",
    "admin",
]
ALL_SCOPES: tuple[Scope, ...] = get_args(Scope)
# Least privilege: a key configured without `scopes` reads and writes payments, nothing more.
# Money going back (refunds, disputes), decrypting payloads (codec) and admin are named.
DEFAULT_SCOPES: tuple[Scope, ...] = ("payments:read", "payments:write")
# The development key `paysaga run` prints: everything the README shows, but not admin.
DEV_KEY_SCOPES: tuple[Scope, ...] = tuple(s for s in ALL_SCOPES if s != "admin")
DEV_CLIENT_ID = "dev"

# An API client's id is the tenant of its payments and part of its ledger account codes.
ClientId = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]


class ApiKey(BaseModel):
    """An API client. Only the SHA-256 of the key is kept: keys are 256-bit random tokens."""

    client_id: ClientId
    key_sha256: str
    scopes: list[Scope] = Field(default_factory=lambda: list(DEFAULT_SCOPES))

    @staticmethod
    def hash(raw_key: str) -> str:
        return hashlib.sha256(raw_key.encode()).hexdigest()


class EncryptionKey(BaseModel):
    key_id: str
    key_b64: SecretStr


# The defaults of what a payment and a subscription fix at their creation are their policies'
# own (domain/payment.py, domain/subscription.py): one value, which recorded histories that lack
# a field also mean.
_POLICY = PaymentPolicy()
_DUNNING = DunningPolicy()


class Settings(BaseSettings):
    # An invalid value is never echoed back: settings hold URLs with credentials and keys.
    model_config = SettingsConfigDict(
        env_prefix="PAYSAGA_", extra="ignore", hide_input_in_errors=True
    )

    home: Path = Path(".paysaga")

    # External services. Empty means "the embedded one that `paysaga run` starts".
    temporal_address: str | None = None
    temporal_namespace: str = "default"
    task_queue: str = "payments"
    kafka_bootstrap_servers: str | None = None
    database_url: str | None = None

    # Ports of the embedded stack (only used when the service above is not configured).
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    temporal_port: int = 7233
    temporal_ui_port: int = 8233
    kafka_port: int = 9092
    postgres_port: int = 55432

    api_keys: Annotated[list[ApiKey], NoDecode] = Field(default_factory=list)
    api_key_file: Path | None = None
    # /docs and /redoc (the interactive pages); /openapi.json, the contract, stays served.
    # Turn them off in production: PAYSAGA_API_DOCS_ENABLED=false.
    api_docs_enabled: bool = True
    # The API's Prometheus /metrics, on its own port (never the public API port); 0: off.
    api_metrics_port: int = 9463
    max_body_bytes: int = 64 * 1024
    # How long a read waits for the payment's workflow to answer its state query (a worker must
    # pick it up); past it the API answers 503 payment_unavailable instead of hanging.
    api_query_timeout_seconds: float = 10.0

    # Fraud: score >= reject_threshold rejects; [review_threshold, reject_threshold) waits.
    fraud_review_threshold: float = _POLICY.review_threshold
    fraud_reject_threshold: float = _POLICY.reject_threshold
    fraud_sidecar_url: str | None = None
    # Whole-call budget for the sidecar; past it the rules score the payment instead.
    fraud_sidecar_timeout_seconds: float = 0.2
    review_timeout_seconds: float = _POLICY.review_timeout_seconds
    dispute_window_days: float = _POLICY.dispute_window_seconds / SECONDS_PER_DAY
    chargeback_fee_minor: int = _POLICY.chargeback_fee_minor
    continue_as_new_after_events: int = _POLICY.continue_as_new_after_events
    # Short forward steps (fraud, payments.raw, ledger, payments.confirmed) as local activities:
    # one workflow task instead of four server round trips (README "Performance"). Fixed per
    # payment at its start; the replay tests hold histories of both modes.
    local_activities: bool = True
    # Run workflows in temporalio's sandbox (worker.workflow_runner explains the trade-off).
    # Off by default for throughput; the test suite runs every workflow sandboxed and replays
    # recorded histories, which is where nondeterminism is caught.
    workflow_sandbox: bool = False
    # Worker processes `paysaga run` starts (each is one Python process on one core).
    worker_processes: int = 2

    # Kafka
    kafka_message_timeout_ms: int = 20_000
    kafka_linger_ms: int = 2
    kafka_session_timeout_ms: int = 6000
    # Topic creation (`python -m infra.provision topics`); tansu and a one-node Kafka take 1.
    kafka_topic_partitions: int = 6
    kafka_replication_factor: int = 1
    # The consumer group of the payments.requests.<client> intake (intake/consumer.py).
    kafka_intake_group: str = "paysaga-intake"
    # The clients that may request payments over Kafka, each on its own topic
    # payments.requests.<client_id>: the topic says who asks, never a header (docs/security.md).
    kafka_intake_clients: Annotated[list[ClientId], NoDecode] = Field(default_factory=list)

    # Database
    db_pool_size: int = 10
    db_max_retries: int = 8

    # CRM targets: each one is used when its base URL is set.
    crm_webhook_url: str | None = None
    crm_webhook_secret: SecretStr = SecretStr("")
    salesforce_base_url: str | None = None
    salesforce_token: SecretStr = SecretStr("")
    salesforce_api_version: str = "v61.0"
    salesforce_event_name: str = "Payment_Event__e"
    hubspot_base_url: str | None = None
    hubspot_token: SecretStr = SecretStr("")
    crm_timeout_seconds: float = 5.0
    # `paysaga run` starts the local CRM sandbox (sandboxes/crm.py) as the webhook target when
    # no CRM is configured, so the saga's fifth step runs on the default stack.
    crm_sandbox: bool = True
    crm_sandbox_port: int = 8070

    # The outbox relay (infra/relay.py, in the worker): publishes every stored event Kafka has
    # not acknowledged `relay_grace_seconds` after it was recorded, and republishes everything
    # once the broker's log is found lost (its epoch marker changed or vanished).
    relay_enabled: bool = True
    relay_interval_seconds: float = 1.0
    relay_grace_seconds: float = 10.0
    relay_batch_size: int = 500
    relay_broker_check_seconds: float = 5.0
    relay_detect_broker_loss: bool = True
    relay_epoch_topic: str = "paysaga.broker-epoch"

    # Merchant webhooks (docs/webhooks.md): deliveries run on their own task queue with
    # bounded slots, so no endpoint can slow payments or starve other endpoints.
    webhook_task_queue: str = "webhooks"
    webhook_max_concurrent_deliveries: int = 20
    webhook_max_in_flight_per_endpoint: int = 4
    webhook_timeout_seconds: float = 10.0
    webhook_retry_initial_seconds: float = 60.0
    webhook_retry_backoff: float = 3.0
    webhook_retry_max_interval_seconds: float = 12 * 3600.0
    webhook_retry_for_seconds: float = 3 * 86400.0
    webhook_secret_overlap_seconds: float = 24 * 3600.0
    # Refuse endpoints on loopback, private, link-local and other non-public addresses (at
    # creation for literal IPs, at every delivery for resolved names). Off on the dev stack,
    # where the sandbox and tests listen on 127.0.0.1; turn it on in production.
    webhook_block_private_networks: bool = False

    # The card acquirer (docs/acquirer.md). Unset URL: the sandbox acquirer `paysaga run` starts.
    acquirer_url: str | None = None
    acquirer_api_key: SecretStr = SecretStr("")
    # Whole-request budget. Past it the outcome is ambiguous and is resolved by asking the
    # acquirer for the status of our reference, never by authorizing again.
    acquirer_timeout_seconds: float = 10.0
    # Connecting is bounded separately: a refused or unanswered connect means nothing was
    # sent, which is the one failure that is safe to retry blindly.
    acquirer_connect_timeout_seconds: float = 3.0
    # `paysaga run` (and the tests' stack) starts the sandbox acquirer (sandboxes/acquirer.py)
    # when no acquirer is configured, so payments authorize and capture on the default stack.
    # No acquirer at all (sandbox off, no URL): payments are booked in the ledger only, as
    # before issue 15 (docs/acquirer.md, "Without an acquirer").
    # An ambiguous outcome is resolved by status for this long, then requires_attention.
    acquirer_resolve_seconds: float = _POLICY.acquirer_resolve_seconds
    # `capture_method: manual`: an authorization left uncaptured this long is voided.
    authorization_expiry_seconds: float = _POLICY.authorization_expiry_seconds
    acquirer_sandbox: bool = True
    # Subscriptions (issue 17): a declined renewal is retried this many days after its first
    # attempt (`PAYSAGA_SUBSCRIPTION_RETRY_DAYS=[1,3,5,7]`); when every retry declined the
    # subscription is `canceled` or kept `unpaid`. Fractions of a day are allowed (tests and
    # the simulation retry within seconds).
    subscription_retry_days: list[float] = Field(
        default_factory=lambda: [s / SECONDS_PER_DAY for s in _DUNNING.retry_after_seconds]
    )
    subscription_when_exhausted: Literal["unpaid", "canceled"] = _DUNNING.when_exhausted
    acquirer_sandbox_port: int = 8020

    # Reconciliation (docs/reconciliation.md). A ledger movement the acquirer has not settled
    # this long after it happened is a `missing` exception.
    recon_missing_after_days: float = Field(default=2.0, ge=0)
    # Where `paysaga recon fetch` and the daily workflow keep the files they download
    # (relative: under `home`).
    recon_settlements_dir: Path = Path("settlements")
    # The daily fetch-and-import (a Temporal Schedule, `paysaga recon schedule`): a cron
    # expression in UTC; each run imports the settlement file of the day before.
    recon_schedule_cron: str = "30 6 * * *"
    # How often the API refreshes the exception gauges (paysaga_reconciliation_exceptions*).
    recon_gauge_refresh_seconds: float = Field(default=60.0, gt=0)

    # Temporal payload encryption (AES-GCM). The first key encrypts; all keys decrypt.
    encryption_keys: Annotated[list[EncryptionKey], NoDecode] = Field(default_factory=list)
    codec_cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Dev only (`paysaga run`): /codec answers without an API key when the caller is on loopback,
    # came through no proxy and sends an Origin in codec_cors_origins (the local Temporal UI).
    codec_trust_local_ui: bool = False

    # Worker
    max_concurrent_activities: int = 200
    max_concurrent_workflow_tasks: int = 100
    max_cached_workflows: int = 2000
    kafka_intake_enabled: bool = False

    log_level: str = "INFO"
    log_json: bool = True
    # OTLP/HTTP collector base URL (e.g. http://otel-collector:4318); unset: no tracing at all.
    otlp_endpoint: str | None = None
    # Prometheus: the worker's /metrics and the Temporal SDK's own; 0 turns either off.
    metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = 9464
    temporal_metrics_port: int = 9465

    @field_validator("api_keys", "encryption_keys", mode="before")
    @classmethod
    def _json_list(cls, value: object) -> object:
        if isinstance(value, str):
            return json.loads(value) if value.strip() else []
        return value

    @field_validator("codec_cors_origins", "kafka_intake_clients", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator(
        "crm_webhook_url", "salesforce_base_url", "hubspot_base_url", "acquirer_url",
        "fraud_sidecar_url",
    )  # fmt: skip
    @classmethod
    def _an_http_url(cls, value: str | None) -> str | None:
        """Refused at start, naming the setting: a malformed URL would otherwise fail every
        call of its step, retried for as long as the step's policy allows."""
        if value is None or not value.strip():
            return None
        parsed = urlsplit(value.strip())
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            # Never echoed: a URL may carry credentials.
            raise ValueError(
                f"must be an http:// or https:// URL with a host (its scheme: {parsed.scheme!r})"
            )
        return value.strip()

    @field_validator("kafka_intake_clients")
    @classmethod
    def _not_the_dead_letter_topic(cls, value: list[str]) -> list[str]:
        if any(intake_topic(client) == REQUESTS_DLQ_TOPIC for client in value):
            raise ValueError(f"a client's intake topic cannot be {REQUESTS_DLQ_TOPIC}")
        return value

    def all_api_keys(self) -> list[ApiKey]:
        keys = list(self.api_keys)
        dev_key = _dev_api_key(self.api_key_file) if self.api_key_file else None
        if dev_key is not None:
            keys.append(dev_key)
        return keys

    def intake_topics(self) -> dict[str, str]:
        """Each Kafka intake client's topic, and whose it is."""
        return {intake_topic(client): client for client in self.kafka_intake_clients}

    @property
    def dispute_window_seconds(self) -> float:
        return self.dispute_window_days * SECONDS_PER_DAY


def _dev_api_key(path: Path) -> ApiKey | None:
    """The dev key file's key (`paysaga run` writes it). Asked for on every request, so it is
    read and hashed again only when the file changes (a new `paysaga run`)."""
    try:
        seen = path.stat()
    except OSError:
        return None
    return _read_dev_api_key(path, seen.st_mtime_ns, seen.st_size)


@lru_cache(maxsize=8)
def _read_dev_api_key(path: Path, mtime_ns: int, size: int) -> ApiKey | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    return ApiKey(client_id=DEV_CLIENT_ID, key_sha256=ApiKey.hash(raw), scopes=list(DEV_KEY_SCOPES))


def intake_topic(client_id: str) -> str:
    """The topic on which `client_id`, and only it, requests payments over Kafka."""
    return f"{REQUESTS_TOPIC}.{client_id}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
