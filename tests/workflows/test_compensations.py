"""Cancellation and the saga's compensations, against the real worker, ledger and broker.

The "after posting, before confirmation" window is held open by a test subclass of our own
Kafka activity that waits before publishing payments.confirmed (the broker still receives
every event); a test subclass of our ledger activity fails the reversal's first attempt.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError, CancelledError

from activities.kafka import EventPublisher
from domain.events import EventKind, event_id
from domain.fraud import amount_for_limit_share
from domain.ledger import TransactionKind
from domain.payment import CancelSignal, PaymentState, payment_id_for
from infra.embedded.stack import Stack
from ledger.activity import LedgerActivities
from ledger.records import LedgerPosting, LedgerReceipt
from ledger.store import Ledger
from settings import Settings
from tests.conftest import TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.fake_crm import FakeCrmServer
from tests.helpers.follow_ups import (
    assert_ledger_balanced,
    captured_payment,
    crm_hooks,
    new_merchant,
    payment_events,
    register_row,
)
from tests.helpers.kafka import ConsumedEvent, GatedKafka
from tests.helpers.saga import account_balance, create_payment, payment_body, wait_for_payment
from worker import payment_worker

CLIENT = "test-client"  # TEST_API_KEY's client: the tenant of the accounts these payments move


def _error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


# ── cancel through the API ───────────────────────────────────────────────────────────────


async def test_cancel_before_posting_stops_the_payment_without_moving_money(
    api: httpx.AsyncClient, engine: AsyncEngine, stack: Stack, temporal_client: Client
) -> None:
    # A first payment this large waits for a reviewer: nothing is published or posted yet.
    body = payment_body(amount=amount_for_limit_share("USD", 60), merchant_id=new_merchant())
    created = await create_payment(api, body, wait=20)
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    assert created.json()["status"] == "requires_review"

    canceled = await api.post(f"/v1/payments/{pid}/cancel")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled"
    again = await api.post(f"/v1/payments/{pid}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "canceled"

    state = await temporal_client.get_workflow_handle(pid).result()
    assert PaymentState.model_validate(state).status == "canceled"
    events = await payment_events(
        stack.kafka_bootstrap_servers,
        pid,
        ["payments.raw", "payments.canceled", "payments.confirmed", "payments.rejected"],
        until=lambda mine: any(e.topic == "payments.canceled" for e in mine),
    )
    assert [(e.topic, e.id) for e in events] == [
        ("payments.canceled", event_id(pid, EventKind.CANCELED))
    ]
    assert await assert_ledger_balanced(engine, pid) == []
    register = await register_row(engine, pid)
    assert register is not None
    assert (register["status"], register["captured"]) == ("canceled", 0)


async def test_cancel_after_posting_is_refused(
    api: httpx.AsyncClient, engine: AsyncEngine, temporal_client: Client
) -> None:
    payment = await captured_payment(api, 2000)
    pid = payment["id"]

    refused = await api.post(f"/v1/payments/{pid}/cancel")
    assert refused.status_code == 409 and _error_code(refused) == "payment_not_cancelable"
    assert "refund" in refused.json()["error"]["message"]

    # The same as a signal (an operator in the UI): refused and said so, money untouched.
    handle = temporal_client.get_workflow_handle(pid)
    await handle.signal("cancel", CancelSignal(reason="operator"))
    payment = await wait_for_payment(api, pid, lambda p: p["cancel_refused"] is not None)
    assert payment["status"] == "succeeded"
    assert "refund it instead" in payment["cancel_refused"]
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment"]


async def test_operator_cancel_of_a_succeeded_payment_only_closes_its_window(
    api: httpx.AsyncClient, engine: AsyncEngine, temporal_client: Client
) -> None:
    payment = await captured_payment(api, 2200)
    pid = payment["id"]
    handle = temporal_client.get_workflow_handle(pid)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), 30)
    assert isinstance(failure.value.cause, CancelledError)

    # The money stays captured; the final word is in the register; follow-ups are refused.
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment"]
    register = await register_row(engine, pid)
    assert register is not None
    assert (register["status"], register["captured"]) == ("succeeded", 2200)
    assert register["summary"]["status"] == "succeeded"
    late = await api.post(
        f"/v1/payments/{pid}/refunds", json={}, headers={"Idempotency-Key": uuid.uuid4().hex}
    )
    assert late.status_code == 409 and _error_code(late) == "payment_closed"


async def test_ledger_refusal_after_raw_voids_it_with_payments_failed(
    api: httpx.AsyncClient, engine: AsyncEngine, stack: Stack
) -> None:
    # Accounts open on first posting: a first payment opens the merchant's, then it closes.
    first = await captured_payment(api, 1000)
    merchant = first["merchant_id"]
    await Ledger(engine).close_account(f"merchant:{CLIENT}:{merchant}:USD")

    created = await create_payment(api, payment_body(amount=1500, merchant_id=merchant))
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    payment = await wait_for_payment(api, pid, lambda p: p["status"] == "failed")
    assert "AccountClosed" in payment["failure_reason"]
    assert payment["amount_captured"] == 0

    events = await payment_events(
        stack.kafka_bootstrap_servers,
        pid,
        ["payments.raw", "payments.failed", "payments.confirmed"],
        until=lambda mine: any(e.topic == "payments.failed" for e in mine),
    )
    # Offsets of two topics don't compare: the payment's own event sequence orders them.
    events.sort(key=lambda e: int(e.body["data"]["sequence"]))
    assert [e.topic for e in events] == ["payments.raw", "payments.failed"]
    raw, failed = events
    # Keyed alike, so the same partition number of each topic: a consumer joining the topics
    # co-partitions them.
    assert (raw.key, raw.partition) == (failed.key, failed.partition)
    assert _occurred_at(raw) <= _occurred_at(failed)
    assert failed.id == event_id(pid, EventKind.FAILED)
    assert failed.body["data"]["status"] == "failed"
    assert "AccountClosed" in failed.body["data"]["failure_reason"]

    assert await assert_ledger_balanced(engine, pid) == []
    register = await register_row(engine, pid)
    assert register is not None
    assert (register["status"], register["captured"]) == ("failed", 0)


# ── operator cancel after posting, before confirmation: a worker we can hold ───────────────


@dataclass
class Rig:
    settings: Settings
    api: httpx.AsyncClient
    kafka: GatedKafka
    ledger: FlakyLedger


class FlakyLedger(LedgerActivities):
    """Fails the first attempt of a chosen payment's reversal, as a database blip would; or
    commits a chosen payment's capture and then fails the step for good, so the workflow never
    learns that its posting committed (as when the workflow task that ran it was lost)."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger)
        self.flaky: set[str] = set()
        self.attempts: dict[str, int] = {}
        self.unknown_commits: set[str] = set()

    @activity.defn(name="post_ledger_transaction")
    async def post_ledger_transaction(self, posting: LedgerPosting) -> LedgerReceipt:
        txn = posting.transaction
        if txn.kind == TransactionKind.PAYMENT_REVERSAL:
            self.attempts[txn.payment_id] = self.attempts.get(txn.payment_id, 0) + 1
            if txn.payment_id in self.flaky and self.attempts[txn.payment_id] == 1:
                raise RuntimeError("connection reset while posting the reversal")
        receipt = await super().post_ledger_transaction(posting)
        if txn.kind == TransactionKind.PAYMENT and txn.payment_id in self.unknown_commits:
            raise ApplicationError("the answer to the commit was lost", non_retryable=True)
        return receipt


