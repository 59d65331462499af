"""SubscriptionWorkflow: one durable workflow per subscription (docs/subscriptions.md).

    created ─► (trialing) ─► wait for the period's boundary (a durable timer)
                   ▲                │
                   │                ▼
                   │   renewal = child PaymentWorkflow `renewal_payment_id(sub, period, attempt)`
                   │        succeeded ─► active, subscription.renewed
                   │        declined  ─► past_due, retried after 1, 3, 5, 7 days (dunning)
                   │                      └─ exhausted ─► canceled or unpaid (policy)
                   └── next period (continue-as-new every N periods keeps the history short)

Why workflow timers and not a Temporal Schedule: a subscription's boundaries are not a cron
calendar (an anchor on the 31st bills on the last day of shorter months; a trial moves the
first charge; a pause skips boundaries; dunning holds the next period back until the current
one is settled) and every boundary must read and change one subscription's state that signals
and updates change too (price, quantity, cancel, pause). One workflow owning that state, with a
timer to the next boundary, serializes all of it; the timer lives on the Temporal server, so it
survives worker and server restarts like any history.

A renewal is a child PaymentWorkflow whose id is derived from (subscription, period, attempt):
starting it twice (a retried workflow task, a reset) finds the same workflow (REJECT_DUPLICATE),
and a new attempt is only made after the previous one ended without moving money (declined,
rejected, failed). The child is abandoned, not awaited: it lives on for its dispute window
(refunds, disputes) while the subscription goes on; it signals its outcome (`renewal_settled`)
as soon as it has one.

Over 400 lines: one workflow: its renewal loop, dunning and the `change` Update with its
validators share one state and one history; the domain rules it applies are in
domain/subscription.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import date, datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import (
    RetryPolicy,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

with workflow.unsafe.imports_passed_through():
    from activities.crm import CrmActivities
    from activities.kafka import KafkaActivities
    from domain.errors import NON_RETRYABLE
    from domain.events import SCHEMA_VERSION, EventKind, EventRecord, event_id
    from domain.messages import CrmNotification, CrmTarget
    from domain.money import CURRENCIES
    from domain.payment import PaymentRequest, PaymentStatus, PaymentWorkflowInput
    from domain.subscription import (
        CancelChange,
        PauseChange,
        PaymentMethodChange,
        Period,
        PeriodStatus,
        PriceChange,
        RefusedChange,
        RenewalAttempt,
        RenewalSettled,
        ResumeChange,
        SubscriptionChange,
        SubscriptionState,
        SubscriptionStatus,
        SubscriptionStatusChange,
        SubscriptionWorkflowInput,
        boundary_date,
        change_adjustment,
        first_period,
        midnight,
        period_index_at,
        prorated,
        renewal_payment_id,
    )
    from workflows import search_attributes as sa
    from workflows.payment import PaymentWorkflow, initial_search_attributes

_INFRA_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=list(NON_RETRYABLE),
)
_KAFKA_TIMEOUT = timedelta(seconds=60)

# A pause sent by the operators' signal while a renewal is being charged is refused (recorded in
# `last_refused_change`) like the `change` Update refuses it; before, it was applied and the
# renewal's capture made the subscription active again. Asked only in the signal handler, only
# when a pause meets a renewal in flight (docs/upgrades.md).
PATCH_SIGNAL_PAUSE_WAITS_FOR_RENEWAL = "subscription-signal-pause-refused-during-renewal"
# A renewal whose time has come is under way even before its payment is started (the workflow
# may still be sending `subscription.created`, or a boundary's timer task not yet run): a pause
# signalled then is refused like one during the charge, and a cancel at the period's end
# accepted then ends the subscription at the boundary after that renewal, not before it. Before,
# both depended on how far the worker had got: on a loaded box a subscription without a trial
# was canceled before its first charge, or paused and resumed past its first period, never
# charged (simulation interleavings seed 1). Decided at the start of each run (in `__init__`,
# before any signal of the first task is handled); docs/upgrades.md.
PATCH_DUE_RENEWAL_IS_UNDER_WAY = "subscription-due-renewal-is-under-way"


class ChangeRefused(ApplicationError):
    """An Update's validator refusing a change: `type` is the REST API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, type=code, non_retryable=True)


