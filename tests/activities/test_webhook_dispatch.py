"""The dispatcher's pass over events no endpoint can want, against the real PostgreSQL.

Most clients have no webhook endpoint: their events are marked dispatched in one statement,
without the dispatcher reading them. An event is wanted when its client has an enabled endpoint
created no later than the event (the same rule the dispatcher applies per event). No dispatcher
runs in this module, so what the pass leaves undispatched is what the test sees.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from activities.event_store import EventStore
from activities.webhook_endpoints import WebhookEndpoints
from domain.events import EventKind, EventRecord
from ledger.tables import outbox_events


def _event(client_id: str) -> EventRecord:
    payment_id = f"pay_{uuid.uuid4().hex[:12]}"
    return EventRecord(
        id=str(uuid.uuid4()),
        kind=EventKind.CONFIRMED,
        client_id=client_id,
        subject=payment_id,
        payment_id=payment_id,
        time=datetime.now(UTC),
        body={"payment_id": payment_id},
    )


async def _undispatched(engine: AsyncEngine, events: list[EventRecord]) -> set[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(outbox_events.c.event_id).where(
                outbox_events.c.event_id.in_([uuid.UUID(e.id) for e in events]),
                outbox_events.c.dispatched_at.is_(None),
            )
        )
        return {str(r.event_id) for r in rows}


async def test_events_no_endpoint_can_want_are_passed_over_and_the_rest_wait(
    engine: AsyncEngine,
) -> None:
    suffix = uuid.uuid4().hex[:8]
    store, endpoints = EventStore(engine), WebhookEndpoints(engine)
    url = "https://merchant.example/hook"
    await endpoints.create(f"early-{suffix}", url, ["*"], None, enabled=True)
    await endpoints.create(f"off-{suffix}", url, ["*"], None, enabled=False)

    no_endpoint = _event(f"none-{suffix}")
    endpoint_disabled = _event(f"off-{suffix}")
    endpoint_later = _event(f"late-{suffix}")
    endpoint_earlier = _event(f"early-{suffix}")
    events = [no_endpoint, endpoint_disabled, endpoint_later, endpoint_earlier]
    for event in events:
        assert await store.record(event)
    await endpoints.create(f"late-{suffix}", url, ["*"], None, enabled=True)
    assert await _undispatched(engine, events) == {e.id for e in events}

    passed = await endpoints.pass_over_unwanted_events()

    assert passed >= 3
    assert await _undispatched(engine, events) == {endpoint_earlier.id}
    # Nothing left for the pass to do with it: a second pass leaves it to the dispatcher.
    await endpoints.pass_over_unwanted_events()
    assert await _undispatched(engine, events) == {endpoint_earlier.id}
    # The dispatcher reads only what some endpoint may want: an unwanted event recorded after
    # the pass waits for the next pass instead of being read, matched and marked.
    after_the_pass = _event(f"none-{suffix}")
    assert await store.record(after_the_pass)
    read = await store.undispatched(10_000, only=endpoints.wanted_by_some_endpoint())
    mine = {e.record.id for e in read} & {e.id for e in [*events, after_the_pass]}
    assert mine == {endpoint_earlier.id}
    await endpoints.pass_over_unwanted_events()
    assert await _undispatched(engine, [after_the_pass]) == set()
    await store.mark_dispatched([endpoint_earlier.id])
