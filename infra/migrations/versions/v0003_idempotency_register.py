"""The idempotency register: every (API client, Idempotency-Key) → payment id and request
fingerprint, so a key reused after Temporal forgot its payment never starts a second run
(infra/idempotency.py).

Keyed by the payment id, which is derived from (client id, key): the key itself is never
stored. `started_at` is NULL while a start is claimed but not yet accepted by Temporal.

Payments that already ended are registered from the payments register's recorded summaries
(their fingerprint is in the summary); payments still running register themselves when they
record their outcome, and Temporal still knows them until then.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_NOW = sa.text("now()")


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("payment_id", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "source IN ('api', 'kafka', 'recorded')", name="idempotency_keys_source_known"
        ),
    )
    op.execute(
        """
        INSERT INTO idempotency_keys (payment_id, client_id, fingerprint, source, created_at,
                                      started_at)
        SELECT payment_id, client_id, summary ->> 'fingerprint', 'recorded', created_at,
               created_at
        FROM payments
        WHERE summary ->> 'fingerprint' IS NOT NULL
        ON CONFLICT (payment_id) DO NOTHING
        """
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys")
