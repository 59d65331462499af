"""Idempotency that outlives Temporal: a key reused after Temporal forgot its payment (an
operator's `workflow delete`, retention, the intake reading old messages again) finds the
payment in the database and never starts a second run; reused with another body, it is refused.

Temporal forgets here the way an operator makes it forget: the closed execution is deleted
through the operator API (`temporal workflow delete`)."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from checker.report import CheckScope
from checker.runner import run_checks
from domain.events import REQUESTS_DLQ_TOPIC
from domain.fraud import amount_for_limit_share
from domain.payment import PaymentRequest, PaymentState, PaymentWorkflowInput, payment_id_for
from domain.subscription import SubscriptionRequest, SubscriptionWorkflowInput, subscription_id_for
from infra.database import make_engine, migrate, revision_before
from infra.embedded.process import free_port
from infra.embedded.stack import Stack
from infra.idempotency import IdempotencyRegister, record_started
from intake.consumer import running_intake
from service.start import payment_policy, start_payment, subscription_policy
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.follow_ups import new_merchant
from tests.helpers.kafka import consume_events
from tests.helpers.saga import create_payment, ledger_rows, payment_body
from tests.intake.test_intake import BILLING, BILLING_TOPIC, produce, request_headers
from workflows.payment import PaymentWorkflow, initial_search_attributes
from workflows.subscription import SubscriptionWorkflow, initial_subscription_search_attributes

CLIENT = "test-client"  # the client TEST_API_KEY belongs to
WINDOW_SECONDS = 2.0
CAPTURE = [("payment", 0, 2)]

pytestmark = pytest.mark.usefixtures("worker")


def _short_window(settings: Settings) -> Settings:
    return settings.model_copy(update={"dispute_window_days": WINDOW_SECONDS / 86400})


def _intake_clients(settings: Settings) -> Settings:
    return settings.model_copy(update={"kafka_intake_clients": [BILLING]})


async def _forget(client: Client, payment_id: str) -> None:
    """What `temporal workflow delete --workflow-id …` does, then wait until it is gone."""
    await client.workflow_service.delete_workflow_execution(
        DeleteWorkflowExecutionRequest(
            namespace=client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=payment_id),
        )
    )
    deadline = asyncio.get_running_loop().time() + 120
    while await _exists(client, payment_id):
        assert asyncio.get_running_loop().time() < deadline, f"{payment_id} never deleted"
        await asyncio.sleep(0.2)


async def _exists(client: Client, payment_id: str) -> bool:
    try:
        await client.get_workflow_handle(payment_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def _closed(client: Client, payment_id: str) -> PaymentState:
    handle: WorkflowHandle[Any, Any] = client.get_workflow_handle(payment_id)
    return PaymentState.model_validate(await asyncio.wait_for(handle.result(), 30))


async def _register_row(engine: AsyncEngine, payment_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text("SELECT * FROM idempotency_keys WHERE payment_id = :p"), {"p": payment_id}
            )
        ).first()
    return dict(row._mapping) if row is not None else None


async def _never_runs_again(client: Client, payment_id: str) -> None:
    """A start would have created the workflow at once; give a stray one time to show up."""
    await asyncio.sleep(1.0)
    assert not await _exists(client, payment_id), "a second run was started"


# ── payments Temporal has forgotten ──────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Forgotten:
    key: str
    payment_id: str
    body: dict[str, Any]


@dataclass(frozen=True)
class ForgottenPayments:
    """Payments whose closed (or terminated) executions an operator deleted."""

    by_api: Forgotten  # created through the API; its window closed; outcome recorded
    in_review: Forgotten  # created through the API, terminated while in review: no record
    legacy: Forgotten  # started without a register row (before migration 0003)
    by_intake: Forgotten  # requested over Kafka
    while_running: Forgotten  # captured, deleted while still open for refunds (no summary)
    intake_offset: tuple[int, int]  # (partition, offset) of the intake's original message


@pytest.fixture(scope="module")
async def forgotten(
    app_settings: Settings, temporal_client: Client, stack: Stack, worker: None
) -> ForgottenPayments:
    """Deleting a closed execution takes the dev server ~30 s (it waits for its task queues'
    next ack): the module's payments are made first and deleted together."""
    settings = _intake_clients(_short_window(app_settings))
    async with api_client(settings, temporal_client, TEST_API_KEY) as api:
        by_api = _forgotten(CLIENT, amount=1234)
        created = await create_payment(api, by_api.body, key=by_api.key, wait=10)
        assert created.status_code == 201 and created.json()["id"] == by_api.payment_id

        review_amount = amount_for_limit_share("USD", 60)  # a first payment this large: review
        in_review = _forgotten(CLIENT, amount=review_amount)
        created = await create_payment(api, in_review.body, key=in_review.key, wait=10)
        assert created.json()["status"] == "requires_review", created.text
        handle = temporal_client.get_workflow_handle(in_review.payment_id)
        await handle.terminate(reason="test: removed by an operator")

    async with api_client(app_settings, temporal_client, TEST_API_KEY) as api:
        while_running = _forgotten(CLIENT, amount=1700)  # the default 120-day window
        created = await create_payment(api, while_running.body, key=while_running.key, wait=10)
        assert created.json()["status"] == "succeeded", created.text

    legacy = _forgotten(CLIENT, amount=1500)
    await _start_without_register(temporal_client, settings, legacy)

    by_intake = _forgotten(BILLING, amount=2700)
    group = f"intake-forgets-{uuid.uuid4().hex[:8]}"
    async with running_intake(settings, temporal_client, group_id=group):
        where = produce(stack, json.dumps(by_intake.body).encode(), request_headers(by_intake.key))
        await committed_past_for(stack, group, *where)

    for closing in (by_api, legacy, by_intake):
        assert (await _closed(temporal_client, closing.payment_id)).status == "succeeded"
    deleted = (by_api, in_review, legacy, by_intake, while_running)
    await asyncio.gather(*(_forget(temporal_client, f.payment_id) for f in deleted))
    return ForgottenPayments(by_api, in_review, legacy, by_intake, while_running, where)


