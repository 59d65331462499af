"""The events store is the source of truth; Kafka a copy the outbox relay keeps whole.

The first test is `make run` → payments → Ctrl-C → `make run` → `paysaga check`, on a private
stack of its own (the embedded broker forgets everything when it stops, exactly as there), with
the CRM sandbox standing in for the CRM as `paysaga run` starts it. The others are the relay's
parts on the session stack: owed events, acknowledged ones left alone, one epoch between
racing relays, and `paysaga events replay`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from activities.crm import sign_webhook, verify_webhook
from activities.event_store import EventStore
from activities.kafka import EventPublisher
from checker.report import OUTBOX_IN_KAFKA, CheckScope
from checker.runner import run_checks
from domain.events import EventKind, PaymentEvent, event_id
from infra.database import (
    TooMuchContention,
    make_bookkeeping_engine,
    make_engine,
    run_serializable,
    run_statement,
)
from infra.embedded.stack import CRM_SECRET_FILE, Stack
from infra.relay import BrokerEpochs, OutboxRelay
from infra.temporal_client import connect_client
from settings import ApiKey, Settings
from tests.conftest import MERCHANT_SCOPES, TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.kafka import consume_events, dedupe_by_id
from tests.helpers.private_stack import private_stack_settings
from tests.helpers.saga import create_payment, payment_body
from tests.helpers.served import served_aiohttp
from worker import event_worker, payment_worker

PAYSAGA = str(Path(sys.executable).parent / "paysaga")
PAYMENTS = 6


def _relay_settings(settings: Settings, **overrides: object) -> Settings:
    """A relay that reacts within a second or two instead of the production 10 s grace."""
    fast: dict[str, object] = {
        "relay_grace_seconds": 1.0,
        "relay_interval_seconds": 0.2,
        "relay_broker_check_seconds": 1.0,
        "relay_epoch_topic": f"paysaga.broker-epoch.{uuid.uuid4().hex[:8]}",
    }
    return settings.model_copy(update={**fast, **overrides})


@asynccontextmanager
async def running_system(stack: Stack) -> AsyncIterator[tuple[Settings, httpx.AsyncClient]]:
    """What `paysaga run` runs on top of the stack: the worker (payments, webhooks, relay,
    dispatcher) and the API, with the services' settings the stack hands out."""
    settings = _relay_settings(
        stack.service_settings(),
        api_keys=[
            ApiKey(
                client_id="restart-client",
                key_sha256=ApiKey.hash(TEST_API_KEY),
                scopes=list(MERCHANT_SCOPES),
            )
        ],
        task_queue="payments-restart",
        workflow_sandbox=True,
        relay_epoch_topic="paysaga.broker-epoch",
    )
    client = await connect_client(settings)
    async with AsyncExitStack() as running:
        await running.enter_async_context(payment_worker(settings, client))
        await running.enter_async_context(event_worker(settings, client))
        api = await running.enter_async_context(api_client(settings, client, TEST_API_KEY))
        yield settings, api


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("restart")


