"""Validate and fraud-score a payment before any money moves.

The default scorer is a handful of explainable, additive rules over the request and the
customer's history in the payments register. Each rule that fires adds its weight and one
human-readable reason; the score is the sum capped at 1.0. Weights are integer hundredths, so
the same inputs always give exactly the same score.

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

When `settings.fraud_sidecar_url` is set, an HTTP scoring service replaces the rules (see
`FraudActivities`). A sidecar outage must not stop payments: if it is down, slow or answers
nonsense, the rules score the payment and say so in a "sidecar unavailable: …" reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import httpx
import sqlalchemy as sa
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from domain.errors import FailureType
from domain.money import CURRENCIES, Money
from domain.payment import FraudAssessment, PaymentRequest
from infra.database import TooMuchContention, run_serializable, step_failure
from ledger.tables import payments
from settings import Settings

# Weights, in hundredths of a score point.
FIRST_PAYMENT_POINTS = 20
UNUSUAL_CURRENCY_POINTS = 20
# (threshold, points), strongest first: only the strongest tier a payment reaches counts.
AMOUNT_VS_AVERAGE_TIERS: tuple[tuple[int, int], ...] = ((10, 50), (5, 30))  # x average
VELOCITY_TIERS: tuple[tuple[int, int], ...] = ((10, 60), (5, 30))  # payments in the last hour
LARGE_AMOUNT_TIERS: tuple[tuple[int, int], ...] = ((80, 80), (50, 60))  # % of currency limit
_FULL_SCORE = 100

VELOCITY_WINDOW = timedelta(hours=1)
# History is the customer's most recent payments only: bounded work per assessment however
# long the customer's history grows (the index is (client_id, customer_id, created_at)).
HISTORY_ROWS = 1000
_HISTORY_READ_ATTEMPTS = 3

# What the sidecar may answer: small, so a broken sidecar cannot bloat workflow history.
_SIDECAR_MAX_BODY_BYTES = 64 * 1024
_SIDECAR_MAX_REASONS = 20
_USER_AGENT = "paysaga-fraud/1"


class FraudCheck(BaseModel):
    """The `assess_payment` activity's input: the request and the API client it came from.
    A customer is a customer *of that client*: its history never includes another client's
    payments, even under the same customer id (docs/security.md, "Tenants")."""

    client_id: str | None
    request: PaymentRequest

    @model_validator(mode="before")
    @classmethod
    def _bare_request(cls, data: Any) -> Any:
        """Activity tasks scheduled before tenants carry the bare request: their client is
        unknown (None), and their history is looked up across clients, as it was then."""
        if isinstance(data, dict) and "request" not in data:
            return {"client_id": None, "request": data}
        return data


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


# --- The customer's history


async def load_customer_history(
    engine: AsyncEngine,
    client_id: str | None,
    customer_id: str,
    ccy: str,
    now: datetime | None = None,
) -> CustomerHistory:
    """One read-only query over the latest `HISTORY_ROWS` register rows of this client's
    customer, grouped by currency. Portable SQL (PostgreSQL and CockroachDB); retried on
    serialization conflicts. `client_id` None: the customer id across every client (only for
    activity tasks scheduled before tenants, see FraudCheck)."""
    since = (now or datetime.now(UTC)) - VELOCITY_WINDOW
    statement = _LEGACY_HISTORY_QUERY if client_id is None else _HISTORY_QUERY
    values = {"client_id": client_id, "customer_id": customer_id, "since": since}

    async def read(conn: AsyncConnection) -> list[sa.Row[Any]]:
        rows = await conn.execute(statement, values)
        return list(rows.all())

    rows = await run_serializable(engine, read, max_attempts=_HISTORY_READ_ATTEMPTS)
    return _history_from(rows, ccy)


def _history_query(*, per_client: bool = True) -> sa.Select[Any]:
    """Built once with bound parameters: scoring is on every payment's critical path, and
    building the statement cost more CPU than running it. The index is (client_id,
    customer_id, created_at) (migration 0004)."""
    since = sa.bindparam("since", type_=sa.DateTime(timezone=True))
    customer = payments.c.customer_id == sa.bindparam("customer_id", type_=sa.String)
    if per_client:
        customer &= payments.c.client_id == sa.bindparam("client_id", type_=sa.String)
    recent = (
        sa.select(
            payments.c.currency, payments.c.amount, payments.c.captured, payments.c.created_at
        )
        .where(customer)
        .order_by(payments.c.created_at.desc())
        .limit(HISTORY_ROWS)
        .subquery("recent")
    )
    captured = recent.c.captured > 0
    return sa.select(
        recent.c.currency,
        sa.func.sum(sa.case((captured, 1), else_=0)).label("captured_count"),
        sa.func.sum(sa.case((captured, recent.c.amount), else_=0)).label("captured_sum"),
        sa.func.max(sa.case((captured, recent.c.amount), else_=None)).label("largest"),
        sa.func.sum(sa.case((recent.c.created_at >= since, 1), else_=0)).label("last_hour"),
    ).group_by(recent.c.currency)


_HISTORY_QUERY = _history_query()
_LEGACY_HISTORY_QUERY = _history_query(per_client=False)


def _history_from(rows: list[sa.Row[Any]], ccy: str) -> CustomerHistory:
    # SUM over BIGINT comes back as a Decimal on both databases; int() keeps it exact.
    per_currency = {
        row.currency: (int(row.captured_count), int(row.captured_sum), row.largest) for row in rows
    }
    count, total, largest = per_currency.get(ccy, (0, 0, None))
    return CustomerHistory(
        payments_total=sum(c for c, _, _ in per_currency.values()),
        payments_last_hour=sum(int(row.last_hour) for row in rows),
        average_amount_same_currency=total // count if count else None,
        max_amount_same_currency=int(largest) if count and largest is not None else None,
        currencies_used=sorted(code for code, (c, _, _) in per_currency.items() if c > 0),
    )


# --- The optional scoring sidecar


class SidecarVerdict(BaseModel):
    """The sidecar's answer: `{"score": 0.0..1.0, "reasons": ["…"]}`; other keys are ignored."""

    model_config = ConfigDict(extra="ignore")

    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, strict=True)
    reasons: list[Annotated[str, StringConstraints(max_length=500)]] = Field(
        max_length=_SIDECAR_MAX_REASONS
    )


