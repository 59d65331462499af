"""The events store: every event paysaga emits, keyed by its CloudEvents id.

It is the ledger's outbox table grown up (migration 0005): ledger events are written by the
posting's own transaction (ledger/store.py), the saga's other events by the publishing
activity before it sends them, webhook endpoint events with the change they report. The outbox
relay reads it to owe Kafka nothing (infra/relay.py), the events API serves it
(`/v1/events`), and the webhook dispatcher matches it against merchants' endpoints.

Two partial indexes keep the relay's work lists cheap: `published_at IS NULL` (Kafka has not
acknowledged it yet) and `dispatched_at IS NULL` (not yet matched against webhook endpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy.dialects.postgresql import UUID, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain.events import EventKind, EventObject, EventRecord
from infra.database import run_serializable, run_statement
from ledger.store import insert_event
from ledger.tables import metadata, outbox_events

log = logging.getLogger(__name__)

event_relay_state = sa.Table(
    "event_relay_state",
    metadata,
    sa.Column("name", sa.String, primary_key=True),
    sa.Column("broker_epoch", sa.String),
    sa.Column("sweep_until", sa.DateTime(timezone=True)),
    sa.Column("sweep_after_created_at", sa.DateTime(timezone=True)),
    sa.Column("sweep_after_event_id", UUID(as_uuid=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)

_COLUMNS = (
    outbox_events.c.event_id,
    outbox_events.c.client_id,
    outbox_events.c.subject,
    outbox_events.c.payment_id,
    outbox_events.c.event_type,
    outbox_events.c.payload,
    outbox_events.c.created_at,
)


class StoredEvent(BaseModel):
    record: EventRecord
    created_at: datetime

    @property
    def cursor(self) -> tuple[datetime, uuid.UUID]:
        return self.created_at, uuid.UUID(self.record.id)

    def api_object(self) -> EventObject:
        return EventObject.of(self.record, self.created_at)


class SweepPage(BaseModel):
    events: list[StoredEvent]
    last: tuple[datetime, uuid.UUID] | None  # the cursor after this page
    full: bool  # as many rows as asked for: more may follow


class RelayState(BaseModel):
    broker_epoch: str | None = None
    sweep_until: datetime | None = None
    sweep_after_created_at: datetime | None = None
    sweep_after_event_id: uuid.UUID | None = None

    @property
    def sweep_cursor(self) -> tuple[datetime, uuid.UUID] | None:
        if self.sweep_after_created_at is None or self.sweep_after_event_id is None:
            return None
        return self.sweep_after_created_at, self.sweep_after_event_id


def _stored(row: Any) -> StoredEvent | None:
    """A row as a record; None for a type this version does not know (a newer writer's)."""
    try:
        kind = EventKind.of_ce_type(row.event_type)
    except KeyError:
        log.warning("events store: skipping %s of unknown type %s", row.event_id, row.event_type)
        return None
    payload: dict[str, Any] = row.payload or {}
    occurred = payload.get("occurred_at")
    try:
        time = datetime.fromisoformat(occurred) if isinstance(occurred, str) else row.created_at
    except ValueError:
        time = row.created_at
    subject = row.subject or row.payment_id or ""
    return StoredEvent(
        record=EventRecord(
            id=str(row.event_id),
            kind=kind,
            client_id=row.client_id or "",
            subject=subject,
            payment_id=row.payment_id,
            time=time,
            body=payload,
        ),
        created_at=row.created_at,
    )


def _all_stored(rows: Sequence[Any]) -> list[StoredEvent]:
    return [event for event in (_stored(row) for row in rows) if event is not None]


def _uuids(ids: Sequence[str]) -> list[uuid.UUID]:
    return [uuid.UUID(i) for i in ids]


def _parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


class EventStore:
    def __init__(self, engine: AsyncEngine, max_attempts: int = 8) -> None:
        self.engine = engine
        self.max_attempts = max_attempts

    async def _write(self, work: Any) -> Any:
        return await run_serializable(self.engine, work, max_attempts=self.max_attempts)

    async def _rows(self, statement: sa.Executable) -> list[Any]:
        async with self.engine.connect() as conn:
            return list((await conn.execute(statement)).all())

    # ── writing ──────────────────────────────────────────────────────────────────────────
    async def record(self, record: EventRecord) -> bool:
        """Idempotent: the same id twice is one event (the first one's payload stays)."""

        async def work(conn: AsyncConnection) -> bool:
            return await insert_event(conn, record, datetime.now(UTC))  # one statement

        recorded: bool = await run_statement(self.engine, work, max_attempts=self.max_attempts)
        return recorded

    async def mark_published(self, ids: Sequence[str]) -> None:
        """Kafka acknowledged these events (in the log the relay currently knows)."""
        if not ids:
            return

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(
                outbox_events.update()
                .where(
                    outbox_events.c.event_id.in_(_uuids(ids)),
                    outbox_events.c.published_at.is_(None),
                )
                .values(published_at=datetime.now(UTC))
            )

        await run_statement(self.engine, work, max_attempts=self.max_attempts)

    async def mark_dispatched(self, ids: Sequence[str]) -> None:
        if not ids:
            return

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(
                outbox_events.update()
                .where(outbox_events.c.event_id.in_(_uuids(ids)))
                .values(dispatched_at=datetime.now(UTC))
            )

        await self._write(work)

    # ── reading: the relay and the dispatcher ──────────────────────────────────────────────
    async def unpublished(self, created_before: datetime, limit: int) -> list[StoredEvent]:
        rows = await self._rows(
            sa.select(*_COLUMNS)
            .where(
                outbox_events.c.published_at.is_(None),
                outbox_events.c.created_at < created_before,
            )
            .order_by(outbox_events.c.created_at)
            .limit(limit)
        )
        return _all_stored(rows)

    async def undispatched(
        self, limit: int, only: sa.ColumnElement[bool] | None = None
    ) -> list[StoredEvent]:
        """Oldest first, the events not yet dispatched (of those, only the ones `only` selects)."""
        where: list[sa.ColumnElement[bool]] = [outbox_events.c.dispatched_at.is_(None)]
        if only is not None:
            where.append(only)
        rows = await self._rows(
            sa.select(*_COLUMNS).where(*where).order_by(outbox_events.c.created_at).limit(limit)
        )
        return _all_stored(rows)

    async def created_between(
        self,
        after: tuple[datetime, uuid.UUID] | None,
        since: datetime | None,
        until: datetime,
        limit: int,
    ) -> SweepPage:
        """Oldest first, from `since` (or the cursor `after`) up to `until`: a sweep's page."""
        clauses = [outbox_events.c.created_at < until]
        if since is not None:
            clauses.append(outbox_events.c.created_at >= since)
        if after is not None:
            clauses.append(
                sa.tuple_(outbox_events.c.created_at, outbox_events.c.event_id)
                > sa.tuple_(sa.literal(after[0]), sa.literal(after[1], UUID(as_uuid=True)))
            )
        rows = await self._rows(
            sa.select(*_COLUMNS)
            .where(*clauses)
            .order_by(outbox_events.c.created_at, outbox_events.c.event_id)
            .limit(limit)
        )
        last = (rows[-1].created_at, rows[-1].event_id) if rows else None
        return SweepPage(events=_all_stored(rows), last=last, full=len(rows) == limit)

    # ── reading: the events API ────────────────────────────────────────────────────────────
    async def get(self, event_id: str, client_id: str | None = None) -> StoredEvent | None:
        """The event, if it exists and (with `client_id`) belongs to that client."""
        the_id = _parse_uuid(event_id)
        if the_id is None:
            return None
        statement = sa.select(*_COLUMNS).where(outbox_events.c.event_id == the_id)
        if client_id is not None:
            statement = statement.where(outbox_events.c.client_id == client_id)
        rows = await self._rows(statement)
        found = _all_stored(rows)
        return found[0] if found else None

    async def page(
        self,
        client_id: str,
        *,
        kinds: Sequence[EventKind] | None = None,
        payment_id: str | None = None,
        limit: int = 10,
        starting_after: StoredEvent | None = None,
        ending_before: StoredEvent | None = None,
    ) -> tuple[list[StoredEvent], bool]:
        """One page of the client's events, newest first, and whether more follow in the
        direction of travel. Keyset pagination on (created_at, event_id): stable while new
        events arrive."""
        key = sa.tuple_(outbox_events.c.created_at, outbox_events.c.event_id)
        clauses: list[Any] = [outbox_events.c.client_id == client_id]
        if kinds is not None:
            clauses.append(outbox_events.c.event_type.in_([k.ce_type for k in kinds]))
        if payment_id is not None:
            clauses.append(outbox_events.c.payment_id == payment_id)
        newest_first: list[Any] = [
            outbox_events.c.created_at.desc(),
            outbox_events.c.event_id.desc(),
        ]
        if ending_before is not None:
            clauses.append(key > _key(ending_before))
            order: list[Any] = [outbox_events.c.created_at, outbox_events.c.event_id]
        else:
            if starting_after is not None:
                clauses.append(key < _key(starting_after))
            order = newest_first
        rows = await self._rows(
            sa.select(*_COLUMNS).where(*clauses).order_by(*order).limit(limit + 1)
        )
        events = _all_stored(rows[:limit])
        if ending_before is not None:
            events.reverse()
        return events, len(rows) > limit

    # ── the relay's own state ──────────────────────────────────────────────────────────────
    async def relay_state(self, name: str) -> RelayState:
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(event_relay_state).where(event_relay_state.c.name == name)
                )
            ).first()
        if row is None:
            return RelayState()
        return RelayState.model_validate(dict(row._mapping))

    async def adopt_broker_epoch(
        self, name: str, seen: str | None, epoch: str, sweep_until: datetime
    ) -> bool:
        """The broker's log is not the one `seen` described: remember `epoch` and start a sweep
        of everything created before `sweep_until`. False if another relay did so first."""

        async def work(conn: AsyncConnection) -> bool:
            now = datetime.now(UTC)
            await conn.execute(
                insert(event_relay_state)
                .values(name=name, updated_at=now)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            done = await conn.execute(
                event_relay_state.update()
                .where(
                    event_relay_state.c.name == name,
                    event_relay_state.c.broker_epoch.is_not_distinct_from(seen),
                )
                .values(
                    broker_epoch=epoch,
                    sweep_until=sweep_until,
                    sweep_after_created_at=None,
                    sweep_after_event_id=None,
                    updated_at=now,
                )
            )
            return done.rowcount == 1

        adopted: bool = await self._write(work)
        return adopted

    async def advance_sweep(
        self, name: str, until: datetime, cursor: tuple[datetime, uuid.UUID] | None
    ) -> None:
        """Record a sweep's progress; `cursor=None` means it is finished. Only the sweep that
        is still the current one (same `until`) is advanced."""

        async def work(conn: AsyncConnection) -> None:
            values: dict[str, Any] = {"updated_at": datetime.now(UTC)}
            if cursor is None:
                values.update(
                    sweep_until=None, sweep_after_created_at=None, sweep_after_event_id=None
                )
            else:
                values.update(sweep_after_created_at=cursor[0], sweep_after_event_id=cursor[1])
            await conn.execute(
                event_relay_state.update()
                .where(
                    event_relay_state.c.name == name,
                    event_relay_state.c.sweep_until == until,
                )
                .values(**values)
            )

        await self._write(work)


def _key(event: StoredEvent) -> Any:
    created_at, the_id = event.cursor
    return sa.tuple_(sa.literal(created_at), sa.literal(the_id, UUID(as_uuid=True)))


class AckRecorder:
    """Notes which events Kafka acknowledged and writes them to the store in one statement per
    interval, so the publishing activity never waits for it. A note lost in a crash only makes
    the relay publish that event once more (consumers deduplicate by id)."""

    def __init__(self, store: EventStore, interval_seconds: float = 0.5) -> None:
        self._store = store
        self._interval = interval_seconds
        self._pending: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def note(self, event_id: str) -> None:
        self._pending.add(event_id)

    async def flush(self) -> None:
        if not self._pending:
            return
        taken, self._pending = self._pending, set()
        try:
            await self._store.mark_published(sorted(taken))
        except Exception as exc:
            # The database is away: keep them for the next round.
            self._pending |= taken
            log.warning("could not record %d Kafka acknowledgements yet: %s", len(taken), exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kafka-ack-recorder")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush()
