"""The benchmark's floor: a workflow with the same shape as a payment and empty bodies.

`paysaga bench` runs it on the same Temporal server in the same run, so the ratio
paysaga / floor says how much of the server's capacity the payment logic itself costs. The
shape is read from a finished payment: on the default stack (a CRM sandbox) that is five local
steps (the CRM notification's first attempt is local, workflows/local_first.py); through the
sandbox acquirer, the authorization is a regular activity, which the floor runs with the CRM's
timeouts.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow

REGULAR = "regular"
LOCAL = "local"


@activity.defn(name="floor_step")
async def floor_step() -> None:
    return None


@workflow.defn(name="FloorWorkflow")
class FloorWorkflow:
    @workflow.run
    async def run(self, shape: list[str]) -> int:
        for kind in shape:
            if kind == LOCAL:
                await workflow.execute_local_activity(
                    floor_step, start_to_close_timeout=timedelta(seconds=10)
                )
            else:
                # A payment's regular step (the acquirer's authorization; the CRM's notice before
                # PATCH_LOCAL_FIRST): the CRM's timeouts.
                await workflow.execute_activity(
                    floor_step,
                    start_to_close_timeout=timedelta(seconds=30),
                    schedule_to_close_timeout=timedelta(hours=24),
                )
        return len(shape)
