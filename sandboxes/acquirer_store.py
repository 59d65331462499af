"""The sandbox acquirer's SQLite store: authorizations, the movements and chargebacks that
settle, the faults already served, the request log and the test discrepancies of a day's
settlement file. Every read-check-write runs in one `transaction()` (sandboxes/acquirer.py)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class DiscrepancyKind(StrEnum):
    MISSING = "missing"
    UNEXPECTED = "unexpected"
    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS authorizations (
    reference           TEXT PRIMARY KEY,            -- ours: idempotency is by this
    acquirer_reference  TEXT NOT NULL UNIQUE,
    payment_method      TEXT NOT NULL,
    currency            TEXT NOT NULL,
    requested_amount    INTEGER NOT NULL CHECK (requested_amount > 0),
    authorized_amount   INTEGER NOT NULL
        CHECK (authorized_amount >= 0 AND authorized_amount <= requested_amount),
    status              TEXT NOT NULL
        CHECK (status IN ('authorized', 'declined', 'captured', 'voided')),
    decline_code        TEXT,
    captured_amount     INTEGER NOT NULL DEFAULT 0
        CHECK (captured_amount >= 0 AND captured_amount <= authorized_amount),
    refunded_amount     INTEGER NOT NULL DEFAULT 0
        CHECK (refunded_amount >= 0 AND refunded_amount <= captured_amount),
    acquirer_capture_reference TEXT UNIQUE,
    created_at          TEXT NOT NULL,
    captured_at         TEXT,
    voided_at           TEXT
);
-- What settles: one row per capture and per refund, never updated (settlement files read it).
CREATE TABLE IF NOT EXISTS movements (
    movement_reference  TEXT PRIMARY KEY,             -- the acquirer's: cap_… / rfd_…
    kind                TEXT NOT NULL CHECK (kind IN ('capture', 'refund')),
    reference           TEXT NOT NULL REFERENCES authorizations (reference),
    acquirer_reference  TEXT NOT NULL,                -- the authorization's
    refund_reference    TEXT UNIQUE,                  -- ours, refunds only
    amount              INTEGER NOT NULL CHECK (amount > 0),
    currency            TEXT NOT NULL,
    fee                 INTEGER NOT NULL CHECK (fee >= 0 AND fee <= amount),
    occurred_at         TEXT NOT NULL,
    CHECK ((kind = 'refund') = (refund_reference IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS movements_by_time ON movements (occurred_at);
CREATE INDEX IF NOT EXISTS movements_by_reference ON movements (reference);
-- error_once faults already served: survives a restart, so "once" stays once.
CREATE TABLE IF NOT EXISTS faults_served (
    fault_key   TEXT NOT NULL,
    operation   TEXT NOT NULL,
    served_at   TEXT NOT NULL,
    PRIMARY KEY (fault_key, operation)
);
-- The request log behind `GET /` and `GET /v1/operations`.
CREATE TABLE IF NOT EXISTS operations (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    at               TEXT NOT NULL,
    operation        TEXT NOT NULL,
    reference        TEXT,
    refund_reference TEXT,
    amount           INTEGER,
    currency         TEXT,
    http_status      INTEGER NOT NULL,
    result           TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS operations_by_reference ON operations (reference);
-- Chargebacks the card network took back (and reversals of ones the merchant won): settlement
-- rows like captures and refunds, kept apart so the movements table's rules stay as they were.
CREATE TABLE IF NOT EXISTS chargebacks (
    movement_reference  TEXT PRIMARY KEY,             -- the acquirer's: cb_… / cbr_…
    kind                TEXT NOT NULL CHECK (kind IN ('chargeback', 'chargeback_reversal')),
    reference           TEXT NOT NULL REFERENCES authorizations (reference),
    acquirer_reference  TEXT NOT NULL,
    dispute_reference   TEXT NOT NULL,
    amount              INTEGER NOT NULL CHECK (amount > 0),
    currency            TEXT NOT NULL,
    occurred_at         TEXT NOT NULL,
    UNIQUE (dispute_reference, kind)
);
-- Test-only faults in a day's settlement file (docs/reconciliation.md, "Discrepancies").
CREATE TABLE IF NOT EXISTS settlement_discrepancies (
    id                  TEXT PRIMARY KEY,
    day                 TEXT NOT NULL,
    kind                TEXT NOT NULL
        CHECK (kind IN ('missing', 'unexpected', 'amount_mismatch', 'currency_mismatch')),
    movement_reference  TEXT,
    reference           TEXT,
    amount              INTEGER,
    currency            TEXT,
    created_at          TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Movement:
    """One settlement-relevant money movement (for the settlement files of reconciliation)."""

    movement_reference: str
    kind: str  # capture | refund
    reference: str
    acquirer_reference: str
    refund_reference: str | None
    amount: int
    currency: str
    fee: int
    occurred_at: datetime


class AcquirerStore:
    """The sandbox's SQLite file. WAL: a crash or kill of the sandbox loses nothing committed
    (synchronous=NORMAL trades only the last moments before a power loss, fine for a sandbox)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # reads

    def authorization(self, reference: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(
            "SELECT * FROM authorizations WHERE reference = ?", (reference,)
        ).fetchone()
        return row

    def refunds_of(self, reference: str) -> list[sqlite3.Row]:
        return self._db.execute(
            "SELECT * FROM movements WHERE reference = ? AND kind = 'refund' "
            "ORDER BY occurred_at, movement_reference",
            (reference,),
        ).fetchall()

    def refund(self, refund_reference: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(
            "SELECT * FROM movements WHERE refund_reference = ?", (refund_reference,)
        ).fetchone()
        return row

    def movements(self) -> list[Movement]:
        rows = self._db.execute(
            "SELECT * FROM movements ORDER BY occurred_at, movement_reference"
        ).fetchall()
        return [
            Movement(
                movement_reference=r["movement_reference"],
                kind=r["kind"],
                reference=r["reference"],
                acquirer_reference=r["acquirer_reference"],
                refund_reference=r["refund_reference"],
                amount=r["amount"],
                currency=r["currency"],
                fee=r["fee"],
                occurred_at=datetime.fromisoformat(r["occurred_at"]),
            )
            for r in rows
        ]

    def operations(self, limit: int, reference: str | None = None) -> list[sqlite3.Row]:
        if reference is None:
            return self._db.execute(
                "SELECT * FROM operations ORDER BY id DESC LIMIT ?", (limit,)
            ).fetchall()
        return self._db.execute(
            "SELECT * FROM operations WHERE reference = ? ORDER BY id DESC LIMIT ?",
            (reference, limit),
        ).fetchall()

    def chargeback(self, dispute_reference: str, kind: str) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self._db.execute(
            "SELECT * FROM chargebacks WHERE dispute_reference = ? AND kind = ?",
            (dispute_reference, kind),
        ).fetchone()
        return row

    def charged_back(self, reference: str) -> int:
        """What chargebacks still hold of `reference`'s capture (reversed ones given back)."""
        total = self._db.execute(
            "SELECT coalesce(sum(CASE kind WHEN 'chargeback' THEN amount ELSE -amount END), 0) "
            "FROM chargebacks WHERE reference = ?",
            (reference,),
        ).fetchone()[0]
        return int(total)

    def settlement_rows(self, day: str) -> list[sqlite3.Row]:
        """Captures, refunds and chargebacks that happened on `day` (UTC), oldest first."""
        return self._db.execute(
            "SELECT movement_reference, kind, reference, acquirer_reference, "
            "coalesce(refund_reference, '') AS merchant_reference, amount, currency, fee, "
            "occurred_at FROM movements WHERE substr(occurred_at, 1, 10) = :day "
            "UNION ALL "
            "SELECT movement_reference, kind, reference, acquirer_reference, "
            "dispute_reference AS merchant_reference, amount, currency, 0 AS fee, occurred_at "
            "FROM chargebacks WHERE substr(occurred_at, 1, 10) = :day "
            "ORDER BY occurred_at, movement_reference",
            {"day": day},
        ).fetchall()

    def discrepancies(self, day: str) -> list[sqlite3.Row]:
        return self._db.execute(
            "SELECT * FROM settlement_discrepancies WHERE day = ? ORDER BY created_at, id", (day,)
        ).fetchall()

    def count_authorizations(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM authorizations").fetchone()[0])

    # writes

    def take_fault(self, fault_key: str, operation: str) -> bool:
        """True exactly once per (key, operation), ever: serve the fault now."""
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO faults_served (fault_key, operation, served_at) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                (fault_key, operation, now_iso()),
            )
            return cursor.rowcount == 1

    def log_operation(
        self,
        operation: str,
        http_status: int,
        result: str,
        *,
        reference: str | None = None,
        refund_reference: str | None = None,
        amount: int | None = None,
        currency: str | None = None,
    ) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO operations (at, operation, reference, refund_reference, amount, "
                "currency, http_status, result) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (now_iso(), operation, reference, refund_reference, amount, currency, http_status,
                 result),
            )  # fmt: skip


# --- The acquirer's rules
