"""What every route reads the same way: the app's clients and settings (stored on `app.state`
by api/app.py), the Idempotency-Key header and the answers an idempotent start shares."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

from fastapi import Header, Request, Response
from pydantic import BeforeValidator
from sqlalchemy.exc import DBAPIError
from temporalio.client import Client

from api.errors import ApiError
from api.ids import no_card_number
from domain.bounds import IDEMPOTENCY_KEY_MAX, IDEMPOTENCY_KEY_MIN
from domain.payment import IDEMPOTENCY_KEY_PATTERN
from infra.idempotency import IdempotencyRegister
from ledger.store import Ledger
from service.start import IdempotencyKeyReused
from settings import Settings

_Body = TypeVar("_Body")
_Started = TypeVar("_Started")

IdempotencyKey = Annotated[
    str,
    Header(
        alias="Idempotency-Key",
        min_length=IDEMPOTENCY_KEY_MIN,
        max_length=IDEMPOTENCY_KEY_MAX,
        pattern=IDEMPOTENCY_KEY_PATTERN,
        description="Unique per payment attempt; retries with the same key never pay twice. "
        "8–255 characters of `A-Z a-z 0-9 _ -`; never a card number.",
    ),
    BeforeValidator(no_card_number),
]


def temporal_client(request: Request) -> Client:
    client: Client = request.app.state.temporal
    return client


def app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def ledger(request: Request) -> Ledger:
    the_ledger: Ledger = request.app.state.ledger
    return the_ledger


def idempotency_register(request: Request) -> IdempotencyRegister:
    register: IdempotencyRegister = request.app.state.idempotency
    return register


def idempotency_key_reused(what: str = "request body") -> ApiError:
    return ApiError(
        409,
        "idempotency_error",
        "idempotency_key_reused",
        f"This Idempotency-Key was already used with a different {what}.",
        "Idempotency-Key",
    )


def answer_started(response: Response, replayed: bool, location: str) -> None:
    """The headers of a 201 from an idempotent start: where the resource is, and whether this
    key had already started it."""
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = location


async def start_once(
    request: Request,
    start: Callable[[Client, IdempotencyRegister, Settings, str, str, _Body], Awaitable[_Started]],
    client_id: str,
    idempotency_key: str,
    body: _Body,
    what: str,
) -> _Started:
    """An idempotent start (`service.start`) from a route, its refusals as API errors: the key
    reused with another body, or the register out of reach (then nothing was started)."""
    try:
        return await start(
            temporal_client(request),
            idempotency_register(request),
            app_settings(request),
            client_id,
            idempotency_key,
            body,
        )
    except IdempotencyKeyReused:
        raise idempotency_key_reused() from None
    except DBAPIError:
        # The key could not be checked against the register: nothing was started.
        raise ApiError(
            503,
            "api_error",
            "database_unavailable",
            f"The {what} could not be recorded; retry with the same Idempotency-Key.",
        ) from None
