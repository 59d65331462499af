"""The ledger's tables as SQLAlchemy sees them (the schema itself is the migrations'):
accounts, the payments register, transactions, entries, and the events store (the outbox).

`metadata` is shared by every table paysaga reads or writes in this database.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = sa.MetaData()
accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column(
        "id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
    ),
    sa.Column("code", sa.String),
    sa.Column("type", sa.String),
    sa.Column("currency", sa.String),
    sa.Column("status", sa.String),
    sa.Column("max_balance", sa.BigInteger),  # migration 0002; NULL: no limit
)
payments = sa.Table(
    "payments",
    metadata,
    sa.Column("payment_id", sa.String, primary_key=True),
    sa.Column("client_id", sa.String),
    sa.Column("customer_id", sa.String),
    sa.Column("merchant_id", sa.String),
    sa.Column("currency", sa.String),
    sa.Column("amount", sa.BigInteger),
    sa.Column("captured", sa.BigInteger),
    sa.Column("refunded", sa.BigInteger),
    sa.Column("disputed", sa.BigInteger),
    sa.Column("dispute_lost", sa.BigInteger),
    sa.Column("status", sa.String),
    sa.Column("summary", JSONB),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
ledger_transactions = sa.Table(
    "ledger_transactions",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("payment_id", sa.String),
    sa.Column("kind", sa.String),
    sa.Column("reference", sa.String),
    sa.Column("description", sa.String),
    sa.Column("created_at", sa.DateTime(timezone=True)),
)
ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column(
        "id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
    ),
    sa.Column("transaction_id", UUID(as_uuid=True)),
    sa.Column("account_id", UUID(as_uuid=True)),
    sa.Column("amount", sa.BigInteger),
    sa.Column("currency", sa.String),
)
outbox_events = sa.Table(
    "outbox_events",
    metadata,
    sa.Column("event_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("transaction_id", UUID(as_uuid=True)),
    sa.Column("payment_id", sa.String),
    sa.Column("topic", sa.String),
    sa.Column("event_type", sa.String),
    sa.Column("payload", JSONB),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    # Migration 0005: the outbox is also the events store (activities/event_store.py).
    sa.Column("client_id", sa.String),
    sa.Column("subject", sa.String),
    sa.Column("published_at", sa.DateTime(timezone=True)),
    sa.Column("dispatched_at", sa.DateTime(timezone=True)),
)
