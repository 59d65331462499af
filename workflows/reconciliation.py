"""The daily reconciliation (docs/reconciliation.md): fetch the acquirer's settlement file of
the day before and import it. Started by a Temporal Schedule (`paysaga recon schedule`), so a
missed day is caught up by the schedule's own catch-up window and two runs never overlap.

The step is idempotent (the copy is saved whole or not at all; the import is keyed by the
file's hash), so a retry or a re-run of a day does no harm."""

from __future__ import annotations

from datetime import date, timedelta

from pydantic import BaseModel
from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.reconciliation import (
        SETTLEMENT_FILE_INVALID,
        ImportResult,
        ReconciliationActivities,
        SettlementDay,
    )

SCHEDULE_ID = "paysaga-daily-reconciliation"
WORKFLOW_ID = "reconciliation-daily"


class DailyReconciliationRequest(BaseModel):
    # None: the day before the run (UTC), as a scheduled run wants.
    day: date | None = None


@workflow.defn(name="DailyReconciliation")
class DailyReconciliationWorkflow:
    @workflow.run
    async def run(self, request: DailyReconciliationRequest) -> ImportResult:
        day = request.day or (workflow.now().date() - timedelta(days=1))
        # The acquirer may publish late or be down: keep asking for hours, not minutes. A file
        # that cannot be imported as it is waits for an operator (non-retryable).
        return await workflow.execute_activity_method(
            ReconciliationActivities.import_settlement_day,
            SettlementDay(day=day),
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=30),
                maximum_interval=timedelta(minutes=30),
                maximum_attempts=30,
                non_retryable_error_types=[SETTLEMENT_FILE_INVALID],
            ),
        )