def _forgotten(client_id: str, amount: int) -> Forgotten:
    key = f"forgotten-{uuid.uuid4().hex}"
    body = payment_body(amount=amount, merchant_id=new_merchant())
    return Forgotten(key, payment_id_for(client_id, key), body)


async def _start_without_register(client: Client, settings: Settings, legacy: Forgotten) -> None:
    """As the starter did before the register existed: the workflow, and no row."""
    request = PaymentRequest.model_validate(legacy.body)
    workflow_input = PaymentWorkflowInput(
        payment_id=legacy.payment_id,
        client_id=CLIENT,
        request=request,
        fingerprint=request.fingerprint(),
        policy=payment_policy(settings, request),
    )
    await client.start_workflow(
        PaymentWorkflow.run,
        workflow_input,
        id=legacy.payment_id,
        task_queue=settings.task_queue,
        search_attributes=initial_search_attributes(workflow_input),
        memo={"fingerprint": request.fingerprint()},
    )


# ── the REST API ─────────────────────────────────────────────────────────────────────────────


async def test_a_key_reused_after_temporal_forgot_the_payment_answers_from_the_register(
    forgotten: ForgottenPayments,
    api: httpx.AsyncClient,
    temporal_client: Client,
    engine: AsyncEngine,
) -> None:
    payment = forgotten.by_api
    pid = payment.payment_id
    row = await _register_row(engine, pid)
    assert row is not None and row["started_at"] is not None
    assert (row["client_id"], row["source"]) == (CLIENT, "api")
    assert payment.key not in json.dumps(row, default=str)  # hashed into the id, never stored

    replay = await create_payment(api, payment.body, key=payment.key, wait=5)
    assert replay.status_code == 201, replay.text
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["id"] == pid
    assert (replay.json()["status"], replay.json()["amount_captured"]) == ("succeeded", 1234)
    await _never_runs_again(temporal_client, pid)

    other = await create_payment(api, {**payment.body, "amount": 4321}, key=payment.key, wait=5)
    assert other.status_code == 409, other.text
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    await _never_runs_again(temporal_client, pid)

    # The payment still reads from the register, and the ledger holds one posting.
    read = (await api.get(f"/v1/payments/{pid}")).json()
    assert (read["status"], read["amount_captured"]) == ("succeeded", 1234)
    rows = await ledger_rows(engine, pid)
    assert [(r["kind"], r["total"], r["entries"]) for r in rows] == CAPTURE


