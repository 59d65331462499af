"""Stripe-style error responses: `{"error": {"type", "code", "message", "param"}}`.

Every failure the API reports goes through here, so two rules hold everywhere: a message is
built from the error's kind and the schema's constraints only (never from what the client
sent: that may be a card number or a secret), and a 5xx never describes our internals.

Over 400 lines: every error answer of the API, so its two rules (no client text in a message,
no internals in a 5xx) are enforced in one place: the error model, the schema-built messages of
validation errors, and one handler per kind of failure.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SqlAlchemyTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.service import RPCError, RPCStatusCode

from domain.cards import contains_card_number
from domain.money import CURRENCIES
from infra.database import TooMuchContention

logger = logging.getLogger(__name__)

ErrorType = Literal[
    "invalid_request_error",
    "authentication_error",
    "permission_error",
    "idempotency_error",
    "api_error",
]


class ErrorDetail(BaseModel):
    type: ErrorType
    code: str = Field(description="Machine-readable reason, e.g. `parameter_missing`.")
    message: str = Field(description="For humans; never contains the submitted values.")
    param: str | None = Field(
        default=None, description="The offending parameter, e.g. `amount` or `metadata[k]`."
    )


class ErrorResponse(BaseModel):
    error: ErrorDetail


@dataclass(eq=False, repr=False)
class ApiError(Exception):
    """Raised by routes and dependencies; rendered as the Stripe-style body (`error_response`
    of these same fields)."""

    status: int
    type: ErrorType
    code: str
    message: str
    param: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(f"{self.status} {self.type}/{self.code}")
        self.headers = dict(self.headers)


def error_response(
    status: int,
    type: ErrorType,
    code: str,
    message: str,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(type=type, code=code, message=message, param=param))
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)


_RESPONSE_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed request: invalid JSON, not a JSON object, a cursor this API never issued, "
    "parameters that exclude each other.",
    401: "Missing or invalid API key.",
    403: "The API key lacks the scope this operation needs.",
    404: "No such resource: whatever the id looks like, one never issued, gone, or another "
    "client's (`resource_missing`).",
    409: "Conflict with the resource's state: an idempotency key reused with another body, a "
    "refund or dispute over what remains, a payment closed, not captured or not cancelable.",
    413: "Request body too large.",
    422: "A parameter is missing or invalid.",
    500: "Unexpected error on our side.",
    503: "A backing service is unavailable; retry with the same idempotency key.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` argument for a route, so OpenAPI documents its error bodies."""
    return {
        code: {
            "model": ErrorResponse,
            "description": _RESPONSE_DESCRIPTIONS.get(code, HTTPStatus(code).phrase),
        }
        for code in codes
    }


# --- Request validation -----------------------------------------------------------------

# Error kinds raised by domain/payment.py validators: their name is the public code.
DOMAIN_CODES = frozenset(
    {
        "card_data_not_allowed",
        "currency_unsupported",
        "amount_too_small",
        "amount_too_large",
        "control_characters",
        "metadata_too_large",
        "amount_invalid",
    }
)

_PYDANTIC_CODES: dict[str, str] = {
    "missing": "parameter_missing",
    "extra_forbidden": "parameter_unknown",
    "int_type": "parameter_invalid_integer",
    "int_parsing": "parameter_invalid_integer",
    "int_from_float": "parameter_invalid_integer",
    "int_parsing_size": "parameter_invalid_integer",
    "string_type": "parameter_invalid_string",
    "string_sub_type": "parameter_invalid_string",
    "string_unicode": "parameter_invalid_string",
    "string_too_long": "parameter_too_long",
    "string_too_short": "parameter_too_short",
    "string_pattern_mismatch": "parameter_invalid_format",
    "greater_than": "parameter_out_of_range",
    "greater_than_equal": "parameter_out_of_range",
    "less_than": "parameter_out_of_range",
    "less_than_equal": "parameter_out_of_range",
    "finite_number": "parameter_out_of_range",
    "literal_error": "parameter_invalid_value",
    "enum": "parameter_invalid_value",
}

# Pydantic's errors when the body as a whole is not an object of the expected shape.
_BODY_SHAPE_ERRORS = frozenset({"model_type", "model_attributes_type", "dict_type", "missing"})

_EXPECTED_TYPE: dict[str, str] = {
    "float": "a number",
    "bool": "a boolean",
    "dict": "an object",
    "model": "an object",
    "model_attributes": "an object",
    "list": "an array",
    "tuple": "an array",
    "set": "an array",
}

_SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_DOMAIN_PATH = re.compile(r"(?P<head>[^\[\]]*)(?P<tail>(?:\[[^\[\]]*\])*)")
_JSON_REASON = re.compile(r"[A-Za-z ',:\\]{1,80}")
_RANGE_WORDS = {
    "gt": "greater than",
    "ge": "greater than or equal to",
    "lt": "less than",
    "le": "less than or equal to",
}


def _safe_segment(segment: str | int) -> str:
    """A path segment may be a client-chosen key: keep it only if it is plainly a name."""
    text = str(segment)
    if _SAFE_SEGMENT.fullmatch(text) and not contains_card_number(text):
        return text
    return "*"


def _render_param(segments: Sequence[str | int]) -> str | None:
    """`("metadata", "k")` -> `metadata[k]`; `(0, "a")` -> `[0][a]`."""
    if not segments:
        return None
    head, *rest = segments
    text = "" if isinstance(head, int) else _safe_segment(head)
    brackets = rest if not isinstance(head, int) else segments
    return text + "".join(f"[{_safe_segment(s)}]" for s in brackets)


def _param_from_domain_path(path: str) -> str | None:
    """Domain validators report paths as text (`metadata[k]`); re-check each segment."""
    match = _DOMAIN_PATH.fullmatch(path)
    if match is None:  # a key contained brackets: keep only the top-level field
        return _render_param([path.split("[", 1)[0], "*"]) if path else None
    text = _safe_segment(match["head"]) if match["head"] else ""
    keys = re.findall(r"\[([^\[\]]*)\]", match["tail"])
    return (text + "".join(f"[{_safe_segment(k)}]" for k in keys)) or None


def _header_name(name: str) -> str:
    return "-".join(part[:1].upper() + part[1:] for part in str(name).split("-"))


def _param_for(error: Mapping[str, Any]) -> str | None:
    ctx = error.get("ctx") or {}
    if isinstance(ctx.get("param"), str):
        return _param_from_domain_path(ctx["param"])
    loc = tuple(error.get("loc") or ())
    if not loc:
        return None
    source, path = loc[0], [s for s in loc[1:] if s != "[key]"]
    if source == "header" and path:
        return _header_name(str(path[0]))
    if source in ("query", "path", "cookie") and path:
        return _safe_segment(path[0])
    return _render_param(path)


def _code_for(error_type: str) -> str:
    if error_type in DOMAIN_CODES:
        return error_type
    if error_type in _PYDANTIC_CODES:
        return _PYDANTIC_CODES[error_type]
    if error_type.endswith(("_type", "_parsing")):
        return "parameter_invalid_type"
    return "parameter_invalid"


