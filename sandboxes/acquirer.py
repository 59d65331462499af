"""The sandbox acquirer: a card acquirer's API as its own HTTP service, with test payment methods.

    python -m sandboxes.acquirer --host 127.0.0.1 --port 8020 --data-dir .paysaga/acquirer

It speaks the wire format of docs/acquirer.md (authorize, capture, void, refund, status by our
reference), keeps its state in `<data-dir>/acquirer.sqlite3` so it survives restarts, and
records every capture and refund with its fee for the settlement files of reconciliation.
`GET /` shows the recent operations to a human; `GET /healthz` answers monitors.

What a payment method token does here (`TEST_PAYMENT_METHODS`, also in docs/acquirer.md):
approve, decline with a network code, approve after a delay, time out (the operation happens but
the answer is held past any sane client timeout), fail with 500 once per operation, or approve
half. Any token not in the table approves, so the README's `pm_card_visa_0001` works.

One process, one event loop: every read-check-write on the store runs without an `await` in
between, so the loop itself serializes them and no two requests can authorize one reference.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import html
import logging
import os
import secrets
import sqlite3
import sys
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from domain.cards import luhn_valid
from domain.money import CURRENCIES, MAX_INT64
from domain.payment import PaymentMethodToken
from domain.settlement import LineType, SettlementLine, render_settlement_file

log = logging.getLogger("paysaga.sandbox.acquirer")

# The documented test credential, like Stripe's published test keys: it moves no real money.
DEFAULT_API_KEY = "sk_test_paysaga_sandbox"
API_KEY_ENV = "PAYSAGA_SANDBOX_ACQUIRER_API_KEY"
DATABASE_FILE = "acquirer.sqlite3"
REPLAYED_HEADER = "Idempotent-Replayed"

# Fee per capture (a sandbox rule, not a price list): a fixed part in minor units of the
# capture's currency plus basis points of the captured amount, the basis-point part rounded
# half up to a whole minor unit, the total never more than the capture itself. Refunds cost
# nothing and return no fee.
DEFAULT_FEE_FIXED_MINOR = 20
DEFAULT_FEE_BASIS_POINTS = 150
# Longer than any sane client timeout (paysaga's default is 10 s), short enough not to pile up.
DEFAULT_HANG_SECONDS = 90.0
DEFAULT_DELAY_SECONDS = 2.0
_RECENT_OPERATIONS = 50


def capture_fee(amount: int, *, fixed_minor: int, basis_points: int) -> int:
    """fixed + round_half_up(amount × bps / 10 000), capped at the amount (integers only)."""
    return min(amount, fixed_minor + (amount * basis_points + 5_000) // 10_000)


# --- Test payment methods


class Behaviour(StrEnum):
    APPROVE = "approve"
    DECLINE = "decline"
    APPROVE_AFTER_DELAY = "approve_after_delay"
    TIMEOUT = "timeout"
    ERROR_ONCE = "error_once"
    PARTIAL_APPROVAL = "partial_approval"


@dataclass(frozen=True)
class SandboxPaymentMethod:
    token: str
    behaviour: Behaviour
    what_happens: str
    decline_code: str | None = None


_DECLINES: tuple[tuple[str, str], ...] = (
    ("insufficient_funds", "The card has insufficient funds."),
    ("do_not_honor", "The issuer declined without giving a reason."),
    ("expired_card", "The card has expired."),
    ("card_velocity_exceeded", "The card's spending or attempt limit was exceeded."),
    ("lost_card", "The card was reported lost."),
    ("stolen_card", "The card was reported stolen."),
    # A real network code paysaga has no name for: it arrives as generic_decline, raw code kept.
    ("restricted_card", "The card cannot be used for this kind of payment."),
)
DECLINE_MESSAGES: dict[str, str] = dict(_DECLINES)

TEST_PAYMENT_METHODS: tuple[SandboxPaymentMethod, ...] = (
    SandboxPaymentMethod(
        "pm_card_visa",
        Behaviour.APPROVE,
        "Approves the full amount. So does every token not in this table, e.g. "
        "`pm_card_visa_0001`.",
    ),
    *(
        SandboxPaymentMethod(
            f"pm_card_decline_{code}", Behaviour.DECLINE, f"Declines with `{code}`.", code
        )
        for code, _ in _DECLINES
    ),
    SandboxPaymentMethod(
        "pm_card_approve_after_delay",
        Behaviour.APPROVE_AFTER_DELAY,
        "Approves after `--delay-seconds` (default 2 s); nothing is authorized until then.",
    ),
    SandboxPaymentMethod(
        "pm_card_timeout",
        Behaviour.TIMEOUT,
        "Every operation (authorize, capture, void, refund) HAPPENS, but its first answer is "
        "held for `--hang-seconds` (default 90 s): the client times out not knowing. Status by "
        "reference shows what happened; a retry with the same reference answers at once.",
    ),
    SandboxPaymentMethod(
        "pm_card_error_once",
        Behaviour.ERROR_ONCE,
        "Every operation answers `500 internal_error` the first time it is asked (per reference, "
        "and per refund reference), WITHOUT happening; asked again, it behaves normally.",
    ),
    SandboxPaymentMethod(
        "pm_card_partial_approval",
        Behaviour.PARTIAL_APPROVAL,
        "Approves half the amount, rounded down (a 1-minor-unit amount is approved in full).",
    ),
)
_BY_TOKEN = {m.token: m for m in TEST_PAYMENT_METHODS}


def payment_method_behaviour(token: str) -> SandboxPaymentMethod:
    return _BY_TOKEN.get(token) or SandboxPaymentMethod(token, Behaviour.APPROVE, "approves")


# --- The wire format: request bodies

Reference = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]{1,64}$")
]
ReferencePath = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
Amount = Annotated[int, Field(gt=0, le=MAX_INT64)]
DayPath = Annotated[str, PathParam(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise SandboxError(400, "invalid_request", "Not a calendar date.", "day") from None


def _no_card_number(value: str) -> str:
    # Only a reference that IS a card number: a digit run inside an id (our pay_<hex> ids hold
    # long ones, now and then Luhn-valid) is not one, and refusing it would refuse a payment.
    if value.isdigit() and 12 <= len(value) <= 19 and luhn_valid(value):
        raise PydanticCustomError(
            "card_data_not_allowed", "A reference must not contain a card number."
        )
    return value


def _supported_currency(value: str) -> str:
    if value not in CURRENCIES:
        raise PydanticCustomError(
            "currency_unsupported",
            "Currency {currency} is not supported; use an ISO 4217 code such as USD.",
            {"currency": value[:8]},
        )
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AuthorizeBody(_Body):
    reference: Reference
    amount: Amount
    currency: str
    payment_method: PaymentMethodToken

    _reference = field_validator("reference")(_no_card_number)
    _currency = field_validator("currency")(_supported_currency)


class CaptureBody(_Body):
    amount: Amount | None = None
    currency: str | None = None

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str | None) -> str | None:
        return None if value is None else _supported_currency(value)

    @model_validator(mode="after")
    def _amount_with_currency(self) -> CaptureBody:
        # An amount without its currency is a number, not money. A currency alone is a guard
        # on a full capture: it must be the authorization's.
        if self.amount is not None and self.currency is None:
            raise PydanticCustomError(
                "amount_without_currency", "An amount must come with its currency."
            )
        return self


class RefundBody(_Body):
    refund_reference: Reference
    amount: Amount
    currency: str

    _reference = field_validator("refund_reference")(_no_card_number)
    _currency = field_validator("currency")(_supported_currency)


class ChargebackBody(_Body):
    """A chargeback the card network pushes (a sandbox test instruction: a real acquirer tells
    you of one). `dispute_reference` is the dispute's id as paysaga knows it."""

    dispute_reference: Reference
    amount: Amount
    currency: str

    _currency = field_validator("currency")(_supported_currency)


