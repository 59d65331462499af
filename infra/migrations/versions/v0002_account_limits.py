"""Account limits: `accounts.max_balance`, the most an account may hold (its credit balance:
what paysaga owes its owner, e.g. a merchant's unsettled payables). NULL: no limit.

Enforced by the single write path (ledger/store.py) inside the posting's SERIALIZABLE
transaction, which makes the balance read part of the transaction: concurrent postings to one
limited account conflict (40001) and are retried, so the limit can never be overshot.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("max_balance", sa.BigInteger, nullable=True))
    op.create_check_constraint(
        "accounts_max_balance_non_negative", "accounts", "max_balance IS NULL OR max_balance >= 0"
    )


def downgrade() -> None:
    op.drop_constraint("accounts_max_balance_non_negative", "accounts", type_="check")
    op.drop_column("accounts", "max_balance")
