"""Talks to the card acquirer: authorize, capture, void, refund and status, by our reference.

The wire format is docs/acquirer.md; the sandbox acquirer (sandboxes/acquirer.py) speaks it, and
so can an adapter in front of a real acquirer. Every call ends in exactly one of four ways:

    answered     a result: approved, partially approved or declined (a decline is an answer,
                 not an error), captured, voided, refunded.
    rejected     the acquirer refused the instruction (4xx): nothing happened, and sending the
                 same again will not help.                                  AcquirerRejected
    not reached  nothing was sent (connection refused, connect timed out), or the acquirer said
                 it did not process it (408, 429): definitely not done; safe to retry as is.
                                                                            AcquirerNotReached
    unknown      sent, but no usable answer came back (timed out waiting, 5xx, connection lost
                 after sending, an unreadable 2xx): it may or may not have happened. Resolve it
                 by asking the status of the same reference, or by retrying with the SAME
                 reference (idempotent); never by authorizing under a new one.
                                                                            AcquirerOutcomeUnknown

`AcquirerActivities` turns these into Temporal outcomes: results, a retryable
`AcquirerOutcomeUnknown` / `AcquirerUnavailable` error the workflow can catch by type, or a
non-retryable `FailureType`.

Over 400 lines: one external system: the connector's HTTP client, the mapping of
docs/acquirer.md's wire format onto domain/acquirer.py's types and its activities change
together.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Literal, Protocol, TypeVar

import aiohttp
from pydantic import BaseModel, SecretStr, TypeAdapter, ValidationError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.http import (
    HttpAnswer,
    OwnsAiohttpSession,
    UnusableUrl,
    phase_timeout,
    transport_error_name,
)
from domain.acquirer import (
    AcquirerAuthorization,
    AcquirerReference,
    AcquirerRefundRequest,
    AuthorizationRequest,
    AuthorizationResult,
    AuthorizationState,
    CaptureRequest,
    CaptureResult,
    DeclineCode,
    RefundResult,
    VoidRequest,
    VoidResult,
)
from domain.errors import FailureType
from settings import Settings

# Retryable failure types the workflow matches on.
# The instruction may have happened: resolve by status of the same reference.
ACQUIRER_OUTCOME_UNKNOWN = "AcquirerOutcomeUnknown"
# The instruction definitely did not happen (or it was a read): retrying as is is safe.
ACQUIRER_UNAVAILABLE = "AcquirerUnavailable"

Operation = Literal["authorize", "capture", "void", "refund", "status"]

_TRANSIENT_STATUSES = frozenset({408, 429})  # "not processed, try later"
_MAX_RETRY_AFTER_SECONDS = 300
_SNIPPET_CHARS = 200
_USER_AGENT = "paysaga-acquirer/1"
_REFERENCE = TypeAdapter(AcquirerReference)


class AcquirerError(Exception):
    def __init__(self, operation: Operation, reference: str, message: str) -> None:
        super().__init__(message)
        self.operation = operation
        self.reference = reference


class AcquirerRejected(AcquirerError):
    """The acquirer refused: nothing happened. `code` is the acquirer's error type."""

    def __init__(
        self, operation: Operation, reference: str, message: str, *, code: str, http_status: int
    ) -> None:
        super().__init__(operation, reference, message)
        self.code = code
        self.http_status = http_status


class AcquirerNotReached(AcquirerError):
    """Definitely not done: nothing was sent, or the acquirer said it did not process it."""

    def __init__(
        self,
        operation: Operation,
        reference: str,
        message: str,
        retry_after: timedelta | None = None,
    ) -> None:
        super().__init__(operation, reference, message)
        self.retry_after = retry_after


class AcquirerOutcomeUnknown(AcquirerError):
    """Sent, no usable answer: it may have happened. Ask the status of the same reference."""


