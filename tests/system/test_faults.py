"""Faults survived: with ≥ 100 payments in flight, Kafka, PostgreSQL, the CRM, the worker or
the Temporal server goes away; afterwards every payment is final, none is posted twice, no
event is lost and the ledger balances.

The fault tests share one PRIVATE stack for this module (the session stack other tests use is
never harmed), a worker in its own process (so it can be SIGKILLed like a crashed pod), the
API in this process over ASGI, and a fake CRM of their own. They run one after another.

The last two tests race the API itself on the session stack: one Idempotency-Key posted 100
times at once, and 20 refunds at once that together ask for more than was captured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.service import RPCError

from checker.report import CheckScope
from checker.runner import run_checks
from domain.events import EventKind, event_id
from infra.embedded.stack import Stack
from settings import Settings
from tests.helpers.api_client import api_client
from tests.helpers.fake_crm import FakeCrmServer
from tests.helpers.fault_rig import (
    WorkerProcess,
    client_settings,
    started_stack,
    worker_and_clients,
)
from tests.helpers.kafka import ConsumedEvent, consume_events, dedupe_by_id
from tests.helpers.saga import create_payment, ledger_rows, payment_body, wait_for_payment

FAULT_API_KEY = "psk_fault_writer_key_0123456789abcdefghij"
FAULT_CLIENT = "fault-client"
FAULT_WEBHOOK_SECRET = "whsec_fault_0123456789"
WEBHOOK_PATH = "/hooks/paysaga"

PAYMENTS_PER_FAULT = 120  # ≥ 100 of them in flight when the fault hits
SUBMIT_CONCURRENCY = 20
OUTAGE_SECONDS = 30.0
CRM_OUTAGE_SECONDS = 60.0
# Generous: a loaded 2-core CI box, activity retries backing off to 10 s, and (after a worker
# SIGKILL) activities that only time out after their 60 s start-to-close.
SETTLE_SECONDS = 150.0
# A publish to a dead broker fails after this, and the activity is retried.
KAFKA_MESSAGE_TIMEOUT_MS = 5000
CRM_TIMEOUT_SECONDS = 2.0

SUCCEEDED = "PaymentStatus = 'succeeded'"
SETTLED = (SUCCEEDED, "CrmSync = 'synced'")


# ── the private rig ──────────────────────────────────────────────────────────────────────────


@dataclass
class FaultRig:
    stack: Stack
    settings: Settings
    worker: WorkerProcess
    crm: FakeCrmServer
    api: httpx.AsyncClient
    temporal: Client
    engine: AsyncEngine

    async def ensure_everything_up(self) -> None:
        """A fault test that failed half-way may have left a service down: bring it back so
        the next test starts from a healthy system."""
        stack = self.stack
        assert stack.broker and stack.postgres and stack.temporal
        for service in (stack.postgres, stack.broker, stack.temporal):
            if service.process is None or not service.process.running:
                await asyncio.to_thread(service.start)
        if not self.worker.running:
            await self.worker.start()
        self.crm.clear()


@pytest.fixture(scope="module")
def fault_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from started_stack(tmp_path_factory, "faults")


@pytest.fixture(scope="module")
async def rig(fault_stack: Stack) -> AsyncIterator[FaultRig]:
    with FakeCrmServer() as crm:
        settings = client_settings(
            fault_stack, "faults", FAULT_CLIENT, FAULT_API_KEY,
            crm_webhook_url=crm.url(WEBHOOK_PATH),
            crm_webhook_secret=SecretStr(FAULT_WEBHOOK_SECRET),
            crm_timeout_seconds=CRM_TIMEOUT_SECONDS,
            kafka_message_timeout_ms=KAFKA_MESSAGE_TIMEOUT_MS,
        )  # fmt: skip
        async with (
            worker_and_clients(fault_stack, settings) as (worker, engine, temporal),
            api_client(settings, temporal, FAULT_API_KEY, base_url="http://paysaga.faults") as api,
        ):
            yield FaultRig(fault_stack, settings, worker, crm, api, temporal, engine)


@pytest.fixture
async def healthy_rig(rig: FaultRig) -> FaultRig:
    await rig.ensure_everything_up()
    return rig


# ── driving payments ─────────────────────────────────────────────────────────────────────────


def _merchant(fault: str) -> str:
    """One merchant per fault test: its payments are found by the MerchantId attribute."""
    return f"mer_fault_{fault}_{uuid.uuid4().hex[:6]}"


async def submit_payments(
    api: httpx.AsyncClient, merchant: str, count: int, first: int = 0
) -> list[str]:
    """POST `count` payments without waiting for them (`wait=0`), 20 at a time; their ids."""
    gate = asyncio.Semaphore(SUBMIT_CONCURRENCY)

    async def submit(n: int) -> str:
        async with gate:
            response = await api.post(
                "/v1/payments",
                json=payment_body(amount=1000 + n, merchant_id=merchant),
                headers={"Idempotency-Key": f"{merchant}-{n}"},
            )
        assert response.status_code == 201, response.text
        payment_id: str = response.json()["id"]
        return payment_id

    return list(await asyncio.gather(*(submit(n) for n in range(first, first + count))))


async def count_payments(temporal: Client, merchant: str, *clauses: str) -> int:
    """From Temporal visibility (search attributes the workflow upserts): answers while the
    worker is down, and costs one call however many payments there are."""
    query = " AND ".join([f"MerchantId = '{merchant}'", *clauses])
    return (await temporal.count_workflows(query)).count


async def wait_for_count(
    temporal: Client, merchant: str, clauses: tuple[str, ...], expected: int, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    seen = -1
    while time.monotonic() < deadline:
        with contextlib.suppress(RPCError):  # Temporal itself may still be coming back
            seen = await count_payments(temporal, merchant, *clauses)
        if seen >= expected:
            return
        await asyncio.sleep(1.0)
    raise AssertionError(
        f"only {seen} of {expected} payments of {merchant} reached {clauses} in {timeout:.0f}s"
    )


async def settled_payments(api: httpx.AsyncClient, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each payment as the API reports it, once it is final: succeeded and the CRM synced."""
    gate = asyncio.Semaphore(10)

    async def final(payment_id: str) -> dict[str, Any]:
        async with gate:
            return await wait_for_payment(
                api,
                payment_id,
                lambda p: p["status"] == "succeeded" and p["crm_sync"] == "synced",
                timeout=60,
            )

    found = await asyncio.gather(*(final(p) for p in ids))
    return {p["id"]: p for p in found}