async def test_make_run_payments_ctrl_c_make_run_then_check_passes_and_the_crm_synced(
    home: Path,
) -> None:
    settings = private_stack_settings(home)
    first = Stack(settings, home, temporal_ui=False, sandboxes=True)
    await asyncio.to_thread(first.start)
    try:
        assert first.crm_sandbox_url is not None  # no CRM configured: the sandbox stands in
        async with running_system(first) as (service, api):
            assert service.crm_webhook_url == f"{first.crm_sandbox_url}/webhooks/paysaga"
            paid = [
                (await create_payment(api, payment_body(amount=1000 + n), wait=20)).json()
                for n in range(PAYMENTS)
            ]
            # The README's first curl: `?wait=` answers once the fifth step is done too.
            assert [(p["status"], p["crm_sync"]) for p in paid] == [("succeeded", "synced")] * 6
            ids = [p["id"] for p in paid]
            refund = await api.post(
                f"/v1/payments/{ids[0]}/refunds",
                json={"amount": 300},
                headers={"Idempotency-Key": "restart-refund-1"},
            )
            assert refund.status_code == 201, refund.text
            # The refund's answer comes once the ledger posted it; its CRM notification is the
            # step after. Wait for the sandbox to have recorded it before stopping the worker.
            received = await _crm_sandbox_received(
                first.crm_sandbox_url, ids[0], ["confirmed", "refunded"]
            )
        secret = (home / CRM_SECRET_FILE).read_text().strip()
    finally:
        await asyncio.to_thread(first.stop)  # Ctrl-C: the memory broker's log is gone

    # The sandbox verified every signature and recorded each payment's confirmation (and
    # the refund), with the event ids of the events store.
    notes = received["data"]
    assert all(n["verified"] and not n["duplicate"] for n in notes)
    confirmed = {n["payment_id"]: n["event_id"] for n in notes if n["event_kind"] == "confirmed"}
    assert confirmed == {p: event_id(p, EventKind.CONFIRMED) for p in ids}
    assert [n["event_kind"] for n in notes if n["payment_id"] == ids[0]] == [
        "confirmed",
        "refunded",
    ]
    assert secret.startswith("whsec_")

    second = Stack(settings, home, temporal_ui=False, sandboxes=True)
    await asyncio.to_thread(second.start)
    engine = make_engine(second.database_url, pool_size=2)
    try:
        scope = CheckScope(payment_ids=frozenset(ids))
        # Before anything republishes: the new broker has none of the stored events.
        lost = await run_checks(second.service_settings(), scope=scope, engine=engine)
        # Each payment's authorized, raw, captured and confirmed (the sandbox acquirer's flow),
        # and one refund.
        assert lost.result(OUTBOX_IN_KAFKA).violation_count == 4 * PAYMENTS + 1
        async with running_system(second):
            report = await run_checks(
                second.service_settings(), scope=scope, engine=engine, settle_seconds=60
            )
            broken = {
                r.name: [v.detail for v in r.examples] for r in report.results if not r.passed
            }
            assert report.passed, broken
            stored = await _stored_ids(engine, ids)
            assert len(stored) == 4 * PAYMENTS + 1
            on_kafka = await _on_kafka(second.kafka_bootstrap_servers, set(stored))
            assert set(stored) <= set(on_kafka)
            # The CRM sandbox kept what it received across the restart.
            kept = httpx.get(f"{second.crm_sandbox_url}/api/notifications", timeout=5).json()
            assert [n["event_id"] for n in kept["data"]] == [n["event_id"] for n in notes]
    finally:
        await engine.dispose()
        await asyncio.to_thread(second.stop)