class DiscrepancyKind(StrEnum):
    MISSING = "missing"
    UNEXPECTED = "unexpected"
    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"


class DiscrepancyBody(_Body):
    """A fault in one day's settlement file, for tests (docs/reconciliation.md): leave a
    movement out, add one nobody made, or report a movement with another amount or currency."""

    # Literal, not the enum: the body is validated strictly from JSON strings.
    kind: Literal["missing", "unexpected", "amount_mismatch", "currency_mismatch"]
    movement_reference: Reference | None = None
    reference: Reference | None = None
    amount: Annotated[int, Field(gt=0, le=MAX_INT64)] | None = None
    currency: str | None = None

    @field_validator("currency")
    @classmethod
    def _currency(cls, value: str | None) -> str | None:
        return None if value is None else _supported_currency(value)

    @model_validator(mode="after")
    def _complete(self) -> DiscrepancyBody:
        needed = {
            DiscrepancyKind.MISSING: ("movement_reference",),
            DiscrepancyKind.UNEXPECTED: ("amount", "currency"),
            DiscrepancyKind.AMOUNT_MISMATCH: ("movement_reference", "amount"),
            DiscrepancyKind.CURRENCY_MISMATCH: ("movement_reference", "currency"),
        }[DiscrepancyKind(self.kind)]
        missing = [name for name in needed if getattr(self, name) is None]
        if missing:
            raise PydanticCustomError(
                "discrepancy_incomplete",
                "A {kind} discrepancy needs {fields}.",
                {"kind": self.kind, "fields": ", ".join(missing)},
            )
        return self


