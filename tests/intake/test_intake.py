"""The Kafka intake over the real broker and Temporal: a valid request becomes a payment of the
client whose topic it came from, a replayed one starts nothing new, an invalid one (or one
claiming another client) lands on the DLQ with its reason, and an offset is committed only
once Temporal accepted the start or the broker acknowledged the dead letter."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode

from domain.events import REQUESTS_DLQ_TOPIC
from domain.payment import PaymentState, payment_id_for
from infra.embedded.process import free_port
from infra.embedded.stack import Stack
from infra.topics import ensure_topics
from intake.consumer import PaymentIntake, running_intake
from intake.messages import Refused, read_payment_order
from settings import Settings, intake_topic
from tests.helpers.kafka import ConsumedEvent, consume_events
from tests.helpers.paths import REPO
from tests.helpers.saga import ledger_rows, payment_body

# One group for every intake in this module: each picks up where the last one committed.
GROUP = f"intake-test-{uuid.uuid4().hex[:8]}"
# Two intake clients, each with its own topic: the topic says who asks.
BILLING, ERP = "billing", "erp"
BILLING_TOPIC, ERP_TOPIC = intake_topic(BILLING), intake_topic(ERP)

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def intake_settings(app_settings: Settings, stack: Stack) -> Settings:
    ensure_topics(stack.kafka_bootstrap_servers, (BILLING_TOPIC, ERP_TOPIC))
    return app_settings.model_copy(update={"kafka_intake_clients": [BILLING, ERP]})


def produce(
    stack: Stack,
    value: bytes | None,
    headers: dict[str, str],
    key: str | None = None,
    topic: str = BILLING_TOPIC,
) -> tuple[int, int]:
    """Send one request and wait for the broker; returns its (partition, offset)."""
    producer = Producer({"bootstrap.servers": stack.kafka_bootstrap_servers, "acks": "all"})
    where: list[tuple[int, int]] = []

    def delivered(err: Any, msg: Any) -> None:
        assert err is None, err
        where.append((msg.partition(), msg.offset()))

    producer.produce(
        topic,
        value=value,
        key=key.encode() if key else None,
        headers=list(headers.items()),
        on_delivery=delivered,
    )
    assert producer.flush(10) == 0
    return where[0]


def committed_offset(stack: Stack, partition: int, topic: str = BILLING_TOPIC) -> int:
    """The group's committed offset on `partition` (negative: nothing committed)."""
    reader = Consumer({"bootstrap.servers": stack.kafka_bootstrap_servers, "group.id": GROUP})
    try:
        [found] = reader.committed([TopicPartition(topic, partition)], timeout=10)
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


async def committed_past(
    stack: Stack, partition: int, offset: int, topic: str = BILLING_TOPIC
) -> None:
    async def check() -> bool:
        return await asyncio.to_thread(committed_offset, stack, partition, topic) > offset

    await eventually(check)


@pytest.fixture
async def intake(
    intake_settings: Settings, temporal_client: Client
) -> AsyncIterator[PaymentIntake]:
    async with running_intake(intake_settings, temporal_client, group_id=GROUP) as running:
        yield running


def intake_count(outcome: str) -> float:
    value = REGISTRY.get_sample_value("paysaga_intake_messages_total", {"outcome": outcome})
    return value or 0.0


async def dead_letters(stack: Stack, keys: set[str]) -> dict[str, ConsumedEvent]:
    """The DLQ records with these Kafka keys (waits until all arrived)."""

    def all_arrived(events: list[ConsumedEvent]) -> bool:
        return keys <= {e.key for e in events}

    events = await asyncio.to_thread(
        consume_events,
        stack.kafka_bootstrap_servers,
        [REQUESTS_DLQ_TOPIC],
        until=all_arrived,
        timeout=30,
    )
    return {e.key: e for e in events if e.key in keys}


def request_headers(key: str, **extra: str) -> dict[str, str]:
    return {"idempotency-key": key, "content-type": "application/json", **extra}


