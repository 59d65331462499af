"""Run by test_exit_status.py in a child pytest: a real Temporal round trip, then exit.

Not collected by the main run (its name does not match test_*.py)."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from infra.embedded.temporal import temporal_binary


@activity.defn
async def echo(value: str) -> str:
    return value


@workflow.defn(sandboxed=False)
class EchoWorkflow:
    @workflow.run
    async def run(self, value: str) -> str:
        return await workflow.execute_activity(
            echo, value, start_to_close_timeout=timedelta(seconds=10)
        )


async def test_round_trip_then_exit() -> None:
    async with (
        await WorkflowEnvironment.start_local(
            dev_server_existing_path=temporal_binary(),
            dev_server_extra_args=["--headless", "--log-level", "error"],
        ) as env,
        Worker(env.client, task_queue="probe", workflows=[EchoWorkflow], activities=[echo]),
    ):
        result = await env.client.execute_workflow(
            EchoWorkflow.run, "ok", id=f"probe-{uuid.uuid4()}", task_queue="probe"
        )
    assert result == "ok"
    assert os.environ.get("PAYSAGA_PROBE_FAIL") != "1", "this run is meant to fail"
