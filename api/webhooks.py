"""`/v1/webhook_endpoints`: where a client's events are delivered, signed (docs/webhooks.md).

The signing secret is shown twice only: when the endpoint is created and when it is rotated.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, Field

from activities.webhook_endpoints import (
    DeliveryRecord,
    EndpointLimitReached,
    WebhookEndpoint,
    WebhookEndpoints,
)
from api.auth import ApiClient, require_scope
from api.errors import ApiError, error_responses
from api.events import EventTypePattern
from api.ids import ENDPOINT_ID, ENDPOINT_LINKS, EndpointId, issued
from api.state import app_settings
from domain.constraints import JsonInteger
from domain.payment import FreeText, StrictRequest
from domain.webhooks import (
    ENDPOINT_ID_PATTERN,
    MAX_ENDPOINTS_PER_CLIENT,
    MAX_URL_LENGTH,
    WEBHOOK_URL_PATTERN,
    AttemptLog,
    EndpointStatus,
    WebhookUrlRefused,
    check_webhook_url,
)

router = APIRouter(prefix="/v1", tags=["webhooks"])

MAX_ENABLED_EVENTS = 20
MAX_ROTATION_OVERLAP_SECONDS = 7 * 86400

WebhookUrl = Annotated[
    str,
    Field(
        min_length=8,
        max_length=MAX_URL_LENGTH,
        pattern=WEBHOOK_URL_PATTERN,
        description="Where events are POSTed: http(s) to an ASCII host name or IPv4 address "
        "(IDNs in punycode), an optional port, a path and query of printable ASCII; no "
        "credentials, no #fragment.",
    ),
]
EnabledEvents = Annotated[
    list[EventTypePattern],
    Field(
        min_length=1,
        max_length=MAX_ENABLED_EVENTS,
        description="Event types, `payment.*` or `*` (every type).",
    ),
]


class WebhookEndpointCreate(StrictRequest):
    url: WebhookUrl
    enabled_events: EnabledEvents = Field(default_factory=lambda: ["*"])
    description: FreeText | None = None
    enabled: bool = True


class WebhookEndpointUpdate(StrictRequest):
    url: WebhookUrl | None = None
    enabled_events: EnabledEvents | None = None
    description: FreeText | None = None
    enabled: bool | None = Field(
        default=None, description="Re-enable an endpoint paysaga disabled, or pause one."
    )


class RotateSecretRequest(StrictRequest):
    expire_previous_after_seconds: (
        Annotated[int, Field(ge=0, le=MAX_ROTATION_OVERLAP_SECONDS), JsonInteger] | None
    ) = Field(
        default=None,
        description="How long the previous secret keeps signing too (both `v1` signatures are "
        "sent); default `PAYSAGA_WEBHOOK_SECRET_OVERLAP_SECONDS` (24 h). 0: retire it now.",
    )


class WebhookEndpointResource(BaseModel):
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    id: str
    url: str
    description: str | None
    enabled_events: list[str]
    status: EndpointStatus
    disabled_reason: str | None
    previous_secret_expires_at: datetime | None = Field(
        description="Until then the previous secret signs too (a rotation's overlap)."
    )
    created_at: datetime
    updated_at: datetime
    secret: str | None = Field(
        default=None, description="Only in the answer to creation and rotation: keep it."
    )

    @classmethod
    def of(cls, endpoint: WebhookEndpoint, *, with_secret: bool = False) -> WebhookEndpointResource:
        return cls(
            id=endpoint.id,
            url=endpoint.url,
            description=endpoint.description,
            enabled_events=endpoint.enabled_events,
            status=endpoint.status,
            disabled_reason=endpoint.disabled_reason,
            previous_secret_expires_at=endpoint.previous_secret_expires_at
            if endpoint.previous_secret
            else None,
            created_at=endpoint.created_at,
            updated_at=endpoint.updated_at,
            secret=endpoint.revealed_secret if with_secret else None,
        )


class WebhookEndpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WebhookEndpointResource]
    has_more: bool


class DeletedWebhookEndpoint(BaseModel):
    object: Literal["webhook_endpoint"] = "webhook_endpoint"
    id: str
    deleted: Literal[True] = True


class DeliveryAttemptResource(AttemptLog):
    """An attempt's log line (domain.webhooks.AttemptLog, the fields the store keeps) and the
    ids a merchant can use."""

    object: Literal["webhook_delivery_attempt"] = "webhook_delivery_attempt"
    id: str
    event_id: str
    event_type: str
    delivery: str = Field(description="The delivery (Temporal workflow) this attempt belongs to.")

    @classmethod
    def of(cls, record: DeliveryRecord) -> DeliveryAttemptResource:
        return cls(
            **record.model_dump(include=set(AttemptLog.model_fields)),
            id=str(record.id),
            event_id=str(record.event_id),
            event_type=record.event_type,
            delivery=record.delivery_id,
        )


class DeliveryAttemptList(BaseModel):
    object: Literal["list"] = "list"
    data: list[DeliveryAttemptResource]
    has_more: bool


def _endpoints(request: Request) -> WebhookEndpoints:
    endpoints: WebhookEndpoints = request.app.state.webhook_endpoints
    return endpoints


def _no_such_endpoint(param: str = "id") -> ApiError:
    return ApiError(
        404, "invalid_request_error", "resource_missing", "No such webhook endpoint.", param
    )


def _checked_url(request: Request, url: str) -> str:
    try:
        return check_webhook_url(
            url, block_private_networks=app_settings(request).webhook_block_private_networks
        )
    except WebhookUrlRefused as why:
        raise ApiError(
            422, "invalid_request_error", "url_invalid", f"Invalid url: {why}.", "url"
        ) from None


async def _owned(request: Request, client: ApiClient, endpoint_id: str) -> WebhookEndpoint:
    endpoint = await _endpoints(request).get(client.client_id, _issued(endpoint_id))
    if endpoint is None:
        raise _no_such_endpoint()
    return endpoint


def _issued(endpoint_id: str, param: str = "id") -> str:
    """The id, if endpoints are ever given one like it; else no such endpoint (404)."""
    if not issued(ENDPOINT_ID, endpoint_id):
        raise _no_such_endpoint(param)
    return endpoint_id


@router.post(
    "/webhook_endpoints",
    status_code=201,
    response_model=WebhookEndpointResource,
    responses={201: {"links": ENDPOINT_LINKS}, **error_responses(400, 401, 403, 409, 413, 422)},
    summary="Create a webhook endpoint (its signing secret is in this answer only)",
)
async def create_endpoint(
    body: WebhookEndpointCreate,
    request: Request,
    client: ApiClient = Depends(require_scope("webhooks:write")),
) -> WebhookEndpointResource:
    url = _checked_url(request, body.url)
    try:
        created = await _endpoints(request).create(
            client.client_id, url, list(dict.fromkeys(body.enabled_events)), body.description,
            body.enabled,
        )  # fmt: skip
    except EndpointLimitReached:
        raise ApiError(
            409,
            "invalid_request_error",
            "webhook_endpoints_limit",
            f"A client has at most {MAX_ENDPOINTS_PER_CLIENT} webhook endpoints; delete one first.",
        ) from None
    return WebhookEndpointResource.of(created, with_secret=True)


@router.get(
    "/webhook_endpoints",
    response_model=WebhookEndpointList,
    responses=error_responses(400, 401, 403, 404, 422),
    summary="List webhook endpoints, newest first",
)
async def list_endpoints(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    starting_after: Annotated[str | None, Query(pattern=ENDPOINT_ID_PATTERN)] = None,
    client: ApiClient = Depends(require_scope("webhooks:read")),
) -> WebhookEndpointList:
    endpoints = _endpoints(request)
    cursor = None
    if starting_after is not None:
        cursor = await endpoints.get(client.client_id, starting_after)
        if cursor is None:
            raise _no_such_endpoint("starting_after")
    found, has_more = await endpoints.page(client.client_id, limit, cursor)
    return WebhookEndpointList(
        data=[WebhookEndpointResource.of(e) for e in found], has_more=has_more
    )


@router.get(
    "/webhook_endpoints/{endpoint_id}",
    response_model=WebhookEndpointResource,
    responses=error_responses(401, 403, 404, 422),
    summary="Retrieve a webhook endpoint",
)
async def get_endpoint(
    endpoint_id: EndpointId,
    request: Request,
    client: ApiClient = Depends(require_scope("webhooks:read")),
) -> WebhookEndpointResource:
    return WebhookEndpointResource.of(await _owned(request, client, endpoint_id))


@router.post(
    "/webhook_endpoints/{endpoint_id}",
    response_model=WebhookEndpointResource,
    responses=error_responses(400, 401, 403, 404, 413, 422),
    summary="Update a webhook endpoint (url, event types, description, enabled)",
)
async def update_endpoint(
    endpoint_id: EndpointId,
    body: WebhookEndpointUpdate,
    request: Request,
    client: ApiClient = Depends(require_scope("webhooks:write")),
) -> WebhookEndpointResource:
    changes: dict[str, Any] = body.model_dump(exclude_unset=True)
    if changes.get("url") is not None:
        changes["url"] = _checked_url(request, changes["url"])
    if changes.get("enabled_events") is not None:
        changes["enabled_events"] = list(dict.fromkeys(changes["enabled_events"]))
    # `null` for a field that cannot be empty means "leave it".
    changes = {k: v for k, v in changes.items() if v is not None or k == "description"}
    updated = await _endpoints(request).update(client.client_id, _issued(endpoint_id), changes)
    if updated is None:
        raise _no_such_endpoint()
    return WebhookEndpointResource.of(updated)


@router.delete(
    "/webhook_endpoints/{endpoint_id}",
    response_model=DeletedWebhookEndpoint,
    responses=error_responses(401, 403, 404, 422),
    summary="Delete a webhook endpoint (deliveries under way stop)",
)
async def delete_endpoint(
    endpoint_id: EndpointId,
    request: Request,
    client: ApiClient = Depends(require_scope("webhooks:write")),
) -> DeletedWebhookEndpoint:
    if not await _endpoints(request).delete(client.client_id, _issued(endpoint_id)):
        raise _no_such_endpoint()
    return DeletedWebhookEndpoint(id=endpoint_id)


@router.post(
    "/webhook_endpoints/{endpoint_id}/rotate_secret",
    response_model=WebhookEndpointResource,
    responses=error_responses(400, 401, 403, 404, 413, 422),
    summary="Rotate the signing secret (the new one is in this answer only)",
    description="During the overlap every delivery carries two `v1` signatures, one per "
    "secret: deploy the new secret to your receiver, then let the old one expire.",
)
async def rotate_secret(
    endpoint_id: EndpointId,
    request: Request,
    body: Annotated[RotateSecretRequest | None, Body()] = None,
    client: ApiClient = Depends(require_scope("webhooks:write")),
) -> WebhookEndpointResource:
    seconds = body.expire_previous_after_seconds if body is not None else None
    if seconds is None:
        seconds = round(app_settings(request).webhook_secret_overlap_seconds)
    rotated = await _endpoints(request).rotate_secret(
        client.client_id, _issued(endpoint_id), timedelta(seconds=seconds)
    )
    if rotated is None:
        raise _no_such_endpoint()
    return WebhookEndpointResource.of(rotated, with_secret=True)


@router.get(
    "/webhook_endpoints/{endpoint_id}/deliveries",
    response_model=DeliveryAttemptList,
    responses=error_responses(400, 401, 403, 404, 422),
    summary="Every delivery attempt to this endpoint, newest first",
)
async def list_deliveries(
    endpoint_id: EndpointId,
    request: Request,
    event_id: Annotated[
        str | None,
        Query(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    starting_after: Annotated[
        str | None,
        Query(
            pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
            description="An attempt's id.",
        ),
    ] = None,
    client: ApiClient = Depends(require_scope("webhooks:read")),
) -> DeliveryAttemptList:
    endpoint = await _owned(request, client, endpoint_id)
    found = await _endpoints(request).deliveries(
        endpoint.id, event_id=event_id, limit=limit, starting_after=starting_after
    )
    if found is None:
        raise ApiError(
            404,
            "invalid_request_error",
            "resource_missing",
            "No such delivery attempt.",
            "starting_after",
        )
    records, has_more = found
    return DeliveryAttemptList(
        data=[DeliveryAttemptResource.of(r) for r in records], has_more=has_more
    )
