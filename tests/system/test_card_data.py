"""Card numbers never get in: a Luhn-valid number of 13–19 digits (domain/cards.py), in any
string field, header, filter or metadata key, split by any separators or glued inside a longer
run of digits, is refused with 422 `card_data_not_allowed` — a property-based test generates
such numbers of every length with random separators and positions — and every number is then
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
import json
import logging
import random
import uuid
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from domain.cards import ISSUER_PREFIXES, MAX_PAN, MIN_PAN, contains_card_number, luhn_valid
from domain.events import ALL_TOPICS
from domain.payment import RefundSignal
from infra.embedded.stack import Stack
from infra.logs import REDACTED, redact_card_numbers
from intake.messages import Refused, read_payment_order
from tests.helpers.kafka import consume_events
from tests.helpers.saga import create_payment, payment_body, wait_for_payment

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
    """The card numbers submitted in this module, one per refused case, and the exact text
    each was sent in (the leak search looks for both)."""

    def __init__(self) -> None:
        self.submitted: list[str] = []
        self.texts: list[str] = []

    def new(self, length: int = 16, iin: str = "4") -> str:
        pan = fresh_pan(length, iin)
        self.submitted.append(pan)
        return pan

    def sent(self, pan: str, text: str) -> None:
        self.submitted.append(pan)
        self.texts.append(text)

    def needles(self) -> list[bytes]:
        spelled = {s.encode() for pan in self.submitted for s in spellings(pan)}
        return sorted(spelled | {t.encode() for t in self.texts})


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
    pan = pans.new(13, "4")
    yield {"description": f"short {pan}"}, "description", pan
    pan = pans.new()
    yield {"description": f"pan {grouped(pan, fours, '.')}"}, "description", pan
    pan = pans.new(16, "51")
    yield {"description": f"tel:{grouped(pan, fours, ' / ')}"}, "description", pan
    pan = pans.new(16, "6011")
    yield {"description": f"ref 00{pan}99"}, "description", pan  # hidden in a longer run
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
    pan = pans.new(16, "4")
    yield {"customer_id": f"cus_{grouped(pan, fours, '_')}"}, "customer_id", pan
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

    # An id in a path may be any text (one never issued is simply not found, 404), but never a
    # card number: refused as card data before anything looks it up, in any spelling.
    for param, path in (
        ("payment_id", "/v1/payments/{}"),
        ("event_id", "/v1/events/{}"),
        ("endpoint_id", "/v1/webhook_endpoints/{}"),
    ):
        pan = pans.new()
        asked = await api.get(path.format(grouped(pan, (4,) * 4, "-")))
        assert _refusal(asked, pan)["param"] == param
    pan = pans.new()
    close = await api.post(
        f"/v1/payments/{payment_id}/disputes/{grouped(pan, (4,) * 4, ' ')}/close",
        json={"outcome": "won"},
    )
    assert _refusal(close, pan)["param"] == "dispute_id"

    # An idempotency key is a string too (hashed, but copied into logs and dead letters by
    # careless code): refused as card data in any spelling, before its format is judged.
    for spelled in (grouped(pans.new(), (4,) * 4, "-"), grouped(pans.new(16, "37"), (4,) * 4, ".")):
        keyed = await create_payment(api, payment_body(), key=spelled, wait=0)
        assert _refusal(keyed, pans.submitted[-1])["param"] == "Idempotency-Key"

    # Nothing was refunded or disputed by the refused requests.
    payment = (await api.get(f"/v1/payments/{payment_id}")).json()
    assert payment["refunds"] == [] and payment["disputes"] == []


# ── the property: every spelling, every length, every field ─────────────────────────────────

# Separators a person, a program or an evasion would put between digits, repeated or mixed.
SEPARATORS = " -._/:\t\n,;|*#~+=()'"
# An HTTP header value cannot hold a tab or a newline.
HEADER_SEPARATORS = " -._/:,;|*#~+=()'"


@st.composite
def card_numbers(draw: st.DrawFn) -> str:
    """A valid PAN of any length 13–19 with a card brand's issuer prefix for that length."""
    length = draw(st.integers(MIN_PAN, MAX_PAN))
    low, high = draw(
        st.sampled_from([(lo, hi) for lo, hi, lengths in ISSUER_PREFIXES if length in lengths])
    )
    prefix = str(draw(st.integers(int(low), int(high)))).zfill(len(low))
    rest = length - len(prefix) - 1
    return luhn_complete(prefix + draw(st.text("0123456789", min_size=rest, max_size=rest)))


