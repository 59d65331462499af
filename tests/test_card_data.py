"""Card numbers never get in: any Luhn-valid run of 12–19 digits, in any string field, with or
without spaces or dashes, is refused with 422 `card_data_not_allowed` — and the number is then
searched for everywhere it could have landed: the logs of the API and the worker (at DEBUG),
Temporal's histories, every Kafka topic, every text column of the database and every file the
services keep on disk.

Each search has a positive control: a 16-digit order number that fails the Luhn check is
accepted, flows through the saga, and *is* found in those same places. A search that cannot
find the order number would prove nothing about the card numbers.

The card numbers are fresh per run (random, then Luhn-completed), so nothing another test wrote
can be mistaken for a leak.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from domain.cards import contains_card_number, luhn_valid
from domain.events import ALL_TOPICS
from infra.stack import Stack
from tests.kafka_helpers import consume_events
from tests.saga_helpers import create_payment, payment_body, wait_for_payment

_rng = random.Random()


def luhn_complete(prefix: str) -> str:
    """`prefix` plus the check digit that makes it Luhn-valid."""
    return next(prefix + d for d in "0123456789" if luhn_valid(prefix + d))


def fresh_pan(length: int = 16, iin: str = "4") -> str:
    body = iin + "".join(_rng.choice("0123456789") for _ in range(length - len(iin) - 1))
    return luhn_complete(body)


def not_a_pan(length: int = 16) -> str:
    """Same shape as a card number, wrong check digit: an order number, an invoice. Grouped in
    fours, no 12-digit part of it may pass Luhn either (those would be refused, rightly)."""
    while True:
        pan = fresh_pan(length, iin="9")
        number = pan[:-1] + str((int(pan[-1]) + 1) % 10)
        if not any(contains_card_number(s) for s in spellings(number)):
            return number


def grouped(digits: str, sizes: tuple[int, ...], sep: str) -> str:
    parts, at = [], 0
    for size in sizes:
        parts.append(digits[at : at + size])
        at += size
    if at < len(digits):
        parts.append(digits[at:])
    return sep.join(parts)


def spellings(pan: str) -> list[str]:
    """Every way the number could show up in text we search."""
    fours = (4,) * (len(pan) // 4)
    return [pan, grouped(pan, fours, " "), grouped(pan, fours, "-")]


class Pans:
    """The card numbers submitted in this module, one per refused case."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def new(self, length: int = 16, iin: str = "4") -> str:
        pan = fresh_pan(length, iin)
        self.submitted.append(pan)
        return pan

    def needles(self) -> list[bytes]:
        return sorted({s.encode() for pan in self.submitted for s in spellings(pan)})


@pytest.fixture(scope="module")
def pans() -> Pans:
    return Pans()