async def _crm_sandbox_received(
    sandbox_url: str, payment_id: str, kinds: list[str], timeout: float = 120.0
) -> dict[str, Any]:
    """The sandbox's record once it holds `kinds` for `payment_id`, polled: a loaded box may
    take a while to deliver the notification, a fixed sleep would be wrong either way."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            received: dict[str, Any] = (
                await http.get(f"{sandbox_url}/api/notifications", params={"limit": 1000})
            ).json()
            got = [n["event_kind"] for n in received["data"] if n["payment_id"] == payment_id]
            if len(got) >= len(kinds):  # the test's own assertion judges what arrived
                return received
            if loop.time() > deadline:
                raise AssertionError(
                    f"the CRM sandbox recorded {got} for {payment_id} after {timeout:.0f} s, "
                    f"expected {kinds}"
                )
            await asyncio.sleep(0.2)


async def _stored_ids(engine: AsyncEngine, payment_ids: list[str]) -> dict[str, str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text("SELECT event_id::text, topic FROM outbox_events WHERE payment_id = ANY(:ids)"),
            {"ids": payment_ids},
        )
        return {r[0]: r[1] for r in rows}


async def _on_kafka(bootstrap: str, wanted: set[str], timeout: float = 30) -> set[str]:
    topics = [k.topic for k in EventKind]
    events = await asyncio.to_thread(
        consume_events,
        bootstrap,
        topics,
        until=lambda seen: wanted <= set(dedupe_by_id(seen)),
        timeout=timeout,
    )
    return set(dedupe_by_id(events))


# ── the relay's parts, on the session stack ──────────────────────────────────────────────────


@pytest.fixture(scope="module")
async def publisher(stack: Stack, app_settings: Settings) -> AsyncIterator[EventPublisher]:
    made = EventPublisher(stack.kafka_bootstrap_servers, app_settings)
    yield made
    await asyncio.to_thread(made.close, 5.0)


def _orphan_event(client_id: str = "relay-client") -> PaymentEvent:
    """An event recorded and never published: a worker that died between the two."""
    payment_id = f"pay_{uuid.uuid4().hex[:24]}"
    return PaymentEvent(
        id=event_id(payment_id, EventKind.FAILED),
        kind=EventKind.FAILED,
        payment_id=payment_id,
        time=datetime.now(UTC),
        data={"payment_id": payment_id, "status": "failed", "sequence": 2},
        client_id=client_id,
    )


async def test_an_event_nobody_published_is_published_by_the_relay_once_its_grace_is_over(
    engine: AsyncEngine, publisher: EventPublisher, app_settings: Settings, stack: Stack
) -> None:
    store = EventStore(engine)
    orphan = _orphan_event()
    assert await store.record(orphan.record())
    assert not await store.record(orphan.record())  # one id, one event
    relay = OutboxRelay(store, publisher, _relay_settings(app_settings, relay_grace_seconds=2.0))

    await relay.publish_owed()
    assert not await _published(engine, orphan.id)  # within its grace: the saga may still send it

    await asyncio.sleep(2.1)
    await relay.publish_owed()
    assert await _published(engine, orphan.id)
    [record] = [
        e
        for e in await asyncio.to_thread(
            consume_events,
            stack.kafka_bootstrap_servers,
            [EventKind.FAILED.topic],
            until=lambda seen: any(s.id == orphan.id for s in seen),
        )
        if e.id == orphan.id
    ]
    assert record.key == orphan.payment_id
    assert record.body == orphan.body()
    assert record.headers["ce_type"] == "com.paysaga.payment.failed"


async def test_events_kafka_acknowledged_are_not_published_again(
    api: httpx.AsyncClient, engine: AsyncEngine, publisher: EventPublisher, app_settings: Settings
) -> None:
    payment = (await create_payment(api, payment_body(), wait=20)).json()
    ids = [event_id(payment["id"], k) for k in (EventKind.RAW, EventKind.CONFIRMED)]
    for _ in range(50):  # the worker notes acknowledgements every half second
        if all([await _published(engine, i) for i in ids]):
            break
        await asyncio.sleep(0.1)
    assert all([await _published(engine, i) for i in ids])
    store = EventStore(engine)
    relay = OutboxRelay(store, publisher, _relay_settings(app_settings, relay_grace_seconds=0))
    owed = await store.unpublished(datetime.now(UTC), 10_000)
    assert not {e.record.id for e in owed} & set(ids)
    await relay.publish_owed()
    assert not await store.unpublished(datetime.now(UTC) - timedelta(seconds=1), 10)


@pytest.fixture
async def bookkeeping(stack: Stack) -> AsyncIterator[AsyncEngine]:
    """The relay's and the dispatcher's engine in the worker: READ COMMITTED."""
    engine = make_bookkeeping_engine(stack.database_url, pool_size=4)
    yield engine
    await engine.dispose()


async def test_the_bookkeeping_runs_read_committed_and_everything_else_serializable(
    engine: AsyncEngine, bookkeeping: AsyncEngine
) -> None:
    async def isolation(conn: AsyncConnection) -> str:
        return str(await conn.scalar(text("SHOW transaction_isolation")))

    async def both(of: AsyncEngine) -> tuple[str, str]:
        return await run_statement(of, isolation), await run_serializable(of, isolation)

    assert await both(bookkeeping) == ("read committed", "read committed")
    assert await both(engine) == ("serializable", "serializable")


async def test_an_acknowledgement_waits_for_a_concurrent_writer_instead_of_failing(
    engine: AsyncEngine, bookkeeping: AsyncEngine
) -> None:
    """A mark of rows another transaction is changing (the other worker's dispatcher, a
    posting) fails under SERIALIZABLE, 40001, and was retried; at READ COMMITTED it waits for
    that transaction and goes on. The same class of conflict, through predicate locks, aborted
    ledger postings for the relay's and the dispatcher's sake (infra.database)."""
    events = [_orphan_event(), _orphan_event()]
    for event in events:
        assert await EventStore(engine).record(event.record())

    for store, survives in (
        (EventStore(engine, max_attempts=1), False),
        (EventStore(bookkeeping, max_attempts=1), True),
    ):
        the_id = events[survives].id
        async with engine.begin() as writer:  # holds the row until the mark is waiting for it
            await writer.execute(
                text(
                    "UPDATE outbox_events SET dispatched_at = now()"
                    " WHERE event_id = CAST(:i AS uuid)"
                ),
                {"i": the_id},
            )
            mark = asyncio.create_task(store.mark_published([the_id]))
            await _until_the_mark_waits_for_a_lock(engine)
        if survives:
            await mark
            assert await _published(engine, the_id)
        else:
            with pytest.raises(TooMuchContention):
                await mark
            assert not await _published(engine, the_id)


async def _until_the_mark_waits_for_a_lock(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        for _ in range(100):
            waiting = await conn.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE 'UPDATE outbox_events SET published_at%'"
                )
            )
            await conn.rollback()
            if waiting:
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the mark never waited for the row")


async def test_racing_relays_agree_on_one_broker_epoch_and_one_sweep(
    bookkeeping: AsyncEngine, publisher: EventPublisher, app_settings: Settings, stack: Stack
) -> None:
    """On the worker's READ COMMITTED engine: the epoch is a compare-and-set on one row."""
    engine = bookkeeping
    settings = _relay_settings(app_settings)
    name = f"race-{uuid.uuid4().hex[:6]}"
    relays = [
        OutboxRelay(
            EventStore(engine),
            publisher,
            settings,
            BrokerEpochs(stack.kafka_bootstrap_servers, settings.relay_epoch_topic),
            name=name,
        )
        for _ in range(4)
    ]
    adopted = await asyncio.gather(*(r.check_broker() for r in relays))
    assert adopted.count(True) == 1
    state = await EventStore(engine).relay_state(name)
    marker = await asyncio.to_thread(relays[0].epochs.current)  # type: ignore[union-attr]
    assert state.broker_epoch == marker and state.sweep_until is not None
    assert not any(await asyncio.gather(*(r.check_broker() for r in relays)))  # same log