def _number(value: object) -> str | None:
    """Constraint values come from the schema; accept them only if they are plain numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return str(value)


def _range_message(name: str, ctx: Mapping[str, Any]) -> str:
    for key, words in _RANGE_WORDS.items():
        bound = _number(ctx.get(key))
        if bound is not None:
            return f"{name} must be {words} {bound}."
    return f"{name} is out of range."


def _amount_too_large_message(ctx: Mapping[str, Any]) -> str:
    limit, currency = _number(ctx.get("limit")), ctx.get("currency")
    if limit is not None and isinstance(currency, str) and currency in CURRENCIES:
        return f"Amount exceeds the per-payment limit of {limit} minor units for {currency}."
    return "Amount exceeds the largest amount accepted."


def _message_for(code: str, error_type: str, param: str | None, ctx: Mapping[str, Any]) -> str:
    """Messages come from our own templates: pydantic's rendered `msg` can contain the input
    (e.g. `currency_unsupported` puts the submitted code in its context)."""
    name = param or "The request body"
    simple = {
        "parameter_missing": f"Missing required parameter: {name}.",
        "parameter_unknown": f"Received unknown parameter: {name}.",
        "parameter_invalid_integer": f"Invalid integer: {name} must be a JSON integer.",
        "parameter_invalid_string": f"Invalid string: {name} must be a JSON string.",
        "parameter_invalid": f"Invalid value for {name}.",
        "card_data_not_allowed": (
            "Card numbers are not accepted; send a payment-method token (pm_…) instead."
        ),
        "currency_unsupported": (
            "Currency is not supported; use an upper-case ISO 4217 code such as USD."
        ),
        "amount_too_small": "Amount must be a positive integer.",
        "amount_invalid": "Amount must be a positive integer.",
        "control_characters": "Control characters are not allowed.",
    }
    if code in simple:
        return simple[code]
    if code == "amount_too_large":
        return _amount_too_large_message(ctx)
    if code == "metadata_too_large":
        return f"metadata holds at most {_number(ctx.get('n')) or 'a limited number of'} keys."
    if code in ("parameter_too_long", "parameter_too_short"):
        key, word = (
            ("max_length", "most") if code == "parameter_too_long" else ("min_length", "least")
        )
        bound = _number(ctx.get(key))
        return f"{name} must have at {word} {bound} characters." if bound else f"Invalid {name}."
    if code == "parameter_invalid_format":
        pattern = ctx.get("pattern")
        suffix = f" {pattern}" if isinstance(pattern, str) else ""
        return f"{name} does not match the required format{suffix}."
    if code == "parameter_out_of_range":
        return _range_message(name, ctx)
    if code == "parameter_invalid_value":
        expected = ctx.get("expected")
        return f"{name} must be {expected}." if isinstance(expected, str) else f"Invalid {name}."
    expected_type = _EXPECTED_TYPE.get(error_type.removesuffix("_type").removesuffix("_parsing"))
    return f"Invalid type for {name}: expected {expected_type or 'another type'}."


def _json_error_response(error: Mapping[str, Any]) -> JSONResponse:
    reason = (error.get("ctx") or {}).get("error")
    loc = tuple(error.get("loc") or ())
    where = f" at position {loc[1]}" if len(loc) > 1 and isinstance(loc[1], int) else ""
    detail = (
        f" ({reason}{where})" if isinstance(reason, str) and _JSON_REASON.fullmatch(reason) else ""
    )
    return error_response(
        400, "invalid_request_error", "invalid_json", f"The request body is not valid JSON{detail}."
    )


def _body_shape_response() -> JSONResponse:
    return error_response(
        400,
        "invalid_request_error",
        "invalid_request_body",
        "The request body must be a JSON object sent with Content-Type: application/json.",
    )


def validation_error_response(errors: Sequence[Mapping[str, Any]]) -> JSONResponse:
    """Report the first error only, like Stripe: one actionable `code` + `param`."""
    if not errors:
        return error_response(422, "invalid_request_error", "parameter_invalid", "Invalid request.")
    error = errors[0]
    error_type = str(error.get("type", ""))
    ctx: Mapping[str, Any] = error.get("ctx") or {}
    if error_type == "json_invalid":
        return _json_error_response(error)
    if tuple(error.get("loc") or ()) == ("body",) and error_type in _BODY_SHAPE_ERRORS:
        return _body_shape_response()
    code = _code_for(error_type)
    param = _param_for(error)
    message = _message_for(code, error_type, param, ctx)
    logger.debug("request rejected: code=%s param=%s", code, param)
    return error_response(422, "invalid_request_error", code, message, param)


# --- Handlers ---------------------------------------------------------------------------


async def _api_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    if exc.status >= 500:
        logger.warning("api error %s %s/%s", exc.status, exc.type, exc.code)
    return error_response(exc.status, exc.type, exc.code, exc.message, exc.param, exc.headers)


async def _validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return validation_error_response(exc.errors())


def _http_error_code(exc: StarletteHTTPException) -> tuple[ErrorType, str, str]:
    status = exc.status_code
    if status == 404:
        return "invalid_request_error", "resource_missing", "Unrecognized request URL."
    if status == 405:
        return "invalid_request_error", "method_not_allowed", "Method not allowed for this URL."
    if status == 413:
        return "invalid_request_error", "request_too_large", "The request body is too large."
    if status == 400 and isinstance(exc.__cause__, ValueError | RecursionError):
        # FastAPI turns any failure to decode the body (bad UTF-8, nesting too deep for
        # json.loads) into a bare 400; to the client it is simply JSON we cannot read.
        return "invalid_request_error", "invalid_json", "The request body is not valid JSON."
    if status == 401:
        return "authentication_error", "api_key_invalid", "Invalid API key."
    if status == 403:
        return "permission_error", "insufficient_scope", "Not allowed."
    if status >= 500:
        return "api_error", "api_error", "An unexpected error occurred; please retry."
    return "invalid_request_error", "invalid_request", HTTPStatus(status).phrase + "."


async def _http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    type_, code, message = _http_error_code(exc)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
    return error_response(exc.status_code, type_, code, message, None, headers)


_TEMPLATE_PARAMETER = re.compile(r"\{[^/{}]+\}")


def allowed_methods(request: Request) -> str:
    """The methods the OpenAPI document lists for the request's path. Starlette's own `Allow`
    names only the first route that matched the path, and `/v1/payments` is two routes (GET and
    POST); the document is what clients read, so it says what the path takes."""
    document: dict[str, Any] = request.app.openapi()  # built once, then cached by FastAPI
    path = request.url.path
    for template, operations in document.get("paths", {}).items():
        literal = [re.escape(part) for part in _TEMPLATE_PARAMETER.split(template)]
        if re.fullmatch("[^/]+".join(literal), path):
            return ", ".join(sorted(method.upper() for method in operations))
    return ""


async def _too_deep_handler(request: Request, _: Exception) -> JSONResponse:
    # Reached when a body nested deeply enough to parse still exhausts the stack while a
    # validator walks it (the card-number scan is recursive). It is the client's input.
    logger.info("request body nested too deeply on %s %s", request.method, request.url.path)
    return error_response(
        400,
        "invalid_request_error",
        "invalid_request_body",
        "The request body is nested too deeply.",
    )


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # Log the failure for operators (never the body: it may carry customer data); tell the
    # client only that it happened.
    logger.error(
        "unhandled error on %s %s",
        request.method,
        request.url.path,
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return error_response(
        500, "api_error", "api_error", "An unexpected error occurred; please retry."
    )


async def _database_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    """The database did not answer (down, restarting, out of connections): a read or a
    follow-up that needed it is refused for now, never a 500. Nothing was changed."""
    if isinstance(exc, DBAPIError) and not isinstance(exc, OperationalError | InterfaceError):
        return await _unexpected_error_handler(request, exc)  # a data error: our bug
    logger.warning("database unavailable on %s %s: %s", request.method, request.url.path,
                   type(exc).__name__)  # fmt: skip
    return error_response(
        503,
        "api_error",
        "database_unavailable",
        "The database is unavailable; retry (with the same Idempotency-Key, if any).",
        headers={"Retry-After": "1"},
    )


async def _database_busy_handler(request: Request, exc: Exception) -> JSONResponse:
    """A SERIALIZABLE transaction kept conflicting past its retries (infra/database.py): many
    requests at once on the same rows. Nothing was committed; the client retries."""
    logger.warning("database contention on %s %s", request.method, request.url.path)
    return error_response(
        503,
        "api_error",
        "database_busy",
        "Too many requests touched the same records at once; retry (with the same "
        "Idempotency-Key, if any).",
        headers={"Retry-After": "1"},
    )


# Temporal's answers when the payment's workflow could not be asked: no worker picked the
# query or Update up in time, the server is unreachable, the workflow's task is failing or
# timed out so nothing can answer a query (FAILED_PRECONDITION), or queries piled up behind a
# workflow task still under way ("consistent query buffer is full", RESOURCE_EXHAUSTED).
WORKFLOW_UNAVAILABLE = frozenset(
    {
        RPCStatusCode.CANCELLED,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.FAILED_PRECONDITION,
        RPCStatusCode.RESOURCE_EXHAUSTED,
    }
)


async def _workflow_unavailable_handler(request: Request, exc: Exception) -> JSONResponse:
    if not isinstance(exc, RPCError) or exc.status not in WORKFLOW_UNAVAILABLE:
        return await _unexpected_error_handler(request, exc)
    logger.warning("payment workflow unavailable on %s %s: %s", request.method,
                   request.url.path, exc.status.name)  # fmt: skip
    return error_response(
        503,
        "api_error",
        "payment_unavailable",
        "The payment cannot be reached right now (no worker is serving it); retry.",
        headers={"Retry-After": "1"},
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, _http_error_handler)
    app.add_exception_handler(RecursionError, _too_deep_handler)
    app.add_exception_handler(DBAPIError, _database_unavailable_handler)
    app.add_exception_handler(SqlAlchemyTimeout, _database_unavailable_handler)
    app.add_exception_handler(TooMuchContention, _database_busy_handler)
    app.add_exception_handler(RPCError, _workflow_unavailable_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)


__all__ = [
    "DOMAIN_CODES",
    "WORKFLOW_UNAVAILABLE",
    "ApiError",
    "ErrorDetail",
    "ErrorResponse",
    "ErrorType",
    "error_response",
    "error_responses",
    "install_error_handlers",
    "validation_error_response",
]
