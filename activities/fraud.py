"""Validate and fraud-score a payment before any money moves.

The rules themselves (weights, bands, reasons) are pure and live in domain/fraud.py; this
activity loads the customer's history from the payments register and scores with them.

When `settings.fraud_sidecar_url` is set, an HTTP scoring service replaces the rules (see
`FraudActivities`). A sidecar outage must not stop payments: if it is down, slow or answers
nonsense, the rules score the payment and say so in a "sidecar unavailable: …" reason.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import httpx
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.http import OwnsHttpClient
from domain.errors import FailureType
from domain.fraud import CustomerHistory, score_payment
from domain.payment import FraudAssessment, PaymentRequest
from infra.database import TooMuchContention, step_failure
from ledger.customer_history import load_customer_history
from settings import Settings

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


class FraudActivities(OwnsHttpClient):
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
