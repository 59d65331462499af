"""The acquirer's side of a payment: what we ask it to do and what it answers (pure types).

An acquirer knows each payment by OUR reference (the merchant reference, e.g. the payment id)
and gives it its own id (the acquirer reference). Every instruction is idempotent by our
reference: asking twice never authorizes, captures or refunds twice. Amounts are integer minor
units of the authorization's ISO 4217 currency.

The lifecycle at the acquirer, for one reference:

    authorize ──> declined                      (nothing held; final)
              └─> authorized ──> captured       (captured_amount settles; the rest is released)
                             └─> voided         (the whole hold is released)

Refunds return captured money, any number of them, together never more than was captured, each
idempotent by our refund reference.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from domain.money import CURRENCIES, MAX_INT64
from domain.payment import PaymentMethodToken

# URL-path safe (it is a path segment on the wire) and within the identifier charset every
# acquirer we know accepts for a merchant reference.
ACQUIRER_REFERENCE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
AcquirerReference = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=ACQUIRER_REFERENCE_PATTERN)
]
PositiveMinor = Annotated[int, Field(gt=0, le=MAX_INT64)]
Minor = Annotated[int, Field(ge=0, le=MAX_INT64)]


def acquirer_refund_reference(payment_id: str, refund_id: str) -> str:
    """Refund ids are unique per payment, the acquirer's refund references per account. The
    reference a refund's settlement line carries back (reconciliation matches by it)."""
    digest = hashlib.sha256(f"{payment_id}/{refund_id}".encode()).hexdigest()
    return f"re_{digest[:32]}"


class DeclineCode(StrEnum):
    """Why the issuer said no, in the network's vocabulary (Stripe's `decline_code` names)."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    DO_NOT_HONOR = "do_not_honor"
    EXPIRED_CARD = "expired_card"
    CARD_VELOCITY_EXCEEDED = "card_velocity_exceeded"
    LOST_CARD = "lost_card"
    STOLEN_CARD = "stolen_card"
    # Whatever code an acquirer sends that is not above; the raw code is kept beside it.
    GENERIC_DECLINE = "generic_decline"

    @property
    def retry_may_succeed(self) -> bool:
        """A soft decline: the same card may be approved later (funds arrive, limits reset).
        A hard one (lost, stolen, expired) never will: retrying it only costs network fees
        and, under the card schemes' retry rules, fines."""
        return self in _SOFT_DECLINES

    @classmethod
    def from_acquirer(cls, code: str) -> DeclineCode:
        try:
            return cls(code)
        except ValueError:
            return cls.GENERIC_DECLINE


_SOFT_DECLINES = frozenset(
    {
        DeclineCode.INSUFFICIENT_FUNDS,
        DeclineCode.DO_NOT_HONOR,
        DeclineCode.CARD_VELOCITY_EXCEEDED,
        DeclineCode.GENERIC_DECLINE,
    }
)


class AuthorizationOutcome(StrEnum):
    APPROVED = "approved"
    # The issuer approved less than asked (prepaid and debit cards with a smaller balance).
    PARTIALLY_APPROVED = "partially_approved"
    DECLINED = "declined"


class AuthorizationState(StrEnum):
    """Where our reference stands at the acquirer now."""

    AUTHORIZED = "authorized"  # money held, nothing captured yet
    DECLINED = "declined"
    CAPTURED = "captured"  # captured_amount taken, the rest of the hold released
    VOIDED = "voided"  # the whole hold released


def _known_currency(value: str) -> str:
    if value not in CURRENCIES:
        raise ValueError(f"currency {value[:8]!r} is not a supported ISO 4217 code")
    return value


class _AcquirerModel(BaseModel):
    model_config = ConfigDict(frozen=True)


# --- What we ask the acquirer to do


class AuthorizationRequest(_AcquirerModel):
    reference: AcquirerReference
    amount: PositiveMinor
    currency: str
    payment_method: PaymentMethodToken

    _currency = field_validator("currency")(_known_currency)


class CaptureRequest(_AcquirerModel):
    reference: AcquirerReference
    # None: capture everything that was authorized. Less: the remainder is released.
    amount: PositiveMinor | None = None
    currency: str

    _currency = field_validator("currency")(_known_currency)


class VoidRequest(_AcquirerModel):
    reference: AcquirerReference


class AcquirerRefundRequest(_AcquirerModel):
    reference: AcquirerReference
    refund_reference: AcquirerReference
    amount: PositiveMinor
    currency: str

    _currency = field_validator("currency")(_known_currency)


# --- What the acquirer answers


class AuthorizationResult(_AcquirerModel):
    """The answer to an authorization: a decline is an answer, not an error."""

    reference: str
    acquirer_reference: str
    outcome: AuthorizationOutcome
    currency: str
    requested_amount: PositiveMinor
    authorized_amount: Minor  # 0 when declined; < requested when partially approved
    decline_code: DeclineCode | None = None
    acquirer_decline_code: str | None = None  # the acquirer's own code, verbatim

    @property
    def approved(self) -> bool:
        return self.outcome is not AuthorizationOutcome.DECLINED