async def test_a_payment_removed_before_it_recorded_anything_is_never_started_again(
    forgotten: ForgottenPayments,
    api: httpx.AsyncClient,
    temporal_client: Client,
    engine: AsyncEngine,
) -> None:
    """Started (it waited for a reviewer), then terminated and deleted by an operator: no
    ledger row, no summary. Its key still never starts a second run."""
    payment = forgotten.in_review
    replay = await create_payment(api, payment.body, key=payment.key, wait=0)
    assert replay.status_code == 409, replay.text
    assert replay.json()["error"]["code"] == "payment_record_missing"
    await _never_runs_again(temporal_client, payment.payment_id)
    assert await ledger_rows(engine, payment.payment_id) == []


async def test_a_payment_deleted_while_running_is_never_started_again_and_is_flagged(
    forgotten: ForgottenPayments,
    api: httpx.AsyncClient,
    temporal_client: Client,
    engine: AsyncEngine,
    app_settings: Settings,
) -> None:
    """Deleted while open for refunds: no summary was recorded, but the capture was. The key
    answers with what the ledger knows, never runs again, and `paysaga check` names it."""
    payment = forgotten.while_running
    replay = await create_payment(api, payment.body, key=payment.key, wait=0)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    answered = replay.json()
    assert (answered["status"], answered["amount_captured"]) == ("succeeded", 1700)
    assert "removed" in answered["waiting_for"]
    await _never_runs_again(temporal_client, payment.payment_id)
    assert (await api.get(f"/v1/payments/{payment.payment_id}")).status_code == 404
    report = await run_checks(
        app_settings,
        scope=CheckScope(payment_ids=frozenset({payment.payment_id})),
        engine=engine,
        temporal=temporal_client,
    )
    flagged = report.violations("workflow-agrees-with-ledger")
    assert [v.payment_id for v in flagged] == [payment.payment_id]
    assert "no outcome was recorded" in flagged[0].detail


async def test_payments_started_before_the_register_register_when_they_end(
    forgotten: ForgottenPayments,
    api: httpx.AsyncClient,
    temporal_client: Client,
    engine: AsyncEngine,
) -> None:
    """A workflow started without a register row (before migration 0003) registers its key
    when it records its outcome, so the key still finds it once Temporal has forgotten it."""
    payment = forgotten.legacy
    row = await _register_row(engine, payment.payment_id)
    fingerprint = PaymentRequest.model_validate(payment.body).fingerprint()
    assert row is not None and (row["source"], row["fingerprint"]) == ("recorded", fingerprint)

    replay = await create_payment(api, payment.body, key=payment.key, wait=0)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json()["amount_captured"] == 1500
    other = await create_payment(api, {**payment.body, "amount": 1600}, key=payment.key, wait=0)
    assert other.status_code == 409
    await _never_runs_again(temporal_client, payment.payment_id)


