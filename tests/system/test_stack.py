"""The embedded stack starts and each part answers for real."""

from __future__ import annotations

import uuid
from datetime import timedelta

from confluent_kafka import Consumer, Producer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

from infra.database import current_revision, migrate
from infra.embedded.stack import Stack
from workflows.search_attributes import ALL_KEYS


@activity.defn
async def greet(name: str) -> str:
    return f"hello {name}"


@workflow.defn(sandboxed=False)
class GreetingWorkflow:
    @workflow.run
    async def run(self, name: str) -> str:
        return await workflow.execute_activity(
            greet, name, start_to_close_timeout=timedelta(seconds=10)
        )


async def test_temporal_answers_and_runs_a_workflow_with_an_activity(stack: Stack) -> None:
    client = await Client.connect(stack.temporal_address)
    assert await client.service_client.check_health()
    queue = f"q-{uuid.uuid4()}"
    async with Worker(client, task_queue=queue, workflows=[GreetingWorkflow], activities=[greet]):
        result = await client.execute_workflow(
            GreetingWorkflow.run, "ledger", id=f"wf-{uuid.uuid4()}", task_queue=queue
        )
    assert result == "hello ledger"


async def test_search_attributes_are_registered(stack: Stack) -> None:
    from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest

    client = await Client.connect(stack.temporal_address)
    listed = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace="default")
    )
    assert {k.name for k in ALL_KEYS} <= set(listed.custom_attributes)


def test_keyed_message_round_trips_with_key_and_headers(stack: Stack) -> None:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    producer = Producer(
        {"bootstrap.servers": stack.kafka_bootstrap_servers, "enable.idempotence": True}
    )
    delivered: list[str] = []
    producer.produce(
        topic,
        key=b"pay_123",
        value=b'{"ok":true}',
        headers=[("ce_id", b"evt-1"), ("ce_type", b"com.paysaga.test")],
        on_delivery=lambda err, msg: delivered.append("ok" if err is None else str(err)),
    )
    producer.flush(10)
    assert delivered == ["ok"]
    consumer = Consumer(
        {
            "bootstrap.servers": stack.kafka_bootstrap_servers,
            "group.id": f"g-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 2000,
        }
    )
    consumer.subscribe([topic])
    try:
        message = None
        for _ in range(100):
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                break
        assert message is not None and message.error() is None
        assert message.key() == b"pay_123"
        assert message.value() == b'{"ok":true}'
        assert dict(message.headers() or []) == {"ce_id": b"evt-1", "ce_type": b"com.paysaga.test"}
    finally:
        consumer.close()


async def test_schema_migrates_from_empty_and_remigrating_is_a_no_op(
    stack: Stack, engine: AsyncEngine
) -> None:
    assert current_revision(stack.database_url) is not None
    async with engine.connect() as conn:
        before = (
            await conn.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname='public'"))
        ).scalar()
    migrate(stack.database_url)
    async with engine.connect() as conn:
        after = (
            await conn.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname='public'"))
        ).scalar()
        isolation = (await conn.execute(text("SHOW transaction_isolation"))).scalar()
    assert before == after
    assert isolation == "serializable"
    async with engine.connect() as conn:
        tables = set(
            (await conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname='public'")))
            .scalars()
            .all()
        )
    assert {
        "accounts",
        "payments",
        "ledger_transactions",
        "ledger_entries",
        "outbox_events",
    } <= tables
