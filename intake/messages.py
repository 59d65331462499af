"""What an intake message must be to start a payment (checked as the REST API checks a
request, `Refused` says why not), and the headers its dead letter carries."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from confluent_kafka import (
    Message,
)
from pydantic import ValidationError

from domain.bounds import IDEMPOTENCY_KEY_MAX, IDEMPOTENCY_KEY_MIN, TEXT_MAX
from domain.cards import contains_card_number
from domain.payment import IDEMPOTENCY_KEY_PATTERN, PaymentRequest

IDEMPOTENCY_KEY_HEADER = "idempotency-key"
CLIENT_ID_HEADER = "client-id"
DLQ_REASON_HEADER = "dlq-reason"
DLQ_ERROR_CODE_HEADER = "dlq-error-code"
DLQ_CLIENT_ID_HEADER = "dlq-client-id"

# The REST API's rule for the same value (api/state.py IdempotencyKey).
_IDEMPOTENCY_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
_MAX_REASON_CHARS = TEXT_MAX
_CARD_REASON = "card numbers are not accepted; send a pm_… token"


class Refused(Exception):
    """This message can never start a payment: it goes to the dead-letter topic."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason[:_MAX_REASON_CHARS]


@dataclass(frozen=True)
class PaymentOrder:
    """A message that passed every check: who asks, under which key, for what."""

    client_id: str
    idempotency_key: str
    body: PaymentRequest


def _header_text(value: str | bytes | None) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value or ""


def message_headers(message: Message) -> list[tuple[str, bytes]]:
    raw = message.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(name, _header_text(value).encode()) for name, value in pairs]


def _header(headers: Sequence[tuple[str, bytes]], name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("utf-8", errors="replace")
    return None


def _schema_reason(error: ValidationError) -> tuple[str, str]:
    """An error code and a message built from locations and rules, never from the values."""
    problems = error.errors(include_input=False, include_url=False)
    if any(p["type"] == "card_data_not_allowed" for p in problems):
        return "card_data_not_allowed", _CARD_REASON
    if any(p["type"] == "json_invalid" for p in problems):
        return "invalid_json", "the message value is not valid JSON"
    parts = [f"{'.'.join(str(x) for x in p['loc']) or 'body'}: {p['msg']}" for p in problems[:5]]
    return "invalid_request", "; ".join(parts)


def _carries_card_number(headers: Sequence[tuple[str, bytes]]) -> bool:
    return any(
        contains_card_number(name) or contains_card_number(value.decode(errors="replace"))
        for name, value in headers
    )


def read_payment_order(
    value: bytes | None,
    headers: Sequence[tuple[str, bytes]],
    max_bytes: int,
    client_id: str,
    *,
    message_key: bytes | None = None,
) -> PaymentOrder:
    """Check a message from `client_id`'s topic as the REST API checks a request; `Refused`
    says why not. The topic decided `client_id`; a header can only agree with it."""
    if _carries_card_number([*headers, ("", message_key or b"")]):
        # The key and headers are copied to the dead-letter topic: a card number in any of them
        # refuses the message like one in its body (the copy is redacted, dead_letter_headers).
        raise Refused("card_data_not_allowed", _CARD_REASON)
    key = _header(headers, IDEMPOTENCY_KEY_HEADER)
    if key is None or not key:
        raise Refused("idempotency_key_missing", f"the {IDEMPOTENCY_KEY_HEADER} header is missing")
    if not _IDEMPOTENCY_KEY.match(key):
        raise Refused(
            "idempotency_key_invalid",
            f"{IDEMPOTENCY_KEY_HEADER} must be {IDEMPOTENCY_KEY_MIN}-{IDEMPOTENCY_KEY_MAX} "
            "characters of A-Z a-z 0-9 _ -",
        )
    claimed = _header(headers, CLIENT_ID_HEADER)
    if claimed is not None and claimed != client_id:
        # Never echo the claim: it is whatever the producer wrote.
        raise Refused(
            "client_id_mismatch",
            f"the {CLIENT_ID_HEADER} header names another client than {client_id}, whose "
            "topic this is; a producer requests payments for its own client only",
        )
    if not value:
        raise Refused("invalid_json", "the message has no value")
    if len(value) > max_bytes:
        raise Refused("request_too_large", f"the message value exceeds {max_bytes} bytes")
    try:
        body = PaymentRequest.model_validate_json(value)
    except ValidationError as exc:
        raise Refused(*_schema_reason(exc)) from None
    return PaymentOrder(client_id=client_id, idempotency_key=key, body=body)


def dead_letter_headers(
    message: Message, headers: Sequence[tuple[str, bytes]], refusal: Refused, client_id: str
) -> list[tuple[str, str | bytes | None]]:
    """The original headers plus why, where from and whose. A header name or value holding
    something card-shaped is redacted (only a card refusal can have one: read_payment_order
    checks headers first)."""
    kept = [
        (
            "[redacted]" if contains_card_number(name) else name,
            b"[redacted]" if contains_card_number(value.decode(errors="replace")) else value,
        )
        for name, value in headers
    ]
    return [
        *kept,
        (DLQ_REASON_HEADER, refusal.reason.encode()),
        (DLQ_ERROR_CODE_HEADER, refusal.code.encode()),
        (DLQ_CLIENT_ID_HEADER, client_id.encode()),
        ("dlq-source-topic", str(message.topic()).encode()),
        ("dlq-source-partition", str(message.partition()).encode()),
        ("dlq-source-offset", str(message.offset()).encode()),
    ]