async def answers_again(temporal: Client, timeout: float) -> None:
    """The same client object, used before the restart, reaches the restarted server."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await temporal.service_client.check_health(timeout=timedelta(seconds=2))
            return
        except RPCError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def sleep_until(moment: float) -> None:
    await asyncio.sleep(max(0.0, moment - time.monotonic()))


# ── the invariants ───────────────────────────────────────────────────────────────────────────
# Each fault test ends with the operator's invariant checker (`paysaga check`) over its
# payments, plus the fault-specific expectations below (every payment final, the CRM told).


async def _rows(engine: AsyncEngine, sql: str, **params: Any) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        result = await conn.execute(text(sql), params)
        return [dict(row._mapping) for row in result]


async def assert_ledger_balanced(engine: AsyncEngine) -> None:
    unbalanced = await _rows(
        engine,
        "SELECT transaction_id, currency, sum(amount) AS total FROM ledger_entries "
        "GROUP BY transaction_id, currency HAVING sum(amount) <> 0",
    )
    assert unbalanced == [], f"ledger transactions that do not sum to zero: {unbalanced}"
    over_returned = await _rows(
        engine,
        "SELECT payment_id, captured, refunded, disputed, dispute_lost FROM payments "
        "WHERE refunded + disputed + dispute_lost > captured",
    )
    assert over_returned == [], f"payments returning more than captured: {over_returned}"


async def outbox_events(engine: AsyncEngine, ids: list[str]) -> list[dict[str, Any]]:
    return await _rows(
        engine,
        "SELECT payment_id, event_id::text AS event_id, topic, created_at FROM outbox_events "
        "WHERE payment_id = ANY(:ids)",
        ids=ids,
    )


async def read_events(
    bootstrap: str, topics: list[str], wanted: set[str], timeout: float = 60
) -> dict[str, ConsumedEvent]:
    """The topics' events deduplicated by ce_id, read until every `wanted` id turned up."""
    events = await asyncio.to_thread(
        consume_events,
        bootstrap,
        topics,
        until=lambda evs: wanted <= set(dedupe_by_id(evs)),
        timeout=timeout,
    )
    return dedupe_by_id(events)


