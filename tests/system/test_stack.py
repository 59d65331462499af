"""The embedded stack starts and each part answers for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psutil
import pytest
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


# A supervisor in miniature: it starts the CRM sandbox as the stack does, prints its pid, waits.
SUPERVISOR = """
import sys, time
from pathlib import Path
from infra.embedded.process import free_port
from infra.embedded.sandboxes import SandboxService, load_or_create_secret
home = Path(sys.argv[1])
load_or_create_secret(home / "secret")
crm = SandboxService("crm", free_port(), home / "crm", ["--secret-file", str(home / "secret")])
crm.start()
print(crm.process.popen.pid, flush=True)
time.sleep(120)
"""


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)  # exited, unreaped
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sandbox_dies_with_its_supervisor_even_when_that_is_sigkilled(tmp_path: Path) -> None:
    """A child runs in its own session, so a killed pytest or a `kill -9` of `paysaga run` used
    to leave `python -m sandboxes.…` orphaned; the kernel now takes it down with its parent."""
    supervisor = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    child: int | None = None
    try:
        assert supervisor.stdout is not None
        line = supervisor.stdout.readline()  # the sandbox answered /healthz (30 s at most)
        assert line.strip().isdigit(), f"the supervisor started no sandbox: {line!r}"
        child = int(line)
        assert "sandboxes.crm" in " ".join(psutil.Process(child).cmdline())
        assert psutil.Process(child).ppid() == supervisor.pid
        assert os.getsid(child) != os.getsid(supervisor.pid)  # its own session, as before

        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(10)
        deadline = time.monotonic() + 5
        while not _gone(child):
            assert time.monotonic() < deadline, "the sandbox outlived its SIGKILLed supervisor"
            time.sleep(0.05)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)
        if child is not None and not _gone(child):
            psutil.Process(child).kill()  # only the sandbox this test started
