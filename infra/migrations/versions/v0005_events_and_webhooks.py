"""Events store, outbox relay state, merchant webhook endpoints and their delivery log.

- `outbox_events` becomes the events store: besides the ledger's rows (written in the posting's
  transaction) it holds every other event of a payment (payments.raw, rejected, failed,
  canceled: recorded by the publishing activity before it sends) and webhook endpoint events.
  New columns: `client_id` (the API client the events API scopes by), `subject` (the Kafka key),
  `published_at` (Kafka acknowledged it; NULL: the relay still owes it to Kafka) and
  `dispatched_at` (matched against webhook endpoints; NULL: not yet).
  `transaction_id` and `payment_id` become optional: only ledger events have a transaction,
  only payment events a payment.
- `event_relay_state`: what the relay knows about the broker's log (the epoch marker it found
  there) and how far a republishing sweep has got.
- `webhook_endpoints`, `webhook_deliveries`: merchants' endpoints and every delivery attempt.

Existing rows count as published (the workflow published them as it always did) and as
dispatched (no endpoint existed): a broker that lost its log is found by the relay's epoch
check, which republishes everything.

Portable to CockroachDB: string and UUID keys, no sequences, partial indexes (supported there),
`UPDATE ... FROM` for the backfill.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_NOW = sa.text("now()")


def upgrade() -> None:
    op.alter_column("outbox_events", "transaction_id", nullable=True)
    op.alter_column("outbox_events", "payment_id", nullable=True)
    op.add_column("outbox_events", sa.Column("client_id", sa.String(64), nullable=True))
    op.add_column("outbox_events", sa.Column("subject", sa.String(64), nullable=True))
    op.add_column(
        "outbox_events", sa.Column("published_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "outbox_events", sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.execute(
        "UPDATE outbox_events SET client_id = p.client_id FROM payments p "
        "WHERE p.payment_id = outbox_events.payment_id"
    )
    op.execute(
        "UPDATE outbox_events SET subject = payment_id, published_at = created_at, "
        "dispatched_at = created_at"
    )
    # The relay's two work lists stay small (only what is owed), so partial indexes keep
    # finding them cheap however large the store grows.
    op.create_index(
        "outbox_events_unpublished",
        "outbox_events",
        ["created_at"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_index(
        "outbox_events_undispatched",
        "outbox_events",
        ["created_at"],
        postgresql_where=sa.text("dispatched_at IS NULL"),
    )
    # The events API (newest first, per client) and the relay's sweeps (oldest first).
    op.create_index(
        "outbox_events_by_client", "outbox_events", ["client_id", "created_at", "event_id"]
    )
    op.create_index("outbox_events_by_time", "outbox_events", ["created_at", "event_id"])

    op.create_table(
        "event_relay_state",
        sa.Column("name", sa.String(64), primary_key=True),
        # The marker the relay found first in the broker's epoch topic; another one means
        # the log it published to is gone (or is another cluster).
        sa.Column("broker_epoch", sa.String(64), nullable=True),
        # A sweep republishes every event created before `sweep_until`, in (created_at,
        # event_id) order; the cursor is the last one republished.
        sa.Column("sweep_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sweep_after_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sweep_after_event_id", UUID(as_uuid=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
    )

    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("client_id", sa.String(64), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("description", sa.String(500), nullable=True),
        sa.Column("enabled_events", JSONB, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("disabled_reason", sa.String(500), nullable=True),
        # The signing secret, and the one it replaced while the rotation overlap lasts.
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("previous_secret", sa.String(128), nullable=True),
        sa.Column("previous_secret_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_success_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=_NOW),
        sa.CheckConstraint(
            "status IN ('enabled', 'disabled')", name="webhook_endpoints_status_known"
        ),
    )
    op.create_index(
        "webhook_endpoints_by_client", "webhook_endpoints", ["client_id", "created_at", "id"]
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", UUID(as_uuid=True), primary_key=True),
        sa.Column("endpoint_id", sa.String(32), nullable=False),
        sa.Column("event_id", UUID(as_uuid=True), nullable=False),
        sa.Column("event_type", sa.String(64), nullable=False),
        # The Temporal workflow that made the attempt: one per (endpoint, event) delivery.
        sa.Column("delivery_id", sa.String(200), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("manual", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("latency_ms", sa.Integer, nullable=False),
        sa.Column("succeeded", sa.Boolean, nullable=False),
        sa.Column("error", sa.String(500), nullable=True),
    )
    op.create_index(
        "webhook_deliveries_by_endpoint",
        "webhook_deliveries",
        ["endpoint_id", "attempted_at", "id"],
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_endpoints")
    op.drop_table("event_relay_state")
    for index in (
        "outbox_events_by_time",
        "outbox_events_by_client",
        "outbox_events_undispatched",
        "outbox_events_unpublished",
    ):
        op.drop_index(index, table_name="outbox_events")
    for column in ("dispatched_at", "published_at", "subject", "client_id"):
        op.drop_column("outbox_events", column)
    op.execute("DELETE FROM outbox_events WHERE transaction_id IS NULL OR payment_id IS NULL")
    op.alter_column("outbox_events", "payment_id", nullable=False)
    op.alter_column("outbox_events", "transaction_id", nullable=False)