async def assert_invariants(
    rig: FaultRig, ids: list[str], *, events_required_for: set[str] | None = None
) -> None:
    """After recovery: every payment final; captured exactly once (one `payment` transaction,
    nothing reversed); the ledger balanced; every confirmed outbox event in Kafka (at least
    once, deduplicated by ce_id) and no confirmed event in Kafka without its outbox row.

    `events_required_for` narrows the Kafka check to those payments (default: all of them).
    """
    assert len(set(ids)) == len(ids)
    payments = await settled_payments(rig.api, ids)
    for payment_id, payment in payments.items():
        assert payment["amount_captured"] == payment["amount"], payment_id
        assert payment["amount_refunded"] == 0, payment_id

    await assert_ledger_balanced(rig.engine)
    postings = await _rows(
        rig.engine,
        "SELECT t.payment_id, t.kind, count(DISTINCT t.id) AS transactions, "
        "sum(e.amount) FILTER (WHERE e.amount > 0) AS moved "
        "FROM ledger_transactions t JOIN ledger_entries e ON e.transaction_id = t.id "
        "WHERE t.payment_id = ANY(:ids) GROUP BY t.payment_id, t.kind",
        ids=ids,
    )
    by_payment = {(r["payment_id"], r["kind"]): r for r in postings}
    assert {kind for _, kind in by_payment} == {"payment"}, "only captures were posted"
    for payment_id in ids:
        posting = by_payment.get((payment_id, "payment"))
        assert posting is not None, f"{payment_id} succeeded but was never posted"
        assert posting["transactions"] == 1, f"{payment_id} posted {posting['transactions']}x"
        assert posting["moved"] == payments[payment_id]["amount"], payment_id
    register = await _rows(
        rig.engine,
        "SELECT payment_id, captured, refunded, status FROM payments WHERE payment_id = ANY(:ids)",
        ids=ids,
    )
    assert {r["payment_id"]: (r["captured"], r["refunded"], r["status"]) for r in register} == {
        p: (payments[p]["amount"], 0, "succeeded") for p in ids
    }

    outbox = await outbox_events(rig.engine, ids)
    confirmed = {
        r["payment_id"]: r["event_id"] for r in outbox if r["topic"] == "payments.confirmed"
    }
    assert len([r for r in outbox if r["topic"] == "payments.confirmed"]) == len(ids)
    assert confirmed == {p: event_id(p, EventKind.CONFIRMED) for p in ids}

    required = set(ids) if events_required_for is None else events_required_for
    wanted = {confirmed[p] for p in required}
    in_kafka = await read_events(rig.stack.kafka_bootstrap_servers, ["payments.confirmed"], wanted)
    missing = sorted(p for p in required if confirmed[p] not in in_kafka)
    assert missing == [], f"{len(missing)} confirmed events never reached Kafka: {missing[:5]}"
    ours = {e.id: e for e in in_kafka.values() if e.key in payments}
    assert set(ours) <= set(confirmed.values()), "a confirmed event in Kafka has no ledger row"
    for event in ours.values():
        assert event.body["payment_id"] == event.key
        assert event.body["data"]["amount"] == payments[event.key]["amount"]

    hooked = {r.json().get("payment_id") for r in rig.crm.requests_for(WEBHOOK_PATH)}
    assert set(ids) <= hooked, "every payment's confirmation reached the CRM"

    # The memory-only broker forgets what it held before a kill: the checker judges the
    # payments whose events were published after the restart there, and all others elsewhere.
    report = await run_checks(
        rig.settings,
        scope=CheckScope(payment_ids=frozenset(required)),
        engine=rig.engine,
        temporal=rig.temporal,
        settle_seconds=10,
    )
    broken = {r.name: [v.detail for v in r.examples] for r in report.results if not r.passed}
    assert report.passed, f"paysaga check found broken promises: {broken}"


# ── faults ───────────────────────────────────────────────────────────────────────────────────