async def test_a_claim_left_by_a_request_that_died_before_the_start_does_not_block_it(
    api: httpx.AsyncClient, temporal_client: Client, engine: AsyncEngine
) -> None:
    """The row is written before the workflow starts; a process dying in between leaves a
    claim that the key's next request turns into the first start."""
    body = payment_body(amount=2100, merchant_id=new_merchant())
    key = f"crashed-{uuid.uuid4().hex}"
    pid = payment_id_for(CLIENT, key)
    request = PaymentRequest.model_validate(body)
    claim = await IdempotencyRegister(engine).claim(pid, CLIENT, request.fingerprint(), "api")
    assert claim.new and not claim.started
    assert not await _exists(temporal_client, pid)

    # The claim holds the body: another one is refused even though nothing runs yet.
    other = await create_payment(api, {**body, "amount": 2200}, key=key, wait=0)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"

    retried = await create_payment(api, body, key=key, wait=10)
    assert retried.status_code == 201, retried.text
    assert "Idempotent-Replayed" not in retried.headers  # this request started it
    assert retried.json()["status"] == "succeeded"
    row = await _register_row(engine, pid)
    assert row is not None and row["started_at"] is not None
    rows = await ledger_rows(engine, pid)
    assert [(r["kind"], r["total"], r["entries"]) for r in rows] == CAPTURE


class _MarkLostAtFirst(IdempotencyRegister):
    """The register, whose first `lost` marks meet a database that does not answer (a real
    connection refused: nothing listens on the port), as when PostgreSQL shuts down between
    Temporal accepting the start and the mark."""

    def __init__(self, engine: AsyncEngine, lost: int) -> None:
        super().__init__(engine)
        self.lost = lost
        dead = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"
        self.dead = IdempotencyRegister(make_engine(dead, pool_size=1), max_attempts=1)

    async def mark_started(self, payment_id: str) -> None:
        if self.lost > 0:
            self.lost -= 1
            await self.dead.mark_started(payment_id)
        await super().mark_started(payment_id)


async def test_a_start_the_database_could_not_mark_is_marked_once_it_answers(
    api: httpx.AsyncClient,
    temporal_client: Client,
    engine: AsyncEngine,
    app_settings: Settings,
) -> None:
    """The faults simulation, seed 2: PostgreSQL was shutting down as a payment was created;
    Temporal had accepted the start, the register's mark failed, and the row stayed claimed
    for good (only logged). A claimed row lets the key start the payment again once Temporal
    has forgotten it. Now the mark is tried again until the database takes it."""
    body = payment_body(amount=2300, merchant_id=new_merchant())
    key = f"mark-lost-{uuid.uuid4().hex}"
    register = _MarkLostAtFirst(engine, lost=2)
    try:
        started = await start_payment(
            temporal_client, register, app_settings, CLIENT, key,
            PaymentRequest.model_validate(body),
        )  # fmt: skip
        assert not started.replayed and started.handle is not None
        deadline = asyncio.get_running_loop().time() + 30
        row = await _register_row(engine, started.payment_id)
        while row is None or row["started_at"] is None:
            assert asyncio.get_running_loop().time() < deadline, "the start was never marked"
            await asyncio.sleep(0.2)
            row = await _register_row(engine, started.payment_id)
        assert register.lost == 0 and row["source"] == "api"
    finally:
        await register.aclose()
        await register.dead.engine.dispose()

    # The key finds its payment, and nothing runs twice.
    again = await create_payment(api, body, key=key, wait=10)
    assert again.status_code == 201, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == started.payment_id
    assert again.json()["status"] == "succeeded"
    rows = await ledger_rows(engine, started.payment_id)
    assert [(r["kind"], r["total"], r["entries"]) for r in rows] == CAPTURE


async def test_marks_asked_together_share_transactions_and_each_waits_for_its_own(
    engine: AsyncEngine,
) -> None:
    """Under load the API marks many payments started at once: they go to the database in a
    few transactions (the first at once, the rest together while it commits), and each
    `mark_started` returns only once its row is marked. A batch the database refuses fails
    every mark in it (so each start falls back to `mark_later`)."""
    register = IdempotencyRegister(engine)
    ids = [payment_id_for(CLIENT, f"grouped-{uuid.uuid4().hex}") for _ in range(40)]
    for payment_id in ids:
        claim = await register.claim(payment_id, CLIENT, "fp-grouped", "api")
        assert claim.new and not claim.started

    async def mark(payment_id: str) -> bool:
        await register.mark_started(payment_id)
        row = await _register_row(engine, payment_id)
        return row is not None and row["started_at"] is not None

    assert all(await asyncio.gather(*(mark(i) for i in ids)))
    assert 1 <= register.mark_transactions < len(ids) // 2, register.mark_transactions

    dead_url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"
    dead = IdempotencyRegister(make_engine(dead_url, pool_size=1), max_attempts=1)
    try:
        refused = await asyncio.gather(
            *(dead.mark_started(i) for i in ids[:5]), return_exceptions=True
        )
    finally:
        await dead.engine.dispose()
    assert all(isinstance(r, Exception) for r in refused), refused