class SandboxError(Exception):
    """An answer other than 2xx, with the error body of docs/acquirer.md."""

    def __init__(self, status: int, type_: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.param = param

    def response(self) -> JSONResponse:
        return _error_response(self.status, self.type, self.message, self.param)


def _error_response(
    status: int, type_: str, message: str, param: str | None = None
) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        {"error": {"type": type_, "message": message, "param": param}},
        status_code=status,
        headers=headers,
    )


# --- Durable state


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


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
                (fault_key, operation, _now()),
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
                (_now(), operation, reference, refund_reference, amount, currency, http_status,
                 result),
            )  # fmt: skip


# --- The acquirer's rules


@dataclass(frozen=True)
class SandboxConfig:
    api_key: str = DEFAULT_API_KEY
    delay_seconds: float = DEFAULT_DELAY_SECONDS
    hang_seconds: float = DEFAULT_HANG_SECONDS
    fee_fixed_minor: int = DEFAULT_FEE_FIXED_MINOR
    fee_basis_points: int = DEFAULT_FEE_BASIS_POINTS


@dataclass(frozen=True)
class Answer:
    body: dict[str, Any]
    replayed: bool = False
    # pm_card_timeout: the operation happened; its answer waits this long.
    hold_seconds: float = 0.0

    def response(self) -> JSONResponse:
        headers = {REPLAYED_HEADER: "true"} if self.replayed else None
        return JSONResponse(self.body, headers=headers)


def _refund_json(row: sqlite3.Row) -> dict[str, Any]:
    return {
        "refund_reference": row["refund_reference"],
        "acquirer_refund_reference": row["movement_reference"],
        "reference": row["reference"],
        "amount": row["amount"],
        "currency": row["currency"],
        "refunded_at": row["occurred_at"],
    }


