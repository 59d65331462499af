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

# Reconciliation (migration 0006, docs/reconciliation.md).
settlement_files = sa.Table(
    "settlement_files",
    metadata,
    sa.Column(
        "id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
    ),
    sa.Column("sha256", sa.String),
    sa.Column("filename", sa.String),
    sa.Column("imported_at", sa.DateTime(timezone=True)),
    sa.Column("line_count", sa.Integer),
    sa.Column("summary", JSONB),
)
settlement_batches = sa.Table(
    "settlement_batches",
    metadata,
    sa.Column("batch_id", sa.String, primary_key=True),
    sa.Column("file_id", UUID(as_uuid=True)),
    sa.Column("settlement_date", sa.Date),
    sa.Column("currency", sa.String),
    sa.Column("payout_amount", sa.BigInteger),
    sa.Column("bank_reference", sa.String),
    sa.Column("line_count", sa.Integer),
    sa.Column("ledger_transaction_id", UUID(as_uuid=True)),
)
settlement_expectations = sa.Table(
    "settlement_expectations",
    metadata,
    sa.Column(
        "id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
    ),
    sa.Column("payment_id", sa.String),
    sa.Column("kind", sa.String),
    sa.Column("merchant_reference", sa.String),
    sa.Column("acquirer_reference", sa.String),
    sa.Column("source_transaction_id", UUID(as_uuid=True)),
    sa.Column("amount", sa.BigInteger),
    sa.Column("currency", sa.String),
    sa.Column("expected_since", sa.DateTime(timezone=True)),
    sa.Column("status", sa.String),
    sa.Column("line_id", UUID(as_uuid=True)),
    sa.Column("settled_amount", sa.BigInteger),
    sa.Column("written_off_amount", sa.BigInteger),
    sa.Column("updated_at", sa.DateTime(timezone=True)),
)
settlement_lines = sa.Table(
    "settlement_lines",
    metadata,
    sa.Column(
        "id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")
    ),
    sa.Column("file_id", UUID(as_uuid=True)),
    sa.Column("line_number", sa.Integer),
    sa.Column("line_id", sa.String),
    sa.Column("batch_id", sa.String),
    sa.Column("settlement_date", sa.Date),
    sa.Column("type", sa.String),
    sa.Column("reference", sa.String),
    sa.Column("acquirer_reference", sa.String),
    sa.Column("movement_reference", sa.String),
    sa.Column("merchant_reference", sa.String),
    sa.Column("amount", sa.BigInteger),
    sa.Column("currency", sa.String),
    sa.Column("occurred_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.String),
    sa.Column("expectation_id", UUID(as_uuid=True)),
)
reconciliation_exceptions = sa.Table(
    "reconciliation_exceptions",
    metadata,
    sa.Column("id", sa.String, primary_key=True),
    sa.Column("kind", sa.String),
    sa.Column("status", sa.String),
    sa.Column("expectation_id", UUID(as_uuid=True)),
    sa.Column("line_id", UUID(as_uuid=True)),
    sa.Column("payment_id", sa.String),
    sa.Column("currency", sa.String),
    sa.Column("amount", sa.BigInteger),
    sa.Column("detail", sa.Text),
    sa.Column("opened_at", sa.DateTime(timezone=True)),
    sa.Column("resolution", sa.String),
    sa.Column("reason", sa.Text),
    sa.Column("resolved_at", sa.DateTime(timezone=True)),
    sa.Column("ledger_transaction_id", UUID(as_uuid=True)),
)