class AcquirerConnector(Protocol):
    """An acquirer, as paysaga uses one. Every method is idempotent by our reference."""

    async def authorize(self, request: AuthorizationRequest) -> AuthorizationResult: ...

    async def capture(self, request: CaptureRequest) -> CaptureResult: ...

    async def void(self, request: VoidRequest) -> VoidResult: ...

    async def refund(self, request: AcquirerRefundRequest) -> RefundResult: ...

    async def status(self, reference: str) -> AcquirerAuthorization | None:
        """The acquirer's record of `reference`; None: it has none (never authorized)."""
        ...

    async def aclose(self) -> None: ...


# --- The wire format's answers (docs/acquirer.md), read strictly


class _WireRefund(BaseModel):
    refund_reference: str
    acquirer_refund_reference: str
    reference: str
    amount: int
    currency: str
    refunded_at: str

    def to_domain(self) -> RefundResult:
        return RefundResult.model_validate(self.model_dump())


class _WireAuthorization(BaseModel):
    reference: str
    acquirer_reference: str
    status: AuthorizationState
    currency: str
    requested_amount: int
    authorized_amount: int
    captured_amount: int
    refunded_amount: int
    decline_code: str | None = None
    acquirer_capture_reference: str | None = None
    created_at: str
    captured_at: str | None = None
    voided_at: str | None = None
    refunds: list[_WireRefund]

    def to_domain(self) -> AcquirerAuthorization:
        return AcquirerAuthorization.model_validate(
            {
                **self.model_dump(exclude={"status", "decline_code", "refunds"}),
                "state": self.status,
                "decline_code": (
                    DeclineCode.from_acquirer(self.decline_code) if self.decline_code else None
                ),
                "acquirer_decline_code": self.decline_code,
                "refunds": tuple(r.to_domain() for r in self.refunds),
            }
        )


class _WireError(BaseModel):
    type: str
    message: str = ""


class _WireErrorBody(BaseModel):
    error: _WireError


def _retry_after(response: HttpAnswer) -> timedelta | None:
    value = response.headers.get("Retry-After", "").strip()
    if not value.isdigit():
        return None
    return timedelta(seconds=min(int(value), _MAX_RETRY_AFTER_SECONDS))


