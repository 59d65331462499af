"""Subscriptions: the request, the state the subscription's workflow keeps, the calendar of its
periods and the money rules of a change. Pure: no Temporal, no I/O
(tests/domain/test_subscription_domain.py).

The calendar (`boundary`)
    A subscription bills every `interval_count` days, weeks, months or years from its
    `billing_anchor` date. Boundary k is the anchor plus k intervals, computed from the anchor
    itself, never from the previous boundary: a month (or year) that has no such day takes its
    last day. So an anchor of 31 January gives 28 (or 29) February, then 31 March, 30 April,
    31 May; an anchor of 29 February gives 28 February in the years that have none. Boundaries
    are midnight UTC of their date; k may be negative, the anchor only fixes the phase.

The first period
    A trial of `trial_days` ends `trial_days` after the subscription is created; without one it
    "ends" at creation. The first charged period is the one containing the trial's end; it is
    charged at the trial's end, in full when that is the boundary's own date (the default
    anchor is the trial's end date), else for the days left of it (proration, below).

Proration (`prorated`), in integer minor units
    The part of an amount for the days left of a period is
        amount × days_left ÷ period_days, rounded half up to a whole minor unit,
    days counted by UTC date, the day of the change counting as left. A change of price or
    quantity while a paid period runs credits the old total's part and charges the new total's
    part, each rounded on its own; the difference (positive: owed; negative: a credit) is added
    to the next renewal. A credit larger than a renewal carries on to the one after; a renewal
    a credit pays in full moves no money (the period is `paid_by_credit`).

MRR (`monthly_recurring_revenue`)
    The total per period brought to a month: month ÷ count, year ÷ (12 × count),
    week × 52 ÷ (12 × count), day × 365 ÷ (12 × count), rounded half up. It counts while the
    subscription is `active` or `past_due`, and is 0 otherwise (trial, paused, unpaid, canceled).

Over 400 lines: the subscription's types and its calendar rules (billing anchors, periods,
proration, MRR), which are one concept and tested together (tests/domain/).
"""

from __future__ import annotations

import calendar
import hashlib
import json
import re
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, model_validator
from pydantic_core import PydanticCustomError

from domain.constraints import JsonInteger, MinorUnits
from domain.money import CURRENCIES, MAX_JSON_INTEGER
from domain.payment import (
    SECONDS_PER_DAY,
    CardDataFree,
    CurrencyCode,
    FreeText,
    Identifier,
    Metadata,
    PaymentMethodToken,
    PaymentPolicy,
    StrictRequest,
)


class Interval(StrEnum):
    DAY = "day"
    WEEK = "week"
    MONTH = "month"
    YEAR = "year"


class SubscriptionStatus(StrEnum):
    TRIALING = "trialing"
    ACTIVE = "active"
    # A renewal was declined; dunning retries it.
    PAST_DUE = "past_due"
    # Dunning gave up and the policy keeps the subscription: no more renewals are attempted
    # until it is canceled (a new subscription is the way back).
    UNPAID = "unpaid"
    CANCELED = "canceled"
    PAUSED = "paused"

    @property
    def ended(self) -> bool:
        return self is SubscriptionStatus.CANCELED

    @property
    def earns(self) -> bool:
        """Counts towards MRR."""
        return self in (SubscriptionStatus.ACTIVE, SubscriptionStatus.PAST_DUE)


# ── the calendar ─────────────────────────────────────────────────────────────────────────


def _add_months(anchor: date, months: int) -> date:
    year, month0 = divmod(anchor.year * 12 + anchor.month - 1 + months, 12)
    last = calendar.monthrange(year, month0 + 1)[1]
    return date(year, month0 + 1, min(anchor.day, last))


def boundary_date(anchor: date, interval: Interval, count: int, k: int) -> date:
    """The date of boundary k: the anchor plus k × count intervals, month ends clamped."""
    if interval is Interval.DAY:
        return anchor + timedelta(days=k * count)
    if interval is Interval.WEEK:
        return anchor + timedelta(days=7 * k * count)
    months = k * count * (12 if interval is Interval.YEAR else 1)
    return _add_months(anchor, months)


def midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def boundary(anchor: date, interval: Interval, count: int, k: int) -> datetime:
    return midnight(boundary_date(anchor, interval, count, k))