@pytest.mark.slow
async def test_kafka_broker_killed_for_30s_then_every_publish_finishes(
    healthy_rig: FaultRig,
) -> None:
    rig = healthy_rig
    assert rig.stack.broker is not None
    merchant = _merchant("kafka")
    before = await submit_payments(rig.api, merchant, 20)
    # Some of them confirmed (their events on Kafka) before the broker dies, the rest still on
    # their way: the relay must then republish what the lost log held.
    await wait_for_count(rig.temporal, merchant, (SUCCEEDED,), 1, 60)

    await asyncio.to_thread(rig.stack.broker.kill)
    killed_at, back_at = datetime.now(UTC), time.monotonic() + OUTAGE_SECONDS
    # Accepted while the broker is dead: the workflow starts and its raw publish retries.
    during = await submit_payments(rig.api, merchant, PAYMENTS_PER_FAULT - 20, first=20)
    in_flight = PAYMENTS_PER_FAULT - await count_payments(rig.temporal, merchant, *SETTLED)
    assert in_flight >= 100, f"only {in_flight} payments were in flight"
    await sleep_until(back_at)
    await asyncio.to_thread(rig.stack.broker.start)  # also recreates the topics

    ids = before + during
    await wait_for_count(rig.temporal, merchant, SETTLED, len(ids), SETTLE_SECONDS)
    posted_after_kill = {
        r["payment_id"]
        for r in await outbox_events(rig.engine, ids)
        if r["topic"] == "payments.confirmed" and r["created_at"] >= killed_at
    }
    assert set(during) <= posted_after_kill
    # tansu keeps records in memory only: whatever reached the broker before the kill was gone
    # with it. The worker's outbox relay found the new log (its epoch marker was missing) and
    # republished every stored event: Kafka holds the events of all payments again, those
    # confirmed before the kill included.
    assert set(before) - posted_after_kill, "some payments were confirmed before the kill"
    await assert_invariants(rig, ids)
    raw_ids = {event_id(p, EventKind.RAW) for p in ids}
    raw = await read_events(rig.stack.kafka_bootstrap_servers, ["payments.raw"], raw_ids)
    assert raw_ids <= set(raw)


@pytest.mark.slow
async def test_postgres_stopped_for_30s_then_every_payment_posts_once(
    healthy_rig: FaultRig,
) -> None:
    rig = healthy_rig
    assert rig.stack.postgres is not None
    merchant = _merchant("postgres")
    # A payment is accepted only once its key is in the idempotency register (the database),
    # so the payments in flight during the outage are accepted before it: queued in Temporal
    # while no worker runs, then picked up with the database gone.
    await rig.worker.stop()
    ids = await submit_payments(rig.api, merchant, PAYMENTS_PER_FAULT)

    await asyncio.to_thread(rig.stack.postgres.stop)
    back_at = time.monotonic() + OUTAGE_SECONDS
    await rig.worker.start()
    # Fraud scoring reads the customer's history and the posting writes the ledger: all of
    # these wait for the database, retrying.
    in_flight = PAYMENTS_PER_FAULT - await count_payments(rig.temporal, merchant, *SETTLED)
    assert in_flight >= 100, f"only {in_flight} payments were in flight"
    # A new payment meanwhile is refused, not half-accepted: nothing starts, and the client
    # retries with the same key.
    late_key = f"{merchant}-late"
    refused = await rig.api.post(
        "/v1/payments",
        json=payment_body(amount=999, merchant_id=merchant),
        headers={"Idempotency-Key": late_key},
    )
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "database_unavailable"
    assert await count_payments(rig.temporal, merchant) == PAYMENTS_PER_FAULT
    await sleep_until(back_at)
    await asyncio.to_thread(rig.stack.postgres.start)

    retried = await rig.api.post(
        "/v1/payments",
        json=payment_body(amount=999, merchant_id=merchant),
        headers={"Idempotency-Key": late_key},
    )
    assert retried.status_code == 201, retried.text
    ids.append(retried.json()["id"])
    await wait_for_count(rig.temporal, merchant, SETTLED, len(ids), SETTLE_SECONDS)
    await assert_invariants(rig, ids)


@pytest.mark.slow
async def test_crm_failing_and_hanging_for_60s_holds_no_money_and_syncs_after(
    healthy_rig: FaultRig,
) -> None:
    rig = healthy_rig
    merchant = _merchant("crm")
    outage = asyncio.create_task(crm_outage(rig, merchant, CRM_OUTAGE_SECONDS))
    ids = await submit_payments(rig.api, merchant, PAYMENTS_PER_FAULT)

    # The money does not wait for the CRM: every payment succeeds while it is down.
    await wait_for_count(
        rig.temporal,
        merchant,
        (SUCCEEDED, "CrmSync = 'pending'"),
        len(ids),
        CRM_OUTAGE_SECONDS - 5,
    )
    synced_during_outage = await outage
    assert synced_during_outage == 0

    # CRM retries back off to at most 10 s: all are synced soon after.
    await wait_for_count(rig.temporal, merchant, SETTLED, len(ids), SETTLE_SECONDS)
    await assert_invariants(rig, ids)
    # The retries never produced a second confirmation on any payment: each has exactly its
    # payments.raw and its payments.confirmed in the events store.
    outbox = await outbox_events(rig.engine, ids)
    assert sorted((r["payment_id"], r["topic"]) for r in outbox) == sorted(
        (p, topic) for p in ids for topic in ("payments.confirmed", "payments.raw")
    )


