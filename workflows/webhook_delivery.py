"""WebhookDeliveryWorkflow: one event to one merchant endpoint, until it is accepted.

    attempt ─ delivered (2xx) ──────────────────────────────────────────► delivered
       │ failed
       ▼
    wait (exponential backoff, ±10 %) ─ still within 3 days ─► attempt again
       │ past the retry window
       ▼
    give up: disable the endpoint if nothing reached it since this delivery began
             (recording a `webhook_endpoint.disabled` event) ──────────► failed

One workflow per (endpoint, event), id `whdel_<endpoint>_<event>`: starting it twice finds the
first, each delivery has its own retry timeline (one failing event never holds back the next),
and a delivery's state is just this loop. Deliveries run on their own task queue with bounded
activity slots, apart from payments; docs/webhooks.md says why this shape.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.webhooks import WebhookActivities
    from domain.webhooks import (
        AttemptOutcome,
        DeliveryAttempt,
        DeliveryGaveUp,
        DeliveryResult,
        WebhookDeliveryInput,
    )

# Retries of the activity itself, not of the delivery: the database away, the worker lost,
# or the endpoint's share of slots taken ("busy"). None of them is an attempt at the endpoint.
_ACTIVITY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)
# Room for the database write after the HTTP attempt.
_BOOKKEEPING = timedelta(seconds=30)


@workflow.defn(name="WebhookDeliveryWorkflow")
class WebhookDeliveryWorkflow:
    @workflow.init
    def __init__(self, input: WebhookDeliveryInput) -> None:
        self.input = input
        self.attempts = 0
        self.last: AttemptOutcome | None = None

    @workflow.run
    async def run(self, input: WebhookDeliveryInput) -> DeliveryResult:
        began = workflow.info().workflow_start_time
        give_up_at = began + timedelta(seconds=input.retry.give_up_after_seconds)
        while True:
            outcome = await self.attempt()
            if outcome.delivered:
                return DeliveryResult(status="delivered", attempts=self.attempts)
            if outcome.stopped:
                return DeliveryResult(
                    status="stopped", attempts=self.attempts, detail=outcome.stopped
                )
            wait = input.retry.delay_after(self.attempts, workflow.random().random())
            if workflow.now() + wait > give_up_at:
                break
            workflow.set_current_details(
                f"attempt {self.attempts} failed ({outcome.error}); next in {wait}"
            )
            await workflow.sleep(wait)
        disabled = False
        if not input.manual:
            disabled = await workflow.execute_activity_method(
                WebhookActivities.give_up_webhook_delivery,
                DeliveryGaveUp(
                    endpoint_id=input.endpoint_id,
                    event_id=input.event_id,
                    delivery_id=workflow.info().workflow_id,
                    began_at=began,
                    attempts=self.attempts,
                    last_error=self.last.error if self.last else None,
                ),
                start_to_close_timeout=_BOOKKEEPING,
                retry_policy=_ACTIVITY_RETRY,
            )
        return DeliveryResult(
            status="failed",
            attempts=self.attempts,
            detail=self.last.error if self.last else None,
            endpoint_disabled=disabled,
        )

    async def attempt(self) -> AttemptOutcome:
        self.attempts += 1
        timeout = self.input.retry.attempt_timeout_seconds
        self.last = await workflow.execute_activity_method(
            WebhookActivities.deliver_webhook,
            DeliveryAttempt(
                endpoint_id=self.input.endpoint_id,
                event_id=self.input.event_id,
                delivery_id=workflow.info().workflow_id,
                attempt=self.attempts,
                manual=self.input.manual,
                timeout_seconds=timeout,
            ),
            start_to_close_timeout=timedelta(seconds=timeout) + _BOOKKEEPING,
            retry_policy=_ACTIVITY_RETRY,
        )
        return self.last

    @workflow.query(name="state")
    def state(self) -> DeliveryResult:
        return DeliveryResult(
            status="pending", attempts=self.attempts, detail=self.last.error if self.last else None
        )
