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

Over 400 lines: the sandbox acquirer's rules and the HTTP service that serializes them on one
event loop; its store, wire format, test payment methods and settlement files are their own
modules.
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
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import uvicorn
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from domain.settlement import render_settlement_file
from sandboxes.acquirer_store import AcquirerStore, now_iso
from sandboxes.acquirer_wire import (
    AuthorizeBody,
    CaptureBody,
    ChargebackBody,
    DayPath,
    DiscrepancyBody,
    ReferencePath,
    RefundBody,
    SandboxError,
    error_response,
    parse_day,
)
from sandboxes.payment_methods import (
    DECLINE_MESSAGES,
    TEST_PAYMENT_METHODS,
    Behaviour,
    SandboxPaymentMethod,
    payment_method_behaviour,
)
from sandboxes.settlement import settlement_report

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


# --- Durable state


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


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
                 body.amount, authorized, status, decline, now_iso()),
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
        now, capture_reference = now_iso(), _new_id("cap")
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
                (now_iso(), reference),
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
                 body.amount, body.currency, now_iso()),
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
                 amount, row["currency"], now_iso()),
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
            "created_at": now_iso(),
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
        return error_response(400, "invalid_request", message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found" if exc.status_code == 404 else "invalid_request"
        return error_response(exc.status_code, type_, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error answering %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "The sandbox failed unexpectedly.")

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
        content = render_settlement_file(settlement_report(store, parse_day(day)))
        return Response(
            content,
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="settlement-{day}.csv"'},
        )

    @app.post("/v1/settlements/{day}/discrepancies", dependencies=[Depends(authenticated)])
    async def add_discrepancy(day: DayPath, body: DiscrepancyBody) -> JSONResponse:
        return acquirer.add_discrepancy(parse_day(day), body).response()

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
