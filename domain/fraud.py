"""The fraud rules: explainable, additive, pure. The fraud activity (activities/fraud.py) loads
the customer's history and calls `score_payment`; a sidecar may replace them there.

Each rule that fires adds its weight and one human-readable reason; the score is the sum capped
at 1.0. Weights are integer hundredths, so the same inputs always give exactly the same score.

    rule               fires when                                                   adds
    first payment      the customer has no captured payment yet                     0.20
    amount vs average  amount >= 5x the customer's average in this currency         0.30
                       amount >= 10x that average                                   0.50
    velocity           >= 5 of the customer's payments in the last hour             0.30
                       >= 10 in the last hour                                       0.60
    unusual currency   the customer paid in other currencies, never in this one     0.20
    large amount       amount >= 50 % of the currency's per-payment limit           0.60
                       amount >= 80 % of that limit                                 0.80
                       (only if more than the customer ever paid in this currency)

Bands with the default thresholds (review 0.70, reject 0.95). Saga tests may rely on them;
`amount_for_limit_share(ccy, percent)` gives the amounts:

    customer        amount, as a share of CURRENCIES[ccy].max_minor    score  outcome
    first payment   below 50 %                                          0.20   approved
    first payment   50 % up to, not including, 80 %                     0.80   requires_review
    first payment   80 % or more                                        1.00   rejected
    returning       below 50 %, < 5x their average in this currency,    0.00   approved
                    < 5 payments in the last hour, a currency they use
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from pydantic import BaseModel, Field

from domain.money import CURRENCIES, Money
from domain.payment import FraudAssessment, PaymentRequest

# Weights, in hundredths of a score point.
FIRST_PAYMENT_POINTS = 20
UNUSUAL_CURRENCY_POINTS = 20
# (threshold, points), strongest first: only the strongest tier a payment reaches counts.
AMOUNT_VS_AVERAGE_TIERS: tuple[tuple[int, int], ...] = ((10, 50), (5, 30))  # x average
VELOCITY_TIERS: tuple[tuple[int, int], ...] = ((10, 60), (5, 30))  # payments in the last hour
LARGE_AMOUNT_TIERS: tuple[tuple[int, int], ...] = ((80, 80), (50, 60))  # % of currency limit
_FULL_SCORE = 100
# "Velocity" counts the customer's payments this long before the one being assessed.
VELOCITY_WINDOW = timedelta(hours=1)


class CustomerHistory(BaseModel):
    """What the payments register knows about a customer of one API client, as seen by one
    payment.

    "Captured" payments are register rows with money still captured (a capture reversed before
    confirmation does not count); velocity counts every payment that reached the register in
    the last hour, reversed or not, because velocity is about attempts. The defaults describe
    a customer with no history at all.
    """

    payments_total: int = Field(default=0, ge=0)
    payments_last_hour: int = Field(default=0, ge=0)
    # In the currency of the payment being assessed; None when the customer never paid in it.
    average_amount_same_currency: int | None = Field(default=None, ge=0)
    max_amount_same_currency: int | None = Field(default=None, ge=0)
    currencies_used: list[str] = Field(default_factory=list)


def amount_for_limit_share(ccy: str, percent: int) -> int:
    """The smallest amount (minor units) that is at least `percent` % of `ccy`'s per-payment
    limit: what tests send to land a first-time customer in a chosen band."""
    limit = CURRENCIES[ccy].max_minor
    return max(1, -(-limit * percent // 100))


# --- The rules


@dataclass(frozen=True)
class RuleHit:
    points: int
    reason: str


def _money(amount: int, ccy: str) -> str:
    return str(Money(amount, ccy))


def _first_payment(request: PaymentRequest, history: CustomerHistory) -> RuleHit | None:
    if history.payments_total > 0:
        return None
    return RuleHit(FIRST_PAYMENT_POINTS, "first payment from this customer")


def _amount_against_average(request: PaymentRequest, history: CustomerHistory) -> RuleHit | None:
    average = history.average_amount_same_currency
    if not average:
        return None
    for times, points in AMOUNT_VS_AVERAGE_TIERS:
        if request.amount >= times * average:
            tenths = request.amount * 10 // average  # integer ratio: no float rounding surprises
            return RuleHit(
                points,
                f"amount is {tenths // 10}.{tenths % 10}x the customer's average "
                f"{request.currency} payment ({_money(average, request.currency)})",
            )
    return None


def _velocity(request: PaymentRequest, history: CustomerHistory) -> RuleHit | None:
    for count, points in VELOCITY_TIERS:
        if history.payments_last_hour >= count:
            return RuleHit(
                points, f"{history.payments_last_hour} payments from this customer in the last hour"
            )
    return None


def _unusual_currency(request: PaymentRequest, history: CustomerHistory) -> RuleHit | None:
    used = history.currencies_used
    if not used or request.currency in used:
        return None
    return RuleHit(
        UNUSUAL_CURRENCY_POINTS,
        f"first payment in {request.currency}; the customer has paid in {', '.join(used)} before",
    )


def _large_amount(request: PaymentRequest, history: CustomerHistory) -> RuleHit | None:
    largest = history.max_amount_same_currency
    if largest is not None and request.amount <= largest:
        return None  # this customer has paid this much in this currency before
    limit = CURRENCIES[request.currency].max_minor
    for percent, points in LARGE_AMOUNT_TIERS:
        if request.amount * 100 >= limit * percent:
            return RuleHit(
                points,
                f"amount {_money(request.amount, request.currency)} is "
                f"{request.amount * 100 // limit}% of the {request.currency} per-payment limit "
                f"({_money(limit, request.currency)}) and more than the customer ever paid in it",
            )
    return None


RULES: tuple[Callable[[PaymentRequest, CustomerHistory], RuleHit | None], ...] = (
    _first_payment,
    _amount_against_average,
    _velocity,
    _unusual_currency,
    _large_amount,
)


def score_payment(request: PaymentRequest, history: CustomerHistory) -> FraudAssessment:
    """The rules scorer: pure and deterministic (reasons in `RULES` order)."""
    hits = [hit for rule in RULES if (hit := rule(request, history)) is not None]
    points = min(sum(hit.points for hit in hits), _FULL_SCORE)
    return FraudAssessment(
        score=points / _FULL_SCORE, reasons=[hit.reason for hit in hits], scorer="rules"
    )