async def test_a_claim_never_marked_is_marked_by_the_payments_outcome_record(
    engine: AsyncEngine,
) -> None:
    """A key claimed whose process died before it could mark the start (the background retry
    lives in that process) must not stay claimed: once Temporal forgets the payment, a claimed
    key would start it a second time. The workflow's outcome record marks it."""
    register = IdempotencyRegister(engine)
    payment_id = f"pay_{uuid.uuid4().hex[:24]}"
    claim = await register.claim(payment_id, CLIENT, "fp-claimed", "api")
    assert not claim.started
    async with engine.begin() as conn:
        await record_started(conn, payment_id, CLIENT, "fp-claimed")
    row = await _register_row(engine, payment_id)
    assert row is not None and row["started_at"] is not None and row["source"] == "api"
    assert (await register.claim(payment_id, CLIENT, "fp-claimed", "api")).started
    # A later outcome record (another body's fingerprint, even) leaves a marked row as it is.
    async with engine.begin() as conn:
        await record_started(conn, payment_id, CLIENT, "fp-other")
    assert await _register_row(engine, payment_id) == row


async def test_a_new_claim_of_a_payment_the_payments_register_knows_is_started(
    engine: AsyncEngine,
) -> None:
    """A payment in the payments register without a key row (from before the register): the
    first claim of its key writes the row already started, in the claim's one statement, so
    nothing starts it again; a key the payments register does not know is claimed unstarted."""
    register = IdempotencyRegister(engine)
    known, unknown = (f"pay_{uuid.uuid4().hex[:24]}" for _ in range(2))
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO payments (payment_id, client_id, customer_id, merchant_id, "
                "currency, amount, status) VALUES "
                "(:id, :client, 'cus', 'mer', 'USD', 100, 'succeeded')"
            ),
            {"id": known, "client": CLIENT},
        )
    claim = await register.claim(known, CLIENT, "fp-known", "api")
    assert claim.new and claim.started and claim.fingerprint == "fp-known"
    row = await _register_row(engine, known)
    assert row is not None and row["started_at"] is not None and row["source"] == "api"
    assert (await register.claim(known, CLIENT, "fp-known", "api")).started

    claim = await register.claim(unknown, CLIENT, "fp-unknown", "kafka")
    assert claim.new and not claim.started
    row = await _register_row(engine, unknown)
    assert row is not None and row["started_at"] is None and row["source"] == "kafka"
    again = await register.claim(unknown, CLIENT, "fp-other", "api")
    assert not again.new and not again.started and again.fingerprint == "fp-unknown"


def test_the_migration_registers_the_payments_that_already_ended(stack: Stack) -> None:
    """Migration 0003 fills the register from the payments register's recorded summaries."""
    import sqlalchemy as sa

    database = f"migrate_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(stack.database_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{database}"'))
    url = sa.make_url(stack.database_url).set(database=database).render_as_string(False)
    try:
        before = revision_before("0003")  # the idempotency register's migration
        assert before is not None
        migrate(url, before)
        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO payments (payment_id, client_id, customer_id, merchant_id, "
                    "currency, amount, status, summary) VALUES "
                    "('pay_ended', 'c1', 'cus', 'mer', 'USD', 100, 'succeeded', "
                    """ '{"fingerprint": "f00d", "status": "succeeded"}'), """
                    "('pay_running', 'c1', 'cus', 'mer', 'USD', 100, 'succeeded', NULL)"
                )
            )
        migrate(url)
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT payment_id, client_id, fingerprint, started_at FROM idempotency_keys"
                )
            ).all()
        engine.dispose()
        assert [(r.payment_id, r.client_id, r.fingerprint) for r in rows] == [
            ("pay_ended", "c1", "f00d")
        ]
        assert rows[0].started_at is not None
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{database}" WITH (FORCE)'))
        admin.dispose()