@pytest.fixture(scope="module")
async def rig(app_settings: Settings, temporal_client: Client) -> AsyncIterator[Rig]:
    """The real activities on a task queue of this module's own, behind its own API app."""
    # Regular activities: these tests hold a forward step open and cancel meanwhile. A local
    # activity runs inside a workflow task, so a cancel reaches the workflow only after that
    # task's forward steps are done (docs/runbook.md, "Cancel").
    settings = app_settings.model_copy(
        update={"task_queue": f"comp-{uuid.uuid4().hex[:8]}", "local_activities": False}
    )
    kafka: list[GatedKafka] = []
    ledger: list[FlakyLedger] = []

    def gated(publisher: EventPublisher, *recording: Any) -> GatedKafka:
        kafka.append(GatedKafka(publisher, *recording))
        return kafka[0]

    def flaky(real: Ledger) -> FlakyLedger:
        ledger.append(FlakyLedger(real))
        return ledger[0]

    async with (
        payment_worker(settings, temporal_client, kafka_activities=gated, ledger_activities=flaky),
        api_client(settings, temporal_client, TEST_API_KEY) as client,
    ):
        yield Rig(settings, client, kafka[0], ledger[0])


async def _held_at(rig: Rig, kind: EventKind) -> tuple[str, dict[str, Any]]:
    """A payment created through the API whose `kind` event is being held."""
    key = f"key-{uuid.uuid4().hex}"
    body = payment_body(amount=4200, merchant_id=new_merchant())
    pid = payment_id_for(CLIENT, key)
    rig.kafka.hold(pid, kind)
    created = await create_payment(rig.api, body, key=key, wait=0)
    assert created.status_code == 201, created.text
    await rig.kafka.wait_held(pid, timeout=20)
    return pid, body