class SandboxAcquirer:
    """Authorize, capture, void, refund and status, by our reference, on the store."""

    def __init__(self, store: AcquirerStore, config: SandboxConfig) -> None:
        self.store = store
        self.config = config

    def authorization_json(self, row: sqlite3.Row) -> dict[str, Any]:
        released = (
            row["authorized_amount"] - row["captured_amount"]
            if row["status"] in ("captured", "voided")
            else 0
        )
        code = row["decline_code"]
        return {
            "reference": row["reference"],
            "acquirer_reference": row["acquirer_reference"],
            "status": row["status"],
            "payment_method": row["payment_method"],
            "currency": row["currency"],
            "requested_amount": row["requested_amount"],
            "authorized_amount": row["authorized_amount"],
            "captured_amount": row["captured_amount"],
            "released_amount": released,
            "refunded_amount": row["refunded_amount"],
            "decline_code": code,
            "decline_message": DECLINE_MESSAGES.get(code) if code else None,
            "acquirer_capture_reference": row["acquirer_capture_reference"],
            "created_at": row["created_at"],
            "captured_at": row["captured_at"],
            "voided_at": row["voided_at"],
            "refunds": [_refund_json(r) for r in self.store.refunds_of(row["reference"])],
        }

    def _existing(self, reference: str) -> sqlite3.Row:
        row = self.store.authorization(reference)
        if row is None:
            raise SandboxError(
                404, "authorization_not_found", f"No authorization has reference {reference}."
            )
        return row

    def _hold(self, row: sqlite3.Row) -> float:
        timeout = payment_method_behaviour(row["payment_method"]).behaviour is Behaviour.TIMEOUT
        return self.config.hang_seconds if timeout else 0.0

    def _fault(self, payment_method: str, fault_key: str, operation: str) -> None:
        behaviour = payment_method_behaviour(payment_method).behaviour
        if behaviour is Behaviour.ERROR_ONCE and self.store.take_fault(fault_key, operation):
            raise SandboxError(
                500,
                "internal_error",
                f"{operation} failed inside the acquirer (pm_card_error_once); it did not "
                "happen. Ask for the status, or retry with the same reference.",
            )

    # authorize

    async def authorize(self, body: AuthorizeBody) -> Answer:
        replay = self._authorize_replay(body)
        if replay is not None:
            return replay
        method = payment_method_behaviour(body.payment_method)
        self._fault(body.payment_method, body.reference, "authorize")
        if method.behaviour is Behaviour.APPROVE_AFTER_DELAY:
            await asyncio.sleep(self.config.delay_seconds)
            # Another request for this reference may have finished while this one waited.
            replay = self._authorize_replay(body)
            if replay is not None:
                return replay
        row = self._record_authorization(body, method)
        return Answer(self.authorization_json(row), hold_seconds=self._hold(row))

    def _authorize_replay(self, body: AuthorizeBody) -> Answer | None:
        row = self.store.authorization(body.reference)
        if row is None:
            return None
        asked = (body.amount, body.currency, body.payment_method)
        if asked != (row["requested_amount"], row["currency"], row["payment_method"]):
            raise SandboxError(
                409,
                "idempotency_conflict",
                f"Reference {body.reference} was already used for another authorization "
                "(different amount, currency or payment method).",
                "reference",
            )
        return Answer(self.authorization_json(row), replayed=True)

    def _record_authorization(
        self, body: AuthorizeBody, method: SandboxPaymentMethod
    ) -> sqlite3.Row:
        status, authorized, decline = "authorized", body.amount, None
        if method.behaviour is Behaviour.DECLINE:
            status, authorized, decline = "declined", 0, method.decline_code
        elif method.behaviour is Behaviour.PARTIAL_APPROVAL:
            authorized = max(1, body.amount // 2)
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO authorizations (reference, acquirer_reference, payment_method, "
                "currency, requested_amount, authorized_amount, status, decline_code, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (body.reference, _new_id("acq"), body.payment_method, body.currency,
                 body.amount, authorized, status, decline, _now()),
            )  # fmt: skip
        row = self.store.authorization(body.reference)
        assert row is not None
        return row

    # capture

    async def capture(self, reference: str, body: CaptureBody) -> Answer:
        row = self._existing(reference)
        amount = body.amount if body.amount is not None else row["authorized_amount"]
        if body.currency is not None and body.currency != row["currency"]:
            raise SandboxError(
                422,
                "currency_mismatch",
                f"The authorization is in {row['currency']}, not {body.currency}.",
                "currency",
            )
        status = row["status"]
        if status == "captured":
            if amount == row["captured_amount"]:
                return Answer(self.authorization_json(row), replayed=True)
            raise SandboxError(
                409,
                "already_captured",
                f"Reference {reference} was already captured ({row['captured_amount']}); "
                "an authorization is captured once.",
            )
        self._refuse_unless_authorized(row)
        if amount > row["authorized_amount"]:
            raise SandboxError(
                422,
                "amount_exceeds_authorized",
                f"Cannot capture {amount}: only {row['authorized_amount']} was authorized.",
                "amount",
            )
        self._fault(row["payment_method"], reference, "capture")
        fee = capture_fee(
            amount,
            fixed_minor=self.config.fee_fixed_minor,
            basis_points=self.config.fee_basis_points,
        )
        now, capture_reference = _now(), _new_id("cap")
        with self.store.transaction() as db:
            db.execute(
                "UPDATE authorizations SET status = 'captured', captured_amount = ?, "
                "acquirer_capture_reference = ?, captured_at = ? "
                "WHERE reference = ? AND status = 'authorized'",
                (amount, capture_reference, now, reference),
            )
            db.execute(
                "INSERT INTO movements (movement_reference, kind, reference, acquirer_reference, "
                "amount, currency, fee, occurred_at) VALUES (?, 'capture', ?, ?, ?, ?, ?, ?)",
                (capture_reference, reference, row["acquirer_reference"], amount,
                 row["currency"], fee, now),
            )  # fmt: skip
        return Answer(
            self.authorization_json(self._existing(reference)), hold_seconds=self._hold(row)
        )

    def _answer_after_change(self, reference: str, before: sqlite3.Row) -> Answer:
        after = self._existing(reference)
        return Answer(self.authorization_json(after), hold_seconds=self._hold(before))

    def _refuse_unless_authorized(self, row: sqlite3.Row) -> None:
        status = row["status"]
        if status == "voided":
            raise SandboxError(
                409, "authorization_voided", f"Reference {row['reference']} was voided."
            )
        if status == "declined":
            raise SandboxError(
                409,
                "authorization_declined",
                f"Reference {row['reference']} was declined; nothing is held.",
            )
        if status == "captured":
            raise SandboxError(
                409,
                "already_captured",
                f"Reference {row['reference']} was captured; refund it instead.",
            )

    # void

    async def void(self, reference: str) -> Answer:
        row = self._existing(reference)
        if row["status"] == "voided":
            return Answer(self.authorization_json(row), replayed=True)
        self._refuse_unless_authorized(row)
        self._fault(row["payment_method"], reference, "void")
        with self.store.transaction() as db:
            db.execute(
                "UPDATE authorizations SET status = 'voided', voided_at = ? "
                "WHERE reference = ? AND status = 'authorized'",
                (_now(), reference),
            )
        return Answer(
            self.authorization_json(self._existing(reference)), hold_seconds=self._hold(row)
        )

    # refund

    async def refund(self, reference: str, body: RefundBody) -> Answer:
        row = self._existing(reference)
        existing = self.store.refund(body.refund_reference)
        if existing is not None:
            asked = (reference, body.amount, body.currency)
            if asked != (existing["reference"], existing["amount"], existing["currency"]):
                raise SandboxError(
                    409,
                    "idempotency_conflict",
                    f"Refund reference {body.refund_reference} was already used for another "
                    "refund (different authorization, amount or currency).",
                    "refund_reference",
                )
            return Answer(_refund_json(existing), replayed=True)
        if body.currency != row["currency"]:
            raise SandboxError(
                422,
                "currency_mismatch",
                f"The authorization is in {row['currency']}, not {body.currency}.",
                "currency",
            )
        if row["status"] != "captured":
            raise SandboxError(
                409,
                "not_captured",
                f"Reference {reference} is {row['status']}: only captured money can be "
                "refunded (void an uncaptured authorization instead).",
            )
        refundable = row["captured_amount"] - row["refunded_amount"]
        if body.amount > refundable:
            raise SandboxError(
                422,
                "refund_exceeds_captured",
                f"Cannot refund {body.amount}: {refundable} of the {row['captured_amount']} "
                "captured is left to refund.",
                "amount",
            )
        self._fault(row["payment_method"], body.refund_reference, "refund")
        with self.store.transaction() as db:
            db.execute(
                "UPDATE authorizations SET refunded_amount = refunded_amount + ? "
                "WHERE reference = ?",
                (body.amount, reference),
            )
            db.execute(
                "INSERT INTO movements (movement_reference, kind, reference, acquirer_reference, "
                "refund_reference, amount, currency, fee, occurred_at) "
                "VALUES (?, 'refund', ?, ?, ?, ?, ?, 0, ?)",
                (_new_id("rfd"), reference, row["acquirer_reference"], body.refund_reference,
                 body.amount, body.currency, _now()),
            )  # fmt: skip
        created = self.store.refund(body.refund_reference)
        assert created is not None
        return Answer(_refund_json(created), hold_seconds=self._hold(row))

    # chargebacks (test instructions: a real network's chargeback arrives on its own)

    async def chargeback(self, reference: str, body: ChargebackBody) -> Answer:
        row = self._existing(reference)
        existing = self.store.chargeback(body.dispute_reference, "chargeback")
        if existing is not None:
            if (existing["reference"], existing["amount"], existing["currency"]) != (
                reference,
                body.amount,
                body.currency,
            ):
                raise SandboxError(
                    409, "idempotency_conflict",
                    f"Dispute {body.dispute_reference} was already charged back differently.",
                    "dispute_reference",
                )  # fmt: skip
            return Answer(dict(existing), replayed=True)
        if body.currency != row["currency"]:
            raise SandboxError(
                422, "currency_mismatch",
                f"The authorization is in {row['currency']}, not {body.currency}.", "currency",
            )  # fmt: skip
        held = row["captured_amount"] - row["refunded_amount"]
        held -= self.store.charged_back(reference)
        if row["status"] != "captured" or body.amount > held:
            raise SandboxError(
                422, "chargeback_exceeds_captured",
                f"Cannot charge back {body.amount}: {max(held, 0)} of {reference} is left.",
                "amount",
            )  # fmt: skip
        self._record_chargeback(row, body.dispute_reference, "chargeback", body.amount)
        created = self.store.chargeback(body.dispute_reference, "chargeback")
        assert created is not None
        return Answer(dict(created))

    async def reverse_chargeback(self, reference: str, dispute_reference: str) -> Answer:
        row = self._existing(reference)
        charged = self.store.chargeback(dispute_reference, "chargeback")
        if charged is None or charged["reference"] != reference:
            raise SandboxError(
                404, "chargeback_not_found", f"No chargeback {dispute_reference} on {reference}."
            )
        existing = self.store.chargeback(dispute_reference, "chargeback_reversal")
        if existing is not None:
            return Answer(dict(existing), replayed=True)
        self._record_chargeback(row, dispute_reference, "chargeback_reversal", charged["amount"])
        created = self.store.chargeback(dispute_reference, "chargeback_reversal")
        assert created is not None
        return Answer(dict(created))

    def _record_chargeback(self, row: sqlite3.Row, dispute: str, kind: str, amount: int) -> None:
        prefix = "cb" if kind == "chargeback" else "cbr"
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO chargebacks (movement_reference, kind, reference, acquirer_reference, "
                "dispute_reference, amount, currency, occurred_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (_new_id(prefix), kind, row["reference"], row["acquirer_reference"], dispute,
                 amount, row["currency"], _now()),
            )  # fmt: skip

    # settlement discrepancies (tests)

    def add_discrepancy(self, day: date, body: DiscrepancyBody) -> Answer:
        created = {
            "id": secrets.token_hex(8),
            "day": day.isoformat(),
            "kind": body.kind,
            "movement_reference": body.movement_reference,
            "reference": body.reference,
            "amount": body.amount,
            "currency": body.currency,
            "created_at": _now(),
        }
        with self.store.transaction() as db:
            db.execute(
                "INSERT INTO settlement_discrepancies (id, day, kind, movement_reference, "
                "reference, amount, currency, created_at) VALUES (:id, :day, :kind, "
                ":movement_reference, :reference, :amount, :currency, :created_at)",
                created,
            )
        return Answer(created)

    # status

    def status(self, reference: str) -> Answer:
        return Answer(self.authorization_json(self._existing(reference)))