# ── the Kafka intake ─────────────────────────────────────────────────────────────────────────


async def test_the_intake_reading_old_messages_after_temporal_forgot_starts_nothing(
    forgotten: ForgottenPayments,
    app_settings: Settings,
    stack: Stack,
    temporal_client: Client,
    engine: AsyncEngine,
) -> None:
    payment = forgotten.by_intake
    pid = payment.payment_id
    # An offset reset: a new consumer group reads payments.requests from the beginning, the
    # original message included; and the billing system sends it once more for good measure.
    reread = f"intake-rereads-{uuid.uuid4().hex[:8]}"
    async with running_intake(
        _intake_clients(_short_window(app_settings)), temporal_client, group_id=reread
    ):
        await committed_past_for(stack, reread, *forgotten.intake_offset)
        again = produce(stack, json.dumps(payment.body).encode(), request_headers(payment.key))
        await committed_past_for(stack, reread, *again)
        await _never_runs_again(temporal_client, pid)

        # The key with another body: dead-lettered as reused, nothing started.
        kafka_key = f"other-{uuid.uuid4().hex[:8]}"
        other_body = json.dumps({**payment.body, "amount": 2800}).encode()
        produce(stack, other_body, request_headers(payment.key), key=kafka_key)
        letters = await asyncio.to_thread(
            consume_events,
            stack.kafka_bootstrap_servers,
            [REQUESTS_DLQ_TOPIC],
            until=lambda events: any(e.key == kafka_key for e in events),
            timeout=30,
        )
        [letter] = [e for e in letters if e.key == kafka_key]
        assert letter.headers["dlq-error-code"] == "idempotency_key_reused"
    await _never_runs_again(temporal_client, pid)
    rows = await ledger_rows(engine, pid)
    assert [(r["kind"], r["total"], r["entries"]) for r in rows] == CAPTURE


async def committed_past_for(stack: Stack, group: str, partition: int, offset: int) -> None:
    """Wait until `group` committed past `offset` on `partition` of the billing client's topic."""

    def committed() -> int:
        reader = Consumer({"bootstrap.servers": stack.kafka_bootstrap_servers, "group.id": group})
        try:
            [found] = reader.committed([TopicPartition(BILLING_TOPIC, partition)], timeout=10)
            return int(found.offset)
        finally:
            reader.close()

    deadline = asyncio.get_running_loop().time() + 60
    while await asyncio.to_thread(committed) <= offset:
        assert asyncio.get_running_loop().time() < deadline, f"{group} never committed {offset}"
        await asyncio.sleep(0.2)


# ── subscriptions: the same register ─────────────────────────────────────────────────────────


def _subscription_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "customer_id": f"cus_{uuid.uuid4().hex[:10]}",
        "merchant_id": new_merchant(),
        "payment_method": "pm_card_visa_0001",
        "unit_amount": 990,
        "currency": "EUR",
        "quantity": 1,
        "interval": "month",
        "trial_days": 14,
    }
    body.update(overrides)
    return body


