"""`/v1/reconciliation/exceptions`: the settlement exception queue (docs/reconciliation.md) for
finance operators — the platform's, not a merchant's: a key needs `reconciliation:read` to list
and `reconciliation:write` to resolve (neither is a merchant scope)."""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from pydantic import BaseModel, BeforeValidator, Field

from api.auth import ApiClient, require_scope
from api.errors import ApiError, error_responses
from api.ids import issued, no_card_number
from domain.bounds import TEXT_MAX
from domain.payment import StrictRequest
from infra.metrics import set_reconciliation_gauges
from ledger.reconciliation import (
    ExceptionKind,
    Reconciliation,
    ReconciliationException,
    ReconciliationRefused,
    Resolution,
    age_bucket,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/reconciliation", tags=["reconciliation"])

EXCEPTION_ID_PATTERN = r"^rex_[0-9a-f]{24}$"
_CONTROL = r"\x00-\x08\x0b-\x1f\x7f"
# Free text with at least one visible character: a resolution says why.
REASON_PATTERN = f"^[^{_CONTROL}]*[^{_CONTROL}\\s][^{_CONTROL}]*$"
EXCEPTION_ID = re.compile(EXCEPTION_ID_PATTERN)
ExceptionIdPath = Annotated[
    str,
    Path(description="An exception's id (`rex_…`). Any other text is simply not found (404)."),
    BeforeValidator(no_card_number),
]
Reason = Annotated[str, Field(min_length=1, max_length=TEXT_MAX, pattern=REASON_PATTERN)]


class ReconciliationExceptionObject(BaseModel):
    object: Literal["reconciliation_exception"] = "reconciliation_exception"
    id: str
    kind: ExceptionKind
    status: Literal["open", "resolved"]
    payment_id: str | None = Field(description="Ours, when the exception is about a movement.")
    amount: int = Field(
        description="What is at stake in minor units: the expected amount (missing, currency "
        "mismatch), the ledger minus the settled amount (amount mismatch), the settled amount "
        "(unexpected)."
    )
    currency: str
    detail: str
    opened_at: datetime = Field(
        description="Since when: the movement's time (missing) or the settled line's."
    )
    age_seconds: int
    age_bucket: Literal["0-1d", "1-3d", "3-7d", "7d+"]
    resolution: Literal["manual_match", "write_off", "settled_late"] | None = None
    reason: str | None = None
    resolved_at: datetime | None = None
    ledger_transaction_id: str | None = None

    @classmethod
    def of(cls, exc: ReconciliationException, now: datetime) -> ReconciliationExceptionObject:
        age = exc.age(now)
        return cls(
            id=exc.id,
            kind=exc.kind,
            status="open" if exc.status == "open" else "resolved",
            payment_id=exc.payment_id,
            amount=exc.amount,
            currency=exc.currency,
            detail=exc.detail,
            opened_at=exc.opened_at,
            age_seconds=int(age.total_seconds()),
            age_bucket=age_bucket(age),  # type: ignore[arg-type]
            resolution=exc.resolution,  # type: ignore[arg-type]
            reason=exc.reason,
            resolved_at=exc.resolved_at,
            ledger_transaction_id=exc.ledger_transaction_id,
        )


class ReconciliationExceptionList(BaseModel):
    object: Literal["list"] = "list"
    url: Literal["/v1/reconciliation/exceptions"] = "/v1/reconciliation/exceptions"
    data: list[ReconciliationExceptionObject]
    has_more: bool = Field(description="More exceptions follow (oldest first).")


class WriteOff(StrictRequest):
    action: Literal["write_off"]
    reason: Reason


class ManualMatch(StrictRequest):
    action: Literal["manual_match"]
    reason: Reason
    counterpart: str = Field(
        pattern=EXCEPTION_ID_PATTERN,
        description="The other exception: the missing movement an unexpected line settles (or "
        "the reverse), of the same amount and currency.",
    )


ResolveRequest = Annotated[WriteOff | ManualMatch, Field(discriminator="action")]


def _reconciliation(request: Request) -> Reconciliation:
    found: Reconciliation = request.app.state.reconciliation
    return found


def _no_such_exception(param: str = "id") -> ApiError:
    return ApiError(404, "invalid_request_error", "resource_missing", "No such exception.", param)


def _refused(exc: ReconciliationRefused, param: str | None = None) -> ApiError:
    if exc.not_found:
        return ApiError(404, "invalid_request_error", "resource_missing", str(exc), param)
    return ApiError(409, "invalid_request_error", exc.code, str(exc), param)


@router.get(
    "/exceptions",
    response_model=ReconciliationExceptionList,
    responses=error_responses(400, 401, 403, 404, 422),
    summary="List reconciliation exceptions, oldest first",
    description="The queue finance works, oldest first; cursor pagination by `starting_after` "
    "(an exception id: 404 if there is none). `status` defaults to `open`.",
)
async def list_exceptions(
    request: Request,
    status: Literal["open", "resolved", "all"] = "open",
    kind: ExceptionKind | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    starting_after: Annotated[str | None, Query(pattern=EXCEPTION_ID_PATTERN)] = None,
    client: ApiClient = Depends(require_scope("reconciliation:read")),
) -> ReconciliationExceptionList:
    try:
        found, more = await _reconciliation(request).exceptions(
            status=None if status == "all" else status,
            kind=kind,
            limit=limit,
            starting_after=starting_after,
        )
    except ReconciliationRefused as exc:
        raise _refused(exc, "starting_after") from None
    now = datetime.now(UTC)
    return ReconciliationExceptionList(
        data=[ReconciliationExceptionObject.of(e, now) for e in found], has_more=more
    )


@router.get(
    "/exceptions/{exception_id}",
    response_model=ReconciliationExceptionObject,
    responses=error_responses(401, 403, 404, 422),
    summary="Retrieve a reconciliation exception",
)
async def get_exception(
    exception_id: ExceptionIdPath,
    request: Request,
    client: ApiClient = Depends(require_scope("reconciliation:read")),
) -> ReconciliationExceptionObject:
    if not issued(EXCEPTION_ID, exception_id):
        raise _no_such_exception()
    found = await _reconciliation(request).exception(exception_id)
    if found is None:
        raise _no_such_exception()
    return ReconciliationExceptionObject.of(found, datetime.now(UTC))


@router.post(
    "/exceptions/{exception_id}/resolve",
    response_model=ReconciliationExceptionObject,
    responses=error_responses(400, 401, 403, 404, 409, 413, 422),
    summary="Resolve a reconciliation exception with a reason",
    description="`write_off` posts what is left to the reconciliation expense account; "
    "`manual_match` pairs an unexpected line with a missing movement (`counterpart`) of the same "
    "amount and currency. Either is a balanced ledger transaction, recorded with the reason. "
    "An exception already resolved, or a match that does not fit: 409.",
)
async def resolve_exception(
    exception_id: ExceptionIdPath,
    request: Request,
    body: Annotated[ResolveRequest, Body()],
    client: ApiClient = Depends(require_scope("reconciliation:write")),
) -> ReconciliationExceptionObject:
    reconciliation = _reconciliation(request)
    counterpart = body.counterpart if isinstance(body, ManualMatch) else None
    if not issued(EXCEPTION_ID, exception_id):
        raise _no_such_exception()
    try:
        resolved = await reconciliation.resolve(
            exception_id,
            Resolution(body.action),
            f"{body.reason} (by API client {client.client_id})",
            counterpart=counterpart,
        )
    except ReconciliationRefused as exc:
        param = "counterpart" if exc.code == "counterpart_missing" else "id"
        raise _refused(exc, param if exc.not_found else None) from None
    await refresh_gauges(reconciliation)
    return ReconciliationExceptionObject.of(resolved, datetime.now(UTC))


async def refresh_gauges(reconciliation: Reconciliation) -> None:
    set_reconciliation_gauges(await reconciliation.open_summary())


async def keep_gauges_fresh(reconciliation: Reconciliation, every_seconds: float) -> None:
    """The API's background refresh of the exception gauges (ages move with the clock)."""
    while True:
        try:
            await refresh_gauges(reconciliation)
        except Exception as exc:  # the next round tries again; the API keeps serving
            log.warning("could not refresh the reconciliation gauges: %s", exc)
        await asyncio.sleep(every_seconds)
