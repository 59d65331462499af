"""Shared steps for saga tests: create payments through the API, wait, read the ledger."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine


def payment_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": 2500,
        "currency": "USD",
        "customer_id": f"cus_{uuid.uuid4().hex[:10]}",
        "merchant_id": "mer_acme",
        "payment_method": "pm_card_visa_0001",
        "description": "Order #1001",
        "metadata": {"order_id": "1001"},
    }
    body.update(overrides)
    return body


async def create_payment(
    api: httpx.AsyncClient,
    body: dict[str, Any] | None = None,
    *,
    key: str | None = None,
    wait: float = 20,
) -> httpx.Response:
    return await api.post(
        "/v1/payments",
        json=body or payment_body(),
        headers={"Idempotency-Key": key or f"key-{uuid.uuid4().hex}"},
        params={"wait": wait},
    )


async def wait_for_payment(
    api: httpx.AsyncClient, payment_id: str, predicate: Any, timeout: float = 30
) -> dict[str, Any]:
    """Poll GET until `predicate(payment)` holds; returns the last payment seen."""
    deadline = asyncio.get_running_loop().time() + timeout
    payment: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        response = await api.get(f"/v1/payments/{payment_id}")
        if response.status_code == 200:
            payment = response.json()
            if predicate(payment):
                return payment
        await asyncio.sleep(0.1)
    raise AssertionError(f"payment {payment_id} never got there; last seen: {payment}")


async def ledger_rows(engine: AsyncEngine, payment_id: str) -> list[dict[str, Any]]:
    """The payment's ledger transactions in posting order, with their entries' sums."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT t.kind, t.reference, e.currency, sum(e.amount) AS total, "
                "count(*) AS entries "
                "FROM ledger_transactions t JOIN ledger_entries e ON e.transaction_id = t.id "
                "WHERE t.payment_id = :p "
                "GROUP BY t.id, t.kind, t.reference, e.currency, t.created_at "
                "ORDER BY t.created_at"
            ),
            {"p": payment_id},
        )
        return [dict(r._mapping) for r in rows]


async def account_balance(engine: AsyncEngine, code: str) -> int:
    async with engine.connect() as conn:
        value = await conn.scalar(
            text(
                "SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e "
                "JOIN accounts a ON a.id = e.account_id WHERE a.code = :c"
            ),
            {"c": code},
        )
        return int(value or 0)
