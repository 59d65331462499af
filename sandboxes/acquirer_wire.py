"""The sandbox acquirer's wire format (docs/acquirer.md): its request bodies with their checks,
and its error answers."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

# The wire's own shapes (docs/acquirer.md), one definition with the connector's.
from domain.acquirer import ACQUIRER_REFERENCE_PATTERN
from domain.acquirer import AcquirerReference as Reference
from domain.acquirer import PositiveMinor as Amount
from domain.cards import luhn_valid
from domain.money import CURRENCIES
from domain.payment import PaymentMethodToken
from sandboxes.acquirer_store import DiscrepancyKind

ReferencePath = Annotated[str, PathParam(pattern=ACQUIRER_REFERENCE_PATTERN)]
DayPath = Annotated[str, PathParam(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")]


def parse_day(value: str) -> date:
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


# Our reference, never a card number; a currency we support.
CardlessReference = Annotated[Reference, AfterValidator(_no_card_number)]
Currency = Annotated[str, AfterValidator(_supported_currency)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class AuthorizeBody(_Body):
    reference: CardlessReference
    amount: Amount
    currency: Currency
    payment_method: PaymentMethodToken


class CaptureBody(_Body):
    amount: Amount | None = None
    currency: Currency | None = None

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
    refund_reference: CardlessReference
    amount: Amount
    currency: Currency


class ChargebackBody(_Body):
    """A chargeback the card network pushes (a sandbox test instruction: a real acquirer tells
    you of one). `dispute_reference` is the dispute's id as paysaga knows it."""

    dispute_reference: Reference
    amount: Amount
    currency: Currency


class DiscrepancyBody(_Body):
    """A fault in one day's settlement file, for tests (docs/reconciliation.md): leave a
    movement out, add one nobody made, or report a movement with another amount or currency."""

    # Literal, not the enum: the body is validated strictly from JSON strings.
    kind: Literal["missing", "unexpected", "amount_mismatch", "currency_mismatch"]
    movement_reference: Reference | None = None
    reference: Reference | None = None
    amount: Amount | None = None
    currency: Currency | None = None

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
        return error_response(self.status, self.type, self.message, self.param)


def error_response(status: int, type_: str, message: str, param: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        {"error": {"type": type_, "message": message, "param": param}},
        status_code=status,
        headers=headers,
    )