@st.composite
def spelled_card_numbers(draw: st.DrawFn, separators: str) -> tuple[str, str]:
    """(the PAN, a text holding it): split by random separators at random positions, after
    other digits or glued inside a longer run of digits, amid other text."""
    pan = draw(card_numbers())
    gaps = len(pan) - 1
    separator = st.text(separators, min_size=1, max_size=3)
    if draw(st.booleans()):
        # Any separators anywhere (mixed, repeated), possibly after another group of digits.
        between = draw(st.lists(st.one_of(st.just(""), separator), min_size=gaps, max_size=gaps))
        run = pan[0] + "".join(sep + digit for sep, digit in zip(between, pan[1:], strict=True))
        run = draw(st.sampled_from(["", "12 ", "2024-01-15 ", "no. 7/", "00 00 "])) + run
    else:
        # Hidden: glued to other digits, split by one separator wherever it is split.
        sep = draw(separator)
        split = draw(st.lists(st.booleans(), min_size=gaps, max_size=gaps))
        run = pan[0] + "".join(
            (sep if cut else "") + digit for cut, digit in zip(split, pan[1:], strict=True)
        )
        run = (
            draw(st.text("0123456789", max_size=4)) + run + draw(st.text("0123456789", max_size=4))
        )
    before = draw(st.sampled_from(["", "card ", "cus_", "pm_", "note: ", "ref-"]))
    after = draw(st.sampled_from(["", " thanks", "x", " exp 12/27", "_A"]))
    return pan, before + run + after


BODY_FIELDS = ("description", "metadata value", "metadata key", "customer_id", "merchant_id")
ELSEWHERE = ("payment_method", "refund reason", "network_reference", "list filter")
HEADERS = ("Idempotency-Key",)
PURE = ("intake body", "intake header", "intake key", "refund signal", "log line")


async def test_every_spelling_of_every_length_in_every_field_is_refused(
    api: httpx.AsyncClient, pans: Pans
) -> None:
    """Hypothesis draws card numbers of every length with random separators and positions and
    puts each in one place a client, a producer or an operator can write to. Every one is
    refused as card data (API: 422 `card_data_not_allowed`), and no answer repeats it. The
    numbers join `pans`: the leak search below looks for each of them, and its text."""
    loop = asyncio.get_running_loop()
    seen_lengths: set[int] = set()
    payment_path = f"/v1/payments/pay_{'0' * 24}"

    def through_api(request: Coroutine[Any, Any, httpx.Response]) -> httpx.Response:
        return asyncio.run_coroutine_threadsafe(request, loop).result(timeout=30)

    # Derandomized: the same 150 examples every run, which try every length; drawn at random,
    # a run once missed length 17 (CI), and "every length was tried" failed for nothing.
    @hypothesis_settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(data=st.data())
    def refused_everywhere(data: st.DataObject) -> None:
        where = data.draw(st.sampled_from((*BODY_FIELDS, *ELSEWHERE, *HEADERS, *PURE)))
        separators = HEADER_SEPARATORS if where in HEADERS else SEPARATORS
        pan, text = data.draw(spelled_card_numbers(separators))
        seen_lengths.add(len(pan))
        pans.sent(pan, text)
        if where in PURE:
            refused_offline(where, text, pan)
            return
        if where in BODY_FIELDS:
            field = where.split(" ")[0]
            body = payment_body()
            if where == "metadata value":
                body["metadata"] = {"note": text}
            elif where == "metadata key":
                body["metadata"] = {text: "x"}
            else:
                body[field] = text
            response = through_api(create_payment(api, body, wait=0))
        elif where == "payment_method":
            response = through_api(create_payment(api, payment_body(payment_method=text)))
        elif where == "refund reason":
            response = through_api(
                api.post(
                    f"{payment_path}/refunds",
                    json={"reason": text},
                    headers={"Idempotency-Key": "refund-prop-1"},
                )
            )
        elif where == "network_reference":
            response = through_api(
                api.post(
                    f"{payment_path}/disputes",
                    json={"reason_code": "10.4", "network_reference": text},
                )
            )
        elif where == "list filter":
            response = through_api(api.get("/v1/payments", params={"customer_id": text}))
        else:
            response = through_api(create_payment(api, payment_body(), key=text, wait=0))
        _refusal(response, pan)
        assert text not in response.text

    await asyncio.to_thread(refused_everywhere)
    assert seen_lengths == set(range(MIN_PAN, MAX_PAN + 1)), "every length was tried"