def _approx_days(interval: Interval, count: int) -> float:
    per = {
        Interval.DAY: 1.0,
        Interval.WEEK: 7.0,
        Interval.MONTH: 30.436875,
        Interval.YEAR: 365.2425,
    }
    return per[interval] * count


def period_index_at(anchor: date, interval: Interval, count: int, day: date) -> int:
    """The k whose period [boundary k, boundary k+1) contains `day`."""
    # An estimate from the average length, then corrected exactly (at most a step or two).
    k = int((day - anchor).days // _approx_days(interval, count))
    while boundary_date(anchor, interval, count, k) > day:
        k -= 1
    while boundary_date(anchor, interval, count, k + 1) <= day:
        k += 1
    return k


# ── money ────────────────────────────────────────────────────────────────────────────────


def round_half_up(numerator: int, denominator: int) -> int:
    """numerator ÷ denominator rounded half up (away from zero for a half), integers only."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    sign = -1 if numerator < 0 else 1
    return sign * ((2 * abs(numerator) + denominator) // (2 * denominator))


def prorated(amount: int, days_left: int, period_days: int) -> int:
    """The part of `amount` for `days_left` of `period_days` (rule in the module docstring)."""
    days_left = max(0, min(days_left, period_days))
    return round_half_up(amount * days_left, period_days)


def change_adjustment(
    old_total: int, new_total: int, change_day: date, period_start: date, period_end: date
) -> int:
    """What a change of total in the running paid period adds to the next renewal: the new
    total's part of the days left minus the old total's part (negative: a credit)."""
    period_days = (period_end - period_start).days
    days_left = (period_end - change_day).days
    return prorated(new_total, days_left, period_days) - prorated(old_total, days_left, period_days)


def monthly_recurring_revenue(total: int, interval: Interval, count: int) -> int:
    if interval is Interval.MONTH:
        return round_half_up(total, count)
    if interval is Interval.YEAR:
        return round_half_up(total, 12 * count)
    if interval is Interval.WEEK:
        return round_half_up(total * 52, 12 * count)
    return round_half_up(total * 365, 12 * count)


# ── the request ──────────────────────────────────────────────────────────────────────────

UnitAmount = Annotated[
    int, JsonInteger, MinorUnits(1, MAX_JSON_INTEGER, "amount_too_small", "amount_too_large")
]
MAX_QUANTITY = 10_000
Quantity = Annotated[int, Field(ge=1, le=MAX_QUANTITY), JsonInteger]
IntervalCount = Annotated[int, Field(ge=1, le=12), JsonInteger]
TrialDays = Annotated[int, Field(ge=0, le=730), JsonInteger]
_ISO_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


def _iso_date(value: Any) -> Any:
    """A date arrives as a JSON string `YYYY-MM-DD` and only so: not a number of seconds, not
    a date-time (what the OpenAPI document's `format: date` says)."""
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if isinstance(value, str) and _ISO_DATE.fullmatch(value):
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
    raise PydanticCustomError("date_invalid", "Send a calendar date as YYYY-MM-DD.")


AnchorDate = Annotated[date, BeforeValidator(_iso_date)]
# Enum values arrive as JSON strings: parsed despite the model's strictness.
IntervalName = Annotated[Interval, Strict(False)]


def total_over_limit(currency: str, unit_amount: int, quantity: int) -> int | None:
    """The currency's per-payment limit when unit_amount × quantity exceeds it, else None (a
    renewal is one payment). JSON Schema cannot bound a product: the API refuses it with 409."""
    limit = CURRENCIES[currency].max_minor
    return limit if unit_amount * quantity > limit else None


def _unit_limits_in_schema(schema: dict[str, Any]) -> None:
    """Each currency's per-payment limit bounds `unit_amount` in the OpenAPI document."""
    schema["allOf"] = [
        {
            "if": {"properties": {"currency": {"const": code}}, "required": ["currency"]},
            "then": {"properties": {"unit_amount": {"maximum": unit.max_minor}}},
        }
        for code, unit in sorted(CURRENCIES.items())
    ]


class SubscriptionRequest(StrictRequest):
    """`POST /v1/subscriptions`."""

    model_config = ConfigDict(json_schema_extra=_unit_limits_in_schema)

    customer_id: Identifier
    merchant_id: Identifier
    payment_method: PaymentMethodToken = Field(description="A payment-method token, never a PAN.")
    unit_amount: UnitAmount = Field(
        description="Price per unit per period, in minor units of `currency`; unit_amount × "
        "quantity is at most the currency's per-payment limit (else 422 amount_too_large)."
    )
    currency: CurrencyCode = Field(description="ISO 4217 code, upper case.")
    quantity: Quantity = 1
    interval: IntervalName = Field(description="The period: day, week, month or year.")
    interval_count: IntervalCount = Field(default=1, description="Periods of `interval` each.")
    billing_anchor: AnchorDate | None = Field(
        default=None,
        description="The date the billing calendar is counted from (month ends clamped: an "
        "anchor of the 31st bills on the last day of shorter months). Default: the day the "
        "trial ends (today without a trial). Any date only sets the phase: the first period "
        "is the one containing the trial's end, charged for the days left of it.",
    )
    trial_days: TrialDays = Field(default=0, description="Days before the first charge.")
    description: FreeText | None = None
    metadata: Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unit_within_currency_limit(self) -> SubscriptionRequest:
        limit = CURRENCIES[self.currency].max_minor
        if self.unit_amount > limit:
            raise PydanticCustomError(
                "amount_too_large",
                "unit_amount exceeds the per-payment limit of {limit} minor units for {currency}.",
                {"limit": limit, "currency": self.currency, "param": "unit_amount"},
            )
        return self

    def fingerprint(self) -> str:
        body = self.model_dump(mode="json")
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class DunningPolicy(BaseModel):
    """What happens after a declined renewal (from settings, fixed at creation). Its defaults
    are the settings' (settings.py reads them from here)."""

    # When a period's declined renewal is tried again, counted from its first attempt (from the
    # settings' days: 1, 3, 5 and 7 days by default).
    retry_after_seconds: list[float] = Field(
        default_factory=lambda: [d * SECONDS_PER_DAY for d in (1, 3, 5, 7)]
    )
    # When every retry declined: keep the subscription `unpaid`, or cancel it.
    when_exhausted: Literal["unpaid", "canceled"] = "canceled"


class SubscriptionPolicy(BaseModel):
    dunning: DunningPolicy = Field(default_factory=DunningPolicy)
    # The rules of every renewal payment (review thresholds, acquirer, CRM targets, …).
    payment: PaymentPolicy = Field(default_factory=PaymentPolicy)
    # Continue as new after this many settled periods or history events, whichever first.
    continue_as_new_after_periods: int = 12
    continue_as_new_after_events: int = 2000
    # Periods kept in the state (older ones live in the ledger and the payments register).
    periods_kept: int = 24


# ── changes (one Update and one signal, `change`) ────────────────────────────────────────


class CancelChange(CardDataFree):
    kind: Literal["cancel"] = "cancel"
    at_period_end: bool = False
    reason: str = "requested_by_customer"


class PauseChange(CardDataFree):
    kind: Literal["pause"] = "pause"


class ResumeChange(CardDataFree):
    kind: Literal["resume"] = "resume"


class PriceChange(CardDataFree):
    kind: Literal["price"] = "price"
    unit_amount: int | None = None
    quantity: int | None = None


class PaymentMethodChange(CardDataFree):
    kind: Literal["payment_method"] = "payment_method"
    payment_method: str


SubscriptionChange = Annotated[
    CancelChange | PauseChange | ResumeChange | PriceChange | PaymentMethodChange,
    Field(discriminator="kind"),
]


class CancelRequest(StrictRequest):
    at_period_end: bool = Field(
        default=False,
        description="true: renew no more and end at the current period's end; false: end now "
        "(what was paid is not refunded here: refund the renewal payment if owed).",
    )


class PriceChangeRequest(StrictRequest):
    unit_amount: UnitAmount | None = None
    quantity: Quantity | None = None


class PaymentMethodRequest(StrictRequest):
    payment_method: PaymentMethodToken


class EmptyRequest(StrictRequest):
    pass


# ── the state ────────────────────────────────────────────────────────────────────────────


class PeriodStatus(StrEnum):
    PENDING = "pending"
    PAID = "paid"
    PAID_BY_CREDIT = "paid_by_credit"
    UNPAID = "unpaid"
    # A boundary passed while paused, or the subscription was canceled before charging it.
    SKIPPED = "skipped"


class RenewalAttempt(BaseModel):
    payment_id: str
    amount: int
    at: datetime
    status: str = "pending"  # the payment's status once it settled
    decline_code: str | None = None


class Period(BaseModel):
    number: int  # 0 = the first charged period
    start: date
    end: date
    amount: int  # what this period's renewal charges (credits and adjustments included)
    status: PeriodStatus = PeriodStatus.PENDING
    attempts: list[RenewalAttempt] = Field(default_factory=list)
    # The renewal payment that captured it (at most one: the checker holds it to that).
    paid_by: str | None = None


class SubscriptionStatusChange(BaseModel):
    status: SubscriptionStatus
    at: datetime
    note: str = ""


class RefusedChange(BaseModel):
    """A change the workflow refused after it was recorded (the operators' `change_requested`
    signal has no caller to answer): what it was, the API's error code, why and when."""

    kind: str
    code: str
    message: str
    at: datetime


class SubscriptionState(BaseModel):
    id: str
    client_id: str
    request: SubscriptionRequest
    fingerprint: str
    status: SubscriptionStatus
    created_at: datetime
    updated_at: datetime
    trial_end: datetime
    billing_anchor: date
    # What the next renewal charges is unit_amount × quantity plus `adjustment`.
    unit_amount: int
    quantity: int
    payment_method: str
    adjustment: int = 0
    # Internal index (k) of the first charged period on the anchor's calendar.
    first_k: int = 0
    # The period the next renewal is for (its number), and when it is due.
    next_period: int = 0
    next_renewal_at: datetime | None = None
    current_period: Period | None = None
    cancel_at_period_end: bool = False
    canceled_at: datetime | None = None
    cancel_reason: str | None = None
    paused_at: datetime | None = None
    periods: list[Period] = Field(default_factory=list)
    paid_total: int = 0
    # The CRM's last word on this subscription's transitions: synced, failed, or not_configured.
    crm_sync: str = "not_configured"
    history: list[SubscriptionStatusChange] = Field(default_factory=list)
    event_sequence: int = 0
    # The last change sent by signal that was refused (an Update's refusal is its 409 instead).
    last_refused_change: RefusedChange | None = None

    @property
    def total(self) -> int:
        return self.unit_amount * self.quantity

    @property
    def mrr(self) -> int:
        if not self.status.earns:
            return 0
        return monthly_recurring_revenue(
            self.total, self.request.interval, self.request.interval_count
        )


class SubscriptionWorkflowInput(BaseModel):
    subscription_id: str
    client_id: str
    request: SubscriptionRequest
    fingerprint: str
    policy: SubscriptionPolicy = Field(default_factory=SubscriptionPolicy)
    carried_state: SubscriptionState | None = None


class RenewalSettled(BaseModel):
    """A renewal payment's outcome, signalled by the payment to its subscription."""

    payment_id: str
    status: str
    captured: int = 0
    decline_code: str | None = None


SUBSCRIPTION_ID_PATTERN = r"^sub_[0-9a-f]{24}$"


def subscription_id_for(client_id: str, idempotency_key: str) -> str:
    digest = hashlib.sha256(f"subscription\x1f{client_id}\x1f{idempotency_key}".encode())
    return f"sub_{digest.hexdigest()[:24]}"


def renewal_payment_id(subscription_id: str, period: int, attempt: int) -> str:
    """The renewal payment of (subscription, period, attempt): a payment id (`pay_…`) no
    client key can produce (another hash domain), the same every time it is computed, so a
    renewal started twice is one workflow (REJECT_DUPLICATE) and one ledger posting."""
    digest = hashlib.sha256(f"renewal\x1f{subscription_id}\x1f{period}\x1f{attempt}".encode())
    return f"pay_{digest.hexdigest()[:24]}"


def first_period(
    anchor: date, interval: Interval, count: int, trial_end: datetime
) -> tuple[int, date, date]:
    """(k, start, end) of the first charged period: the one containing the trial's end."""
    k = period_index_at(anchor, interval, count, trial_end.astimezone(UTC).date())
    return (
        k,
        boundary_date(anchor, interval, count, k),
        boundary_date(anchor, interval, count, k + 1),
    )
