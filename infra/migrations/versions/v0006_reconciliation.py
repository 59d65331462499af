"""Reconciliation (docs/reconciliation.md): the acquirer's settlement files and what they matched.

- `settlement_files`: each imported file once, by the SHA-256 of its bytes (a second import of
  the same file finds it here and does nothing).
- `settlement_batches`: each payout batch once (a bank credit), with the ledger transaction
  that moved its money from the acquirer receivable to the bank.
- `settlement_lines`: every row of every file, unique by the acquirer's line id, with what it
  matched (`status`, `expectation_id`).
- `settlement_expectations`: each ledger movement of an acquirer payment (capture, refund,
  chargeback of a lost or won dispute, reversal of a won one) that a settlement line must
  confirm, with what has settled and been written off of it.
- `reconciliation_exceptions`: the queue finance works: missing, unexpected, amount and
  currency mismatches, each with its age and, once resolved, the reason and ledger transaction.

Portable to CockroachDB: UUID and string keys, no sequences, plain B-tree indexes.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_UUID = sa.text("gen_random_uuid()")


def _ccy() -> sa.Column[str]:
    return sa.Column("currency", sa.String(3), nullable=False)


def upgrade() -> None:
    op.create_table(
        "settlement_files",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=_UUID),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("filename", sa.String(255), nullable=False),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("line_count", sa.Integer, nullable=False),
        sa.Column("summary", JSONB, nullable=False),
    )
    op.create_table(
        "settlement_batches",
        sa.Column("batch_id", sa.String(64), primary_key=True),
        sa.Column(
            "file_id", UUID(as_uuid=True), sa.ForeignKey("settlement_files.id"), nullable=False
        ),
        sa.Column("settlement_date", sa.Date, nullable=False),
        _ccy(),
        sa.Column("payout_amount", sa.BigInteger, nullable=False),
        sa.Column("bank_reference", sa.String(64), nullable=False),
        sa.Column("line_count", sa.Integer, nullable=False),
        sa.Column("ledger_transaction_id", UUID(as_uuid=True), nullable=True),
    )
    op.create_table(
        "settlement_expectations",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=_UUID),
        sa.Column("payment_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("merchant_reference", sa.String(128), nullable=False),
        sa.Column("acquirer_reference", sa.String(64), nullable=True),
        sa.Column("source_transaction_id", UUID(as_uuid=True), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        _ccy(),
        sa.Column("expected_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("line_id", UUID(as_uuid=True), nullable=True),
        sa.Column("settled_amount", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("written_off_amount", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("source_transaction_id", "kind"),
        sa.CheckConstraint(
            "status IN ('open', 'matched', 'amount_mismatch', 'currency_mismatch', 'written_off')",
            name="settlement_expectations_status",
        ),
    )
    op.create_index(
        "settlement_expectations_open", "settlement_expectations", ["status", "payment_id"]
    )
    op.create_index(
        "settlement_expectations_by_acquirer", "settlement_expectations", ["acquirer_reference"]
    )
    op.create_table(
        "settlement_lines",
        sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=_UUID),
        sa.Column(
            "file_id", UUID(as_uuid=True), sa.ForeignKey("settlement_files.id"), nullable=False
        ),
        sa.Column("line_number", sa.Integer, nullable=False),
        sa.Column("line_id", sa.String(64), nullable=False, unique=True),
        sa.Column("batch_id", sa.String(64), nullable=False),
        sa.Column("settlement_date", sa.Date, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.Column("reference", sa.String(64), nullable=False),
        sa.Column("acquirer_reference", sa.String(64), nullable=False),
        sa.Column("movement_reference", sa.String(64), nullable=False),
        sa.Column("merchant_reference", sa.String(128), nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        _ccy(),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column(
            "expectation_id",
            UUID(as_uuid=True),
            sa.ForeignKey("settlement_expectations.id"),
            nullable=True,
        ),
    )
    op.create_index("settlement_lines_by_batch", "settlement_lines", ["batch_id"])
    op.create_table(
        "reconciliation_exceptions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column(
            "expectation_id",
            UUID(as_uuid=True),
            sa.ForeignKey("settlement_expectations.id"),
            nullable=True,
        ),
        sa.Column(
            "line_id", UUID(as_uuid=True), sa.ForeignKey("settlement_lines.id"), nullable=True
        ),
        sa.Column("payment_id", sa.String(64), nullable=True),
        _ccy(),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
        sa.Column("opened_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolution", sa.String(32), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ledger_transaction_id", UUID(as_uuid=True), nullable=True),
        sa.CheckConstraint(
            "kind IN ('missing', 'unexpected', 'amount_mismatch', 'currency_mismatch')",
            name="reconciliation_exceptions_kind",
        ),
        sa.CheckConstraint(
            "status IN ('open', 'resolved')", name="reconciliation_exceptions_status"
        ),
    )
    op.create_index(
        "reconciliation_exceptions_queue",
        "reconciliation_exceptions",
        ["status", "opened_at", "id"],
    )


def downgrade() -> None:
    op.drop_table("reconciliation_exceptions")
    op.drop_table("settlement_lines")
    op.drop_table("settlement_expectations")
    op.drop_table("settlement_batches")
    op.drop_table("settlement_files")