async def _held_after_posting(rig: Rig, engine: AsyncEngine) -> tuple[str, dict[str, Any]]:
    """A payment posted to the ledger whose payments.confirmed is being held."""
    pid, body = await _held_at(rig, EventKind.CONFIRMED)
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment"]
    return pid, body


async def test_cancel_while_raw_is_published_stops_before_the_ledger(
    rig: Rig, engine: AsyncEngine, stack: Stack, temporal_client: Client
) -> None:
    pid, _ = await _held_at(rig, EventKind.RAW)
    accepted = await rig.api.post(f"/v1/payments/{pid}/cancel", params={"wait": 0.5})
    # Accepted while payments.raw is still on its way: the payment stops right after it.
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["status"] == "processing"
    rig.kafka.release(pid)

    state = PaymentState.model_validate(
        await asyncio.wait_for(temporal_client.get_workflow_handle(pid).result(), 30)
    )
    assert state.status == "canceled" and not state.ledger_posted
    events = await payment_events(
        stack.kafka_bootstrap_servers,
        pid,
        ["payments.raw", "payments.canceled", "payments.confirmed"],
        until=lambda mine: any(e.topic == "payments.canceled" for e in mine),
    )
    assert [e.topic for e in sorted(events, key=lambda e: int(e.body["data"]["sequence"]))] == [
        "payments.raw",
        "payments.canceled",
    ]
    assert await assert_ledger_balanced(engine, pid) == []
    canceled = await rig.api.post(f"/v1/payments/{pid}/cancel")
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"