async def test_a_valid_request_becomes_a_payment_and_its_offset_is_committed(
    intake: PaymentIntake, stack: Stack, temporal_client: Client, engine: AsyncEngine
) -> None:
    key = f"billing-{uuid.uuid4().hex}"
    partition, offset = produce(
        stack, json.dumps(payment_body()).encode(), request_headers(key, **{"client-id": BILLING})
    )
    payment_id = payment_id_for(BILLING, key)
    state = await succeeded(temporal_client, payment_id)
    assert state.client_id == BILLING
    await committed_past(stack, partition, offset)
    rows = await ledger_rows(engine, payment_id)
    assert [(r["kind"], r["total"]) for r in rows] == [("payment", 0)]


async def test_a_replayed_request_starts_nothing_new(
    intake: PaymentIntake, stack: Stack, temporal_client: Client, engine: AsyncEngine
) -> None:
    key = f"replay-{uuid.uuid4().hex}"
    body = json.dumps(payment_body()).encode()
    produce(stack, body, request_headers(key))
    payment_id = payment_id_for(BILLING, key)
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
    await succeeded(temporal_client, payment_id_for(BILLING, reused_key))

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

    dead = await dead_letters(stack, set(cases))
    assert set(dead) == set(cases)
    for kafka_key, (value, _, code) in cases.items():
        letter = dead[kafka_key]
        assert letter.headers["dlq-error-code"] == code, (kafka_key, letter.headers)
        assert letter.headers["dlq-reason"]
        assert letter.headers["source-system"] == "billing-eu"  # original headers kept
        assert letter.headers["dlq-source-topic"] == BILLING_TOPIC
        assert letter.headers["dlq-client-id"] == BILLING
        if code == "card_data_not_allowed":
            assert letter.value == b""  # the card-bearing body is not copied anywhere
            assert "4242" not in json.dumps(letter.headers)
        else:
            assert letter.value == value
    assert "amount" in dead[f"schema-{run}"].headers["dlq-reason"]

    # Nothing was started for them, and every one of them was committed.
    for key in (f"k-json-{run}", f"k-card-{run}", f"k-schema-{run}"):
        assert await payment_state(temporal_client, payment_id_for(BILLING, key)) is None
    reused = await payment_state(temporal_client, payment_id_for(BILLING, reused_key))
    assert reused is not None and reused.request.amount != 999
    for partition, offset in last.items():
        await committed_past(stack, partition, offset)


async def test_the_topic_says_who_asks_and_a_header_claiming_another_client_is_refused(
    intake: PaymentIntake, stack: Stack, temporal_client: Client
) -> None:
    """A producer writes to its own topic only (Kafka ACLs); the `client-id` header cannot
    move its request to another client. The same key on two clients' topics is two payments."""
    run = uuid.uuid4().hex[:8]
    key = f"order-{run}"
    body = json.dumps(payment_body()).encode()
    produce(stack, body, request_headers(key), topic=ERP_TOPIC)
    produce(stack, body, request_headers(key, **{"client-id": BILLING}))
    erp = await succeeded(temporal_client, payment_id_for(ERP, key))
    billing = await succeeded(temporal_client, payment_id_for(BILLING, key))
    assert (erp.client_id, billing.client_id) == (ERP, BILLING)
    assert erp.id != billing.id

    # Billing's producer claims to be the ERP: refused, and nothing starts for either client.
    forged_key = f"forged-{run}"
    partition, offset = produce(
        stack, body, request_headers(forged_key, **{"client-id": ERP}), key=f"forged-{run}"
    )
    letter = (await dead_letters(stack, {f"forged-{run}"}))[f"forged-{run}"]
    assert letter.headers["dlq-error-code"] == "client_id_mismatch"
    assert letter.headers["dlq-client-id"] == BILLING
    assert letter.headers["dlq-source-topic"] == BILLING_TOPIC
    await committed_past(stack, partition, offset)
    for client in (ERP, BILLING):
        assert await payment_state(temporal_client, payment_id_for(client, forged_key)) is None


