"""Refunds and disputes on a captured payment: through the API and as operators' signals, with
the real worker, ledger, broker and CRM webhook. Every path ends with a balanced ledger."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from domain.events import EventKind, event_id
from domain.payment import FollowUpStatus, PaymentState, PaymentStatus, RefundSignal
from infra.embedded.stack import Stack
from infra.embedded.temporal import temporal_binary
from tests.helpers.fake_crm import FakeCrmServer, RecordedRequest
from tests.helpers.follow_ups import (
    assert_ledger_balanced,
    captured_payment,
    close_dispute,
    crm_hooks,
    ledger_entries,
    open_dispute,
    payment_events,
    refund,
    refund_rows_total,
    register_row,
)
from tests.helpers.saga import account_balance, wait_for_payment

CLIENT = "test-client"  # TEST_API_KEY's client: its customers' and merchants' accounts move


def _error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


async def test_partial_and_multiple_refunds_until_fully_refunded(
    api: httpx.AsyncClient,
    engine: AsyncEngine,
    stack: Stack,
    crm_server: FakeCrmServer,
    temporal_client: Client,
) -> None:
    payment = await captured_payment(api, 10_000)
    pid, customer, merchant = payment["id"], payment["customer_id"], payment["merchant_id"]

    first = await refund(api, pid, 3000, reason="damaged in transit")
    assert first.status_code == 201, first.text
    assert first.json()["status"] == "succeeded"
    assert (first.json()["amount"], first.json()["reason"]) == (3000, "damaged in transit")
    payment = (await api.get(f"/v1/payments/{pid}")).json()
    assert payment["status"] == "partially_refunded"
    assert (payment["amount_refunded"], payment["amount_refundable"]) == (3000, 7000)

    second = await refund(api, pid, 2000)
    assert second.status_code == 201, second.text
    rest = await refund(api, pid)  # no amount: everything that remains
    assert rest.status_code == 201, rest.text
    assert rest.json()["amount"] == 5000

    payment = (await api.get(f"/v1/payments/{pid}")).json()
    assert payment["status"] == "refunded"
    assert (payment["amount_captured"], payment["amount_refunded"]) == (10_000, 10_000)
    assert payment["amount_refundable"] == 0
    refund_ids = [first.json()["id"], second.json()["id"], rest.json()["id"]]
    assert [(r["id"], r["amount"], r["status"]) for r in payment["refunds"]] == [
        (refund_ids[0], 3000, "succeeded"),
        (refund_ids[1], 2000, "succeeded"),
        (refund_ids[2], 5000, "succeeded"),
    ]
    statuses = [change["status"] for change in payment["status_history"]]
    assert statuses[-3:] == ["succeeded", "partially_refunded", "refunded"]

    # Refunding a fully refunded payment is refused up front, and nothing is recorded.
    late = await refund(api, pid, 100)
    assert late.status_code == 409 and _error_code(late) == "charge_already_refunded"
    assert len((await api.get(f"/v1/payments/{pid}")).json()["refunds"]) == 3
    # Sent straight to the workflow (an operator), it is recorded as failed, with the reason.
    await temporal_client.get_workflow_handle(pid).signal(
        "refund", RefundSignal(refund_id="re_too_late", amount=100)
    )
    payment = await wait_for_payment(api, pid, lambda p: len(p["refunds"]) == 4)
    too_late = payment["refunds"][-1]
    assert (too_late["id"], too_late["status"]) == ("re_too_late", "failed")
    assert "Nothing is left to refund" in too_late["failure_reason"]
    assert payment["amount_refunded"] == 10_000

    # Ledger: the capture and one reversing transaction per refund, each balanced; the
    # customer and the merchant are back where they started.
    rows = await assert_ledger_balanced(engine, pid)
    assert [(r["kind"], r["reference"]) for r in rows] == [
        ("payment", ""),
        *(("refund", rid) for rid in refund_ids),
    ]
    assert await account_balance(engine, f"customer:{CLIENT}:{customer}:USD") == 0
    assert await account_balance(engine, f"merchant:{CLIENT}:{merchant}:USD") == 0
    register = await register_row(engine, pid)
    assert register is not None
    assert (register["captured"], register["refunded"], register["status"]) == (
        10_000,
        10_000,
        "refunded",
    )

    # Kafka: one payments.refunded per refund; its id is the deterministic id of the refund.
    events = await payment_events(
        stack.kafka_bootstrap_servers,
        pid,
        ["payments.refunded"],
        until=lambda mine: len(mine) >= 3,
    )
    assert {e.id: e.body["data"]["amount"] for e in events} == {
        event_id(pid, EventKind.REFUNDED, rid): amount
        for rid, amount in zip(refund_ids, (3000, 2000, 5000), strict=True)
    }
    assert all(e.headers["ce_type"] == "com.paysaga.payment.refunded" for e in events)

    # CRM: one signed update per refund, keyed by the same event id.
    hooks = await crm_hooks(
        crm_server, pid, lambda hs: sum(h.json()["event_kind"] == "refunded" for h in hs) >= 3
    )
    refunded_hooks = {
        h.header("Idempotency-Key"): h.json()["details"]["refund_amount"]
        for h in hooks
        if h.json()["event_kind"] == "refunded"
    }
    assert refunded_hooks == {e.id: e.body["data"]["amount"] for e in events}


async def test_the_same_refund_key_twice_is_one_refund(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    payment = await captured_payment(api, 5000)
    pid = payment["id"]
    key = f"refund-once-{uuid.uuid4().hex}"

    first = await refund(api, pid, 1500, key=key)
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    again = await refund(api, pid, 1500, key=key)
    assert again.status_code == 201, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    # Without an amount the retry still names the same refund.
    bare = await refund(api, pid, key=key)
    assert bare.status_code == 201 and bare.json()["id"] == first.json()["id"]
    # The key reused for another amount is the client's bug, not a second refund.
    other = await refund(api, pid, 999, key=key)
    assert other.status_code == 409 and _error_code(other) == "idempotency_key_reused"

    # Sent twice at once, a new key still makes one refund.
    racing_key = f"refund-race-{uuid.uuid4().hex}"
    racing = await asyncio.gather(*(refund(api, pid, 500, key=racing_key) for _ in range(2)))
    assert [r.status_code for r in racing] == [201, 201], [r.text for r in racing]
    assert racing[0].json()["id"] == racing[1].json()["id"]

    payment = (await api.get(f"/v1/payments/{pid}")).json()
    assert [(r["amount"], r["status"]) for r in payment["refunds"]] == [
        (1500, "succeeded"),
        (500, "succeeded"),
    ]
    assert payment["amount_refunded"] == 2000
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "refund", "refund"]


async def test_concurrent_refunds_beyond_captured_one_fails_and_total_stays_within(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    payment = await captured_payment(api, 10_000)
    pid = payment["id"]

    responses = await asyncio.gather(refund(api, pid, 6000), refund(api, pid, 7000))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201, 409], [r.text for r in responses]
    won = next(r for r in responses if r.status_code == 201).json()
    lost = next(r for r in responses if r.status_code != 201)
    # Either the API saw the first refund already reserved, or the workflow refused it.
    assert _error_code(lost) in ("refund_failed", "amount_too_large"), lost.text
    assert "refundable" in lost.json()["error"]["message"]

    payment = await wait_for_payment(
        api, pid, lambda p: all(r["status"] != "pending" for r in p["refunds"])
    )
    assert payment["amount_refunded"] == won["amount"]
    assert payment["status"] == "partially_refunded"
    succeeded = [r for r in payment["refunds"] if r["status"] == "succeeded"]
    assert [r["id"] for r in succeeded] == [won["id"]]
    for failed in (r for r in payment["refunds"] if r["status"] == "failed"):
        assert failed["failure_reason"]  # recorded with its reason, never silently dropped

    assert await refund_rows_total(engine, pid) == won["amount"] <= 10_000
    register = await register_row(engine, pid)
    assert register is not None
    assert register["refunded"] == won["amount"]
    assert register["refunded"] + register["disputed"] + register["dispute_lost"] <= 10_000
    await assert_ledger_balanced(engine, pid)


async def test_dispute_opened_then_won_returns_the_funds_to_the_merchant(
    api: httpx.AsyncClient,
    engine: AsyncEngine,
    stack: Stack,
    crm_server: FakeCrmServer,
) -> None:
    payment = await captured_payment(api, 8000)
    pid, merchant = payment["id"], payment["merchant_id"]
    merchant_account = f"merchant:{CLIENT}:{merchant}:USD"
    assert await account_balance(engine, merchant_account) == -8000  # credited

    opened = await open_dispute(api, pid, 5000)
    assert opened.status_code == 201, opened.text
    dispute = opened.json()
    assert (dispute["status"], dispute["amount"], dispute["reason_code"]) == (
        "open",
        5000,
        "fraudulent",
    )
    payment = (await api.get(f"/v1/payments/{pid}")).json()
    assert payment["status"] == "disputed"
    assert (payment["amount_disputed"], payment["amount_refundable"]) == (5000, 3000)
    # The disputed amount left the merchant for the disputes account.
    assert await account_balance(engine, merchant_account) == -3000
    held = [e for e in await ledger_entries(engine, pid) if e["kind"] == "dispute_opened"]
    assert sorted((e["account"], e["amount"]) for e in held) == [
        ("disputes:USD", -5000),
        (merchant_account, 5000),
    ]

    # A refund larger than what the dispute left is refused: a valid request the payment
    # cannot honour as it stands (409, as the document declares), not a malformed one.
    too_much = await refund(api, pid, 4000)
    assert too_much.status_code == 409 and _error_code(too_much) == "amount_too_large"

    closed = await close_dispute(api, pid, dispute["id"], "won")
    assert closed.status_code == 200, closed.text
    assert closed.json()["status"] == "won"
    payment = (await api.get(f"/v1/payments/{pid}")).json()
    assert payment["status"] == "succeeded"
    assert (payment["amount_disputed"], payment["amount_dispute_lost"]) == (0, 0)
    assert await account_balance(engine, merchant_account) == -8000
    # Closing it again the same way answers the same; the other way is refused.
    again = await close_dispute(api, pid, dispute["id"], "won")
    assert again.status_code == 200 and again.json()["status"] == "won"
    flipped = await close_dispute(api, pid, dispute["id"], "lost")
    assert flipped.status_code == 409

    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "dispute_opened", "dispute_won"]
    register = await register_row(engine, pid)
    assert register is not None
    assert (register["disputed"], register["dispute_lost"], register["status"]) == (
        0,
        0,
        "succeeded",
    )

    events = await payment_events(
        stack.kafka_bootstrap_servers,
        pid,
        ["payments.dispute.opened", "payments.dispute.won"],
        until=lambda mine: len(mine) >= 2,
    )
    assert {e.topic: e.id for e in events} == {
        "payments.dispute.opened": event_id(pid, EventKind.DISPUTE_OPENED, dispute["id"]),
        "payments.dispute.won": event_id(pid, EventKind.DISPUTE_WON, dispute["id"]),
    }
    hooks = await crm_hooks(
        crm_server, pid, lambda hs: {"dispute.opened", "dispute.won"} <= _kinds(hs)
    )
    assert {"confirmed", "dispute.opened", "dispute.won"} <= _kinds(hooks)


def _kinds(hooks: list[RecordedRequest]) -> set[str]:
    return {h.json()["event_kind"] for h in hooks}


async def test_dispute_lost_after_a_partial_refund_never_returns_more_than_captured(
    api: httpx.AsyncClient,
    engine: AsyncEngine,
    stack: Stack,
    crm_server: FakeCrmServer,
    temporal_client: Client,
) -> None:
    payment = await captured_payment(api, 10_000)
    pid, customer, merchant = payment["id"], payment["customer_id"], payment["merchant_id"]
    assert (await refund(api, pid, 4000)).status_code == 201

    # The dispute cannot claim more than the refund left.
    too_much = await open_dispute(api, pid, 7000)
    assert too_much.status_code == 409 and _error_code(too_much) == "amount_too_large"
    opened = await open_dispute(api, pid)  # no amount: all that remains
    assert opened.status_code == 201, opened.text
    dispute = opened.json()
    assert dispute["amount"] == 6000
    assert (await refund(api, pid, 1)).status_code == 409  # nothing left to refund

    lost = await close_dispute(api, pid, dispute["id"], "lost")
    assert lost.status_code == 200, lost.text
    assert lost.json()["status"] == "lost"

    # The query is the whole story: amounts, each follow-up with its status, the history.
    state = await temporal_client.get_workflow_handle(pid).query("state", result_type=PaymentState)
    assert (state.captured, state.refunded, state.disputed, state.dispute_lost) == (
        10_000,
        4000,
        0,
        6000,
    )
    assert state.refunded + state.dispute_lost == state.captured
    assert state.status == PaymentStatus.REFUNDED
    assert [(r.amount, r.status) for r in state.refunds] == [(4000, FollowUpStatus.SUCCEEDED)]
    assert [(d.id, d.amount, d.status) for d in state.disputes] == [(dispute["id"], 6000, "lost")]
    assert [c.status for c in state.history][-4:] == [
        PaymentStatus.SUCCEEDED,
        PaymentStatus.PARTIALLY_REFUNDED,
        PaymentStatus.DISPUTED,
        PaymentStatus.REFUNDED,
    ]

    # Money: the customer got everything back, once; the merchant also paid the fee.
    fee = 1500
    assert await account_balance(engine, f"customer:{CLIENT}:{customer}:USD") == 0
    assert await account_balance(engine, f"merchant:{CLIENT}:{merchant}:USD") == fee
    lost_entries = [e for e in await ledger_entries(engine, pid) if e["kind"] == "dispute_lost"]
    assert sorted((e["account"], e["amount"]) for e in lost_entries) == sorted(
        [
            ("disputes:USD", 6000),
            (f"customer:{CLIENT}:{customer}:USD", -6000),
            (f"merchant:{CLIENT}:{merchant}:USD", fee),
            ("fees:chargeback:USD", -fee),
        ]
    )
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["kind"] for r in rows] == ["payment", "refund", "dispute_opened", "dispute_lost"]
    register = await register_row(engine, pid)
    assert register is not None
    assert register["refunded"] + register["disputed"] + register["dispute_lost"] == 10_000

    events = await payment_events(
        stack.kafka_bootstrap_servers,
        pid,
        ["payments.dispute.lost"],
        until=lambda mine: len(mine) >= 1,
    )
    assert [(e.id, e.body["data"]["fee"]) for e in events] == [
        (event_id(pid, EventKind.DISPUTE_LOST, dispute["id"]), fee)
    ]
    await crm_hooks(crm_server, pid, lambda hs: "dispute.lost" in _kinds(hs))


async def test_operators_signal_refunds_with_plain_json(
    api: httpx.AsyncClient, engine: AsyncEngine, stack: Stack, temporal_client: Client
) -> None:
    """What an operator types in the Temporal UI or CLI is plain JSON: no pydantic client."""
    payment = await captured_payment(api, 3000)
    pid = payment["id"]

    # The typed way, as the API and scripts do it.
    await temporal_client.get_workflow_handle(pid).signal(
        "refund", RefundSignal(refund_id="re_ops_typed", amount=100, reason="goodwill")
    )
    # A client with Temporal's default JSON converter, as the UI sends a signal.
    plain = await Client.connect(stack.temporal_address)
    await plain.get_workflow_handle(pid).signal("refund", {"refund_id": "re_ops_1", "amount": 200})
    # And the CLI itself.
    signal_input = json.dumps({"refund_id": "re_cli_1", "amount": 300, "reason": "goodwill"})
    await _temporal_cli(
        stack, "signal", "--workflow-id", pid, "--name", "refund", "--input", signal_input
    )

    payment = await wait_for_payment(
        api,
        pid,
        lambda p: len(p["refunds"]) == 3 and all(r["status"] != "pending" for r in p["refunds"]),
    )
    assert [(r["id"], r["amount"], r["status"]) for r in payment["refunds"]] == [
        ("re_ops_typed", 100, "succeeded"),
        ("re_ops_1", 200, "succeeded"),
        ("re_cli_1", 300, "succeeded"),
    ]
    assert payment["amount_refunded"] == 600

    # The same id again from the CLI is the same refund.
    await _temporal_cli(
        stack, "signal", "--workflow-id", pid, "--name", "refund", "--input", signal_input
    )
    queried = await _temporal_cli(
        stack, "query", "--workflow-id", pid, "--name", "state", "--output", "json"
    )
    assert _find_key(json.loads(queried), "refunded") == 600
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["reference"] for r in rows if r["kind"] == "refund"] == [
        "re_ops_typed",
        "re_ops_1",
        "re_cli_1",
    ]


async def test_operators_refund_by_update_with_the_cli_and_get_the_answer(
    api: httpx.AsyncClient, engine: AsyncEngine, stack: Stack
) -> None:
    """The copy-paste commands of docs/signals.md: the Update answers with the refund once the
    ledger posted it, and a refused one names its reason and enters no history."""
    payment = await captured_payment(api, 2000)
    pid = payment["id"]
    made = await _temporal_cli(
        stack, "update", "execute", "--workflow-id", pid, "--name", "refund",
        "--update-id", "re_manual_1", "--output", "json",
        "--input", json.dumps({"refund_id": "re_manual_1", "amount": 500, "reason": "goodwill"}),
    )  # fmt: skip
    assert _find_key(json.loads(made), "status") == "succeeded"
    assert (await api.get(f"/v1/payments/{pid}")).json()["amount_refunded"] == 500

    argv = [
        temporal_binary(), "workflow", "update", "execute", "--address", stack.temporal_address,
        "--workflow-id", pid, "--name", "refund", "--update-id", "re_manual_2",
        "--input", json.dumps({"refund_id": "re_manual_2", "amount": 99_000}),
    ]  # fmt: skip
    refused = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=30
    )
    assert refused.returncode != 0
    assert "exceeds the 1500 minor units still refundable" in refused.stdout + refused.stderr
    rows = await assert_ledger_balanced(engine, pid)
    assert [r["reference"] for r in rows if r["kind"] == "refund"] == ["re_manual_1"]


async def _temporal_cli(stack: Stack, *args: str) -> str:
    """`temporal workflow …` against the test stack, off the event loop (the worker that
    answers queries runs on it)."""
    argv = [temporal_binary(), "workflow", *args, "--address", stack.temporal_address]
    done = await asyncio.to_thread(
        subprocess.run, argv, check=True, capture_output=True, text=True, timeout=30
    )
    return done.stdout


def _find_key(tree: object, key: str) -> object:
    """The first value under `key` anywhere in decoded JSON (the CLI wraps query results)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        tree = list(tree.values())
    if isinstance(tree, list):
        for item in tree:
            found = _find_key(item, key)
            if found is not None:
                return found
    return None


