"""Safe deploys: every recorded workflow history (PaymentWorkflow's paths, and the webhook
deliveries', `webhook_*`) replays against today's workflow code.

A payment's workflow lives for months (the dispute window), so a deploy meets histories that
older code wrote. Each file under tests/histories/ is one path of the saga, recorded by
`python -m scripts.record_histories`; replaying it with temporalio's Replayer re-runs today's
workflow against the commands the old code issued. A change that would break running payments
(a step added, removed or reordered without `workflow.patched()`) fails here, before the
deploy. docs/upgrades.md explains how to change the workflow and when to re-record.

Replay uses the sandboxed runner, as the tests' workers do, so non-deterministic calls in
workflow code (time, randomness, I/O) fail here even where production runs unsandboxed.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from temporalio import workflow
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer

from domain.events import EventKind
from domain.payment import SAGA_REVISION, FraudAssessment, PaymentState, PaymentWorkflowInput
from domain.subscription import renewal_payment_id
from settings import Settings
from tests.helpers.paths import REPO
from worker import workflow_runner
from workflows import acquirer_steps, follow_up_steps, follow_ups, local_first, subscription
from workflows import payment as payment_workflow
from workflows.payment import PaymentWorkflow
from workflows.reconciliation import DailyReconciliationWorkflow
from workflows.subscription import SubscriptionWorkflow
from workflows.webhook_delivery import WebhookDeliveryWorkflow

HISTORIES = REPO / "tests" / "histories"
CHILD = EventType.EVENT_TYPE_START_CHILD_WORKFLOW_EXECUTION_INITIATED

# One history per path of the saga (docs/upgrades.md: new versions add `<path>.v2.json`, …).
PATHS = {
    "success",  # local activities on: the policy's default
    "success_regular_activities",  # local activities off
    "fraud_reject",
    "review_approve",
    "review_decline",
    "review_timeout",
    "refund_partial_then_full",
    "dispute_won",
    "dispute_lost",
    "cancel_before_posting",  # the cancel signal while waiting for review
    "operator_cancel_after_posting",  # compensation: reversal, payments.canceled, CRM
    "operator_cancel_succeeded",  # a succeeded payment only loses its follow-up window
    "ledger_refusal",  # compensation: payments.raw voided, payment failed
    "window_closes",  # the dispute window closes: outcome recorded, workflow completes
    "refund_continues_as_new",  # a run ending in ContinueAsNew, carrying its state
    "continued_as_new",  # the carried run serving one more refund
    "refund_by_update",  # a refund Update, one refused by its validator, a refused signal
    "acquirer_capture",  # authorized (partially), captured at once, posted
    "acquirer_decline",  # declined by the issuer: payments.declined, the CRM told
    "acquirer_timeout_resolved",  # authorize and capture timed out, resolved by status
    "acquirer_refund",  # a refund returned at the acquirer, then posted
    "acquirer_refund_needs_attention",  # refunded there, refused by the ledger: an operator
    "acquirer_canceled_void",  # canceled during the authorization: the hold voided
    # canceled in the UI during the authorization: voided, the hold's release asks the ledger
    "acquirer_operator_cancel_during_authorization",
    "acquirer_manual_capture",  # requires_capture, a refused capture Update, a partial capture
    "acquirer_manual_void",  # requires_capture, voided by Update
    "acquirer_authorization_expires",  # requires_capture until the expiry timer voids it
    "requires_attention_resolved",  # a refused reversal waits for an operator's retry
    "window_closes_with_open_dispute",  # only the dispute's close is taken after the window
    "operator_cancel_with_open_dispute",  # canceled, kept until the dispute closes
    "refund_drained_before_continue_as_new",  # queued refunds run before the hand-over
    "webhook_delivered_after_retries",  # WebhookDeliveryWorkflow: failed twice, backoff, accepted
    "webhook_gave_up_disabled",  # the retry window passed: gave up, the endpoint disabled
    "webhook_manual_redelivery",  # one attempt, never disabling
    "reconciliation_daily",  # DailyReconciliation: a day's settlement file fetched, imported
    "subscription_trial_changed_and_canceled",  # SubscriptionWorkflow: Updates, a refusal, a signal
    "subscription_declined_until_canceled",  # child payments declined, dunning timers, canceled
    "subscription_paid_continues_as_new",  # a renewal paid (the child's signal), continue-as-new
    "subscription_continued_paused_and_canceled",  # the carried run: pause, resume, cancel
    "subscription_pause_signalled_during_renewal",  # a pause signal refused mid-renewal (patch)
    # a cancel at the period's end and a pause signalled before the first renewal started (patch)
    "subscription_changed_while_its_first_renewal_is_due",
}

# Payload encodings of an unencrypted history (the codec's would be binary/encrypted).
PLAIN_ENCODINGS = {"json/plain", "binary/null"}


def _history_files() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


def _path_of(file: Path) -> str:
    """`refund_partial_then_full.v2.json` → `refund_partial_then_full`."""
    return file.name.split(".")[0]


def _load(file: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(file.stem, file.read_text())


def _replayer(*workflows: type) -> Replayer:
    return Replayer(
        workflows=list(workflows)
        or [
            PaymentWorkflow,
            WebhookDeliveryWorkflow,
            DailyReconciliationWorkflow,
            SubscriptionWorkflow,
        ],
        data_converter=pydantic_data_converter,
        workflow_runner=workflow_runner(Settings(workflow_sandbox=True)),
    )


def test_every_path_has_a_recorded_history() -> None:
    recorded = {_path_of(f) for f in _history_files()}
    assert not PATHS - recorded, f"missing histories: {sorted(PATHS - recorded)}"


@pytest.mark.parametrize("file", _history_files(), ids=lambda f: f.name)
async def test_recorded_history_replays_without_nondeterminism(file: Path) -> None:
    # Raises the replay failure (NondeterminismError, or the workflow task's own error).
    result = await _replayer().replay_workflow(_load(file))
    assert result.replay_failure is None


def test_histories_cover_local_and_regular_activities() -> None:
    """The forward steps leave local-activity markers in one mode, scheduled activities in the
    other: replay must accept both, since the policy is fixed per payment at its creation."""
    local = _load(HISTORIES / "success.json")
    regular = _load(HISTORIES / "success_regular_activities.json")
    assert "assess_payment" in _local_activity_markers(local)
    assert "assess_payment" not in _scheduled_activities(local)
    assert {"assess_payment", "publish_payment_event", "post_ledger_transaction"} <= set(
        _scheduled_activities(regular)
    )
    assert _local_activity_markers(regular) == []


def test_histories_cover_remote_calls_before_and_after_local_first() -> None:
    """Payments from before PATCH_LOCAL_FIRST schedule the acquirer's capture and the CRM
    notice as regular activities (and replay so); newer ones try each once as a local activity,
    and an unknown outcome of that attempt is still resolved by the acquirer's status, never by
    sending the instruction again. The authorization stays regular (a cancel can reach it)."""
    remote = {"capture_payment", "notify_crm"}
    before = _load(HISTORIES / "acquirer_capture.json")
    assert remote <= set(_scheduled_activities(before))
    after = _load(HISTORIES / "acquirer_capture.v3.json")
    assert remote <= set(_local_activity_markers(after))
    assert not remote & set(_scheduled_activities(after))
    assert _scheduled_activities(after) == ["authorize_payment"]
    assert "notify_crm" in _local_activity_markers(_load(HISTORIES / "success.v3.json"))
    timed_out = _load(HISTORIES / "acquirer_timeout_resolved.v3.json")
    sent = _local_activity_markers(timed_out) + _scheduled_activities(timed_out)
    assert sent.count("authorize_payment") == sent.count("capture_payment") == 1, sent
    assert _scheduled_activities(timed_out).count("acquirer_status") == 2


def test_histories_cover_continue_as_new_from_both_sides() -> None:
    ended = _load(HISTORIES / "refund_continues_as_new.json").events[-1]
    assert ended.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    carried = _load(HISTORIES / "continued_as_new.json").events[0]
    start = carried.workflow_execution_started_event_attributes
    assert start.continued_execution_run_id  # a run that another one continued into
    workflow_input = json.loads(start.input.payloads[0].data)
    assert workflow_input["carried_state"]["refunded"] == 4000


def test_histories_cover_updates_and_every_patch() -> None:
    """Each `workflow.patched()` branch (PaymentWorkflow's, SubscriptionWorkflow's) is pinned
    by a recorded history, and the follow-ups' Updates are in some: replay re-runs their
    handlers too."""
    patches: set[str] = set()
    updates = 0
    for file in _history_files():
        events = _load(file).events
        patches |= {patch for _, patch in _patch_markers(events)}
        updates += len(_at(events, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED))
    assert patches == {
        follow_ups.PATCH_FOLLOW_UP_RULES,
        follow_up_steps.PATCH_DRAIN_BEFORE_CONTINUE,
        payment_workflow.PATCH_CANCEL_FINISHES_FOLLOW_UPS,
        payment_workflow.PATCH_UNDO_FAILURE_NEEDS_ATTENTION,
        payment_workflow.PATCH_CRM_STEP_OUTLIVES_CANCEL,
        payment_workflow.PATCH_REVERSAL_ASKS_THE_LEDGER,
        follow_up_steps.PATCH_REFUND_NEEDS_ATTENTION,
        acquirer_steps.PATCH_ACQUIRER,
        acquirer_steps.PATCH_EXPIRY_SEARCH_ATTRIBUTE,
        payment_workflow.PATCH_DECIDED_AT_START,
        payment_workflow.PATCH_END_ASKS_THE_LEDGER,
        local_first.PATCH_LOCAL_FIRST,
        subscription.PATCH_SIGNAL_PAUSE_WAITS_FOR_RENEWAL,
        subscription.PATCH_DUE_RENEWAL_IS_UNDER_WAY,
    }
    assert updates >= 5


def _patch_id(event: Any) -> str | None:
    attributes = event.marker_recorded_event_attributes
    if event.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
        return None
    if attributes.marker_name != "core_patch":
        return None
    patch_id: str = json.loads(attributes.details["patch-data"].payloads[0].data)["id"]
    return patch_id


def test_new_payments_decide_their_patches_before_any_local_activity() -> None:
    """A patch asked right after a local activity has no fixed place in the history: the
    activity's marker and the code after it can land in different workflow tasks, and replay
    answers `patched()` by task (the faults profile's seed 2 met "Non-deprecated patch marker
    ... acquirer-authorize-capture" after a worker restart). New payments ask those patches once,
    in their first activation: in every history recorded since, the start marker is the first
    command of the first task, and no patch marker follows a local activity's in one task."""
    new = [f for f in _history_files() if not f.name.startswith("webhook_")]
    new = [
        f
        for f in new
        if payment_workflow.PATCH_DECIDED_AT_START in {_patch_id(e) for e in _load(f).events}
    ]
    assert len(new) >= 5, [f.name for f in new]
    assert not set(new) & set(_revision_1_histories())
    for file in new:
        events = _load(file).events
        first_completed = _at(events, EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)[0]
        # An Update the first task accepted (a cancel that met it) is recorded before its commands.
        first_command = next(
            e
            for e in events[first_completed + 1 :]
            if e.event_type != EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_ACCEPTED
        )
        assert _patch_id(first_command) == payment_workflow.PATCH_DECIDED_AT_START
        after_local_activity = False
        for event in events:
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED:
                after_local_activity = False
            elif _patch_id(event) is not None:
                assert not after_local_activity, (file.name, _patch_id(event), event.event_id)
            elif event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED:
                after_local_activity = True


def _policy_revision(history: WorkflowHistory) -> int | None:
    """The PaymentPolicy.revision a PaymentWorkflow history was started under (None: another
    workflow type)."""
    start = history.events[0].workflow_execution_started_event_attributes
    if start.workflow_type.name != "PaymentWorkflow":
        return None
    workflow_input = PaymentWorkflowInput.model_validate_json(start.input.payloads[0].data)
    return workflow_input.policy.revision


def _revision_1_histories() -> list[Path]:
    return [f for f in _history_files() if (_policy_revision(_load(f)) or 0) >= 1]


def _upserted(history: WorkflowHistory) -> list[set[str]]:
    return [
        set(e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    ]


def test_payments_of_revision_1_take_every_patch_without_a_marker() -> None:
    """New payments are started under SAGA_REVISION (the API's policy): every patched branch is
    taken without asking, so no patch marker (and no `TemporalChangeVersion` upsert the SDK adds
    to each) is in their histories, and the fraud score goes with the status that follows it in
    one upsert. The same path recorded before (v4) asked two patches and upserted six times;
    payments of revision 0 still ask (every older history replays above)."""
    assert SAGA_REVISION == 1
    revision_1 = _revision_1_histories()
    assert {f.name for f in revision_1} >= {
        "success.v5.json",
        "fraud_reject.v5.json",
        "review_approve.v5.json",
        "refund_by_update.v5.json",
        "acquirer_capture.v5.json",
        "acquirer_manual_capture.v5.json",
        "operator_cancel_during_crm.v5.json",
    }
    for file in revision_1:
        events = _load(file).events
        assert [p for e in events if (p := _patch_id(e)) is not None] == [], file.name
    before, after = _load(HISTORIES / "success.v4.json"), _load(HISTORIES / "success.v5.json")
    assert _policy_revision(before) == 0
    assert len([e for e in before.events if _patch_id(e) is not None]) == 2
    assert len(_upserted(before)) == 6 and len(_upserted(after)) == 3
    assert {"FraudScore", "PaymentStatus"} in _upserted(after)
    rejected = _upserted(_load(HISTORIES / "fraud_reject.v5.json"))
    assert len(rejected) == 1 and {"FraudScore", "PaymentStatus"} <= rejected[0]


def _is_local_activity_marker(event: HistoryEvent) -> bool:
    return (
        event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
        and event.marker_recorded_event_attributes.marker_name != "core_patch"
    )


def _shift_references(message: Message, after: int, by: int) -> None:
    """Every `…event_id` in `message` naming an event after `after` moves by `by`."""
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type is None or field.message_type.GetOptions().map_entry:
                continue  # payload maps: no event ids
            for item in [value] if isinstance(value, Message) else value:
                _shift_references(item, after, by)
        elif field.name.endswith("event_id") and isinstance(value, int) and value > after:
            setattr(message, field.name, value + by)


def _split_tasks_after_local_activities(history: WorkflowHistory) -> WorkflowHistory:
    """The same run as if each workflow task that recorded a local activity's marker followed
    by more commands had completed right after that marker, the workflow going on in a new
    task: what a task completed for a query or a heartbeat as the local activity finished
    looks like. Event ids, and the references to them, are renumbered."""
    events = [HistoryEvent.FromString(e.SerializeToString()) for e in history.events]
    task: list[HistoryEvent] = []  # the last scheduled, started and completed events
    index = 0
    while index < len(events) - 1:
        event, after = events[index], events[index + 1]
        if event.event_type in _TASK_EVENTS:
            task = [e for e in task if e.event_type != event.event_type] + [event]
        splits = (
            _is_local_activity_marker(event)
            and len(task) == 3
            and after.event_id == event.event_id + 1
            and after.event_type in _COMMANDS_AFTER_A_SPLIT
            and not _is_local_activity_marker(after)
        )
        if not splits:
            index += 1
            continue
        at = event.event_id
        for any_event in events:  # their own ids and their references to later events
            _shift_references(any_event, at, 3)
        inserted = []
        for offset, template in enumerate(sorted(task, key=lambda e: e.event_type)):
            new = HistoryEvent.FromString(template.SerializeToString())
            new.event_id = at + 1 + offset
            new.event_time.CopyFrom(event.event_time)
            inserted.append(new)
        scheduled, started, completed = inserted
        started.workflow_task_started_event_attributes.scheduled_event_id = scheduled.event_id
        completed.workflow_task_completed_event_attributes.scheduled_event_id = scheduled.event_id
        completed.workflow_task_completed_event_attributes.started_event_id = started.event_id
        # The commands after the split are the new task's.
        for command in events[index + 1 :]:
            if command.event_type in _TASK_EVENTS:
                break
            for field, value in command.ListFields():
                if field.type == FieldDescriptor.TYPE_MESSAGE and hasattr(
                    value, "workflow_task_completed_event_id"
                ):
                    value.workflow_task_completed_event_id = completed.event_id
        events[index + 1 : index + 1] = inserted
        task = inserted
        index += 4
    return WorkflowHistory(history.workflow_id, events)


_TASK_EVENTS = (
    EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
    EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
)
_COMMANDS_AFTER_A_SPLIT = (
    EventType.EVENT_TYPE_MARKER_RECORDED,
    EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES,
    EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED,
    EventType.EVENT_TYPE_TIMER_STARTED,
)


async def test_a_patch_asked_after_a_local_activity_breaks_when_its_task_ends_early() -> None:
    """The cause of the faults profile's seed 2: a payment from before asks
    `acquirer-authorize-capture` right after the fraud check's local activity. Had its first
    task completed as that activity finished, replay answers the patch before seeing its marker
    (it lies in the next task): the non-determinism error the simulation met."""
    split = _split_tasks_after_local_activities(_load(HISTORIES / "acquirer_capture.json"))
    assert len(split.events) > len(_load(HISTORIES / "acquirer_capture.json").events)
    result = await _replayer().replay_workflow(split, raise_on_replay_failure=False)
    assert result.replay_failure is not None
    assert "Non-deprecated patch marker" in str(result.replay_failure)
    assert acquirer_steps.PATCH_ACQUIRER in str(result.replay_failure)


async def test_new_payments_replay_whichever_task_their_local_activities_end_in() -> None:
    """The same split of every history recorded since `patches-decided-at-start` (after each
    local activity followed by more commands in its task) replays: their patches were decided
    in the first activation, before any local activity."""
    new = [
        f
        for f in _history_files()
        if payment_workflow.PATCH_DECIDED_AT_START in {_patch_id(e) for e in _load(f).events}
    ] + _revision_1_histories()
    split_files = []
    for file in new:
        original = _load(file)
        split = _split_tasks_after_local_activities(original)
        if len(split.events) == len(original.events):
            continue  # regular activities only: nothing to re-cut
        split_files.append(file.name)
        result = await _replayer().replay_workflow(split, raise_on_replay_failure=False)
        assert result.replay_failure is None, (file.name, result.replay_failure)
    assert len(split_files) >= 5, split_files


def test_histories_cover_payments_from_before_and_after_tenants() -> None:
    """Payments started before tenants carry no `tenant_accounts` and post to the shared codes
    for their whole life; new ones post to their API client's accounts, and hand the fraud
    check their client. Both replay (test above)."""

    def scheduled(file: str, activity: str) -> list[dict[str, Any]]:
        inputs = []
        for event in _load(HISTORIES / file).events:
            attributes = event.activity_task_scheduled_event_attributes
            if attributes.activity_type.name == activity:
                inputs.append(json.loads(attributes.input.payloads[0].data))
        return inputs

    def policy(file: str) -> dict[str, Any]:
        start = _load(HISTORIES / file).events[0].workflow_execution_started_event_attributes
        found: dict[str, Any] = json.loads(start.input.payloads[0].data)["policy"]
        return found

    def account_codes(file: str) -> set[str]:
        return {
            entry["account"]["code"]
            for posting in scheduled(file, "post_ledger_transaction")
            for entry in posting["transaction"]["entries"]
        }

    assert "tenant_accounts" not in policy("dispute_lost.json")
    assert account_codes("dispute_lost.json") >= {
        "customer:cus_replay_dispute_lost:USD",
        "merchant:mer_replay_dispute_lost:USD",
    }
    assert policy("dispute_lost.tenants.json")["tenant_accounts"] is True
    assert account_codes("dispute_lost.tenants.json") >= {
        "customer:replay-recorder:cus_replay_dispute_lost:USD",
        "merchant:replay-recorder:mer_replay_dispute_lost:USD",
        "disputes:USD",  # platform accounts stay global
    }
    [before] = scheduled("success_regular_activities.json", "assess_payment")
    [after] = scheduled("success_regular_activities.tenants.json", "assess_payment")
    assert "customer_id" in before  # the bare request
    assert after["client_id"] == "replay-recorder" and "customer_id" in after["request"]


def test_histories_are_unencrypted_and_hold_no_secrets() -> None:
    """The replayer decodes them without a key; nothing in them may be a credential."""
    for file in _history_files():
        payloads = list(_payloads(json.loads(file.read_text())))
        assert payloads, file.name
        for payload in payloads:
            encoding = base64.b64decode(payload["metadata"]["encoding"]).decode()
            assert encoding in PLAIN_ENCODINGS, (file.name, encoding)
            data = base64.b64decode(payload.get("data", "")).decode()
            for secret_marker in ("whsec_", "psk_", "key_b64", "Bearer "):
                assert secret_marker not in data, (file.name, secret_marker)


# ── the guard itself: a breaking change must fail replay ────────────────────────────────────


@workflow.defn(name="PaymentWorkflow")
class PaymentWorkflowWithEarlyStep(PaymentWorkflow):
    """A careless change: payments.raw published before the fraud assessment, unpatched."""

    @workflow.run
    async def run(self, input: PaymentWorkflowInput) -> PaymentState:
        return await super().run(input)

    async def assess(self) -> FraudAssessment:
        await workflow.execute_activity(
            "publish_payment_event",
            self.event(EventKind.RAW),
            start_to_close_timeout=timedelta(seconds=10),
        )
        return await super().assess()


@workflow.defn(name="PaymentWorkflow")
class PaymentWorkflowWithPatchedStep(PaymentWorkflow):
    """The same change behind `workflow.patched()`: old histories take the old branch."""

    @workflow.run
    async def run(self, input: PaymentWorkflowInput) -> PaymentState:
        return await super().run(input)

    async def assess(self) -> FraudAssessment:
        if workflow.patched("publish-raw-before-assessment"):
            await workflow.execute_activity(
                "publish_payment_event",
                self.event(EventKind.RAW),
                start_to_close_timeout=timedelta(seconds=10),
            )
        return await super().assess()


@workflow.defn(name="PaymentWorkflow")
class PaymentWorkflowReadingTheClock(PaymentWorkflow):
    """Non-deterministic code the commands alone would not betray: the sandbox refuses it."""

    @workflow.run
    async def run(self, input: PaymentWorkflowInput) -> PaymentState:
        return await super().run(input)

    async def assess(self) -> FraudAssessment:
        assessment = await super().assess()
        if datetime.now(UTC).hour == 25:  # never true: only the call itself matters
            assessment.reasons.append("night")
        return assessment


@pytest.mark.parametrize("name", ["success.json", "success_regular_activities.json"])
async def test_an_unpatched_new_step_fails_replay_with_nondeterminism(name: str) -> None:
    history = _load(HISTORIES / name)
    result = await _replayer(PaymentWorkflowWithEarlyStep).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert isinstance(result.replay_failure, workflow.NondeterminismError), result.replay_failure


@pytest.mark.parametrize("name", ["success.json", "success_regular_activities.json"])
async def test_the_same_step_behind_patched_replays(name: str) -> None:
    history = _load(HISTORIES / name)
    result = await _replayer(PaymentWorkflowWithPatchedStep).replay_workflow(history)
    assert result.replay_failure is None


async def test_the_sandbox_fails_replay_of_a_workflow_reading_the_wall_clock() -> None:
    history = _load(HISTORIES / "success.json")
    result = await _replayer(PaymentWorkflowReadingTheClock).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert "Cannot access datetime.datetime.now" in str(result.replay_failure)


# ── a live/replay time difference: the window must close at the same instant ───────────────

# Recorded live (not by scripts.record_histories: it depends on timing) from a payment with local
# activities whose first workflow task completed with no command while the fraud assessment ran.
# Replay gives that task's activation the *next* task's time (temporalio 1.35), so a window
# measured from workflow.now() in __init__ closed ~30 ms later in replay than live, and the
# replayed workflow started another timer where the history holds record_payment_outcome.
EMPTY_FIRST_TASK = HISTORIES / "window_closes_empty_first_task.json"


@workflow.defn(name="PaymentWorkflow")
class PaymentWorkflowWindowFromFirstTaskTime(PaymentWorkflow):
    """The earlier code: created_at (the window's start) read from workflow.now()."""

    @workflow.init
    def __init__(self, input: PaymentWorkflowInput) -> None:
        super().__init__(input)
        self.state.created_at = workflow.now()

    @workflow.run
    async def run(self, input: PaymentWorkflowInput) -> PaymentState:
        return await super().run(input)


def test_the_empty_first_task_history_has_that_shape() -> None:
    events = _load(EMPTY_FIRST_TASK).events
    kinds = [e.event_type for e in events[:5]]
    assert kinds[1:] == [
        EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED,
        EventType.EVENT_TYPE_WORKFLOW_TASK_SCHEDULED,  # nothing between: the task was empty
    ]
    assert "assess_payment" in _local_activity_markers(_load(EMPTY_FIRST_TASK))
    assert events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED


async def test_a_window_measured_from_the_first_task_time_fails_that_replay() -> None:
    result = await _replayer(PaymentWorkflowWindowFromFirstTaskTime).replay_workflow(
        _load(EMPTY_FIRST_TASK), raise_on_replay_failure=False
    )
    assert isinstance(result.replay_failure, workflow.NondeterminismError), result.replay_failure


# ── reading histories ────────────────────────────────────────────────────────────────────────


def _local_activity_markers(history: WorkflowHistory) -> list[str]:
    types = []
    for event in history.events:
        if (
            event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
            and event.marker_recorded_event_attributes.marker_name == "core_local_activity"
        ):
            data = event.marker_recorded_event_attributes.details["data"].payloads[0].data
            types.append(json.loads(data)["activity_type"])
    return types


def _scheduled_activities(history: WorkflowHistory) -> list[str]:
    return [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]


def _payloads(node: Any) -> Any:
    """Every payload (a dict with `metadata.encoding`) anywhere in a history's JSON."""
    if isinstance(node, dict):
        if "encoding" in node.get("metadata", {}):
            yield node
        for value in node.values():
            yield from _payloads(value)
    elif isinstance(node, list):
        for item in node:
            yield from _payloads(item)


def _at(events: Sequence[HistoryEvent], *types: EventType.ValueType) -> list[int]:
    """Where the events of these types stand in the history, in order."""
    return [i for i, e in enumerate(events) if e.event_type in types]


def _patch_markers(events: Sequence[HistoryEvent]) -> list[tuple[int, str]]:
    """Each patch marker: where it stands, and its patch's id."""
    return [(i, p) for i, e in enumerate(events) if (p := _patch_id(e)) is not None]


def _signals(events: Sequence[HistoryEvent]) -> list[tuple[int, str]]:
    """Each signal received: where it stands, and its name."""
    return [
        (i, events[i].workflow_execution_signaled_event_attributes.signal_name)
        for i in _at(events, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
    ]


def test_subscription_histories_cover_a_renewal_its_signal_and_continue_as_new() -> None:
    """The renewal path from the subscription's side: a child payment started under the
    derived id, its outcome signalled back, the run continued as new carrying the state."""
    events = _load(HISTORIES / "subscription_paid_continues_as_new.json").events
    children = [
        events[i].start_child_workflow_execution_initiated_event_attributes
        for i in _at(events, CHILD)
    ]
    assert [c.workflow_type.name for c in children] == ["PaymentWorkflow"]
    start = events[0].workflow_execution_started_event_attributes
    subscription_id = json.loads(start.input.payloads[0].data)["subscription_id"]
    assert children[0].workflow_id == renewal_payment_id(subscription_id, 0, 0)
    assert [name for _, name in _signals(events)] == ["renewal_settled"]
    assert events[-1].event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW
    declined = _load(HISTORIES / "subscription_declined_until_canceled.json").events
    assert len(_at(declined, CHILD)) == 3  # the first attempt and its two retries


def test_a_pause_signalled_during_a_renewal_is_pinned_by_its_patch() -> None:
    """The signal's new rule is recorded under its patch: the marker is in the signal's own
    workflow task, after the renewal's child started and before its outcome came back; nothing
    is emitted for that pause (one subscription.paused publish: the later, accepted one)."""
    events = _load(HISTORIES / "subscription_pause_signalled_during_renewal.json").events
    patches = _patch_markers(events)
    assert [p for _, p in patches] == [subscription.PATCH_SIGNAL_PAUSE_WAITS_FOR_RENEWAL]
    marker_at = patches[0][0]
    signals = _signals(events)
    names = [name for _, name in signals]
    assert names == ["change_requested", "renewal_settled", "change_requested"], names
    child_started = _at(events, CHILD)[0]
    assert child_started < signals[0][0] < marker_at < signals[1][0]


def test_changes_before_the_first_renewal_started_are_pinned_by_their_patch() -> None:
    """`subscription-due-renewal-is-under-way` is decided in the first workflow task, before any
    command; the cancel at the period's end sent with the start did not end the subscription
    before its first period was charged (the renewal's child started), and the pause signalled
    before that renewal was refused (nothing published for it)."""
    events = _load(HISTORIES / "subscription_changed_while_its_first_renewal_is_due.json").events
    patches = _patch_markers(events)
    assert [p for _, p in patches] == [subscription.PATCH_DUE_RENEWAL_IS_UNDER_WAY]
    first_command = _at(events, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED, CHILD)[0]
    assert patches[0][0] < first_command
    assert len(_at(events, CHILD)) == 1
    published = [
        json.loads(e.activity_task_scheduled_event_attributes.input.payloads[0].data)["kind"]
        for e in events
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and e.activity_task_scheduled_event_attributes.activity_type.name
        == "publish_subscription_event"
    ]
    assert "subscription.paused" not in published and "subscription.canceled" in published