async def crm_outage(rig: FaultRig, merchant: str, seconds: float) -> int:
    """First half: every CRM call gets a 503. Second half: every call hangs past the client's
    timeout. Then the CRM is back. Returns how many payments had synced before it was."""
    started = time.monotonic()
    # Failing until the swap however late this task wakes (a loaded box), then hung: the swap
    # is one step, so no request meets a CRM that answers in between.
    rig.crm.fail_for(seconds)
    await sleep_until(started + seconds / 2)
    rig.crm.hang_instead(CRM_TIMEOUT_SECONDS * 2.5)  # also forgets the requests recorded so far
    await sleep_until(started + seconds)
    synced = await count_payments(rig.temporal, merchant, "CrmSync = 'synced'")
    rig.crm.clear()
    return synced


@pytest.mark.slow
async def test_worker_sigkilled_twice_mid_run_then_every_payment_finishes_once(
    healthy_rig: FaultRig,
) -> None:
    rig = healthy_rig
    merchant = _merchant("worker")
    before = await submit_payments(rig.api, merchant, 10)
    # Kill #1 while the first payments are mid-saga: some done, the rest with activities
    # running on the worker that dies.
    await wait_for_count(rig.temporal, merchant, (SUCCEEDED,), 2, 60)
    rig.worker.kill()
    # Accepted while no worker runs: Temporal queues them. A backlog above the 120 of the other
    # faults: the restarted worker clears a score of payments before kill #2 lands, and at least
    # 100 must still be in flight then.
    during = await submit_payments(rig.api, merchant, PAYMENTS_PER_FAULT + 20, first=10)
    ids = before + during

    await rig.worker.start()
    # Kill #2 once the new worker is mid-run through the backlog: activities running for many
    # payments, or one more payment through.
    done_at_restart = await count_payments(rig.temporal, merchant, SUCCEEDED)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        processing = await count_payments(rig.temporal, merchant, "PaymentStatus = 'processing'")
        done = await count_payments(rig.temporal, merchant, SUCCEEDED)
        if processing >= 20 or done > done_at_restart:
            break
        await asyncio.sleep(0.2)
    in_flight = len(ids) - await count_payments(rig.temporal, merchant, *SETTLED)
    rig.worker.kill()
    assert in_flight >= 100, f"only {in_flight} payments were in flight at the second kill"
    await rig.worker.start()

    # Activities the dead workers held time out (start-to-close) and run again elsewhere.
    await wait_for_count(rig.temporal, merchant, SETTLED, len(ids), SETTLE_SECONDS)
    await assert_invariants(rig, ids)


@pytest.mark.slow
async def test_temporal_server_restarted_then_clients_reconnect_and_payments_finish(
    healthy_rig: FaultRig,
) -> None:
    rig = healthy_rig
    assert rig.stack.temporal is not None
    merchant = _merchant("temporal")
    # A CRM answering 503 for a while keeps every payment mid-saga when the server goes down:
    # the early ones waiting on server-side retry timers, the later ones mid-activity.
    rig.crm.fail_for(30)
    ids = await submit_payments(rig.api, merchant, PAYMENTS_PER_FAULT)
    in_flight = len(ids) - await count_payments(rig.temporal, merchant, *SETTLED)
    assert in_flight >= 100, f"only {in_flight} payments were in flight"

    await asyncio.to_thread(rig.stack.temporal.stop)
    await asyncio.sleep(10)  # activities finishing now cannot report their results
    await asyncio.to_thread(rig.stack.temporal.start)
    await answers_again(rig.temporal, timeout=30)

    # The API's and the worker's clients reconnect on their own: the same client object
    # starts new payments, and the worker process (never restarted) finishes them all.
    assert rig.worker.running
    ids += await submit_payments(rig.api, merchant, 5, first=PAYMENTS_PER_FAULT)
    await wait_for_count(rig.temporal, merchant, SETTLED, len(ids), SETTLE_SECONDS)
    await assert_invariants(rig, ids)