async def test_a_dead_letter_the_broker_refuses_is_not_committed(
    intake_settings: Settings, stack: Stack, temporal_client: Client
) -> None:
    """The broker refuses the dead letter (as it does a write the intake's principal has no
    ACL for): librdkafka reports the error and empties its queue, so `flush()` returns 0. Only
    the delivery report tells; the message stays uncommitted and is dead-lettered later."""
    unwritable = "payments.requests.dlq/unwritable"  # an invalid topic name: always refused
    kafka_key = f"bad-{uuid.uuid4().hex[:8]}"
    retried = intake_count("retried")
    # Refusals of an unknown topic can also surface as a message timeout: keep it short.
    impatient = intake_settings.model_copy(update={"kafka_message_timeout_ms": 3000})
    async with running_intake(
        impatient, temporal_client, group_id=GROUP, dead_letter_topic=unwritable
    ):
        partition, offset = produce(
            stack, b'{"amount": 25', request_headers(f"k-{kafka_key}"), key=kafka_key
        )

        async def refused_twice() -> bool:
            return intake_count("retried") >= retried + 2

        await eventually(refused_twice, timeout=60)
        assert await asyncio.to_thread(committed_offset, stack, partition) <= offset

    # The dead-letter topic is writable again: the same message is read again and delivered.
    dead_lettered = intake_count("dead_lettered")
    async with running_intake(intake_settings, temporal_client, group_id=GROUP):
        letter = (await dead_letters(stack, {kafka_key}))[kafka_key]
        assert letter.headers["dlq-error-code"] == "invalid_json"
        await committed_past(stack, partition, offset)
    assert intake_count("dead_lettered") >= dead_lettered + 1


async def test_the_offset_waits_until_temporal_accepts_the_start(
    intake_settings: Settings, stack: Stack, temporal_client: Client
) -> None:
    # A client for a namespace Temporal does not have: every start is refused.
    unaccepted = await Client.connect(
        temporal_client.service_client.config.target_host,
        namespace="no-such-namespace",
        data_converter=pydantic_data_converter,
    )
    key = f"outage-{uuid.uuid4().hex}"
    payment_id = payment_id_for(BILLING, key)
    retried = REGISTRY.get_sample_value("paysaga_intake_messages_total", {"outcome": "retried"})
    async with running_intake(intake_settings, unaccepted, group_id=GROUP):
        body = json.dumps(payment_body()).encode()
        partition, offset = produce(stack, body, request_headers(key))

        async def tried_twice() -> bool:
            now = REGISTRY.get_sample_value("paysaga_intake_messages_total", {"outcome": "retried"})
            return (now or 0) >= (retried or 0) + 2

        await eventually(tried_twice)
        assert await asyncio.to_thread(committed_offset, stack, partition) <= offset
    assert await payment_state(temporal_client, payment_id) is None

    # Temporal is back: the same group reads the uncommitted message again and starts it.
    async with running_intake(intake_settings, temporal_client, group_id=GROUP):
        await succeeded(temporal_client, payment_id)
        await committed_past(stack, partition, offset)


async def test_the_worker_process_runs_the_intake_logs_json_and_serves_metrics(
    stack: Stack, temporal_client: Client, intake_settings: Settings
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
        PAYSAGA_KAFKA_INTAKE_CLIENTS=",".join(intake_settings.kafka_intake_clients),
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
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        key = f"process-{uuid.uuid4().hex}"
        produce(stack, json.dumps(payment_body()).encode(), request_headers(key), topic=ERP_TOPIC)
        payment_id = payment_id_for(ERP, key)
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


def test_a_numeric_invoice_number_is_a_fine_idempotency_key_a_card_number_is_not() -> None:
    """Keys are hashed into the payment id, but the key header is copied to the DLQ when a
    message is refused: a key that is a card number is refused like one in the body."""
    body = json.dumps(payment_body()).encode()
    order = read_payment_order(body, [("idempotency-key", b"4242424242424241")], 65536, BILLING)
    assert order.idempotency_key == "4242424242424241"  # 16 digits, not Luhn-valid
    assert order.client_id == BILLING
    with pytest.raises(Refused) as card:
        read_payment_order(body, [("idempotency-key", b"4242424242424242")], 65536, BILLING)
    assert card.value.code == "card_data_not_allowed"
    assert "4242" not in card.value.reason
    with pytest.raises(Refused) as refused:
        read_payment_order(body, [("idempotency-key", b"short")], 65536, BILLING)
    assert refused.value.code == "idempotency_key_invalid"
    with pytest.raises(Refused) as dotted:
        read_payment_order(body, [("idempotency-key", b"order:1001.a")], 65536, BILLING)
    assert dotted.value.code == "idempotency_key_invalid"
    with pytest.raises(Refused) as too_big:
        read_payment_order(body, [("idempotency-key", b"long-enough-key")], 10, BILLING)
    assert too_big.value.code == "request_too_large"