async def test_events_replay_republishes_a_window_with_the_original_ids(
    api: httpx.AsyncClient, engine: AsyncEngine, stack: Stack
) -> None:
    """`paysaga events replay`, the real command (for consumers of a real cluster, whose log the
    relay never sees lost): every event of the window again, the same event."""
    payment = (await create_payment(api, payment_body(), wait=20)).json()
    ids = {event_id(payment["id"], k) for k in (EventKind.RAW, EventKind.CONFIRMED)}
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")},
        "PAYSAGA_DATABASE_URL": stack.database_url,
        "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": stack.kafka_bootstrap_servers,
    }
    started = datetime.now(UTC)
    done = await asyncio.to_thread(
        subprocess.run,
        [PAYSAGA, "events", "replay", "--since", "2m"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    republished = int(done.stdout.split()[1])
    async with engine.connect() as conn:
        in_window = await conn.scalar(
            text("SELECT count(*) FROM outbox_events WHERE created_at >= :t"),
            {"t": started - timedelta(minutes=2, seconds=5)},
        )
    assert len(ids) <= republished <= (in_window or 0)
    copies = await asyncio.to_thread(
        consume_events,
        stack.kafka_bootstrap_servers,
        [EventKind.RAW.topic, EventKind.CONFIRMED.topic],
        until=lambda seen: sum(1 for s in seen if s.id in ids) >= 2 * len(ids),
    )
    # Each event at least twice now (the saga's publish and the replay), always the same one
    # (the same JSON; the store keeps it as JSONB, which does not keep the keys' order).
    mine = [c for c in copies if c.id in ids]
    assert len(mine) >= 2 * len(ids)
    first = {c.id: c for c in reversed(mine)}
    assert all(
        (c.key, c.headers, c.body) == (first[c.id].key, first[c.id].headers, first[c.id].body)
        for c in mine
    )


async def _published(engine: AsyncEngine, the_id: str) -> bool:
    async with engine.connect() as conn:
        value = await conn.scalar(
            text("SELECT published_at FROM outbox_events WHERE event_id = CAST(:i AS uuid)"),
            {"i": the_id},
        )
    return value is not None


async def test_the_sandbox_verifies_signatures_and_marks_repeats(home: Path) -> None:
    """The receiver the sandbox runs verifies like the documented one (docs/webhooks.md)."""
    from sandboxes.crm import create_app

    secret = "whsec_sandbox_test_secret"
    body = b'{"event_kind":"confirmed","payment_id":"pay_1"}'
    now = int(datetime.now(UTC).timestamp())
    header = sign_webhook(secret, body, now)
    assert verify_webhook(secret, body, header)
    async with (
        served_aiohttp(create_app(home / "crm", secret)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        forged = await client.post(
            "/webhooks/paysaga",
            content=body,
            headers={"Paysaga-Signature": f"t={now},v1={'0' * 64}"},
        )
        assert forged.status_code == 400
        answers = [
            await client.post(
                "/webhooks/paysaga",
                content=body,
                headers={"Paysaga-Signature": header, "Idempotency-Key": "evt-1"},
            )
            for _ in range(2)
        ]
        assert [a.json() for a in answers] == [
            {"received": True, "duplicate": False},
            {"received": True, "duplicate": True},
        ]
        listed = (await client.get("/api/notifications")).json()["data"]
        assert [(n["verified"], n["duplicate"]) for n in listed] == [
            (False, False),
            (True, False),
            (True, True),
        ]
        assert "pay_1" in (await client.get("/")).text
        # The feed's bounds are checked: a clear 400, not a crash.
        for bad in ("after=-1", "limit=0", "limit=1001", "after=x"):
            refused = await client.get(f"/api/notifications?{bad}")
            assert refused.status_code == 400, bad
            assert "must be an integer" in refused.json()["error"]
    # Kept on disk: a restarted sandbox still knows what it received.
    assert len((home / "crm" / "notifications.jsonl").read_text().splitlines()) == 3