class RecordingHandler(logging.Handler):
    """Every record any logger in this process emits: the API and the in-process worker."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            rendered = record.getMessage()
        except Exception:  # a bad format string is still text we must search
            rendered = f"{record.msg!r} {record.args!r}"
        exc = logging.Formatter().formatException(record.exc_info) if record.exc_info else ""
        extras = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS}
        self.lines.append(f"{record.name} {record.levelname} {rendered} {exc} {extras!r}")


_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


@pytest.fixture(scope="module")
def app_logs() -> Iterator[RecordingHandler]:
    root = logging.getLogger()
    handler, level = RecordingHandler(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture(scope="module")
def started_at() -> datetime:
    return datetime.now(UTC) - timedelta(seconds=1)


# ── refused ──────────────────────────────────────────────────────────────────────────────────


def _refusal(response: httpx.Response, pan: str) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == "card_data_not_allowed", error
    for spelling in spellings(pan):
        assert spelling not in response.text
    assert not contains_card_number(response.text)
    return error


def _cases(pans: Pans) -> Iterator[tuple[dict[str, Any], str, str]]:
    """(payment body overrides, the param the error names, the card number) — a fresh number
    per case, in every string field, spelled every way."""
    fours = (4, 4, 4, 4)
    pan = pans.new()
    yield {"description": f"card {grouped(pan, fours, ' ')} thx"}, "description", pan
    pan = pans.new()
    yield {"description": f"ref 12 {grouped(pan, fours, '-')}"}, "description", pan
    pan = pans.new(15, "37")
    yield {"description": f"amex {grouped(pan, (4, 6, 5), ' ')}"}, "description", pan
    pan = pans.new(19, "4")
    yield {"description": f"pan={pan}"}, "description", pan
    pan = pans.new(12, "5")
    yield {"description": f"short {pan}"}, "description", pan
    pan = pans.new()
    yield {"metadata": {"card": grouped(pan, fours, " ")}}, "metadata[card]", pan
    pan = pans.new(16, "51")
    yield {"metadata": {"order": "A1", "note": pan}}, "metadata[note]", pan
    # A key is a string too; the error never repeats it.
    pan = pans.new()
    yield {"metadata": {f"c-{grouped(pan, fours, '-')}": "x"}}, "metadata[*]", pan
    pan = pans.new()
    yield {"customer_id": pan}, "customer_id", pan
    pan = pans.new(16, "6011")
    yield {"customer_id": f"cus_{pan}"}, "customer_id", pan
    pan = pans.new(16, "35")
    yield {"merchant_id": pan}, "merchant_id", pan
    pan = pans.new()
    yield {"payment_method": f"pm_{pan}"}, "payment_method", pan
    # Fields whose own format is all digits: the format alone would let a card number in.
    pan = pans.new()
    yield {"hubspot_deal_id": pan}, "hubspot_deal_id", pan
    pan = pans.new(16, "22")
    yield {"salesforce_opportunity_id": pan}, "salesforce_opportunity_id", pan


async def test_card_numbers_in_any_field_are_refused(
    api: httpx.AsyncClient, pans: Pans, app_logs: RecordingHandler, started_at: datetime
) -> None:
    for overrides, param, pan in _cases(pans):
        response = await create_payment(api, payment_body(**overrides), wait=0)
        error = _refusal(response, pan)
        assert error["param"] == param, (overrides, error)
    # Positive control for the log search: the app's own DEBUG records were captured.
    assert any("card_data_not_allowed" in line for line in app_logs.lines)


async def test_the_well_known_test_card_in_metadata_is_refused(api: httpx.AsyncClient) -> None:
    body = payment_body(metadata={"order_id": "1001", "note": "4242 4242 4242 4242"})
    _refusal(await create_payment(api, body, wait=0), "4242424242424242")


async def test_card_numbers_in_follow_ups_and_filters_are_refused(
    api: httpx.AsyncClient, pans: Pans, app_logs: RecordingHandler, started_at: datetime
) -> None:
    created = await create_payment(api, payment_body(amount=1000))
    assert created.status_code == 201, created.text
    payment_id = created.json()["id"]
    await wait_for_payment(api, payment_id, lambda p: p["status"] == "succeeded")

    pan = pans.new()
    refund = await api.post(
        f"/v1/payments/{payment_id}/refunds",
        json={"amount": 100, "reason": f"customer read out {grouped(pan, (4,) * 4, ' ')}"},
        headers={"Idempotency-Key": f"refund-{uuid.uuid4().hex}"},
    )
    assert _refusal(refund, pan)["param"] == "reason"

    pan = pans.new(16, "53")
    dispute = await api.post(
        f"/v1/payments/{payment_id}/disputes",
        json={"reason_code": "10.4", "network_reference": grouped(pan, (4,) * 4, "-")},
    )
    assert _refusal(dispute, pan)["param"] == "network_reference"

    # Searching by a card number is as bad as storing one: it would end up in query logs.
    pan = pans.new()
    listing = await api.get("/v1/payments", params={"customer_id": pan})
    assert _refusal(listing, pan)["param"] == "customer_id"

    # Nothing was refunded or disputed by the refused requests.
    payment = (await api.get(f"/v1/payments/{payment_id}")).json()
    assert payment["refunds"] == [] and payment["disputes"] == []


# ── accepted: the check is not over-broad ───────────────────────────────────────────────────


@pytest.fixture(scope="module")
async def order_number_payment(api: httpx.AsyncClient) -> tuple[str, str]:
    """A payment carrying a 16-digit number that is not a card number: accepted, and carried
    everywhere a leaked card number would have been carried."""
    order = not_a_pan()
    assert not luhn_valid(order) and not contains_card_number(order)
    body = payment_body(
        customer_id=f"cus_{order}",
        description=f"order {grouped(order, (4,) * 4, ' ')}",
        metadata={"order_number": order, "phone": "+1 415 555 0100"},
    )
    created = await create_payment(api, body)
    assert created.status_code == 201, created.text
    payment_id = str(created.json()["id"])
    payment = await wait_for_payment(
        api, payment_id, lambda p: p["status"] == "succeeded" and p["crm_sync"] == "synced"
    )
    assert payment["metadata"]["order_number"] == order
    assert payment["description"] == body["description"]
    return payment_id, order


async def test_a_16_digit_order_number_that_fails_luhn_is_accepted(
    order_number_payment: tuple[str, str],
) -> None:
    payment_id, order = order_number_payment
    assert payment_id.startswith("pay_") and len(order) == 16


# ── …and the card numbers reached none of the places the order number did ────────────────────


def _found(haystack: bytes, needles: list[bytes]) -> list[bytes]:
    return [n for n in needles if n in haystack]


async def test_card_numbers_never_reach_logs_history_kafka_database_or_disk(
    order_number_payment: tuple[str, str],
    pans: Pans,
    app_logs: RecordingHandler,
    started_at: datetime,
    temporal_client: Client,
    engine: AsyncEngine,
    stack: Stack,
) -> None:
    payment_id, order = order_number_payment
    needles = pans.needles()
    assert len(pans.submitted) >= 17, "the refusal tests ran first and submitted card numbers"
    control = [order.encode()]

    # Logs of the API and the worker, DEBUG and up. The test's own HTTP client logs its
    # request URLs (one carried a card number in its query): that line is ours, not the app's.
    app_lines = [line for line in app_logs.lines if "http://paysaga.test" not in line]
    logged = "\n".join(app_lines).encode()
    assert _found(logged, needles) == []

    # Temporal: the full history of every workflow started during this module.
    history = await _histories_since(temporal_client, started_at)
    assert _found(history, control) == control, "the search must see the accepted order number"
    assert _found(history, needles) == []

    # Kafka: every record (key, headers, value) of every payments topic.
    records = await asyncio.to_thread(consume_events, stack.kafka_bootstrap_servers, ALL_TOPICS)
    kafka = b"\n".join(
        r.key.encode() + b" " + repr(r.headers).encode() + b" " + r.value for r in records
    )
    assert _found(kafka, control) == control
    assert _found(kafka, needles) == []

    # Database: every text, varchar and json column of every table.
    stored = await _all_text_columns(engine)
    assert _found(stored, control) == control
    assert _found(stored, needles) == []

    # Disk: every file the services keep (PostgreSQL heap and WAL, Temporal's SQLite and its
    # WAL, every service log).
    on_disk = await asyncio.to_thread(_files_containing, Path(stack.home), [*control, *needles])
    assert order.encode() in on_disk, "the disk search must see the accepted order number"
    assert {n: files for n, files in on_disk.items() if n in needles} == {}
    assert payment_id


async def _histories_since(client: Client, since: datetime) -> bytes:
    query = f'StartTime >= "{since.isoformat()}"'
    chunks: list[bytes] = []
    async for execution in client.list_workflows(query):
        handle = client.get_workflow_handle(execution.id, run_id=execution.run_id)
        history = await handle.fetch_history()
        chunks.extend(event.SerializeToString() for event in history.events)
    assert chunks, "no workflow histories found"
    return b"\n".join(chunks)


async def _all_text_columns(engine: AsyncEngine) -> bytes:
    async with engine.connect() as conn:
        columns = (
            await conn.execute(
                text(
                    "SELECT c.table_name, c.column_name FROM information_schema.columns c "
                    "JOIN information_schema.tables t USING (table_schema, table_name) "
                    "WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' AND "
                    "c.data_type IN ('text', 'character varying', 'character', 'json', 'jsonb')"
                )
            )
        ).all()
        assert len(columns) > 10
        chunks: list[bytes] = []
        for table, column in columns:
            values = await conn.execute(
                text(f'SELECT "{column}"::text FROM "{table}" WHERE "{column}" IS NOT NULL')
            )
            chunks.extend(str(value).encode() for (value,) in values)
    return b"\n".join(chunks)


def _files_containing(root: Path, needles: list[bytes]) -> dict[bytes, list[str]]:
    found: dict[bytes, list[str]] = {}
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue  # a socket or a file removed meanwhile
        for needle in needles:
            if needle in data:
                found.setdefault(needle, []).append(str(path.relative_to(root)))
    return found
