"""The Kafka intake over the real broker and Temporal: a valid request becomes a payment, a
replayed one starts nothing new, an invalid one lands on the DLQ with its reason, and an
offset is committed only once Temporal accepted the start."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode

from domain.events import REQUESTS_DLQ_TOPIC, REQUESTS_TOPIC
from domain.payment import PaymentState, payment_id_for
from infra.process import free_port
from infra.stack import Stack
from intake import DEFAULT_CLIENT_ID, PaymentIntake, Refused, read_payment_order, running_intake
from settings import Settings
from tests.kafka_helpers import ConsumedEvent, consume_events
from tests.saga_helpers import ledger_rows, payment_body

# One group for every intake in this module: each picks up where the last one committed.
GROUP = f"intake-test-{uuid.uuid4().hex[:8]}"

pytestmark = pytest.mark.usefixtures("worker")


def produce(
    stack: Stack, value: bytes | None, headers: dict[str, str], key: str | None = None
) -> tuple[int, int]:
    """Send one request and wait for the broker; returns its (partition, offset)."""
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap_servers, "acks": "all"})
    where: list[tuple[int, int]] = []

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        where.append((msg.partition(), msg.offset()))

    producer.produce(
        REQUESTS_TOPIC,
        value=value,
        key=key.encode() if key else None,
        headers=list(headers.items()),
        on_delivery=delivered,
    )
    assert producer.flush(10) == 0
    return where[0]


def committed_offset(stack: Stack, partition: int) -> int:
    """The group's committed offset on `partition` (negative: nothing committed)."""
    reader = Consumer({"bootstrap.servers": stack.kafka_bootstrap_servers, "group.id": GROUP})
    try:
        [found] = reader.committed([TopicPartition(REQUESTS_TOPIC, partition)], timeout=10)
        return int(found.offset)
    finally:
        reader.close()


async def eventually(check: Any, timeout: float = 30.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("never happened")
        await asyncio.sleep(0.2)


async def payment_state(temporal: Client, payment_id: str) -> PaymentState | None:
    try:
        state: PaymentState = await temporal.get_workflow_handle(payment_id).query(
            "state", result_type=PaymentState
        )
        return state
    except RPCError as exc:
        if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.FAILED_PRECONDITION):
            return None
        raise


async def succeeded(temporal: Client, payment_id: str) -> PaymentState:
    async def check() -> PaymentState | None:
        state = await payment_state(temporal, payment_id)
        return state if state is not None and state.status == "succeeded" else None

    result: PaymentState = await eventually(check)
    return result


async def committed_past(stack: Stack, partition: int, offset: int) -> None:
    async def check() -> bool:
        return await asyncio.to_thread(committed_offset, stack, partition) > offset

    await eventually(check)


@pytest.fixture
async def intake(app_settings: Settings, temporal_client: Client) -> AsyncIterator[PaymentIntake]:
    async with running_intake(app_settings, temporal_client, group_id=GROUP) as running:
        yield running


def request_headers(key: str, **extra: str) -> dict[str, str]:
    return {"idempotency-key": key, "content-type": "application/json", **extra}


async def test_a_valid_request_becomes_a_payment_and_its_offset_is_committed(
    intake: PaymentIntake, stack: Stack, temporal_client: Client, engine: AsyncEngine
) -> None:
    key = f"billing-{uuid.uuid4().hex}"
    partition, offset = produce(
        stack, json.dumps(payment_body()).encode(), request_headers(key, **{"client-id": "billing"})
    )
    payment_id = payment_id_for("billing", key)
    state = await succeeded(temporal_client, payment_id)
    assert state.client_id == "billing"
    await committed_past(stack, partition, offset)
    rows = await ledger_rows(engine, payment_id)
    assert [(r["kind"], r["total"]) for r in rows] == [("payment", 0)]