def _json_body(payload: dict[str, Any]) -> bytes:
    """A request's JSON exactly as httpx encoded it (compact, UTF-8, no NaN)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class HttpAcquirer(OwnsAiohttpSession):
    """The wire format over HTTP (aiohttp: on the payment's hot path it costs a fraction of
    httpx's CPU, activities/http.py). One instance per worker; it owns its connection pool
    unless a session is passed in."""

    def __init__(
        self,
        base_url: str,
        api_key: SecretStr,
        *,
        timeout_seconds: float = 10.0,
        connect_timeout_seconds: float = 3.0,
        http: aiohttp.ClientSession | None = None,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout_seconds = timeout_seconds
        self._timeout = phase_timeout(
            timeout_seconds, connect=min(connect_timeout_seconds, timeout_seconds)
        )
        self._session = http
        self._owns_session = http is None

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpAcquirer:
        if not settings.acquirer_url:
            raise ValueError("PAYSAGA_ACQUIRER_URL is not set")
        return cls(
            settings.acquirer_url,
            settings.acquirer_api_key,
            timeout_seconds=settings.acquirer_timeout_seconds,
            connect_timeout_seconds=settings.acquirer_connect_timeout_seconds,
        )

    # the five instructions

    async def authorize(self, request: AuthorizationRequest) -> AuthorizationResult:
        body = await self._send(
            "authorize",
            request.reference,
            "POST",
            "/v1/authorizations",
            {
                "reference": request.reference,
                "amount": request.amount,
                "currency": request.currency,
                "payment_method": request.payment_method,
            },
        )
        record = self._authorization("authorize", request.reference, body)
        if (record.requested_amount, record.currency) != (request.amount, request.currency):
            raise self._unusable("authorize", request.reference, "another amount or currency")
        return record.authorization_result()

    async def capture(self, request: CaptureRequest) -> CaptureResult:
        payload: dict[str, Any] = {"currency": request.currency}
        if request.amount is not None:
            payload["amount"] = request.amount
        body = await self._send(
            "capture", request.reference, "POST", self._path(request.reference, "capture"), payload
        )
        result = self._authorization("capture", request.reference, body).capture_result()
        if result is None or (
            request.amount is not None and result.captured_amount != request.amount
        ):
            raise self._unusable("capture", request.reference, "no capture of that amount")
        return result

    async def void(self, request: VoidRequest) -> VoidResult:
        body = await self._send(
            "void", request.reference, "POST", self._path(request.reference, "void"), {}
        )
        result = self._authorization("void", request.reference, body).void_result()
        if result is None:
            raise self._unusable("void", request.reference, "the authorization is not voided")
        return result

    async def refund(self, request: AcquirerRefundRequest) -> RefundResult:
        body = await self._send(
            "refund",
            request.reference,
            "POST",
            self._path(request.reference, "refunds"),
            {
                "refund_reference": request.refund_reference,
                "amount": request.amount,
                "currency": request.currency,
            },
        )
        try:
            result = _WireRefund.model_validate(body).to_domain()
        except ValidationError:
            raise self._unusable("refund", request.reference, "not a refund") from None
        asked = (request.reference, request.refund_reference, request.amount, request.currency)
        if (result.reference, result.refund_reference, result.amount, result.currency) != asked:
            raise self._unusable("refund", request.reference, "another refund")
        return result

    async def status(self, reference: str) -> AcquirerAuthorization | None:
        body = await self._send("status", reference, "GET", self._path(reference), None)
        if body is None:
            return None
        return self._authorization("status", reference, body)

    # the wire

    def _path(self, reference: str, action: str | None = None) -> str:
        # References are validated to [A-Za-z0-9_-]: safe as a path segment as they are.
        return f"/v1/authorizations/{reference}" + (f"/{action}" if action else "")

    async def _send(
        self,
        operation: Operation,
        reference: str,
        method: str,
        path: str,
        payload: dict[str, Any] | None,
    ) -> Any:
        """The parsed JSON of a 2xx answer; None for a status of an unknown reference."""
        key = self._api_key.get_secret_value()
        if not key:
            raise AcquirerRejected(
                operation,
                reference,
                "PAYSAGA_ACQUIRER_API_KEY is empty; refusing to call the acquirer without it",
                code="not_configured",
                http_status=0,
            )
        headers = {"Authorization": f"Bearer {key}", "User-Agent": _USER_AGENT}
        body = None
        if payload is not None:
            body = _json_body(payload)
            headers["Content-Type"] = "application/json"
        where = f"{operation} {reference}: {method} {path}"
        try:
            response = await self._exchange(
                method, self._base_url + path, body=body, headers=headers, timeout=self._timeout
            )
        # Before the generic TimeoutError: a connect timeout is one too.
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            # Nothing left this process: the acquirer cannot have acted on it.
            raise AcquirerNotReached(
                operation, reference, f"{where} not sent: {transport_error_name(exc)}: {exc}"
            ) from None
        except TimeoutError as exc:
            raise AcquirerOutcomeUnknown(
                operation,
                reference,
                f"{where} sent, no answer within {self._timeout_seconds:g}s"
                f" ({transport_error_name(exc)})",
            ) from None
        except (UnusableUrl, aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            raise AcquirerRejected(
                operation,
                reference,
                f"{where}: PAYSAGA_ACQUIRER_URL is unusable: {exc}",
                code="not_configured",
                http_status=0,
            ) from None
        except aiohttp.ClientError as exc:
            raise AcquirerOutcomeUnknown(
                operation,
                reference,
                f"{where} sent, connection lost: {transport_error_name(exc)}: {exc}",
            ) from None
        return self._answer(operation, reference, where, response)

    def _answer(
        self, operation: Operation, reference: str, where: str, response: HttpAnswer
    ) -> Any:
        status = response.status_code
        if 200 <= status < 300:
            try:
                return json.loads(response.content)
            except ValueError:
                raise self._unusable(operation, reference, "not JSON") from None
        if status >= 500:
            raise AcquirerOutcomeUnknown(
                operation, reference, f"{where} answered {status}: {self._snippet(response)}"
            )
        if status in _TRANSIENT_STATUSES:
            raise AcquirerNotReached(
                operation,
                reference,
                f"{where} answered {status} (not processed): {self._snippet(response)}",
                retry_after=_retry_after(response),
            )
        code = self._error_code(response)
        if operation == "status" and status == 404 and code == "authorization_not_found":
            return None
        hint = " (check PAYSAGA_ACQUIRER_API_KEY)" if status in (401, 403) else ""
        raise AcquirerRejected(
            operation,
            reference,
            f"{where} rejected with {status} {code}{hint}: {self._snippet(response)}",
            code=code,
            http_status=status,
        )

    def _authorization(
        self, operation: Operation, reference: str, body: Any
    ) -> AcquirerAuthorization:
        try:
            record = _WireAuthorization.model_validate(body).to_domain()
        except ValidationError:
            # `from None`: the validation text would quote the acquirer's body.
            raise self._unusable(operation, reference, "not a consistent authorization") from None
        if record.reference != reference:
            raise self._unusable(operation, reference, f"the record of {record.reference}")
        return record

    def _unusable(self, operation: Operation, reference: str, what: str) -> AcquirerOutcomeUnknown:
        """A 2xx we cannot believe: the acquirer acted (or not); only its status tells."""
        return AcquirerOutcomeUnknown(
            operation, reference, f"{operation} {reference}: unusable answer ({what})"
        )

    @staticmethod
    def _error_code(response: HttpAnswer) -> str:
        try:
            return _WireErrorBody.model_validate_json(response.content).error.type
        except ValidationError:
            return f"http_{response.status_code}"

    def _snippet(self, response: HttpAnswer) -> str:
        try:
            text = _WireErrorBody.model_validate_json(response.content).error.message
        except ValidationError:
            text = response.text
        text = " ".join(text[:_SNIPPET_CHARS].split())
        key = self._api_key.get_secret_value()
        # An acquirer echoing our header back must not leak it into workflow history.
        return (text.replace(key, "[redacted]") if key else text) or "(empty body)"


# --- The activities

_Request = TypeVar("_Request", bound=BaseModel)
_Result = TypeVar("_Result")


def _revalidated(request: _Request) -> _Request:
    """Defense in depth: anything can schedule an activity; a malformed instruction is a bug
    to stop before it reaches the acquirer, not something to retry."""
    try:
        return type(request).model_validate(request.model_dump())
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False, include_context=False)
        )
        raise ApplicationError(
            f"invalid acquirer instruction {type(request).__name__}: {problems}",
            type=FailureType.INVALID_ACQUIRER_REQUEST.value,
            non_retryable=True,
        ) from None


class AcquirerActivities:
    """The acquirer activities. Register all five on the worker:
    `authorize_payment`, `capture_payment`, `void_authorization`, `refund_payment`,
    `acquirer_status`.

    Declines are results. Failures the workflow must handle carry a type:
    `AcquirerOutcomeUnknown` (retryable; may have happened: resolve by `acquirer_status`),
    `AcquirerUnavailable` (retryable; did not happen), and non-retryable `AcquirerRejected`,
    `RefundExceedsCaptured`, `InvalidAcquirerRequest`. Each rejection's first detail is the
    acquirer's error code (e.g. `authorization_voided`)."""

    def __init__(self, settings: Settings, connector: AcquirerConnector | None = None) -> None:
        self._settings = settings
        self._connector = connector
        self._owns_connector = connector is None

    async def aclose(self) -> None:
        """Closes the connector this object built; one passed in belongs to the caller."""
        if self._owns_connector and self._connector is not None:
            await self._connector.aclose()
            self._connector = None

    def _acquirer(self, operation: Operation, reference: str) -> AcquirerConnector:
        if self._connector is None:
            try:
                self._connector = HttpAcquirer.from_settings(self._settings)
            except ValueError as exc:
                raise AcquirerRejected(
                    operation, reference, str(exc), code="not_configured", http_status=0
                ) from None
        return self._connector

    @activity.defn(name="authorize_payment")
    async def authorize_payment(self, request: AuthorizationRequest) -> AuthorizationResult:
        request = _revalidated(request)
        result = await self._call(
            "authorize", request.reference, lambda acquirer: acquirer.authorize(request)
        )
        activity.logger.info(
            "authorization %s %s: %d of %d %s (acquirer %s%s)",
            result.reference,
            result.outcome,
            result.authorized_amount,
            result.requested_amount,
            result.currency,
            result.acquirer_reference,
            f", {result.acquirer_decline_code}" if result.acquirer_decline_code else "",
        )
        return result

    @activity.defn(name="capture_payment")
    async def capture_payment(self, request: CaptureRequest) -> CaptureResult:
        request = _revalidated(request)
        result = await self._call(
            "capture", request.reference, lambda acquirer: acquirer.capture(request)
        )
        activity.logger.info(
            "captured %d %s of %s, released %d",
            result.captured_amount,
            result.currency,
            result.reference,
            result.released_amount,
        )
        return result

    @activity.defn(name="void_authorization")
    async def void_authorization(self, request: VoidRequest) -> VoidResult:
        request = _revalidated(request)
        result = await self._call(
            "void", request.reference, lambda acquirer: acquirer.void(request)
        )
        activity.logger.info(
            "voided %s, released %d %s", result.reference, result.released_amount, result.currency
        )
        return result

    @activity.defn(name="refund_payment")
    async def refund_payment(self, request: AcquirerRefundRequest) -> RefundResult:
        request = _revalidated(request)
        result = await self._call(
            "refund", request.reference, lambda acquirer: acquirer.refund(request)
        )
        activity.logger.info(
            "refunded %d %s of %s as %s",
            result.amount,
            result.currency,
            result.reference,
            result.refund_reference,
        )
        return result

    @activity.defn(name="acquirer_status")
    async def acquirer_status(self, reference: str) -> AcquirerAuthorization | None:
        try:
            reference = _REFERENCE.validate_python(reference)
        except ValidationError:
            raise ApplicationError(
                "invalid acquirer reference for a status request",
                type=FailureType.INVALID_ACQUIRER_REQUEST.value,
                non_retryable=True,
            ) from None
        return await self._call("status", reference, lambda acquirer: acquirer.status(reference))

    async def _call(
        self,
        operation: Operation,
        reference: str,
        instruction: Callable[[AcquirerConnector], Awaitable[_Result]],
    ) -> _Result:
        attempt = activity.info().attempt
        try:
            return await instruction(self._acquirer(operation, reference))
        except AcquirerOutcomeUnknown as exc:
            # A status read changes nothing: for it, "unknown" is merely "unavailable".
            kind = ACQUIRER_UNAVAILABLE if operation == "status" else ACQUIRER_OUTCOME_UNKNOWN
            message = f"{exc} (attempt {attempt})"
            activity.logger.warning(message)
            raise ApplicationError(message, operation, reference, type=kind) from None
        except AcquirerNotReached as exc:
            message = f"{exc} (attempt {attempt}); will retry"
            activity.logger.warning(message)
            raise ApplicationError(
                message,
                operation,
                reference,
                type=ACQUIRER_UNAVAILABLE,
                next_retry_delay=exc.retry_after,
            ) from None
        except AcquirerRejected as exc:
            failure = (
                FailureType.REFUND_EXCEEDS_CAPTURED
                if exc.code == "refund_exceeds_captured"
                else FailureType.ACQUIRER_REJECTED
            )
            activity.logger.warning("%s; not retrying", exc)
            raise ApplicationError(
                str(exc), exc.code, type=failure.value, non_retryable=True
            ) from None