def refused_offline(where: str, text: str, pan: str) -> None:
    """The Kafka intake's check, an operator's signal, and the log redactor."""
    if where == "log line":
        redacted = redact_card_numbers(f"posting failed for {text} at 2026-01-15")
        assert REDACTED in redacted and not contains_card_number(redacted)
        assert pan not in redacted and text not in redacted
        return
    if where == "refund signal":
        with pytest.raises(ValidationError) as invalid:
            RefundSignal.model_validate({"refund_id": "re_manual_1", "reason": text})
        assert invalid.value.errors()[0]["type"] == "card_data_not_allowed"
        assert pan not in str(invalid.value) and text not in str(invalid.value)
        return
    body = json.dumps(payment_body()).encode()
    headers: list[tuple[str, bytes]] = [("idempotency-key", b"order-prop-0001")]
    key: bytes | None = None
    if where == "intake body":
        body = json.dumps(payment_body(description=text)).encode()
    elif where == "intake header":
        headers.append(("source-reference", text.encode()))
    else:
        key = text.encode()
    with pytest.raises(Refused) as refused:
        read_payment_order(body, headers, 65536, "billing", message_key=key)
    assert refused.value.code == "card_data_not_allowed"
    assert pan not in refused.value.reason


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


# ── an operator's signal is not validated by the API ────────────────────────────────────────


async def test_a_signal_carrying_a_card_number_is_dropped_without_logging_it(
    api: httpx.AsyncClient, temporal_client: Client, app_logs: RecordingHandler
) -> None:
    """`temporal workflow signal --name refund` goes straight to Temporal: the workflow cannot
    refuse it before it is in history (the codec encrypts it there; docs/security.md), but it
    never acts on it, and the worker's log of the refusal does not repeat it. This runs after
    the leak search, which therefore does not look for this number."""
    created = await create_payment(api, payment_body(amount=1000))
    assert created.status_code == 201, created.text
    payment_id = created.json()["id"]
    await wait_for_payment(api, payment_id, lambda p: p["status"] == "succeeded")
    pan = fresh_pan()
    handle = temporal_client.get_workflow_handle(payment_id)
    await handle.signal(
        "refund",
        {
            "refund_id": "re_manual_card",
            "amount": 100,
            "reason": f"card {grouped(pan, (4,) * 4, '.')}",
        },
    )
    await handle.signal("refund", {"refund_id": "re_manual_ok", "amount": 100, "reason": "ok"})

    payment = await wait_for_payment(
        api, payment_id, lambda p: [r["status"] for r in p["refunds"]] == ["succeeded"]
    )
    assert [r["id"] for r in payment["refunds"]] == ["re_manual_ok"]
    dropped = [line for line in app_logs.lines if "dropping the signal" in line]
    assert dropped and "card_data_not_allowed" in "\n".join(dropped)
    logged = "\n".join(app_logs.lines)
    assert not any(spelling in logged for spelling in spellings(pan))
    assert grouped(pan, (4,) * 4, ".") not in logged