async def test_a_subscription_key_reused_after_temporal_forgot_it_never_starts_a_second_one(
    app_settings: Settings, temporal_client: Client, engine: AsyncEngine
) -> None:
    """A subscription goes through the payments' register: once Temporal forgot it, its key
    answers 409 `subscription_record_missing` with the same body (never a second subscription)
    and `idempotency_key_reused` with another. One key names one payment and one subscription,
    each answered only by its own endpoint."""
    key = f"shared-{uuid.uuid4().hex}"
    body = _subscription_body()
    async with api_client(app_settings, temporal_client, TEST_API_KEY) as api:
        created = await api.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": key})
        assert created.status_code == 201, created.text
        sub_id = created.json()["id"]
        assert sub_id.startswith("sub_")
        row = await _register_row(engine, sub_id)
        assert row is not None and row["client_id"] == CLIENT and row["started_at"] is not None
        assert row["fingerprint"] != ""

        # The same key on the payments endpoint is another resource, never this subscription.
        pay_body = payment_body(amount=700)
        paid = await create_payment(api, pay_body, key=key, wait=10)
        assert paid.status_code == 201, paid.text
        payment_id = paid.json()["id"]
        assert payment_id.startswith("pay_") and payment_id == payment_id_for(CLIENT, key)

        again = await api.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": key})
        assert again.status_code == 201 and again.json()["id"] == sub_id
        assert again.headers.get("Idempotent-Replayed") == "true"

        canceled = await api.post(f"/v1/subscriptions/{sub_id}/cancel", json={})
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        handle: WorkflowHandle[Any, Any] = temporal_client.get_workflow_handle(sub_id)
        await asyncio.wait_for(handle.result(), 30)
        await _forget(temporal_client, sub_id)

        same = await api.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": key})
        assert same.status_code == 409, same.text
        assert same.json()["error"]["code"] == "subscription_record_missing"
        other = await api.post(
            "/v1/subscriptions",
            json={**body, "unit_amount": 1990},
            headers={"Idempotency-Key": key},
        )
        assert other.status_code == 409, other.text
        assert other.json()["error"]["code"] == "idempotency_key_reused"
        await _never_runs_again(temporal_client, sub_id)
        missing = await api.get(f"/v1/subscriptions/{sub_id}")
        assert missing.status_code == 404

        # The payment made with the same key is untouched and still replays as a payment.
        replayed = await create_payment(api, pay_body, key=key)
        assert replayed.status_code == 201 and replayed.json()["id"] == payment_id
        assert replayed.headers.get("Idempotent-Replayed") == "true"


async def test_a_subscription_started_before_the_register_is_registered_by_its_next_retry(
    app_settings: Settings, temporal_client: Client, engine: AsyncEngine
) -> None:
    """A subscription started without a register row (before this change) is found by
    Temporal's duplicate check on the next retry of its key, which registers it as started (and
    refuses another body): from then on the register answers even after Temporal forgets it."""
    key = f"legacy-sub-{uuid.uuid4().hex}"
    request = SubscriptionRequest.model_validate(_subscription_body())
    sub_id = subscription_id_for(CLIENT, key)
    workflow_input = SubscriptionWorkflowInput(
        subscription_id=sub_id,
        client_id=CLIENT,
        request=request,
        fingerprint=request.fingerprint(),
        policy=subscription_policy(app_settings, request),
    )
    await temporal_client.start_workflow(
        SubscriptionWorkflow.run,
        workflow_input,
        id=sub_id,
        task_queue=app_settings.task_queue,
        search_attributes=initial_subscription_search_attributes(workflow_input),
        memo={"fingerprint": request.fingerprint()},
    )
    assert await _register_row(engine, sub_id) is None
    body = request.model_dump(mode="json", exclude_defaults=True)
    async with api_client(app_settings, temporal_client, TEST_API_KEY) as api:
        other = await api.post(
            "/v1/subscriptions",
            json={**body, "quantity": 3},
            headers={"Idempotency-Key": key},
        )
        assert (
            other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"
        )
        same = await api.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": key})
        assert same.status_code == 201, same.text
        assert same.json()["id"] == sub_id and same.headers.get("Idempotent-Replayed") == "true"
        row = await _register_row(engine, sub_id)
        assert row is not None and row["started_at"] is not None
        assert row["fingerprint"] == request.fingerprint()
        await api.post(f"/v1/subscriptions/{sub_id}/cancel", json={})
