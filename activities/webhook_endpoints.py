"""Merchant webhook endpoints and their delivery log, as stored in PostgreSQL: create, change,
rotate the secret, list, delete an endpoint; record each delivery attempt; disable an endpoint
that keeps failing; pick the outbox events no endpoint wants. The delivery itself is
activities/webhooks.py.

Over 400 lines: one store: the endpoints and their delivery log are read and written together
(a failing streak disables the endpoint in the attempt's transaction).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain.events import EventKind, EventRecord, event_id, event_type_matches
from domain.webhooks import (
    MAX_ENDPOINTS_PER_CLIENT,
    AttemptLog,
    AttemptOutcome,
    DeliveryAttempt,
    DeliveryGaveUp,
    EndpointStatus,
    new_endpoint_id,
    new_signing_secret,
)
from infra.codec import (
    EncryptionCodec,
    PayloadDecryptionError,
    UnknownEncryptionKeyError,
    is_sealed,
    sealed_key_id,
)
from infra.database import run_serializable
from ledger.store import insert_event
from ledger.tables import metadata, outbox_events

webhook_endpoints = sa.Table(
    "webhook_endpoints",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("client_id", sa.String),
    sa.Column("url", sa.String),
    sa.Column("description", sa.String),
    sa.Column("enabled_events", JSONB),
    sa.Column("status", sa.String),
    sa.Column("disabled_reason", sa.String),
    sa.Column("secret", sa.String),
    sa.Column("previous_secret", sa.String),
    sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True)),
    sa.Column("last_success_at", sa.DateTime(timezone=True)),
    sa.Column("failing_since", sa.DateTime(timezone=True)),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
webhook_deliveries = sa.Table(
    "webhook_deliveries",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("endpoint_id", sa.String),
    sa.Column("event_id", UUID(as_uuid=True)),
    sa.Column("event_type", sa.String),
    sa.Column("delivery_id", sa.String),
    sa.Column("attempt", sa.Integer),
    sa.Column("manual", sa.Boolean),
    sa.Column("attempted_at", sa.DateTime(timezone=True)),
    sa.Column("status_code", sa.Integer),
    sa.Column("latency_ms", sa.Integer),
    sa.Column("succeeded", sa.Boolean),
    sa.Column("error", sa.String),
)


class EndpointLimitReached(Exception):
    """The client has MAX_ENDPOINTS_PER_CLIENT endpoints already."""


class WebhookEndpoint(BaseModel):
    id: str
    client_id: str
    url: str
    description: str | None
    enabled_events: list[str]
    status: EndpointStatus
    disabled_reason: str | None
    # The signing secrets as stored: sealed (`sealed:v1:…`) or, from before sealing, in the
    # clear. Opened only to sign (`WebhookEndpoints.signing_secrets`), so an endpoint whose key
    # was retired still reads, lists and dispatches; only its deliveries fail, saying why.
    secret: str
    previous_secret: str | None
    previous_secret_expires_at: datetime | None
    last_success_at: datetime | None
    failing_since: datetime | None
    deleted_at: datetime | None
    created_at: datetime
    updated_at: datetime
    # The new secret in the clear: on the answers to creation and rotation only.
    revealed_secret: str | None = None

    def wants(self, api_type: str) -> bool:
        return any(event_type_matches(pattern, api_type) for pattern in self.enabled_events)


class Resealed(BaseModel):
    """What `reseal_all` did: endpoints whose secrets it moved under the current key, those
    already there, and those it could not open (their key is no longer configured)."""

    resealed: int = 0
    current: int = 0
    unopenable: list[str] = []


class DeliveryRecord(AttemptLog):
    """A stored attempt: its log line and whose it is."""

    id: uuid.UUID
    endpoint_id: str
    event_id: uuid.UUID
    event_type: str
    delivery_id: str


class WebhookEndpoints:
    """The endpoint store. Every method that takes a `client_id` sees only that client's
    endpoints (another client's id is "not found")."""

    def __init__(
        self, engine: AsyncEngine, max_attempts: int = 8, sealer: EncryptionCodec | None = None
    ) -> None:
        """`sealer`: the payload encryption keys (PAYSAGA_ENCRYPTION_KEYS), which also seal the
        signing secrets at rest; without keys they are stored as they are (a warning at start)."""
        self.engine = engine
        self.max_attempts = max_attempts
        self.sealer = sealer

    def _seal(self, secret: str, endpoint_id: str) -> str:
        return self.sealer.seal_text(secret, endpoint_id) if self.sealer else secret

    def _endpoint(self, row: Any) -> WebhookEndpoint:
        return WebhookEndpoint.model_validate(dict(row._mapping))

    def signing_secrets(self, endpoint: WebhookEndpoint, now: datetime) -> list[str]:
        """The current secret, and the previous one while its overlap lasts, opened. Raises
        UnknownEncryptionKeyError when the key that sealed one is no longer configured, and
        PayloadDecryptionError for a value altered or sealed for another endpoint."""
        stored = [endpoint.secret]
        expires = endpoint.previous_secret_expires_at
        if endpoint.previous_secret and expires is not None and now < expires:
            stored.append(endpoint.previous_secret)
        return [self._open(value, endpoint.id) for value in stored]

    def _open(self, stored: str, endpoint_id: str) -> str:
        if not is_sealed(stored):
            return stored  # stored in the clear before sealing began
        if self.sealer is None:
            raise UnknownEncryptionKeyError(sealed_key_id(stored), [])
        return self.sealer.open_text(stored, endpoint_id)

    async def _write(self, work: Any) -> Any:
        return await run_serializable(self.engine, work, max_attempts=self.max_attempts)

    # ── retiring an encryption key ───────────────────────────────────────────────────────
    async def reseal_all(self) -> Resealed:
        """`paysaga webhooks reseal`: every endpoint's secrets (current and previous, deleted
        endpoints too) sealed with the first of the configured keys, the secrets themselves
        unchanged: merchants change nothing, and the older keys can then be removed. Secrets
        stored in the clear are sealed too. Each row is changed only if no rotation changed it
        meanwhile (a rotation seals with the current key anyway)."""
        assert self.sealer is not None, "resealing needs the encryption keys"
        current_key = self.sealer.key_ids[0]
        done = Resealed()
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(
                        webhook_endpoints.c.id,
                        webhook_endpoints.c.secret,
                        webhook_endpoints.c.previous_secret,
                    ).order_by(webhook_endpoints.c.id)
                )
            ).all()
        for endpoint_id, secret, previous in rows:
            stale = [
                v
                for v in (secret, previous)
                if v is not None and (not is_sealed(v) or sealed_key_id(v) != current_key)
            ]
            if not stale:
                done.current += 1
                continue
            try:
                values = {
                    column: self._seal(self._open(value, endpoint_id), endpoint_id)
                    for column, value in (("secret", secret), ("previous_secret", previous))
                    if value is not None
                }
            except PayloadDecryptionError:
                done.unopenable.append(endpoint_id)
                continue
            if await self._replace_secrets(endpoint_id, (secret, previous), values):
                done.resealed += 1
        return done

    async def _replace_secrets(
        self, endpoint_id: str, seen: tuple[str, str | None], values: dict[str, str]
    ) -> bool:
        async def work(conn: AsyncConnection) -> bool:
            changed = await conn.execute(
                webhook_endpoints.update()
                .where(
                    webhook_endpoints.c.id == endpoint_id,
                    webhook_endpoints.c.secret == seen[0],
                    webhook_endpoints.c.previous_secret.is_not_distinct_from(seen[1]),
                )
                .values(**values)
            )
            return changed.rowcount == 1

        replaced: bool = await self._write(work)
        return replaced

    # ── the API's side ───────────────────────────────────────────────────────────────────
    async def create(
        self, client_id: str, url: str, enabled_events: list[str], description: str | None,
        enabled: bool,
    ) -> WebhookEndpoint:  # fmt: skip
        now = datetime.now(UTC)
        endpoint_id = new_endpoint_id()
        secret = new_signing_secret()
        values = {
            "id": endpoint_id,
            "client_id": client_id,
            "url": url,
            "description": description,
            "enabled_events": enabled_events,
            "status": (EndpointStatus.ENABLED if enabled else EndpointStatus.DISABLED).value,
            "disabled_reason": None if enabled else "disabled by the merchant",
            "secret": self._seal(secret, endpoint_id),
            "created_at": now,
            "updated_at": now,
        }

        async def work(conn: AsyncConnection) -> WebhookEndpoint:
            # Counted in the same SERIALIZABLE transaction: racing creates cannot pass the bound.
            existing = await conn.scalar(
                sa.select(sa.func.count()).where(
                    webhook_endpoints.c.client_id == client_id,
                    webhook_endpoints.c.deleted_at.is_(None),
                )
            )
            if (existing or 0) >= MAX_ENDPOINTS_PER_CLIENT:
                raise EndpointLimitReached
            row = (
                await conn.execute(
                    webhook_endpoints.insert().values(**values).returning(*webhook_endpoints.c)
                )
            ).one()
            return self._endpoint(row)

        created: WebhookEndpoint = await self._write(work)
        return created.model_copy(update={"revealed_secret": secret})

    async def get(self, client_id: str, endpoint_id: str) -> WebhookEndpoint | None:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(webhook_endpoints).where(
                        webhook_endpoints.c.id == endpoint_id,
                        webhook_endpoints.c.client_id == client_id,
                        webhook_endpoints.c.deleted_at.is_(None),
                    )
                )
            ).first()
        return self._endpoint(row) if row is not None else None

    async def page(
        self, client_id: str, limit: int, starting_after: WebhookEndpoint | None
    ) -> tuple[list[WebhookEndpoint], bool]:
        """Newest first."""
        clauses: list[Any] = [
            webhook_endpoints.c.client_id == client_id,
            webhook_endpoints.c.deleted_at.is_(None),
        ]
        if starting_after is not None:
            clauses.append(
                sa.tuple_(webhook_endpoints.c.created_at, webhook_endpoints.c.id)
                < sa.tuple_(sa.literal(starting_after.created_at), sa.literal(starting_after.id))
            )
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(webhook_endpoints)
                    .where(*clauses)
                    .order_by(webhook_endpoints.c.created_at.desc(), webhook_endpoints.c.id.desc())
                    .limit(limit + 1)
                )
            ).all()
        return [self._endpoint(r) for r in rows[:limit]], len(rows) > limit

    async def update(
        self, client_id: str, endpoint_id: str, changes: dict[str, Any]
    ) -> WebhookEndpoint | None:
        """`changes` may hold url, description, enabled_events and enabled."""
        values = {k: v for k, v in changes.items() if k in ("url", "description", "enabled_events")}
        if "enabled" in changes:
            enabled = bool(changes["enabled"])
            status = EndpointStatus.ENABLED if enabled else EndpointStatus.DISABLED
            values["status"] = status.value
            values["disabled_reason"] = None if enabled else "disabled by the merchant"
            if enabled:
                values["failing_since"] = None  # a fresh start: failures before do not count
        values["updated_at"] = datetime.now(UTC)
        return await self._update_one(client_id, endpoint_id, values)

    async def delete(self, client_id: str, endpoint_id: str) -> bool:
        """Soft delete: the delivery log keeps naming it; deliveries under way stop."""
        now = datetime.now(UTC)
        values = {"deleted_at": now, "updated_at": now, "status": EndpointStatus.DISABLED.value}
        return await self._update_one(client_id, endpoint_id, values) is not None

    async def rotate_secret(
        self, client_id: str, endpoint_id: str, overlap: timedelta
    ) -> WebhookEndpoint | None:
        """A new secret; the current one keeps signing too until `overlap` has passed."""
        now = datetime.now(UTC)
        secret = new_signing_secret()
        values = {
            "previous_secret": webhook_endpoints.c.secret,  # sealed for the same row, or legacy
            "previous_secret_expires_at": now + overlap,
            "secret": self._seal(secret, endpoint_id),
            "updated_at": now,
        }
        rotated = await self._update_one(client_id, endpoint_id, values)
        return rotated.model_copy(update={"revealed_secret": secret}) if rotated else None

    async def _update_one(
        self, client_id: str, endpoint_id: str, values: dict[str, Any]
    ) -> WebhookEndpoint | None:
        async def work(conn: AsyncConnection) -> WebhookEndpoint | None:
            row = (
                await conn.execute(
                    webhook_endpoints.update()
                    .where(
                        webhook_endpoints.c.id == endpoint_id,
                        webhook_endpoints.c.client_id == client_id,
                        webhook_endpoints.c.deleted_at.is_(None),
                    )
                    .values(**values)
                    .returning(*webhook_endpoints.c)
                )
            ).first()
            return self._endpoint(row) if row is not None else None

        updated: WebhookEndpoint | None = await self._write(work)
        return updated

    async def deliveries(
        self,
        endpoint_id: str,
        *,
        event_id: str | None = None,
        limit: int = 20,
        starting_after: str | None = None,
    ) -> tuple[list[DeliveryRecord], bool] | None:
        """Newest first; None when `starting_after` names no attempt of this endpoint."""
        clauses: list[Any] = [webhook_deliveries.c.endpoint_id == endpoint_id]
        if event_id is not None:
            clauses.append(webhook_deliveries.c.event_id == uuid.UUID(event_id))
        async with self.engine.connect() as conn:
            if starting_after is not None:
                cursor = (
                    await conn.execute(
                        sa.select(webhook_deliveries.c.attempted_at, webhook_deliveries.c.id).where(
                            webhook_deliveries.c.id == uuid.UUID(starting_after),
                            webhook_deliveries.c.endpoint_id == endpoint_id,
                        )
                    )
                ).first()
                if cursor is None:
                    return None
                clauses.append(
                    sa.tuple_(webhook_deliveries.c.attempted_at, webhook_deliveries.c.id)
                    < sa.tuple_(
                        sa.literal(cursor.attempted_at),
                        sa.literal(cursor.id, UUID(as_uuid=True)),
                    )
                )
            rows = (
                await conn.execute(
                    sa.select(webhook_deliveries)
                    .where(*clauses)
                    .order_by(
                        webhook_deliveries.c.attempted_at.desc(), webhook_deliveries.c.id.desc()
                    )
                    .limit(limit + 1)
                )
            ).all()
        records = [DeliveryRecord.model_validate(dict(r._mapping)) for r in rows[:limit]]
        return records, len(rows) > limit

    # ── the deliveries' side ───────────────────────────────────────────────────────────────
    async def find(self, endpoint_id: str) -> WebhookEndpoint | None:
        """Any client's endpoint, deleted ones included."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id)
                )
            ).first()
        return self._endpoint(row) if row is not None else None

    @staticmethod
    def wanted_by_some_endpoint() -> sa.ColumnElement[bool]:
        """An `outbox_events` row some endpoint may want: its client has an enabled endpoint
        created no later than the event."""
        return (
            sa.select(webhook_endpoints.c.id)
            .where(
                webhook_endpoints.c.client_id == outbox_events.c.client_id,
                webhook_endpoints.c.status == EndpointStatus.ENABLED.value,
                webhook_endpoints.c.deleted_at.is_(None),
                webhook_endpoints.c.created_at <= outbox_events.c.created_at,
            )
            .exists()
        )

    async def pass_over_unwanted_events(self) -> int:
        """Mark dispatched, without reading them, the undispatched events that no endpoint can
        want: their client has no enabled endpoint created before them. Most events, on a
        system whose clients have no webhooks; the dispatcher then reads only the rest."""
        wanted_by_some_endpoint = self.wanted_by_some_endpoint()

        async def work(conn: AsyncConnection) -> int:
            result = await conn.execute(
                outbox_events.update()
                .where(outbox_events.c.dispatched_at.is_(None), ~wanted_by_some_endpoint)
                .values(dispatched_at=datetime.now(UTC))
            )
            return int(result.rowcount)

        passed: int = await self._write(work)
        return passed

    async def enabled_for(self, client_ids: list[str]) -> list[WebhookEndpoint]:
        if not client_ids:
            return []
        async with self.engine.connect() as conn:
            rows = (
                await conn.execute(
                    sa.select(webhook_endpoints).where(
                        webhook_endpoints.c.client_id.in_(client_ids),
                        webhook_endpoints.c.status == EndpointStatus.ENABLED.value,
                        webhook_endpoints.c.deleted_at.is_(None),
                    )
                )
            ).all()
        return [self._endpoint(r) for r in rows]

    async def record_attempt(
        self, attempt: DeliveryAttempt, event_type: str, at: datetime, outcome: AttemptOutcome
    ) -> None:
        """The attempt's log row, and the endpoint's health: a success ends a failing streak,
        the first failure after a success starts one."""

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(
                webhook_deliveries.insert().values(
                    id=uuid.uuid4(),
                    endpoint_id=attempt.endpoint_id,
                    event_id=uuid.UUID(attempt.event_id),
                    event_type=event_type,
                    delivery_id=attempt.delivery_id,
                    attempt=attempt.attempt,
                    manual=attempt.manual,
                    attempted_at=at,
                    status_code=outcome.status_code,
                    latency_ms=outcome.latency_ms,
                    succeeded=outcome.delivered,
                    error=outcome.error,
                )
            )
            endpoint = webhook_endpoints.c
            if outcome.delivered:
                health: dict[str, Any] = {"last_success_at": at, "failing_since": None}
            else:
                health = {"failing_since": sa.func.coalesce(endpoint.failing_since, at)}
            await conn.execute(
                webhook_endpoints.update()
                .where(endpoint.id == attempt.endpoint_id)
                .values(**health)
            )

        await self._write(work)

    async def disable_after_persistent_failure(self, gave_up: DeliveryGaveUp) -> bool:
        """Disable the endpoint if nothing reached it since this delivery began (so it has been
        failing for the whole retry window), recording a `webhook_endpoint.disabled` event in
        the same transaction. True if it was disabled now."""

        async def work(conn: AsyncConnection) -> bool:
            row = (
                await conn.execute(
                    sa.select(webhook_endpoints).where(
                        webhook_endpoints.c.id == gave_up.endpoint_id
                    )
                )
            ).first()
            if row is None:
                return False
            endpoint = self._endpoint(row)
            if endpoint.status != EndpointStatus.ENABLED or endpoint.deleted_at is not None:
                return False
            last_success = endpoint.last_success_at
            if last_success is not None and last_success >= gave_up.began_at:
                return False  # it answered other deliveries meanwhile: not persistent
            now = datetime.now(UTC)
            failing_since = endpoint.failing_since or gave_up.began_at
            reason = (
                f"every delivery failed since {failing_since.isoformat()}; the last one gave "
                f"up after {gave_up.attempts} attempts ({gave_up.last_error or 'no answer'})"
            )[:500]
            await conn.execute(
                webhook_endpoints.update()
                .where(webhook_endpoints.c.id == endpoint.id)
                .values(
                    status=EndpointStatus.DISABLED.value, disabled_reason=reason, updated_at=now
                )
            )
            kind = EventKind.WEBHOOK_ENDPOINT_DISABLED
            the_id = event_id(endpoint.id, kind, gave_up.delivery_id)
            data = {
                "webhook_endpoint_id": endpoint.id,
                "url": endpoint.url,
                "reason": reason,
                "failing_since": failing_since.isoformat(),
                "last_event_id": gave_up.event_id,
            }
            await insert_event(
                conn,
                EventRecord(
                    id=the_id,
                    kind=kind,
                    client_id=endpoint.client_id,
                    subject=endpoint.id,
                    payment_id=None,
                    time=now,
                    body={
                        "schema_version": 1,
                        "event_id": the_id,
                        "type": kind.ce_type,
                        "webhook_endpoint_id": endpoint.id,
                        "occurred_at": now.isoformat(),
                        "data": data,
                    },
                ),
                now,
            )
            return True

        disabled: bool = await self._write(work)
        return disabled