class CaptureResult(_AcquirerModel):
    reference: str
    acquirer_reference: str
    acquirer_capture_reference: str
    currency: str
    captured_amount: PositiveMinor
    released_amount: Minor  # the part of the hold that was not captured
    captured_at: datetime


class VoidResult(_AcquirerModel):
    reference: str
    acquirer_reference: str
    currency: str
    released_amount: Minor
    voided_at: datetime


class RefundResult(_AcquirerModel):
    reference: str
    refund_reference: str
    acquirer_refund_reference: str
    currency: str
    amount: PositiveMinor
    refunded_at: datetime


class AcquirerAuthorization(_AcquirerModel):
    """The acquirer's record of one reference: the truth that resolves an ambiguous outcome.

    Its invariants are checked on construction, so an acquirer answer that would have us
    capture more than was authorized, or refund more than was captured, is never believed."""

    reference: str
    acquirer_reference: str
    state: AuthorizationState
    currency: str
    requested_amount: PositiveMinor
    authorized_amount: Minor
    captured_amount: Minor = 0
    refunded_amount: Minor = 0
    decline_code: DeclineCode | None = None
    acquirer_decline_code: str | None = None
    acquirer_capture_reference: str | None = None
    created_at: datetime  # when the acquirer decided (approved or declined)
    captured_at: datetime | None = None
    voided_at: datetime | None = None
    refunds: tuple[RefundResult, ...] = ()

    _currency = field_validator("currency")(_known_currency)

    @model_validator(mode="after")
    def _consistent(self) -> AcquirerAuthorization:
        declined = self.state is AuthorizationState.DECLINED
        if declined != (self.decline_code is not None):
            raise ValueError("a decline code comes with, and only with, a declined state")
        if declined and self.authorized_amount != 0:
            raise ValueError("a declined authorization holds nothing")
        if not declined and not 0 < self.authorized_amount <= self.requested_amount:
            raise ValueError("authorized amount must be within (0, requested]")
        if self.captured_amount > self.authorized_amount:
            raise ValueError("captured amount exceeds the authorized amount")
        captured = self.state is AuthorizationState.CAPTURED
        if captured != (self.captured_amount > 0 and self.captured_at is not None):
            raise ValueError("a captured authorization has a capture amount and time")
        if (self.state is AuthorizationState.VOIDED) != (self.voided_at is not None):
            raise ValueError("a voided authorization has a void time")
        if self.refunded_amount > self.captured_amount:
            raise ValueError("refunded amount exceeds the captured amount")
        if sum(r.amount for r in self.refunds) != self.refunded_amount:
            raise ValueError("refunds do not add up to the refunded amount")
        if any(r.currency != self.currency or r.reference != self.reference for r in self.refunds):
            raise ValueError("a refund belongs to another authorization or currency")
        return self

    @property
    def outcome(self) -> AuthorizationOutcome:
        if self.state is AuthorizationState.DECLINED:
            return AuthorizationOutcome.DECLINED
        if self.authorized_amount < self.requested_amount:
            return AuthorizationOutcome.PARTIALLY_APPROVED
        return AuthorizationOutcome.APPROVED

    @property
    def released_amount(self) -> int:
        if self.state in (AuthorizationState.CAPTURED, AuthorizationState.VOIDED):
            return self.authorized_amount - self.captured_amount
        return 0

    @property
    def refundable_amount(self) -> int:
        return self.captured_amount - self.refunded_amount

    def authorization_result(self) -> AuthorizationResult:
        return AuthorizationResult(
            reference=self.reference,
            acquirer_reference=self.acquirer_reference,
            outcome=self.outcome,
            currency=self.currency,
            requested_amount=self.requested_amount,
            authorized_amount=self.authorized_amount,
            decline_code=self.decline_code,
            acquirer_decline_code=self.acquirer_decline_code,
        )

    def capture_result(self) -> CaptureResult | None:
        if self.state is not AuthorizationState.CAPTURED:
            return None
        assert self.captured_at is not None and self.acquirer_capture_reference is not None
        return CaptureResult(
            reference=self.reference,
            acquirer_reference=self.acquirer_reference,
            acquirer_capture_reference=self.acquirer_capture_reference,
            currency=self.currency,
            captured_amount=self.captured_amount,
            released_amount=self.released_amount,
            captured_at=self.captured_at,
        )

    def void_result(self) -> VoidResult | None:
        if self.state is not AuthorizationState.VOIDED:
            return None
        assert self.voided_at is not None
        return VoidResult(
            reference=self.reference,
            acquirer_reference=self.acquirer_reference,
            currency=self.currency,
            released_amount=self.released_amount,
            voided_at=self.voided_at,
        )

    def refund(self, refund_reference: str) -> RefundResult | None:
        return next((r for r in self.refunds if r.refund_reference == refund_reference), None)