# --- Settlement files (docs/reconciliation.md)


def batch_id(day: date, ccy: str) -> str:
    return f"po_{day:%Y%m%d}_{ccy.lower()}"


def settlement_report(store: AcquirerStore, day: date) -> list[SettlementLine]:
    """The day's settlement file: every capture, refund and chargeback of `day` (UTC) with a
    fee row per fee, the test discrepancies of that day applied, grouped into one payout batch
    per currency whose payout row is the batch's net (so the file is always self-consistent,
    as a real acquirer's is: a discrepancy is between its file and our ledger)."""
    key = day.isoformat()
    faults = store.discrepancies(key)
    dropped = {f["movement_reference"] for f in faults if f["kind"] == DiscrepancyKind.MISSING}
    amounts = {
        f["movement_reference"]: f["amount"]
        for f in faults
        if f["kind"] == DiscrepancyKind.AMOUNT_MISMATCH
    }
    currencies = {
        f["movement_reference"]: f["currency"]
        for f in faults
        if f["kind"] == DiscrepancyKind.CURRENCY_MISMATCH
    }
    sign = {"capture": 1, "refund": -1, "chargeback": -1, "chargeback_reversal": 1}
    rows: list[tuple[str, SettlementLine]] = []  # (currency, line) before batching

    def line(
        line_id: str, type_: LineType, amount: int, ccy: str, at: datetime, **refs: str
    ) -> None:
        rows.append(
            (
                ccy,
                SettlementLine(
                    line_number=0,
                    settlement_date=day,
                    batch_id=batch_id(day, ccy),
                    line_id=line_id,
                    type=type_,
                    reference=refs.get("reference", ""),
                    acquirer_reference=refs.get("acquirer_reference", ""),
                    movement_reference=refs.get("movement_reference", ""),
                    merchant_reference=refs.get("merchant_reference", ""),
                    amount=amount,
                    currency=ccy,
                    occurred_at=at,
                ),
            )
        )

    for row in store.settlement_rows(key):
        movement = row["movement_reference"]
        if movement in dropped:
            continue
        ccy = currencies.get(movement, row["currency"])
        at = datetime.fromisoformat(row["occurred_at"])
        refs = {
            "reference": row["reference"],
            "acquirer_reference": row["acquirer_reference"],
            "movement_reference": movement,
            "merchant_reference": row["merchant_reference"],
        }
        amount = amounts.get(movement, row["amount"]) * sign[row["kind"]]
        line(f"ln_{movement}", LineType(row["kind"]), amount, ccy, at, **refs)
        if row["fee"]:
            line(f"ln_{movement}_fee", LineType.FEE, -row["fee"], ccy, at, **refs)
    for fault in faults:
        if fault["kind"] == DiscrepancyKind.UNEXPECTED:
            movement = f"cap_{fault['id']}"
            line(
                f"ln_{movement}",
                LineType.CAPTURE,
                fault["amount"],
                fault["currency"],
                datetime.fromisoformat(fault["created_at"]),
                reference=fault["reference"] or f"unknown_{fault['id']}",
                acquirer_reference=f"acq_{fault['id']}",
                movement_reference=movement,
            )
    lines: list[SettlementLine] = []
    end_of_day = datetime.combine(day, datetime.max.time(), tzinfo=UTC).replace(microsecond=0)
    for ccy in sorted({c for c, _ in rows}):
        batch = [ln for c, ln in rows if c == ccy]
        lines += batch
        bid = batch_id(day, ccy)
        lines.append(
            SettlementLine(
                line_number=0,
                settlement_date=day,
                batch_id=bid,
                line_id=bid,
                type=LineType.PAYOUT,
                reference="",
                acquirer_reference="",
                movement_reference=f"tr_{day:%Y%m%d}_{ccy.lower()}",
                merchant_reference="",
                amount=sum(ln.amount for ln in batch),
                currency=ccy,
                occurred_at=end_of_day,
            )
        )
    return lines