# ── races on the API (session stack) ─────────────────────────────────────────────────────────


async def test_100_concurrent_posts_with_one_idempotency_key_make_one_payment(
    api: httpx.AsyncClient, engine: AsyncEngine, temporal_client: Client
) -> None:
    body = payment_body(amount=3100)
    key = f"race-{uuid.uuid4().hex}"
    responses = await asyncio.gather(
        *(create_payment(api, body, key=key, wait=0) for _ in range(100))
    )

    assert {r.status_code for r in responses} == {201}, {r.text for r in responses}
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    [payment_id] = ids
    # Exactly one request started the workflow; the 99 others were told they replayed it.
    originals = [r for r in responses if r.headers.get("Idempotent-Replayed") != "true"]
    assert len(originals) == 1

    payment = await wait_for_payment(
        api, payment_id, lambda p: p["status"] == "succeeded" and p["crm_sync"] == "synced"
    )
    assert payment["amount_captured"] == 3100
    runs = await temporal_client.count_workflows(f"WorkflowId = '{payment_id}'")
    assert runs.count == 1
    rows = await ledger_rows(engine, payment_id)
    assert [(r["kind"], r["total"], r["entries"]) for r in rows] == [("payment", 0, 2)]


REFUND_AMOUNTS = [
    300, 700, 1100, 400, 900, 1300, 500, 800, 1200, 600,
    1000, 350, 750, 1150, 450, 950, 1250, 550, 850, 650,
]  # fmt: skip


async def test_20_concurrent_refunds_never_return_more_than_captured(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    captured = 10_000
    assert sum(REFUND_AMOUNTS) > captured
    created = await create_payment(api, payment_body(amount=captured))
    assert created.status_code == 201, created.text
    payment_id = created.json()["id"]
    await wait_for_payment(api, payment_id, lambda p: p["status"] == "succeeded")

    async def refund(n: int, amount: int) -> httpx.Response:
        return await api.post(
            f"/v1/payments/{payment_id}/refunds",
            json={"amount": amount},
            headers={"Idempotency-Key": f"refund-{n}-{uuid.uuid4().hex[:8]}"},
            params={"wait": 30},
        )

    responses = await asyncio.gather(*(refund(n, a) for n, a in enumerate(REFUND_AMOUNTS)))

    accepted = [r.json() for r in responses if r.status_code == 201]
    refused = [
        (a, r) for a, r in zip(REFUND_AMOUNTS, responses, strict=True) if r.status_code != 201
    ]
    for _, response in refused:
        assert response.status_code == 409, response.text
        assert response.json()["error"]["code"] in (
            "amount_too_large",
            "refund_failed",
            "charge_already_refunded",
        ), response.text
    assert all(r["status"] == "succeeded" for r in accepted), accepted
    total = sum(r["amount"] for r in accepted)
    assert 0 < total <= captured
    # Nothing was refused that still fitted: the budget only shrinks as refunds succeed, so a
    # refusal means the amount exceeded even what is left at the end.
    left = captured - total
    assert all(amount > left for amount, _ in refused), (left, [a for a, _ in refused])

    # The workflow, the ledger's register and its transactions tell the same story.
    payment = await wait_for_payment(
        api,
        payment_id,
        lambda p: all(r["status"] != "pending" for r in p["refunds"]),
    )
    assert payment["amount_refunded"] == total
    assert payment["amount_refundable"] == left
    succeeded = {r["id"]: r["amount"] for r in payment["refunds"] if r["status"] == "succeeded"}
    assert succeeded == {r["id"]: r["amount"] for r in accepted}
    refunds = await _rows(
        engine,
        "SELECT t.reference, sum(e.amount) FILTER (WHERE e.amount > 0) AS amount, "
        "sum(e.amount) AS balance FROM ledger_transactions t "
        "JOIN ledger_entries e ON e.transaction_id = t.id "
        "WHERE t.payment_id = :p AND t.kind = 'refund' GROUP BY t.id, t.reference",
        p=payment_id,
    )
    assert {r["reference"]: r["amount"] for r in refunds} == succeeded
    assert all(r["balance"] == 0 for r in refunds)
    [register] = await _rows(
        engine,
        "SELECT captured, refunded, status FROM payments WHERE payment_id = :p",
        p=payment_id,
    )
    expected_status = "refunded" if left == 0 else "partially_refunded"
    assert register == {"captured": captured, "refunded": total, "status": expected_status}
    assert payment["status"] == expected_status
