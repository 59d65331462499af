"""`/v1/events`: every event of the client's payments (and webhook endpoints), newest first,
from the events store: the same ids as Kafka's `ce_id` and the webhooks'. A consumer that
missed Kafka or a webhook catches up here. Events are kept for as long as the ledger (at least
the 30 days Stripe promises; paysaga does not prune them)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Body, Depends, Query, Request
from pydantic import BaseModel, Field

from activities.event_store import EventStore, StoredEvent
from activities.webhook_endpoints import WebhookEndpoint, WebhookEndpoints
from api.auth import ApiClient, require_scope
from api.errors import ApiError, error_responses
from api.ids import EventId
from domain.events import EVENT_TYPE_PATTERNS, EventKind, EventObject, event_type_matches
from domain.payment import PAYMENT_ID_PATTERN, StrictRequest
from domain.webhooks import ENDPOINT_ID_PATTERN, EndpointStatus
from service.webhook_dispatch import start_delivery

router = APIRouter(prefix="/v1", tags=["events"])

EventTypePattern = Literal[EVENT_TYPE_PATTERNS]  # type: ignore[valid-type]
Cursor = Annotated[str | None, Query(min_length=1, max_length=64, description="An event id.")]


class EventList(BaseModel):
    object: Literal["list"] = "list"
    url: Literal["/v1/events"] = "/v1/events"
    data: list[EventObject]
    has_more: bool = Field(description="More events follow in the direction of travel.")


class RedeliverRequest(StrictRequest):
    webhook_endpoint: str | None = Field(
        default=None,
        pattern=ENDPOINT_ID_PATTERN,
        description="Only this endpoint (even one the event type does not match); default: "
        "every enabled endpoint that wants the event.",
    )


class Redelivery(BaseModel):
    object: Literal["webhook_redelivery"] = "webhook_redelivery"
    event: str
    webhook_endpoint: str
    delivery: str = Field(description="The delivery's id (its Temporal workflow id).")


class RedeliveryList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Redelivery]


def _store(request: Request) -> EventStore:
    store: EventStore = request.app.state.events
    return store


def _no_such_event(param: str = "id") -> ApiError:
    return ApiError(404, "invalid_request_error", "resource_missing", "No such event.", param)


async def _cursor(store: EventStore, client: ApiClient, event_id: str | None, param: str) -> (
    StoredEvent | None
):  # fmt: skip
    if event_id is None:
        return None
    found = await store.get(event_id, client.client_id)
    if found is None:
        raise _no_such_event(param)
    return found


@router.get(
    "/events",
    response_model=EventList,
    responses=error_responses(400, 401, 403, 404, 422),
    summary="List events, newest first",
    description="Cursor pagination as Stripe's: `starting_after` (older than that event) or "
    "`ending_before` (newer), not both (400). A cursor naming no event of yours: 404. `type` "
    "takes an event type or a wildcard (`payment.*`, `*`).",
)
async def list_events(
    request: Request,
    type: EventTypePattern | None = None,
    payment_id: Annotated[str | None, Query(pattern=PAYMENT_ID_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
    starting_after: Cursor = None,
    ending_before: Cursor = None,
    client: ApiClient = Depends(require_scope("events:read")),
) -> EventList:
    if starting_after is not None and ending_before is not None:
        raise ApiError(
            400,
            "invalid_request_error",
            "parameters_exclusive",
            "Pass starting_after or ending_before, not both.",
            "ending_before",
        )
    store = _store(request)
    kinds = [k for k in EventKind if event_type_matches(type, k.api_type)] if type else None
    events, has_more = await store.page(
        client.client_id,
        kinds=kinds,
        payment_id=payment_id,
        limit=limit,
        starting_after=await _cursor(store, client, starting_after, "starting_after"),
        ending_before=await _cursor(store, client, ending_before, "ending_before"),
    )
    return EventList(data=[e.api_object() for e in events], has_more=has_more)


@router.get(
    "/events/{event_id}",
    response_model=EventObject,
    responses=error_responses(401, 403, 404, 422),
    summary="Retrieve an event",
)
async def get_event(
    event_id: EventId,
    request: Request,
    client: ApiClient = Depends(require_scope("events:read")),
) -> EventObject:
    found = await _store(request).get(event_id, client.client_id)
    if found is None:
        raise _no_such_event()
    return found.api_object()


@router.post(
    "/events/{event_id}/redeliver",
    status_code=202,
    response_model=RedeliveryList,
    responses=error_responses(400, 401, 403, 404, 409, 413, 422),
    summary="Send an event to your webhook endpoints again",
    description="Each redelivery is one new, signed attempt, logged with the endpoint's "
    "deliveries (`manual: true`); receivers deduplicate by the event id.",
)
async def redeliver_event(
    event_id: EventId,
    request: Request,
    body: Annotated[RedeliverRequest | None, Body()] = None,
    client: ApiClient = Depends(require_scope("webhooks:write")),
) -> RedeliveryList:
    found = await _store(request).get(event_id, client.client_id)
    if found is None:
        raise _no_such_event()
    endpoints: WebhookEndpoints = request.app.state.webhook_endpoints
    targets: list[WebhookEndpoint]
    if body is not None and body.webhook_endpoint is not None:
        named = await endpoints.get(client.client_id, body.webhook_endpoint)
        if named is None:
            raise ApiError(
                404,
                "invalid_request_error",
                "resource_missing",
                "No such webhook endpoint.",
                "webhook_endpoint",
            )
        if named.status != EndpointStatus.ENABLED:
            raise ApiError(
                409,
                "invalid_request_error",
                "webhook_endpoint_disabled",
                "The webhook endpoint is disabled; enable it first.",
                "webhook_endpoint",
            )
        targets = [named]
    else:
        api_type = found.record.kind.api_type
        enabled = await endpoints.enabled_for([client.client_id])
        targets = [e for e in enabled if e.wants(api_type)]
        if not targets:
            raise ApiError(
                409,
                "invalid_request_error",
                "no_webhook_endpoint",
                "No enabled webhook endpoint wants this event's type.",
            )
    started = [
        Redelivery(
            event=found.record.id,
            webhook_endpoint=endpoint.id,
            delivery=await start_delivery(
                request.app.state.temporal,
                request.app.state.settings,
                endpoint,
                found.record.id,
                manual=True,
            ),
        )
        for endpoint in targets
    ]
    return RedeliveryList(data=started)
