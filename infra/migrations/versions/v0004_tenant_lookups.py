"""Tenant-scoped lookups: a customer's fraud history is read per API client.

The fraud rules read a customer's latest payments by (client_id, customer_id) newest first
(activities/fraud.py); the index replaces the one by customer_id alone, which would make every
lookup read the same customer id's rows of every client and filter them.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "payments_by_client_customer", "payments", ["client_id", "customer_id", "created_at"]
    )
    op.drop_index("payments_by_customer", table_name="payments")


def downgrade() -> None:
    op.create_index("payments_by_customer", "payments", ["customer_id", "created_at"])
    op.drop_index("payments_by_client_customer", table_name="payments")