@workflow.defn(name="SubscriptionWorkflow")
class SubscriptionWorkflow:
    @workflow.init
    def __init__(self, input: SubscriptionWorkflowInput) -> None:
        self.input = input
        self.policy = input.policy
        self.state = input.carried_state or _new_state(input)
        # Bumped by every handler: the waits below wake up and look again.
        self.wakeups = 0
        self.settled: dict[str, RenewalSettled] = {}
        self.periods_this_run = 0
        # PATCH_DUE_RENEWAL_IS_UNDER_WAY, decided first thing in the run.
        self.due_is_under_way = workflow.patched(PATCH_DUE_RENEWAL_IS_UNDER_WAY)
        # A cancel at the period's end accepted while a renewal was due: it ends the
        # subscription at the boundary after that renewal.
        self.cancel_after_due_renewal = False

    # ── the story ─────────────────────────────────────────────────────────────────────────
    @workflow.run
    async def run(self, input: SubscriptionWorkflowInput) -> SubscriptionState:
        if input.carried_state is None:
            await self.emit(EventKind.SUBSCRIPTION_CREATED)
        while not self.state.status.ended:
            await self.wait_for_the_boundary()
            if self.state.status.ended:
                break
            if self.state.cancel_at_period_end and not self.cancel_after_due_renewal:
                await self.end("canceled at the period's end")
                break
            await self.renew(self.state.next_period)
            self.cancel_after_due_renewal = False
            if self.state.status.ended:
                break
            self.periods_this_run += 1
            if self.history_is_long():
                await workflow.wait_condition(workflow.all_handlers_finished)
                workflow.continue_as_new(
                    self.input.model_copy(update={"carried_state": self.state})
                )
        self.set_next_renewal(None)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.state

    async def wait_for_the_boundary(self) -> None:
        """Until the next renewal is due; paused or unpaid, until that changes; canceled: now."""
        while not self.state.status.ended:
            woken = self.waker()
            if self.state.status in (SubscriptionStatus.PAUSED, SubscriptionStatus.UNPAID):
                await workflow.wait_condition(woken)
                continue
            due = self.state.next_renewal_at
            assert due is not None
            if not await self.sleep_until(due, woken):
                return

    def waker(self) -> Callable[[], bool]:
        """True once any handler has run since this was made."""
        seen = self.wakeups
        return lambda: self.wakeups != seen

    async def sleep_until(self, when: datetime, woken: Callable[[], bool]) -> bool:
        """A durable timer to `when`; True if `woken` first, False once it is time."""
        now = workflow.now()
        if now >= when:
            return False
        try:
            await workflow.wait_condition(woken, timeout=when - now)
        except TimeoutError:
            return False
        return True

    async def renew(self, number: int) -> None:
        """Charge period `number`, with dunning retries; settles it paid, unpaid or skipped."""
        period = self.period(number)
        self.state.current_period = period
        self.keep(period)
        amount = period.amount
        if amount <= 0:
            # The credit of earlier changes pays this period in full; what is left carries on.
            self.state.adjustment = amount
            period.amount = 0
            period.status = PeriodStatus.PAID_BY_CREDIT
            self.paid(number, "paid by credit")
            await self.emit(EventKind.SUBSCRIPTION_RENEWED, {"period": self.period_data(period)})
            return
        limit = CURRENCIES[self.state.request.currency].max_minor
        # An amount over the currency's limit (a large upgrade's adjustment) is charged up to the
        # limit; the rest is owed on the next renewal.
        self.state.adjustment = max(0, amount - limit)
        period.amount = min(amount, limit)

        first_attempt_at = workflow.now()
        retry_after = self.policy.dunning.retry_after_seconds
        attempt = 0
        while True:
            outcome = await self.charge(period, attempt)
            if outcome.status == PaymentStatus.SUCCEEDED.value:
                period.status = PeriodStatus.PAID
                period.paid_by = outcome.payment_id
                self.state.paid_total += outcome.captured
                self.paid(number, "paid")
                await self.emit(
                    EventKind.SUBSCRIPTION_RENEWED,
                    {"period": self.period_data(period), "amount_captured": outcome.captured},
                    payment_id=outcome.payment_id,
                )
                return
            if self.state.status != SubscriptionStatus.PAST_DUE and not self.state.status.ended:
                self.set_status(
                    SubscriptionStatus.PAST_DUE,
                    f"period {number}: {outcome.status} {outcome.decline_code or ''}".strip(),
                )
                await self.emit(
                    EventKind.SUBSCRIPTION_PAST_DUE,
                    {"period": self.period_data(period), "decline_code": outcome.decline_code},
                    payment_id=outcome.payment_id,
                )
            if self.state.status.ended:
                period.status = PeriodStatus.UNPAID
                return
            if attempt >= len(retry_after):
                period.status = PeriodStatus.UNPAID
                await self.give_up(number)
                return
            retry_at = first_attempt_at + timedelta(seconds=retry_after[attempt])
            while not self.state.status.ended:
                if not await self.sleep_until(retry_at, self.waker()):
                    break
            if self.state.status.ended:
                period.status = PeriodStatus.UNPAID
                return
            attempt += 1

    def paid(self, number: int, how: str) -> None:
        """Period `number` is paid: the subscription is active (unless it was canceled while
        the renewal ran: the money moved, the subscription stays canceled) and the next period
        is due."""
        if self.state.status.ended:
            return
        self.set_status(SubscriptionStatus.ACTIVE, f"period {number} {how}")
        self.schedule(number + 1)

    async def charge(self, period: Period, attempt: int) -> RenewalSettled:
        """One renewal attempt: the child payment, and its outcome when it signals it."""
        state = self.state
        request = state.request
        payment_id = renewal_payment_id(state.id, period.number, attempt)
        payment = PaymentRequest(
            amount=period.amount,
            currency=request.currency,
            customer_id=request.customer_id,
            merchant_id=request.merchant_id,
            payment_method=state.payment_method,
            description=f"Subscription {state.id}, period {period.number}",
            metadata={
                "subscription_id": state.id,
                "subscription_period": str(period.number),
                "renewal_attempt": str(attempt),
            },
        )
        child_input = PaymentWorkflowInput(
            payment_id=payment_id,
            client_id=state.client_id,
            request=payment,
            fingerprint=payment.fingerprint(),
            policy=self.policy.payment,
        )
        period.attempts.append(
            RenewalAttempt(payment_id=payment_id, amount=period.amount, at=workflow.now())
        )
        # Started before (a reset of this workflow): the same payment, never a second charge;
        # its outcome signal reaches this workflow id (a reset reapplies signals).
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await workflow.start_child_workflow(
                PaymentWorkflow.run,
                child_input,
                id=payment_id,
                task_queue=workflow.info().task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                parent_close_policy=workflow.ParentClosePolicy.ABANDON,
                search_attributes=initial_search_attributes(child_input),
                static_summary=f"renewal of {state.id}, period {period.number}",
            )
        await workflow.wait_condition(lambda: payment_id in self.settled)
        outcome = self.settled.pop(payment_id)
        period.attempts[-1].status = outcome.status
        period.attempts[-1].decline_code = outcome.decline_code
        return outcome

    async def give_up(self, number: int) -> None:
        if self.policy.dunning.when_exhausted == "canceled":
            await self.end(f"period {number} unpaid after every retry")
            return
        self.set_status(SubscriptionStatus.UNPAID, f"period {number} unpaid after every retry")
        self.state.next_period = number + 1
        self.set_next_renewal(None)
        await self.emit(EventKind.SUBSCRIPTION_UNPAID)

    async def end(self, reason: str) -> None:
        state = self.state
        state.canceled_at = workflow.now()
        state.cancel_reason = reason
        self.set_status(SubscriptionStatus.CANCELED, reason)
        self.set_next_renewal(None)
        await self.emit(EventKind.SUBSCRIPTION_CANCELED, {"reason": reason})

    # ── the calendar ──────────────────────────────────────────────────────────────────────
    def period(self, number: int) -> Period:
        state = self.state
        request = state.request
        k = state.first_k + number
        start = boundary_date(state.billing_anchor, request.interval, request.interval_count, k)
        end = boundary_date(state.billing_anchor, request.interval, request.interval_count, k + 1)
        amount = state.total
        trial_day = state.trial_end.date()
        if number == 0 and trial_day != start:
            amount = prorated(state.total, (end - trial_day).days, (end - start).days)
        return Period(number=number, start=start, end=end, amount=amount + state.adjustment)

    def due(self, number: int) -> datetime:
        period = self.period(number)
        return max(midnight(period.start), self.state.trial_end)

    def schedule(self, number: int) -> None:
        self.state.next_period = number
        paused = self.state.status == SubscriptionStatus.PAUSED
        self.set_next_renewal(None if paused else self.due(number))

    def keep(self, period: Period) -> None:
        periods = self.state.periods
        periods.append(period)
        del periods[: max(0, len(periods) - self.policy.periods_kept)]

    def history_is_long(self) -> bool:
        info = workflow.info()
        return (
            self.periods_this_run >= self.policy.continue_as_new_after_periods
            or info.is_continue_as_new_suggested()
            or info.get_current_history_length() > self.policy.continue_as_new_after_events
        )

    # ── status, search attributes, events ─────────────────────────────────────────────────
    def set_status(self, status: SubscriptionStatus, note: str = "") -> None:
        now = workflow.now()
        if status != self.state.status:
            self.state.history.append(SubscriptionStatusChange(status=status, at=now, note=note))
            del self.state.history[: max(0, len(self.state.history) - 100)]
            self.state.status = status
            workflow.upsert_search_attributes([sa.SUBSCRIPTION_STATUS.value_set(status.value)])
        self.state.updated_at = now
        self.wakeups += 1

    def set_next_renewal(self, when: datetime | None) -> None:
        self.state.next_renewal_at = when
        workflow.upsert_search_attributes(
            [
                sa.NEXT_RENEWAL_AT.value_set(when)
                if when is not None
                else sa.NEXT_RENEWAL_AT.value_unset()
            ]
        )

    def period_data(self, period: Period) -> dict[str, Any]:
        return {
            "number": period.number,
            "start": period.start.isoformat(),
            "end": period.end.isoformat(),
            "amount": period.amount,
            "status": period.status.value,
        }

    async def emit(
        self, kind: EventKind, data: dict[str, Any] | None = None, payment_id: str | None = None
    ) -> None:
        """One event per transition, numbered: its id is (subscription, kind, number), the same
        on every retry, so consumers deduplicate by it and order a subscription's events."""
        state = self.state
        state.event_sequence += 1
        sequence = state.event_sequence
        the_id = event_id(state.id, kind, str(sequence))
        now = workflow.now()
        body: dict[str, Any] = {
            "subscription_id": state.id,
            "client_id": state.client_id,
            "status": state.status.value,
            "customer_id": state.request.customer_id,
            "merchant_id": state.request.merchant_id,
            "currency": state.request.currency,
            "unit_amount": state.unit_amount,
            "quantity": state.quantity,
            "interval": state.request.interval.value,
            "interval_count": state.request.interval_count,
            "next_renewal_at": (
                state.next_renewal_at.isoformat() if state.next_renewal_at else None
            ),
            "cancel_at_period_end": state.cancel_at_period_end,
            "mrr": state.mrr,
            "sequence": sequence,
        }
        if payment_id is not None:
            body["payment_id"] = payment_id
        body.update(data or {})
        record = EventRecord(
            id=the_id,
            kind=kind,
            client_id=state.client_id,
            subject=state.id,
            payment_id=payment_id,
            time=now,
            body={
                "schema_version": SCHEMA_VERSION,
                "event_id": the_id,
                "type": kind.ce_type,
                "subscription_id": state.id,
                "occurred_at": now.isoformat(),
                "data": body,
            },
        )
        await workflow.execute_activity_method(
            KafkaActivities.publish_subscription_event,
            record,
            start_to_close_timeout=_KAFKA_TIMEOUT,
            retry_policy=_INFRA_RETRY,
        )
        await self.tell_the_crm(kind, the_id, now)

    async def tell_the_crm(self, kind: EventKind, the_id: str, now: datetime) -> None:
        """Every transition reaches the CRM targets the renewals use (the signed webhook; a
        subscription has no Salesforce opportunity or HubSpot deal of its own): status, next
        renewal date and MRR, under the event's id as the idempotency key. A CRM that stays
        down is recorded (`crm_sync: failed`), never a reason to stop billing."""
        targets = [t for t in self.policy.payment.crm_targets if t == CrmTarget.WEBHOOK.value]
        if not targets:
            return
        state = self.state
        notification = CrmNotification(
            event_id=the_id,
            event_kind=kind,
            # The subject of the notification: here the subscription.
            payment_id=state.id,
            status=state.status.value,
            amount=state.mrr,
            currency=state.request.currency,
            customer_id=state.request.customer_id,
            merchant_id=state.request.merchant_id,
            occurred_at=now,
            details={
                "subscription_id": state.id,
                "mrr": state.mrr,
                "next_renewal_at": (
                    state.next_renewal_at.isoformat() if state.next_renewal_at else None
                ),
                "unit_amount": state.unit_amount,
                "quantity": state.quantity,
                "paid_total": state.paid_total,
            },
        )
        results = await asyncio.gather(
            *(
                workflow.execute_activity_method(
                    CrmActivities.notify_crm,
                    args=[CrmTarget(target), notification],
                    start_to_close_timeout=timedelta(seconds=30),
                    schedule_to_close_timeout=timedelta(hours=24),
                    retry_policy=_INFRA_RETRY,
                )
                for target in targets
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, asyncio.CancelledError):
                raise result
        failed = [r for r in results if isinstance(r, BaseException)]
        state.crm_sync = "failed" if failed else "synced"

    # ── messages ──────────────────────────────────────────────────────────────────────────
    @workflow.query(name="state")
    def current_state(self) -> SubscriptionState:
        return self.state

    @workflow.signal(name="renewal_settled")
    def renewal_settled(self, outcome: RenewalSettled) -> None:
        self.settled[outcome.payment_id] = outcome
        self.wakeups += 1

    @workflow.update(name="change")
    async def change(self, change: SubscriptionChange) -> SubscriptionState:
        await self.apply(change)
        return self.state

    @change.validator
    def _change_allowed(self, change: SubscriptionChange) -> None:
        # Refused in the validator: an Update refused there never enters the history.
        refusal = self.refusal(change)
        if refusal is not None:
            raise ChangeRefused(*refusal)

    def charging(self) -> bool:
        """A renewal payment of the current period was started and has not told its outcome."""
        period = self.state.current_period
        return period is not None and any(a.status == "pending" for a in period.attempts)

    def renewal_due(self) -> bool:
        """The next renewal's time has come and its payment is not started yet: the workflow is
        on its way to it (PATCH_DUE_RENEWAL_IS_UNDER_WAY)."""
        state = self.state
        due = state.next_renewal_at
        return (
            self.due_is_under_way
            and state.status in (SubscriptionStatus.ACTIVE, SubscriptionStatus.TRIALING)
            and due is not None
            and due <= workflow.now()
            and not self.charging()
        )

    @workflow.signal(name="change_requested")
    async def change_requested(self, change: SubscriptionChange) -> None:
        """The same changes for operators' tools (and servers without Updates), under the same
        rules as the Update: a refused one is recorded in `last_refused_change` (the state the
        API and `paysaga subscriptions show` read) and not applied."""
        refusal = self.refusal(change, by_signal=True)
        if refusal is not None:
            workflow.logger.warning("change %s refused: %s", change.kind, refusal[1])
            # State only, no command: replay-safe for every refusal, recorded or not before.
            self.state.last_refused_change = RefusedChange(
                kind=change.kind, code=refusal[0], message=refusal[1], at=workflow.now()
            )
            self.state.updated_at = workflow.now()
            return
        await self.apply(change)

    def refusal(
        self, change: SubscriptionChange, *, by_signal: bool = False
    ) -> tuple[str, str] | None:
        """Why `change` cannot apply now (its API error code and message), or None: the one
        rule for the `change` Update's validator and the `change_requested` signal."""
        status = self.state.status
        if status.ended:
            return ("subscription_canceled", "The subscription is canceled.")
        if isinstance(change, CancelChange):
            if change.at_period_end and status not in (
                SubscriptionStatus.ACTIVE,
                SubscriptionStatus.TRIALING,
                SubscriptionStatus.PAST_DUE,
            ):
                return (
                    "subscription_not_renewing",
                    f"A {status} subscription has no period end to cancel at; cancel it now.",
                )
            return None
        if isinstance(change, PauseChange):
            if status != SubscriptionStatus.ACTIVE:
                return (
                    "subscription_not_pausable",
                    f"Only an active subscription pauses ({status}).",
                )
            if self.renewal_due() or (
                self.charging()
                and (
                    # A signal's refusal is recorded, so it changes what the workflow does: patched
                    # (asked here, where the signal is handled; never in the Update's validator).
                    not by_signal or workflow.patched(PATCH_SIGNAL_PAUSE_WAITS_FOR_RENEWAL)
                )
            ):
                # Accepted now, the pause would be undone when the renewal's capture makes the
                # subscription active again (simulation interleavings seed 1).
                return (
                    "renewal_in_progress",
                    "A renewal is being charged; pause once it has settled.",
                )
            return None
        if isinstance(change, ResumeChange):
            if status != SubscriptionStatus.PAUSED:
                return ("subscription_not_paused", f"The subscription is {status}, not paused.")
            return None
        if isinstance(change, PriceChange):
            if change.unit_amount is None and change.quantity is None:
                return ("parameter_missing", "Give unit_amount, quantity or both.")
            unit = change.unit_amount if change.unit_amount is not None else self.state.unit_amount
            quantity = change.quantity if change.quantity is not None else self.state.quantity
            if not (1 <= unit <= CURRENCIES[self.state.request.currency].max_minor):
                return ("amount_invalid", "unit_amount is out of range.")
            if not (1 <= quantity <= 10_000):
                return ("quantity_invalid", "quantity is out of range.")
            if unit * quantity > CURRENCIES[self.state.request.currency].max_minor:
                return ("amount_too_large", "unit_amount × quantity exceeds the currency's limit.")
            if status == SubscriptionStatus.UNPAID:
                return ("subscription_unpaid", "An unpaid subscription is not renewed.")
            return None
        if isinstance(change, PaymentMethodChange):
            if not change.payment_method.startswith("pm_") or len(change.payment_method) > 64:
                return ("payment_method_invalid", "Send a payment-method token (pm_…).")
            return None
        return ("change_unknown", "Unknown change.")

    async def apply(self, change: SubscriptionChange) -> None:
        state = self.state
        state.updated_at = workflow.now()
        if isinstance(change, CancelChange):
            if change.at_period_end:
                if not state.cancel_at_period_end:
                    # The period whose renewal is due has begun: it ends at the boundary after.
                    self.cancel_after_due_renewal = self.renewal_due()
                state.cancel_at_period_end = True
                self.wakeups += 1
                await self.emit(EventKind.SUBSCRIPTION_UPDATED, {"change": "cancel_at_period_end"})
            else:
                await self.end(change.reason)
        elif isinstance(change, PauseChange):
            state.paused_at = workflow.now()
            self.set_status(SubscriptionStatus.PAUSED, "paused")
            self.set_next_renewal(None)
            await self.emit(EventKind.SUBSCRIPTION_PAUSED)
        elif isinstance(change, ResumeChange):
            state.paused_at = None
            self.set_status(SubscriptionStatus.ACTIVE, "resumed")
            self.resume_schedule()
            await self.emit(EventKind.SUBSCRIPTION_RESUMED)
        elif isinstance(change, PriceChange):
            await self.change_price(change)
        elif isinstance(change, PaymentMethodChange):
            state.payment_method = change.payment_method
            self.wakeups += 1
            await self.emit(EventKind.SUBSCRIPTION_UPDATED, {"change": "payment_method"})

    def resume_schedule(self) -> None:
        """Boundaries that passed while paused are skipped: the next renewal is the first one
        due after now (the anchor's calendar is kept)."""
        state = self.state
        now = workflow.now()
        if self.due(state.next_period) > now:
            self.set_next_renewal(self.due(state.next_period))
            return
        request = state.request
        k_now = period_index_at(
            state.billing_anchor, request.interval, request.interval_count, now.date()
        )
        self.schedule(max(state.next_period, k_now - state.first_k + 1))

    async def change_price(self, change: PriceChange) -> None:
        state = self.state
        old_total = state.total
        if change.unit_amount is not None:
            state.unit_amount = change.unit_amount
        if change.quantity is not None:
            state.quantity = change.quantity
        adjustment = 0
        period = state.current_period
        today = workflow.now().date()
        if (
            state.status == SubscriptionStatus.ACTIVE
            and period is not None
            and period.status in (PeriodStatus.PAID, PeriodStatus.PAID_BY_CREDIT)
            and period.start <= today < period.end
        ):
            adjustment = change_adjustment(old_total, state.total, today, period.start, period.end)
            state.adjustment += adjustment
        self.wakeups += 1
        await self.emit(
            EventKind.SUBSCRIPTION_UPDATED,
            {"change": "price", "old_total": old_total, "proration": adjustment},
        )


def _new_state(input: SubscriptionWorkflowInput) -> SubscriptionState:
    request = input.request
    # The start event's time: the same in replay as live.
    now = workflow.info().workflow_start_time
    trial_end = now + timedelta(days=request.trial_days)
    anchor: date = request.billing_anchor or trial_end.date()
    k, _, _ = first_period(anchor, request.interval, request.interval_count, trial_end)
    status = SubscriptionStatus.TRIALING if request.trial_days else SubscriptionStatus.ACTIVE
    return SubscriptionState(
        id=input.subscription_id,
        client_id=input.client_id,
        request=request,
        fingerprint=input.fingerprint,
        status=status,
        created_at=now,
        updated_at=now,
        trial_end=trial_end,
        billing_anchor=anchor,
        unit_amount=request.unit_amount,
        quantity=request.quantity,
        payment_method=request.payment_method,
        first_k=k,
        next_period=0,
        next_renewal_at=trial_end,
        history=[SubscriptionStatusChange(status=status, at=now)],
    )


def initial_subscription_search_attributes(
    input: SubscriptionWorkflowInput,
) -> TypedSearchAttributes:
    """Set at start, so a subscription is findable before its first workflow task."""
    request = input.request
    status = SubscriptionStatus.TRIALING if request.trial_days else SubscriptionStatus.ACTIVE
    return TypedSearchAttributes(
        [
            SearchAttributePair(sa.SUBSCRIPTION_STATUS, status.value),
            SearchAttributePair(sa.CUSTOMER_ID, request.customer_id),
            SearchAttributePair(sa.MERCHANT_ID, request.merchant_id),
            SearchAttributePair(sa.AMOUNT_MINOR, request.unit_amount * request.quantity),
            SearchAttributePair(sa.CURRENCY, request.currency),
            SearchAttributePair(sa.CLIENT_ID, input.client_id),
        ]
    )


__all__ = [
    "SubscriptionWorkflow",
    "initial_subscription_search_attributes",
]
