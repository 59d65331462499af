"""The fraud rules' view of a customer, read from the payments register: the ledger package
answers it, as it answers every other read of the register."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from domain.fraud import VELOCITY_WINDOW, CustomerHistory
from infra.database import run_serializable
from ledger.tables import payments

# History is the customer's most recent payments only: bounded work per assessment however
# long the customer's history grows (the index is (client_id, customer_id, created_at)).
HISTORY_ROWS = 1000
_HISTORY_READ_ATTEMPTS = 3


async def load_customer_history(
    engine: AsyncEngine,
    client_id: str | None,
    customer_id: str,
    ccy: str,
    now: datetime | None = None,
) -> CustomerHistory:
    """One read-only query over the latest `HISTORY_ROWS` register rows of this client's
    customer, grouped by currency. Portable SQL (PostgreSQL and CockroachDB); retried on
    serialization conflicts. `client_id` None: the customer id across every client (only for
    activity tasks scheduled before tenants, see FraudCheck)."""
    since = (now or datetime.now(UTC)) - VELOCITY_WINDOW
    statement = _LEGACY_HISTORY_QUERY if client_id is None else _HISTORY_QUERY
    values = {"client_id": client_id, "customer_id": customer_id, "since": since}

    async def read(conn: AsyncConnection) -> list[sa.Row[Any]]:
        rows = await conn.execute(statement, values)
        return list(rows.all())

    rows = await run_serializable(engine, read, max_attempts=_HISTORY_READ_ATTEMPTS)
    return _history_from(rows, ccy)


def _history_query(*, per_client: bool = True) -> sa.Select[Any]:
    """Built once with bound parameters: scoring is on every payment's critical path, and
    building the statement cost more CPU than running it. The index is (client_id,
    customer_id, created_at) (migration 0004)."""
    since = sa.bindparam("since", type_=sa.DateTime(timezone=True))
    customer = payments.c.customer_id == sa.bindparam("customer_id", type_=sa.String)
    if per_client:
        customer &= payments.c.client_id == sa.bindparam("client_id", type_=sa.String)
    recent = (
        sa.select(
            payments.c.currency, payments.c.amount, payments.c.captured, payments.c.created_at
        )
        .where(customer)
        .order_by(payments.c.created_at.desc())
        .limit(HISTORY_ROWS)
        .subquery("recent")
    )
    captured = recent.c.captured > 0
    return sa.select(
        recent.c.currency,
        sa.func.sum(sa.case((captured, 1), else_=0)).label("captured_count"),
        sa.func.sum(sa.case((captured, recent.c.amount), else_=0)).label("captured_sum"),
        sa.func.max(sa.case((captured, recent.c.amount), else_=None)).label("largest"),
        sa.func.sum(sa.case((recent.c.created_at >= since, 1), else_=0)).label("last_hour"),
    ).group_by(recent.c.currency)


_HISTORY_QUERY = _history_query()
_LEGACY_HISTORY_QUERY = _history_query(per_client=False)


def _history_from(rows: list[sa.Row[Any]], ccy: str) -> CustomerHistory:
    # SUM over BIGINT comes back as a Decimal on both databases; int() keeps it exact.
    per_currency = {
        row.currency: (int(row.captured_count), int(row.captured_sum), row.largest) for row in rows
    }
    count, total, largest = per_currency.get(ccy, (0, 0, None))
    return CustomerHistory(
        payments_total=sum(c for c, _, _ in per_currency.values()),
        payments_last_hour=sum(int(row.last_hour) for row in rows),
        average_amount_same_currency=total // count if count else None,
        max_amount_same_currency=int(largest) if count and largest is not None else None,
        currencies_used=sorted(code for code, (c, _, _) in per_currency.items() if c > 0),
    )
