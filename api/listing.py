"""Listing workflows of one client through Temporal visibility, a page at a time, behind a
cursor only this client can use (the payments' and the subscriptions' list routes)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Annotated, Any

from fastapi import Query
from pydantic import BeforeValidator
from temporalio.client import Client, WorkflowExecution
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode

from api.errors import ApiError
from api.ids import no_card_number
from domain.payment import IDENTIFIER_PATTERN
from workflows import search_attributes as sa

# A cursor is Temporal's page token plus a check over it and the client it was issued to. Temporal
# cannot tell a mangled token from a fault of its own (it answers "something went wrong" after
# the client's retries, i.e. a slow 500); checked here, any cursor we did not issue is a 400.
_CURSOR_CHECK_BYTES = 8
# URL-safe base64 of the check and a non-empty token.
_CURSOR_PATTERN = r"^[A-Za-z0-9_-]+={0,2}$"
_CURSOR_MIN_LENGTH = 12

Cursor = Annotated[
    str | None,
    Query(
        min_length=_CURSOR_MIN_LENGTH,
        max_length=2048,
        pattern=_CURSOR_PATTERN,
        description="`next_cursor` of the previous page, as it was issued to you.",
    ),
]
Limit = Annotated[int, Query(ge=1, le=100)]
IdentifierFilter = Annotated[
    str | None,
    Query(max_length=64, pattern=IDENTIFIER_PATTERN),
    BeforeValidator(no_card_number),
]


def _cursor_check(client_id: str, token: bytes) -> bytes:
    digest = hashlib.sha256(b"paysaga-cursor\x1f" + client_id.encode() + b"\x1f" + token)
    return digest.digest()[:_CURSOR_CHECK_BYTES]


def _cursor(client_id: str, token: bytes) -> str:
    return base64.urlsafe_b64encode(_cursor_check(client_id, token) + token).decode()


def _page_token(client_id: str, cursor: str) -> bytes | None:
    """The page token inside a cursor we issued to this client, else None."""
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii"))
    except (binascii.Error, ValueError):
        return None
    check, token = raw[:_CURSOR_CHECK_BYTES], raw[_CURSOR_CHECK_BYTES:]
    if not token or not hmac.compare_digest(check, _cursor_check(client_id, token)):
        return None
    return token


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bad_cursor() -> ApiError:
    return ApiError(400, "invalid_request_error", "cursor_invalid", "Bad cursor.", "cursor")


async def list_page(
    temporal: Client,
    client_id: str,
    workflow_type: str,
    filters: dict[str, str | None],
    limit: int,
    cursor: str | None,
) -> tuple[list[WorkflowExecution], str | None]:
    """One page of this client's `workflow_type` executions whose search attributes equal the
    given filters (None: not filtered), and the cursor of the next page (None: the last)."""
    clauses = [f"WorkflowType = {_quote(workflow_type)}", f"ClientId = {_quote(client_id)}"]
    clauses += [f"{name} = {_quote(value)}" for name, value in filters.items() if value is not None]
    token: bytes | None = None
    if cursor:
        token = _page_token(client_id, cursor)
        if token is None:
            raise _bad_cursor()
    iterator = temporal.list_workflows(
        " AND ".join(clauses), page_size=limit, next_page_token=token
    )
    try:
        await iterator.fetch_next_page()
    except RPCError as exc:
        if exc.status == RPCStatusCode.INVALID_ARGUMENT:
            raise _bad_cursor() from None
        raise
    next_token = iterator.next_page_token
    return list(iterator.current_page or []), _cursor(client_id, next_token) if next_token else None


def listed(execution: WorkflowExecution, status: SearchAttributeKey[str]) -> dict[str, Any]:
    """The fields every list item has, from the search attributes its workflow set at the start
    (a payment's and a subscription's alike; `status` is its own status attribute)."""
    attrs = execution.typed_search_attributes
    return {
        "id": execution.id,
        "status": attrs.get(status),
        "amount": attrs.get(sa.AMOUNT_MINOR),
        "currency": attrs.get(sa.CURRENCY),
        "customer_id": attrs.get(sa.CUSTOMER_ID),
        "merchant_id": attrs.get(sa.MERCHANT_ID),
        "created_at": execution.start_time,
    }