async def _cancel_while_confirmation_is_held(
    rig: Rig, engine: AsyncEngine, temporal_client: Client, pid: str
) -> PaymentState:
    handle = temporal_client.get_workflow_handle(pid)
    await handle.cancel()
    # The workflow lets the in-flight confirmation settle before it compensates: a
    # payments.canceled must never be overtaken by the payments.confirmed it voids.
    await asyncio.sleep(0.5)
    assert [r["kind"] for r in await assert_ledger_balanced(engine, pid)] == ["payment"]
    rig.kafka.release(pid)

    with pytest.raises(WorkflowFailureError) as failure:
        await asyncio.wait_for(handle.result(), 30)
    assert isinstance(failure.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    state: PaymentState = await handle.query("state", result_type=PaymentState)
    return state


async def test_operator_cancel_after_posting_reverses_then_voids_then_tells_the_crm(
    rig: Rig,
    engine: AsyncEngine,
    stack: Stack,
    crm_server: FakeCrmServer,
    temporal_client: Client,
) -> None:
    pid, body = await _held_after_posting(rig, engine)
    state = await _cancel_while_confirmation_is_held(rig, engine, temporal_client, pid)
    assert state.status == "canceled" and state.captured == 0
    assert state.history[-1].note == "workflow canceled by an operator"

    # Ledger: the capture, then its reversal; both accounts net to zero.
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "payment_reversal"]
    assert await account_balance(engine, f"customer:{CLIENT}:{body['customer_id']}:USD") == 0
    assert await account_balance(engine, f"merchant:{CLIENT}:{body['merchant_id']}:USD") == 0
    register = await register_row(engine, pid)
    assert register is not None
    assert (register["status"], register["captured"]) == ("canceled", 0)

    events = await payment_events(
        stack.kafka_bootstrap_servers,
        pid,
        ["payments.raw", "payments.confirmed", "payments.canceled"],
        until=lambda mine: any(e.topic == "payments.canceled" for e in mine),
    )
    # Kafka: raw, the confirmation that was in flight, then the void, on the same partition
    # number of each topic.
    assert len({e.partition for e in events}) == 1
    assert [e.topic for e in sorted(events, key=lambda e: int(e.body["data"]["sequence"]))] == [
        "payments.raw",
        "payments.confirmed",
        "payments.canceled",
    ]
    canceled = next(e for e in events if e.topic == "payments.canceled")
    assert canceled.id == event_id(pid, EventKind.CANCELED)
    assert canceled.body["data"]["status"] == "canceled"

    # Compensations in reverse order: the reversal posted, then payments.canceled, then the CRM.
    hooks = await crm_hooks(crm_server, pid, lambda hs: any(_kind(h) == "canceled" for h in hs))
    told = next(h for h in hooks if _kind(h) == "canceled")
    assert told.header("Idempotency-Key") == canceled.id
    assert "confirmed" not in {_kind(h) for h in hooks}  # the CRM never heard of a confirmation
    # The void is the reversal's own event (one body under its id, in the outbox and on
    # Kafka), so its occurred_at precedes the commit; the record's send time follows it.
    reversed_at = await _posted_at(engine, pid, "payment_reversal")
    assert canceled.timestamp_ms is not None
    voided_at = canceled.timestamp_ms / 1000
    assert reversed_at.timestamp() <= voided_at
    assert voided_at <= told.received_at <= time.time()


async def test_a_compensation_that_fails_once_is_retried_and_posts_once(
    rig: Rig, engine: AsyncEngine, temporal_client: Client
) -> None:
    pid, body = await _held_after_posting(rig, engine)
    rig.ledger.flaky.add(pid)
    state = await _cancel_while_confirmation_is_held(rig, engine, temporal_client, pid)

    assert rig.ledger.attempts[pid] == 2  # failed once, retried by its retry policy
    assert state.status == "canceled"
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "payment_reversal"]
    assert await account_balance(engine, f"merchant:{CLIENT}:{body['merchant_id']}:USD") == 0


async def test_a_capture_that_committed_without_the_workflow_knowing_is_reversed(
    rig: Rig, engine: AsyncEngine
) -> None:
    """The saga cannot know whether a posting whose step failed had committed: the reversal
    asks the ledger, so the money is never left captured on a payment that did not succeed."""
    key = f"key-{uuid.uuid4().hex}"
    body = payment_body(amount=4300, merchant_id=new_merchant())
    pid = payment_id_for(CLIENT, key)
    rig.ledger.unknown_commits.add(pid)
    created = await create_payment(rig.api, body, key=key, wait=0)
    assert created.status_code == 201, created.text

    payment = await wait_for_payment(rig.api, pid, lambda p: p["status"] == "failed")
    assert payment["amount_captured"] == 0
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "payment_reversal"]
    register = await register_row(engine, pid)
    assert register is not None and register["captured"] == 0
    assert await account_balance(engine, f"merchant:{CLIENT}:{body['merchant_id']}:USD") == 0


def _occurred_at(event: ConsumedEvent) -> datetime:
    return datetime.fromisoformat(event.body["occurred_at"])


def _kind(hook: Any) -> str:
    kind: str = hook.json()["event_kind"]
    return kind


async def _posted_at(engine: AsyncEngine, payment_id: str, kind: str) -> datetime:
    async with engine.connect() as conn:
        value = await conn.scalar(
            text("SELECT created_at FROM ledger_transactions WHERE payment_id = :p AND kind = :k"),
            {"p": payment_id, "k": kind},
        )
    assert isinstance(value, datetime)
    return value
