"""Steps shared by the refund, dispute, compensation and lifetime tests: a captured payment,
follow-up requests through the API, and what the ledger, Kafka and the CRM recorded."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.helpers.fake_crm import FakeCrmServer, RecordedRequest
from tests.helpers.kafka import ConsumedEvent, consume_events
from tests.helpers.saga import create_payment, ledger_rows, payment_body, wait_for_payment

WEBHOOK_PATH = "/hooks/paysaga"


def new_merchant() -> str:
    """A merchant of the test's own, so its account balance is the test's alone."""
    return f"mer_{uuid.uuid4().hex[:12]}"


async def captured_payment(
    api: httpx.AsyncClient, amount: int = 10_000, currency: str = "USD", **overrides: Any
) -> dict[str, Any]:
    """A payment through the API, waited for until captured and the CRM told."""
    body = payment_body(amount=amount, currency=currency, merchant_id=new_merchant())
    body.update(overrides)
    created = await create_payment(api, body)
    assert created.status_code == 201, created.text
    return await wait_for_payment(
        api,
        created.json()["id"],
        lambda p: p["status"] == "succeeded" and p["crm_sync"] == "synced",
    )


async def refund(
    api: httpx.AsyncClient,
    payment_id: str,
    amount: int | None = None,
    *,
    key: str | None = None,
    reason: str | None = None,
    wait: float = 10,
) -> httpx.Response:
    """POST a refund; `wait`: seconds the API waits for it to settle (0: answer at once)."""
    body: dict[str, Any] = {}
    if amount is not None:
        body["amount"] = amount
    if reason is not None:
        body["reason"] = reason
    return await api.post(
        f"/v1/payments/{payment_id}/refunds",
        json=body,
        headers={"Idempotency-Key": key or f"refund-{uuid.uuid4().hex}"},
        params={"wait": wait},
    )


async def open_dispute(
    api: httpx.AsyncClient, payment_id: str, amount: int | None = None, reason: str = "fraudulent"
) -> httpx.Response:
    body: dict[str, Any] = {
        "reason_code": reason,
        "network_reference": f"nr_{uuid.uuid4().hex}",
    }
    if amount is not None:
        body["amount"] = amount
    return await api.post(f"/v1/payments/{payment_id}/disputes", json=body)


async def close_dispute(
    api: httpx.AsyncClient, payment_id: str, dispute_id: str, outcome: str
) -> httpx.Response:
    return await api.post(
        f"/v1/payments/{payment_id}/disputes/{dispute_id}/close", json={"outcome": outcome}
    )


async def ledger_entries(engine: AsyncEngine, payment_id: str) -> list[dict[str, Any]]:
    """Every entry of the payment's transactions, in posting order."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT t.kind, t.reference, a.code AS account, e.amount, e.currency "
                "FROM ledger_transactions t JOIN ledger_entries e ON e.transaction_id = t.id "
                "JOIN accounts a ON a.id = e.account_id WHERE t.payment_id = :p "
                "ORDER BY t.created_at, e.amount"
            ),
            {"p": payment_id},
        )
        return [dict(r._mapping) for r in rows]


async def assert_ledger_balanced(engine: AsyncEngine, payment_id: str) -> list[dict[str, Any]]:
    """Zero-sum per transaction and currency; returns the transactions in posting order."""
    rows = await ledger_rows(engine, payment_id)
    unbalanced = [r for r in rows if r["total"] != 0]
    assert not unbalanced, unbalanced
    return rows


async def register_row(engine: AsyncEngine, payment_id: str) -> dict[str, Any] | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT captured, refunded, disputed, dispute_lost, status, summary "
                    "FROM payments WHERE payment_id = :p"
                ),
                {"p": payment_id},
            )
        ).first()
        return dict(row._mapping) if row is not None else None


async def refund_rows_total(engine: AsyncEngine, payment_id: str) -> int:
    """What the ledger's refund transactions returned to the customer."""
    async with engine.connect() as conn:
        value = await conn.scalar(
            text(
                "SELECT coalesce(sum(e.amount), 0) FROM ledger_transactions t "
                "JOIN ledger_entries e ON e.transaction_id = t.id "
                "JOIN accounts a ON a.id = e.account_id "
                "WHERE t.payment_id = :p AND t.kind = 'refund' AND a.code LIKE 'merchant:%'"
            ),
            {"p": payment_id},
        )
        return int(value or 0)


async def payment_events(
    bootstrap: str,
    payment_id: str,
    topics: Sequence[str],
    until: Callable[[list[ConsumedEvent]], bool],
    timeout: float = 20,
) -> list[ConsumedEvent]:
    """The payment's events on `topics` (first copy per event id), once `until(mine)` holds."""

    def mine(events: list[ConsumedEvent]) -> list[ConsumedEvent]:
        seen: set[str] = set()
        unique = []
        for event in events:
            if event.key == payment_id and event.id not in seen:
                seen.add(event.id)
                unique.append(event)
        return unique

    events = await asyncio.to_thread(
        consume_events, bootstrap, list(topics), until=lambda evs: until(mine(evs)), timeout=timeout
    )
    return mine(events)


async def crm_hooks(
    crm_server: FakeCrmServer,
    payment_id: str,
    predicate: Callable[[list[RecordedRequest]], bool],
    timeout: float = 15,
) -> list[RecordedRequest]:
    """The signed webhooks the CRM received about the payment, once `predicate` holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        hooks = [
            r for r in crm_server.requests_for(WEBHOOK_PATH) if r.json()["payment_id"] == payment_id
        ]
        if predicate(hooks) or asyncio.get_running_loop().time() > deadline:
            return hooks
        await asyncio.sleep(0.05)