async def test_each_follow_up_has_its_own_update_and_its_own_answer(
    api: httpx.AsyncClient, engine: AsyncEngine
) -> None:
    """Update ids are per follow-up (its kind and its key), never shared: a refund and a
    dispute sent with the same string as key and network reference, refunds of two requests
    sent at once, and two closes of disputes, each get their own answer (a shared Update id
    would hand the second the first one's result)."""
    payment = await captured_payment(api, 10_000)
    pid = payment["id"]
    shared = f"shared-{uuid.uuid4().hex[:12]}"
    first, second, disputed = await asyncio.gather(
        refund(api, pid, 1000, key=shared),
        refund(api, pid, 2000, key=f"{shared}-2"),
        api.post(
            f"/v1/payments/{pid}/disputes",
            json={"amount": 3000, "reason_code": "fraudulent", "network_reference": shared},
        ),
    )
    assert first.status_code == second.status_code == disputed.status_code == 201
    assert (first.json()["object"], first.json()["amount"]) == ("refund", 1000)
    assert (second.json()["object"], second.json()["amount"]) == ("refund", 2000)
    assert (disputed.json()["object"], disputed.json()["amount"]) == ("dispute", 3000)
    assert first.json()["id"] != second.json()["id"]
    other = await open_dispute(api, pid, 500)
    assert other.status_code == 201, other.text
    won, lost = await asyncio.gather(
        close_dispute(api, pid, disputed.json()["id"], "won"),
        close_dispute(api, pid, other.json()["id"], "lost"),
    )
    assert (won.json()["id"], won.json()["status"]) == (disputed.json()["id"], "won")
    assert (lost.json()["id"], lost.json()["status"]) == (other.json()["id"], "lost")
    final = await wait_for_payment(api, pid, lambda p: p["amount_disputed"] == 0)
    assert (final["amount_refunded"], final["amount_dispute_lost"]) == (3000, 500)
    row = await register_row(engine, pid)
    assert row is not None and (row["refunded"], row["dispute_lost"]) == (3000, 500)