# --- HTTP


def _describe(answer: Answer) -> str:
    body = answer.body
    if "dispute_reference" in body:
        what = f"{body['kind']} {body['amount']}"
    elif "refund_reference" in body:
        what = f"refunded {body['amount']}"
    elif body["status"] == "declined":
        what = f"declined: {body['decline_code']}"
    elif body["status"] == "authorized":
        partial = body["authorized_amount"] < body["requested_amount"]
        what = f"{'partially ' if partial else ''}approved {body['authorized_amount']}"
    elif body["status"] == "captured":
        what = f"captured {body['captured_amount']}, released {body['released_amount']}"
    else:
        what = f"voided, released {body['released_amount']}"
    if answer.replayed:
        return f"replayed: {what}"
    if answer.hold_seconds:
        return f"{what}; answer held {answer.hold_seconds:g}s"
    return what


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    # Never echo inputs: a confused client may have put a card number anywhere.
    parts, param = [], None
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            return "The body is not valid JSON.", None
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "path", "query")]
        where = ".".join(loc)
        param = param or (where or None)
        parts.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


def create_app(store: AcquirerStore, config: SandboxConfig) -> FastAPI:
    acquirer = SandboxAcquirer(store, config)
    app = FastAPI(
        title="paysaga sandbox acquirer",
        description="A card acquirer's API with test payment methods (docs/acquirer.md).",
        version="1",
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(400, "invalid_request", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found" if exc.status_code == 404 else "invalid_request"
        return _error_response(exc.status_code, type_, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return _error_response(500, "internal_error", "The sandbox failed unexpectedly.")

    @app.exception_handler(SandboxError)
    async def _refused(request: Request, exc: SandboxError) -> JSONResponse:
        return exc.response()

    def authenticated(request: Request) -> None:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), config.api_key.encode()
        ):
            raise SandboxError(
                401,
                "authentication_failed",
                "Send `Authorization: Bearer <api key>` with this acquirer's key.",
            )

    async def answered(
        operation: str,
        call: Awaitable[Answer],
        *,
        reference: str | None = None,
        refund_reference: str | None = None,
        amount: int | None = None,
        currency: str | None = None,
    ) -> JSONResponse:
        def logged(http_status: int, result: str) -> None:
            store.log_operation(
                operation,
                http_status,
                result,
                reference=reference,
                refund_reference=refund_reference,
                amount=amount,
                currency=currency,
            )

        try:
            answer = await call
        except SandboxError as exc:
            logged(exc.status, f"{exc.type}: {exc.message}")
            raise
        logged(200, _describe(answer))
        if answer.hold_seconds:
            await asyncio.sleep(answer.hold_seconds)
        return answer.response()

    @app.post("/v1/authorizations", dependencies=[Depends(authenticated)])
    async def authorize(body: AuthorizeBody) -> JSONResponse:
        return await answered(
            "authorize",
            acquirer.authorize(body),
            reference=body.reference,
            amount=body.amount,
            currency=body.currency,
        )

    @app.post("/v1/authorizations/{reference}/capture", dependencies=[Depends(authenticated)])
    async def capture(
        reference: ReferencePath, body: Annotated[CaptureBody | None, Body()] = None
    ) -> JSONResponse:
        body = body or CaptureBody()
        return await answered(
            "capture",
            acquirer.capture(reference, body),
            reference=reference,
            amount=body.amount,
            currency=body.currency,
        )

    @app.post("/v1/authorizations/{reference}/void", dependencies=[Depends(authenticated)])
    async def void(reference: ReferencePath) -> JSONResponse:
        return await answered("void", acquirer.void(reference), reference=reference)

    @app.post("/v1/authorizations/{reference}/refunds", dependencies=[Depends(authenticated)])
    async def refund(reference: ReferencePath, body: RefundBody) -> JSONResponse:
        return await answered(
            "refund",
            acquirer.refund(reference, body),
            reference=reference,
            refund_reference=body.refund_reference,
            amount=body.amount,
            currency=body.currency,
        )

    @app.get("/v1/authorizations/{reference}", dependencies=[Depends(authenticated)])
    async def status(reference: ReferencePath) -> JSONResponse:
        return acquirer.status(reference).response()

    @app.get("/v1/operations", dependencies=[Depends(authenticated)])
    async def operations(
        reference: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = _RECENT_OPERATIONS,
    ) -> JSONResponse:
        rows = store.operations(limit, reference)
        return JSONResponse({"data": [dict(r) for r in rows]})

    @app.post("/v1/authorizations/{reference}/chargebacks", dependencies=[Depends(authenticated)])
    async def chargeback(reference: ReferencePath, body: ChargebackBody) -> JSONResponse:
        return await answered(
            "chargeback",
            acquirer.chargeback(reference, body),
            reference=reference,
            amount=body.amount,
            currency=body.currency,
        )

    @app.post(
        "/v1/authorizations/{reference}/chargebacks/{dispute_reference}/reverse",
        dependencies=[Depends(authenticated)],
    )
    async def reverse_chargeback(
        reference: ReferencePath, dispute_reference: ReferencePath
    ) -> JSONResponse:
        return await answered(
            "chargeback_reversal",
            acquirer.reverse_chargeback(reference, dispute_reference),
            reference=reference,
        )

    @app.get("/v1/settlements/{day}.csv", dependencies=[Depends(authenticated)])
    async def settlement_file(day: DayPath) -> Response:
        content = render_settlement_file(settlement_report(store, _day(day)))
        return Response(
            content,
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="settlement-{day}.csv"'},
        )

    @app.post("/v1/settlements/{day}/discrepancies", dependencies=[Depends(authenticated)])
    async def add_discrepancy(day: DayPath, body: DiscrepancyBody) -> JSONResponse:
        return acquirer.add_discrepancy(_day(day), body).response()

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "authorizations": store.count_authorizations()})

    @app.get("/", response_class=HTMLResponse)
    async def home() -> HTMLResponse:
        return HTMLResponse(_home_page(store, config))

    return app