async def test_a_replayed_request_starts_nothing_new(
    intake: PaymentIntake, stack: Stack, temporal_client: Client, engine: AsyncEngine
) -> None:
    key = f"replay-{uuid.uuid4().hex}"
    body = json.dumps(payment_body()).encode()
    produce(stack, body, request_headers(key))
    payment_id = payment_id_for(DEFAULT_CLIENT_ID, key)
    await succeeded(temporal_client, payment_id)
    first_run = (await temporal_client.get_workflow_handle(payment_id).describe()).run_id

    # The billing system did not see our ack and sends it twice more.
    produce(stack, body, request_headers(key))
    partition, offset = produce(stack, body, request_headers(key))
    await committed_past(stack, partition, offset)

    runs = [w async for w in temporal_client.list_workflows(f'WorkflowId = "{payment_id}"')]
    assert [w.run_id for w in runs] == [first_run]
    payments = [r for r in await ledger_rows(engine, payment_id) if r["kind"] == "payment"]
    assert len(payments) == 1


async def test_invalid_requests_go_to_the_dead_letter_topic_with_their_reason(
    intake: PaymentIntake, stack: Stack, temporal_client: Client
) -> None:
    run = uuid.uuid4().hex[:8]
    reused_key = f"reused-{run}"
    produce(stack, json.dumps(payment_body()).encode(), request_headers(reused_key))
    await succeeded(temporal_client, payment_id_for(DEFAULT_CLIENT_ID, reused_key))

    cases: dict[str, tuple[bytes, dict[str, str], str]] = {
        f"bad-json-{run}": (b'{"amount": 25', request_headers(f"k-json-{run}"), "invalid_json"),
        f"no-key-{run}": (
            json.dumps(payment_body()).encode(),
            {"content-type": "application/json"},
            "idempotency_key_missing",
        ),
        f"card-{run}": (
            json.dumps(payment_body(description="card 4242 4242 4242 4242")).encode(),
            request_headers(f"k-card-{run}"),
            "card_data_not_allowed",
        ),
        f"schema-{run}": (
            json.dumps(payment_body(amount="25.00")).encode(),
            request_headers(f"k-schema-{run}"),
            "invalid_request",
        ),
        f"reused-{run}": (
            json.dumps(payment_body(amount=999)).encode(),
            request_headers(reused_key),
            "idempotency_key_reused",
        ),
    }
    last: dict[int, int] = {}
    for kafka_key, (value, headers, _) in cases.items():
        partition, offset = produce(
            stack, value, {**headers, "source-system": "billing-eu"}, key=kafka_key
        )
        last[partition] = max(offset, last.get(partition, -1))

    def all_arrived(events: list[ConsumedEvent]) -> bool:
        return set(cases) <= {e.key for e in events}

    dead = {
        e.key: e
        for e in await asyncio.to_thread(
            consume_events,
            stack.kafka_bootstrap_servers,
            [REQUESTS_DLQ_TOPIC],
            until=all_arrived,
            timeout=30,
        )
        if e.key in cases
    }
    assert set(dead) == set(cases)
    for kafka_key, (value, _, code) in cases.items():
        letter = dead[kafka_key]
        assert letter.headers["dlq-error-code"] == code, (kafka_key, letter.headers)
        assert letter.headers["dlq-reason"]
        assert letter.headers["source-system"] == "billing-eu"  # original headers kept
        assert letter.headers["dlq-source-topic"] == REQUESTS_TOPIC
        if code == "card_data_not_allowed":
            assert letter.value == b""  # the card-bearing body is not copied anywhere
            assert "4242" not in json.dumps(letter.headers)
        else:
            assert letter.value == value
    assert "amount" in dead[f"schema-{run}"].headers["dlq-reason"]

    # Nothing was started for them, and every one of them was committed.
    for key in (f"k-json-{run}", f"k-card-{run}", f"k-schema-{run}"):
        assert await payment_state(temporal_client, payment_id_for(DEFAULT_CLIENT_ID, key)) is None
    reused = await payment_state(temporal_client, payment_id_for(DEFAULT_CLIENT_ID, reused_key))
    assert reused is not None and reused.request.amount != 999
    for partition, offset in last.items():
        await committed_past(stack, partition, offset)


