"""Inputs are bounded at every edge by what the schema stores (domain/bounds.py), so a value
too long for its column is refused at the door instead of failing deep inside a saga step."""

from __future__ import annotations

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

from domain.bounds import FINGERPRINT_LENGTH, ID_MAX, REASON_CODE_MAX, TEXT_MAX
from domain.fraud import amount_for_limit_share
from domain.payment import DisputeRequest, PaymentRequest, PaymentState, RefundSignal
from tests.helpers.follow_ups import assert_ledger_balanced, captured_payment, new_merchant, refund
from tests.helpers.saga import create_payment, payment_body, wait_for_payment

# Every column an edge writes into, with the bound that guards it.
COLUMNS = {
    ("ledger_transactions", "payment_id"): ID_MAX,
    ("ledger_transactions", "reference"): ID_MAX,  # refund and dispute ids
    ("ledger_transactions", "description"): TEXT_MAX,
    ("payments", "payment_id"): ID_MAX,
    ("payments", "client_id"): ID_MAX,
    ("payments", "customer_id"): ID_MAX,
    ("payments", "merchant_id"): ID_MAX,
    ("outbox_events", "payment_id"): ID_MAX,
    ("idempotency_keys", "payment_id"): ID_MAX,
    ("idempotency_keys", "client_id"): ID_MAX,
    ("idempotency_keys", "fingerprint"): FINGERPRINT_LENGTH,
}


async def test_the_schema_stores_exactly_what_the_bounds_allow(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT table_name, column_name, character_maximum_length FROM "
                "information_schema.columns WHERE table_schema = current_schema()"
            )
        )
        stored = {(r.table_name, r.column_name): r.character_maximum_length for r in rows}
    assert {column: stored.get(column) for column in COLUMNS} == COLUMNS


def test_the_api_models_declare_the_same_bounds() -> None:
    payment = PaymentRequest.model_json_schema()["properties"]
    assert payment["customer_id"]["maxLength"] == ID_MAX
    assert payment["merchant_id"]["maxLength"] == ID_MAX
    assert payment["description"]["anyOf"][0]["maxLength"] == TEXT_MAX
    dispute = DisputeRequest.model_json_schema()["properties"]
    assert dispute["reason_code"]["maxLength"] == REASON_CODE_MAX
    assert dispute["network_reference"]["maxLength"] == ID_MAX


async def test_an_over_long_refund_id_from_an_operator_is_recorded_failed_and_wedges_nothing(
    api: httpx.AsyncClient, temporal_client: Client, engine: AsyncEngine
) -> None:
    """A raw signal with a refund id longer than the ledger's reference column: recorded
    failed with the reason, and the payment's later follow-ups still go through. (Before, the
    posting failed with 22001 on every retry and every later follow-up queued behind it.)"""
    payment = await captured_payment(api, 5000)
    pid = payment["id"]
    handle = temporal_client.get_workflow_handle(pid)
    too_long = "re_" + "x" * (ID_MAX + 10)
    await handle.signal("refund", RefundSignal(refund_id=too_long, amount=100))
    await handle.signal(
        "refund", RefundSignal(refund_id="re_ops_ctrl", amount=100, reason="bad\x00reason")
    )
    await handle.signal("refund", RefundSignal(refund_id="re_ops_after", amount=200))

    payment = await wait_for_payment(
        api,
        pid,
        lambda p: len(p["refunds"]) == 3 and all(r["status"] != "pending" for r in p["refunds"]),
    )
    rejected, controlled, after = payment["refunds"]
    assert (rejected["id"], rejected["status"]) == (too_long[:ID_MAX], "failed")
    assert f"1-{ID_MAX} characters" in rejected["failure_reason"]
    assert (controlled["status"], controlled["reason"]) == ("failed", "badreason")
    assert "control" in controlled["failure_reason"]
    assert (after["id"], after["status"]) == ("re_ops_after", "succeeded")

    # The API's own refunds still go through, and the Update refuses the same id at the door.
    later = await refund(api, pid, 300)
    assert later.status_code == 201 and later.json()["status"] == "succeeded", later.text
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(
            "refund", RefundSignal(refund_id=too_long, amount=100), id="re_too_long_update"
        )
    assert isinstance(refused.value.cause, ApplicationError)
    assert refused.value.cause.type == "invalid_follow_up"

    rows = await assert_ledger_balanced(engine, pid)
    assert [r["reference"] for r in rows if r["kind"] == "refund"] == [
        "re_ops_after",
        later.json()["id"],
    ]
    state = await handle.query("state", result_type=PaymentState)
    assert state.refunded == 500


async def test_a_reviewers_text_is_clipped_to_what_the_state_keeps(
    api: httpx.AsyncClient, temporal_client: Client
) -> None:
    """Display text from operators (a review decision) is kept bounded and without control
    characters, which PostgreSQL's JSONB refuses when the outcome is recorded."""
    body = payment_body(amount=amount_for_limit_share("USD", 60), merchant_id=new_merchant())
    created = await create_payment(api, body, wait=10)
    assert created.json()["status"] == "requires_review", created.text
    handle = temporal_client.get_workflow_handle(created.json()["id"])
    await handle.signal(
        "approve", {"reviewer": "a" * (ID_MAX * 2), "note": "ok\x00" + "n" * (TEXT_MAX * 2)}
    )
    await wait_for_payment(api, created.json()["id"], lambda p: p["status"] == "succeeded")
    state = await handle.query("state", result_type=PaymentState)
    assert state.review is not None
    assert len(state.review.reviewer) == ID_MAX
    assert len(state.review.note) == TEXT_MAX and "\x00" not in state.review.note