_OPERATION_COLUMNS = (
    "at", "operation", "reference", "refund_reference", "amount", "currency", "http_status",
    "result",
)  # fmt: skip


def _home_page(store: AcquirerStore, config: SandboxConfig) -> str:
    esc = html.escape
    key_hint = (
        f"the documented test key <code>{esc(DEFAULT_API_KEY)}</code>"
        if config.api_key == DEFAULT_API_KEY
        else "the key it was started with (not the documented test key)"
    )
    methods = "".join(
        f"<tr><td><code>{esc(m.token)}</code></td><td>{esc(m.what_happens)}</td></tr>"
        for m in TEST_PAYMENT_METHODS
    )
    operations = "".join(
        "<tr>"
        + "".join(f"<td>{esc('' if r[c] is None else str(r[c]))}</td>" for c in _OPERATION_COLUMNS)
        + "</tr>"
        for r in store.operations(_RECENT_OPERATIONS)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>paysaga sandbox acquirer</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .5em;text-align:left}}code{{font-size:.95em}}</style>
</head><body>
<h1>paysaga sandbox acquirer</h1>
<p>Test mode: no real money moves. Authenticate with <code>Authorization: Bearer …</code>
using {key_hint}. Wire format and rules: <code>docs/acquirer.md</code>.
{store.count_authorizations()} authorizations on record.</p>
<h2>Recent operations</h2>
<table><tr><th>at (UTC)</th><th>operation</th><th>reference</th><th>refund reference</th>
<th>amount</th><th>currency</th><th>HTTP</th><th>result</th></tr>{operations}</table>
<h2>Test payment methods</h2>
<table><tr><th>token</th><th>what happens</th></tr>{methods}</table>
</body></html>"""


# --- Running it


def command(
    host: str,
    port: int,
    data_dir: Path,
    *,
    delay_seconds: float | None = None,
    hang_seconds: float | None = None,
) -> list[str]:
    """The argv that starts the sandbox in its own process (for `paysaga run` and tests).
    A key other than the test key travels in the environment (`API_KEY_ENV`), never on a
    command line where `ps` shows it."""
    argv = [sys.executable, "-m", "sandboxes.acquirer", "--host", host, "--port", str(port)]
    argv += ["--data-dir", str(data_dir)]
    if delay_seconds is not None:
        argv += ["--delay-seconds", str(delay_seconds)]
    if hang_seconds is not None:
        argv += ["--hang-seconds", str(hang_seconds)]
    return argv


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sandboxes.acquirer", description="paysaga's sandbox card acquirer"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8020)
    parser.add_argument("--data-dir", type=Path, required=True, help="holds acquirer.sqlite3")
    parser.add_argument(
        "--delay-seconds",
        type=float,
        default=DEFAULT_DELAY_SECONDS,
        help="how long pm_card_approve_after_delay takes",
    )
    parser.add_argument(
        "--hang-seconds",
        type=float,
        default=DEFAULT_HANG_SECONDS,
        help="how long pm_card_timeout holds each first answer",
    )
    parser.add_argument("--fee-fixed-minor", type=int, default=DEFAULT_FEE_FIXED_MINOR)
    parser.add_argument("--fee-basis-points", type=int, default=DEFAULT_FEE_BASIS_POINTS)
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    config = SandboxConfig(
        api_key=os.environ.get(API_KEY_ENV) or DEFAULT_API_KEY,
        delay_seconds=args.delay_seconds,
        hang_seconds=args.hang_seconds,
        fee_fixed_minor=args.fee_fixed_minor,
        fee_basis_points=args.fee_basis_points,
    )
    store = AcquirerStore(args.data_dir / DATABASE_FILE)
    try:
        uvicorn.run(
            create_app(store, config),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            # Held pm_card_timeout answers must not hold up a stop.
            timeout_graceful_shutdown=1,
        )
    finally:
        store.close()


if __name__ == "__main__":
    main()