async def test_the_offset_waits_until_temporal_accepts_the_start(
    app_settings: Settings, stack: Stack, temporal_client: Client
) -> None:
    # A client for a namespace Temporal does not have: every start is refused.
    unaccepted = await Client.connect(
        temporal_client.service_client.config.target_host,
        namespace="no-such-namespace",
        data_converter=pydantic_data_converter,
    )
    key = f"outage-{uuid.uuid4().hex}"
    payment_id = payment_id_for(DEFAULT_CLIENT_ID, key)
    retried = REGISTRY.get_sample_value("paysaga_intake_messages_total", {"outcome": "retried"})
    async with running_intake(app_settings, unaccepted, group_id=GROUP):
        body = json.dumps(payment_body()).encode()
        partition, offset = produce(stack, body, request_headers(key))

        async def tried_twice() -> bool:
            now = REGISTRY.get_sample_value("paysaga_intake_messages_total", {"outcome": "retried"})
            return (now or 0) >= (retried or 0) + 2

        await eventually(tried_twice)
        assert await asyncio.to_thread(committed_offset, stack, partition) <= offset
    assert await payment_state(temporal_client, payment_id) is None

    # Temporal is back: the same group reads the uncommitted message again and starts it.
    async with running_intake(app_settings, temporal_client, group_id=GROUP):
        await succeeded(temporal_client, payment_id)
        await committed_past(stack, partition, offset)


async def test_the_worker_process_runs_the_intake_logs_json_and_serves_metrics(
    stack: Stack, temporal_client: Client
) -> None:
    """`python -m worker` as deployed: its own task queue, the intake switched on, JSON logs,
    metrics on its ports, and a clean exit on SIGTERM."""
    metrics_port, sdk_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    env.update(
        PAYSAGA_HOME=str(stack.home),
        PAYSAGA_TEMPORAL_ADDRESS=stack.temporal_address,
        PAYSAGA_KAFKA_BOOTSTRAP_SERVERS=stack.kafka_bootstrap_servers,
        PAYSAGA_DATABASE_URL=stack.database_url,
        PAYSAGA_TASK_QUEUE=f"process-{uuid.uuid4().hex[:8]}",
        PAYSAGA_KAFKA_INTAKE_ENABLED="true",
        PAYSAGA_KAFKA_INTAKE_GROUP=GROUP,
        PAYSAGA_KAFKA_SESSION_TIMEOUT_MS="2000",
        PAYSAGA_WORKER_METRICS_PORT=str(metrics_port),
        PAYSAGA_TEMPORAL_METRICS_PORT=str(sdk_port),
        PAYSAGA_LOG_JSON="true",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        env=env,
        cwd=Path(__file__).parent.parent,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        key = f"process-{uuid.uuid4().hex}"
        produce(stack, json.dumps(payment_body()).encode(), request_headers(key))
        payment_id = payment_id_for(DEFAULT_CLIENT_ID, key)
        state = await succeeded(temporal_client, payment_id)
        assert state.crm_sync == "not_configured"  # the process's own settings applied
        async with httpx.AsyncClient() as http:
            ours = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
            sdk = (await http.get(f"http://127.0.0.1:{sdk_port}/metrics")).text
        assert 'paysaga_intake_messages_total{outcome="started"} 1.0' in ours
        assert 'paysaga_payments_total{outcome="succeeded"} 1.0' in ours
        assert env["PAYSAGA_TASK_QUEUE"] in sdk
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()[-3000:]
    lines = [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]
    steps = {r["activity"] for r in lines if r.get("payment_id") == payment_id}
    assert {"assess_payment", "publish_payment_event"} <= steps, lines[-5:]


def test_a_numeric_invoice_number_is_a_fine_idempotency_key() -> None:
    """Keys are hashed into the payment id and never stored: a 16-digit invoice number that
    happens to pass the Luhn check must not be mistaken for card data."""
    body = json.dumps(payment_body()).encode()
    order = read_payment_order(body, [("idempotency-key", b"4242424242424242")], 65536)
    assert order.idempotency_key == "4242424242424242"
    assert order.client_id == DEFAULT_CLIENT_ID
    with pytest.raises(Refused) as refused:
        read_payment_order(body, [("idempotency-key", b"short")], 65536)
    assert refused.value.code == "idempotency_key_invalid"
    with pytest.raises(Refused) as too_big:
        read_payment_order(body, [("idempotency-key", b"long-enough-key")], 10)
    assert too_big.value.code == "request_too_large"
