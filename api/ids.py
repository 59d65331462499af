"""Ids in paths: any text is a well-formed question, and an id nobody issued is simply not found.

The OpenAPI document declares every `{id}` as a plain string, so a generated client may ask for
anything; an id that could never exist answers `404 resource_missing` like one that no longer
does, never a `422` about its shape. The shape each kind of id is issued in is still checked,
here, before a lookup: an id that cannot be ours never reaches Temporal or the database.

One refusal stays: a card number, in any spelling, is `422 card_data_not_allowed`, checked
before anything else looks at the id (headers and filters get the same check).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import Path
from pydantic import BeforeValidator
from pydantic_core import PydanticCustomError

from domain.cards import contains_card_number
from domain.payment import PAYMENT_ID_PATTERN
from domain.webhooks import ENDPOINT_ID_PATTERN

# The shapes ids are issued in (service/start.py, api/payments.py, activities/webhook_endpoints.py).
PAYMENT_ID = re.compile(PAYMENT_ID_PATTERN)
ENDPOINT_ID = re.compile(ENDPOINT_ID_PATTERN)


def no_card_number(value: Any) -> Any:
    """Headers, filters and path ids are strings too: a card number sent as an idempotency key,
    searched for or asked for by id would reach logs and stores the body never does. Checked
    before the format, so every spelling is refused as card data, like one in the body."""
    if isinstance(value, str) and contains_card_number(value):
        raise PydanticCustomError(
            "card_data_not_allowed",
            "Card numbers are not accepted; send a payment-method token (pm_…) instead.",
        )
    return value


def issued(pattern: re.Pattern[str], value: str) -> bool:
    return pattern.fullmatch(value) is not None


PaymentId = Annotated[
    str,
    Path(description="A payment's id (`pay_…`). Any other text is simply not found (404)."),
    BeforeValidator(no_card_number),
]
DisputeId = Annotated[
    str,
    Path(description="A dispute's id (`dp_…`). Any other text is simply not found (404)."),
    BeforeValidator(no_card_number),
]
EventId = Annotated[
    str,
    Path(description="An event's id (a UUID). Any other text is simply not found (404)."),
    BeforeValidator(no_card_number),
]
EndpointId = Annotated[
    str,
    Path(description="A webhook endpoint's id (`we_…`). Any other text is simply not found (404)."),
    BeforeValidator(no_card_number),
]


def link(path: str, method: str, **parameters: str) -> dict[str, Any]:
    """An OpenAPI link: the operation at `path` and `method`, with parameters taken from the
    answer (`$response.body#/id`). Generated clients and schemathesis' stateful phase follow
    them: create a payment, then get, refund, dispute or cancel it."""
    pointer = path.replace("~", "~0").replace("/", "~1")
    return {"operationRef": f"#/paths/{pointer}/{method}", "parameters": parameters}


_PAYMENT = "/v1/payments/{payment_id}"


def _payment_links(payment_id: str) -> dict[str, dict[str, Any]]:
    return {
        "GetPayment": link(_PAYMENT, "get", payment_id=payment_id),
        "RefundPayment": link(f"{_PAYMENT}/refunds", "post", payment_id=payment_id),
        "OpenDispute": link(f"{_PAYMENT}/disputes", "post", payment_id=payment_id),
        "CancelPayment": link(f"{_PAYMENT}/cancel", "post", payment_id=payment_id),
    }


# From a payment (created or read) and from its follow-ups: on to the payment's other calls.
PAYMENT_LINKS = _payment_links("$response.body#/id")
READ_PAYMENT_LINKS = {k: v for k, v in PAYMENT_LINKS.items() if k != "GetPayment"}
FOLLOW_UP_LINKS = _payment_links("$response.body#/payment_id")
DISPUTE_LINKS = {
    **FOLLOW_UP_LINKS,
    "CloseDispute": link(
        f"{_PAYMENT}/disputes/{{dispute_id}}/close",
        "post",
        payment_id="$response.body#/payment_id",
        dispute_id="$response.body#/id",
    ),
}
_ENDPOINT = "/v1/webhook_endpoints/{endpoint_id}"
ENDPOINT_LINKS = {
    "GetWebhookEndpoint": link(_ENDPOINT, "get", endpoint_id="$response.body#/id"),
    "UpdateWebhookEndpoint": link(_ENDPOINT, "post", endpoint_id="$response.body#/id"),
    "RotateWebhookSecret": link(
        f"{_ENDPOINT}/rotate_secret", "post", endpoint_id="$response.body#/id"
    ),
    "ListWebhookDeliveries": link(
        f"{_ENDPOINT}/deliveries", "get", endpoint_id="$response.body#/id"
    ),
    "DeleteWebhookEndpoint": link(_ENDPOINT, "delete", endpoint_id="$response.body#/id"),
}