class SidecarUnavailable(Exception):
    """The sidecar gave no usable answer; the message says why, never the URL."""


def sidecar_payload(
    request: PaymentRequest, history: CustomerHistory, client_id: str | None = None
) -> dict[str, Any]:
    """What the sidecar sees: the API client, the request without its payment-method token,
    and that client's customer's history. A sidecar keeping its own state keys customers by
    (client_id, customer_id), as paysaga does."""
    return {
        "client_id": client_id,
        "request": request.model_dump(mode="json", exclude={"payment_method"}),
        "history": history.model_dump(mode="json"),
    }


def _first_error(exc: ValidationError) -> str:
    # Never the input: a broken sidecar could echo anything back.
    error = exc.errors(include_input=False, include_url=False, include_context=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


# --- The activity


def _revalidated(request: PaymentRequest) -> PaymentRequest:
    """Defense in depth: the API validated the request, but anything can start a workflow."""
    try:
        return PaymentRequest.model_validate(request.model_dump())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False, include_context=False)
        )
        # `from None`: the ValidationError's text echoes inputs, which may hold card data.
        raise ApplicationError(
            f"invalid payment request: {problems}",
            type=FailureType.INVALID_PAYMENT.value,
            non_retryable=True,
        ) from None


class FraudActivities:
    """The `assess_payment` activity. Register `FraudActivities(engine, settings).assess_payment`
    on the worker; a database error is left to Temporal's retry policy."""

    def __init__(
        self, engine: AsyncEngine, settings: Settings, http: httpx.AsyncClient | None = None
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._http = http
        self._owns_http = http is None

    @activity.defn(name="assess_payment")
    async def assess_payment(self, check: FraudCheck) -> FraudAssessment:
        request = _revalidated(check.request)
        started = time.perf_counter()
        try:
            history = await load_customer_history(
                self._engine, check.client_id, request.customer_id, request.currency
            )
        except (DBAPIError, TooMuchContention) as exc:
            raise step_failure(exc, "the customer's history") from None
        loaded = time.perf_counter()
        assessment = await self.assess(request, history, check.client_id)
        scored = time.perf_counter()
        activity.logger.info(
            "fraud score %.2f by %s for client %s customer %s at merchant %s "
            "(history %.1f ms, scoring %.1f ms, %d reasons)",
            assessment.score,
            assessment.scorer,
            check.client_id,
            request.customer_id,
            request.merchant_id,
            (loaded - started) * 1000,
            (scored - loaded) * 1000,
            len(assessment.reasons),
        )
        return assessment.model_copy(update={"elapsed_ms": round((scored - started) * 1000, 3)})

    async def assess(
        self, request: PaymentRequest, history: CustomerHistory, client_id: str | None = None
    ) -> FraudAssessment:
        """The sidecar's verdict when one is configured and answers sensibly, else the rules'."""
        url = self._settings.fraud_sidecar_url
        if not url:
            return score_payment(request, history)
        try:
            return await self._ask_sidecar(url, request, history, client_id)
        except SidecarUnavailable as exc:
            activity.logger.warning("fraud sidecar unavailable, scoring by rules: %s", exc)
            fallback = score_payment(request, history)
            fallback.reasons.append(f"sidecar unavailable: {exc}")
            return fallback

    async def aclose(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    def _client(self) -> httpx.AsyncClient:
        # Created on first use so the worker can build this object outside an event loop.
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False)
        return self._http

    async def _ask_sidecar(
        self, url: str, request: PaymentRequest, history: CustomerHistory, client_id: str | None
    ) -> FraudAssessment:
        budget = self._settings.fraud_sidecar_timeout_seconds
        try:
            # httpx timeouts are per phase; this bounds the whole call, slow-drip answers included.
            async with asyncio.timeout(budget):
                response = await self._client().post(
                    url,
                    json=sidecar_payload(request, history, client_id),
                    headers={"User-Agent": _USER_AGENT},
                    timeout=budget,
                )
        except (TimeoutError, httpx.TimeoutException):
            raise SidecarUnavailable(f"no answer within {budget:g}s") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise SidecarUnavailable(type(exc).__name__) from None
        if not 200 <= response.status_code < 300:
            raise SidecarUnavailable(f"answered {response.status_code}")
        if len(response.content) > _SIDECAR_MAX_BODY_BYTES:
            raise SidecarUnavailable(f"answer larger than {_SIDECAR_MAX_BODY_BYTES} bytes")
        try:
            verdict = SidecarVerdict.model_validate_json(response.content)
        except ValidationError as exc:
            raise SidecarUnavailable(f"invalid answer ({_first_error(exc)})") from None
        return FraudAssessment(score=verdict.score, reasons=list(verdict.reasons), scorer="sidecar")
