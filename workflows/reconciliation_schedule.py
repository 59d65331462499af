"""The Temporal Schedule that runs the daily reconciliation (`paysaga recon schedule`)."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from settings import Settings
from workflows.reconciliation import (
    SCHEDULE_ID,
    WORKFLOW_ID,
    DailyReconciliationRequest,
    DailyReconciliationWorkflow,
)


def reconciliation_schedule(settings: Settings) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            DailyReconciliationWorkflow.run,
            DailyReconciliationRequest(),
            id=WORKFLOW_ID,
            task_queue=settings.task_queue,
            execution_timeout=timedelta(hours=20),
        ),
        spec=ScheduleSpec(cron_expressions=[settings.recon_schedule_cron]),
        # One run at a time; a run missed while Temporal was down is made up within 3 days.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP, catchup_window=timedelta(days=3)),
    )


async def ensure_reconciliation_schedule(client: Client, settings: Settings) -> bool:
    """Create the schedule, or bring an existing one to these settings; True if created."""
    schedule = reconciliation_schedule(settings)
    try:
        await client.create_schedule(SCHEDULE_ID, schedule)
        return True
    except ScheduleAlreadyRunningError:

        def updated(_: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(SCHEDULE_ID).update(updated)
        return False
