"""Ledger schema: accounts, payments register, transactions, entries, outbox.

Portable to CockroachDB: UUID keys from gen_random_uuid() (no sequences, no hotspots), BIGINT
minor units, JSONB. The PL/pgSQL triggers that make an unbalanced or edited
ledger impossible to commit are PostgreSQL-only; on CockroachDB the same invariants are held by
the single write path (ledger/store.py) and verified by `paysaga check`.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_NOW = sa.text("now()")
_UUID = sa.text("gen_random_uuid()")

_BALANCE_TRIGGER = """
CREATE FUNCTION ledger_transaction_balances() RETURNS trigger AS $$
DECLARE
    txn uuid := COALESCE(NEW.transaction_id, OLD.transaction_id);
BEGIN
    IF EXISTS (
        SELECT 1 FROM ledger_entries WHERE transaction_id = txn
        GROUP BY currency HAVING SUM(amount) <> 0
    ) THEN
        RAISE EXCEPTION 'ledger transaction % does not sum to zero per currency', txn
            USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;

-- Deferred to COMMIT: entries are inserted one by one, the sum is checked once at the end.
CREATE CONSTRAINT TRIGGER ledger_entries_balance
    AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_transaction_balances();

CREATE FUNCTION ledger_is_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: post a reversing transaction instead'
        USING ERRCODE = 'insufficient_privilege';
END $$ LANGUAGE plpgsql;

CREATE TRIGGER ledger_entries_append_only
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();
CREATE TRIGGER ledger_transactions_append_only
    BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION ledger_is_append_only();
"""


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=_UUID),
        sa.Column("code", sa.String(200), nullable=False, unique=True),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, server_default="open"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.CheckConstraint("status IN ('open', 'closed')", name="accounts_status_known"),
    )
    op.create_table(
        "payments",
        sa.Column("payment_id", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("customer_id", sa.String(64), nullable=False),
        sa.Column("merchant_id", sa.String(64), nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("captured", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("refunded", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("disputed", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("dispute_lost", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("summary", JSONB, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.CheckConstraint(
            "captured >= 0 AND refunded >= 0 AND disputed >= 0 AND dispute_lost >= 0",
            name="payments_amounts_non_negative",
        ),
        # Refunds and disputes together never return more than was captured.
        sa.CheckConstraint(
            "refunded + disputed + dispute_lost <= captured", name="payments_never_over_refunded"
        ),
    )
    op.create_index("payments_by_customer", "payments", ["customer_id", "created_at"])
    op.create_table(
        "ledger_transactions",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=_UUID),
        sa.Column("payment_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        # The refund or dispute id; '' for the payment posting. Together with payment id and kind
        # it is the idempotency key of the business event: a retry can never post twice.
        sa.Column("reference", sa.String(64), nullable=False, server_default=""),
        sa.Column("description", sa.String(500), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.UniqueConstraint("payment_id", "kind", "reference", name="ledger_transactions_once"),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=_UUID),
        sa.Column(
            "transaction_id",
            UUID(as_uuid=True),
            sa.ForeignKey("ledger_transactions.id"),
            nullable=False,
        ),
        sa.Column("account_id", UUID(as_uuid=True), sa.ForeignKey("accounts.id"), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.CheckConstraint("amount <> 0", name="ledger_entries_non_zero"),
    )
    op.create_index("ledger_entries_by_transaction", "ledger_entries", ["transaction_id"])
    op.create_index("ledger_entries_by_account", "ledger_entries", ["account_id"])
    op.create_table(
        "outbox_events",
        sa.Column("event_id", UUID(as_uuid=True), primary_key=True),
        sa.Column(
            "transaction_id",
            UUID(as_uuid=True),
            sa.ForeignKey("ledger_transactions.id"),
            nullable=False,
        ),
        sa.Column("payment_id", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(128), nullable=False),
        sa.Column("event_type", sa.String(128), nullable=False),
        sa.Column("payload", JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    )
    op.create_index("outbox_events_by_payment", "outbox_events", ["payment_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_BALANCE_TRIGGER)


def downgrade() -> None:
    for table in ("outbox_events", "ledger_entries", "ledger_transactions", "payments", "accounts"):
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS ledger_transaction_balances() CASCADE")
        op.execute("DROP FUNCTION IF EXISTS ledger_is_append_only() CASCADE")
