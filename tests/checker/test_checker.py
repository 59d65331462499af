"""`paysaga check` against the real stack: real payments pass every check; each kind of broken
promise, planted directly in the database or the broker, is caught and named.

The test session shares one database and broker with other tests, so every run here is scoped to
this module's payments (`CheckScope(payment_ids=...)`). Planted rows are removed afterwards
(bypassing the append-only triggers), so later tests see an honest ledger again.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import typer
from confluent_kafka import Producer
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from temporalio.client import Client
from typer.testing import CliRunner

from checker.report import (
    HOLDS_RELEASED,
    KAFKA_HAS_OUTBOX,
    LEDGER_BALANCED,
    OUTBOX_IN_KAFKA,
    POSTED_ONCE,
    PROMISES,
    REGISTER_MATCHES,
    WITHIN_CAPTURED,
    WORKFLOW_AGREES,
    CheckReport,
    CheckScope,
)
from checker.runner import run_checks
from cli import check as check_cli
from domain.events import EventKind, PaymentEvent, event_id
from domain.ledger import (
    LedgerTransaction,
    Parties,
    authorization_hold_transaction,
    hold_released_transaction,
    payment_transaction,
)
from domain.payment import PaymentStatus
from infra.embedded.process import free_port
from infra.embedded.stack import Stack
from ledger.records import LedgerPosting, PaymentOutcome, PaymentParties
from ledger.store import Ledger
from settings import Settings
from tests.helpers.saga import create_payment, payment_body, wait_for_payment

FAKE_MERCHANT = "mer_checker_planted"


def _fake_payment_id() -> str:
    return f"pay_{uuid.uuid4().hex[:24]}"


async def _check(
    app_settings: Settings,
    engine: AsyncEngine,
    temporal: Client,
    ids: set[str],
    settle_seconds: float = 0.0,
) -> CheckReport:
    return await run_checks(
        app_settings,
        scope=CheckScope(payment_ids=frozenset(ids)),
        engine=engine,
        temporal=temporal,
        max_examples=50,
        settle_seconds=settle_seconds,
    )


def _failures(report: CheckReport) -> dict[str, list[tuple[str | None, str]]]:
    return {
        r.name: [(v.payment_id, v.detail) for v in r.examples]
        for r in report.results
        if not r.passed
    }


def _flagged(report: CheckReport, check: str, payment_id: str, needle: str = "") -> bool:
    return any(v.payment_id == payment_id and needle in v.detail for v in report.violations(check))


# ── real payments ────────────────────────────────────────────────────────────────────────────


async def _paid(api: httpx.AsyncClient, **overrides: Any) -> str:
    created = await create_payment(api, payment_body(**overrides))
    assert created.status_code == 201, created.text
    payment_id = str(created.json()["id"])
    await wait_for_payment(api, payment_id, lambda p: p["status"] == "succeeded")
    return payment_id


async def _refund(api: httpx.AsyncClient, payment_id: str, amount: int) -> None:
    made = await api.post(
        f"/v1/payments/{payment_id}/refunds",
        json={"amount": amount},
        headers={"Idempotency-Key": f"refund-{uuid.uuid4().hex}"},
    )
    assert made.status_code == 201 and made.json()["status"] == "succeeded", made.text


async def _dispute_lost(api: httpx.AsyncClient, payment_id: str, amount: int) -> None:
    opened = await api.post(
        f"/v1/payments/{payment_id}/disputes",
        json={"amount": amount, "reason_code": "10.4", "network_reference": uuid.uuid4().hex},
    )
    assert opened.status_code == 201 and opened.json()["status"] == "open", opened.text
    closed = await api.post(
        f"/v1/payments/{payment_id}/disputes/{opened.json()['id']}/close", json={"outcome": "lost"}
    )
    assert closed.status_code == 200 and closed.json()["status"] == "lost", closed.text


@pytest.fixture(scope="module")
async def real_payments(api: httpx.AsyncClient) -> dict[str, str]:
    """Payments through the whole saga: plain, partly refunded, fully refunded, disputed
    (open), and a lost dispute on top of a refund."""
    ids = {
        "succeeded": await _paid(api, amount=2500),
        "partial": await _paid(api, amount=4000, currency="EUR"),
        "refunded": await _paid(api, amount=1200, currency="JPY"),
        "disputed": await _paid(api, amount=3000),
        "lost": await _paid(api, amount=5000, currency="BHD"),
    }
    await _refund(api, ids["partial"], 1500)
    await _refund(api, ids["refunded"], 1200)
    opened = await api.post(
        f"/v1/payments/{ids['disputed']}/disputes",
        json={"reason_code": "13.1", "network_reference": uuid.uuid4().hex},
    )
    assert opened.status_code == 201 and opened.json()["status"] == "open", opened.text
    await _refund(api, ids["lost"], 1000)
    await _dispute_lost(api, ids["lost"], 2500)
    return ids


async def test_real_payments_keep_every_promise(
    real_payments: dict[str, str],
    app_settings: Settings,
    engine: AsyncEngine,
    temporal_client: Client,
) -> None:
    ids = set(real_payments.values())
    report = await _check(app_settings, engine, temporal_client, ids, settle_seconds=20)
    assert report.passed, _failures(report)
    assert [r.name for r in report.results] == list(PROMISES)
    counts = {r.name: r.checked for r in report.results}
    # What was looked at, not just "nothing found": 5 captures, 3 refunds, 2 dispute openings
    # and 1 loss are 11 transactions, and each emitted one ledger event.
    assert counts[LEDGER_BALANCED] == 11
    assert counts[WITHIN_CAPTURED] == counts[POSTED_ONCE] == counts[REGISTER_MATCHES] == 5
    assert counts[WORKFLOW_AGREES] == 5
    # The events store also holds each payment's payments.raw: all 16 reached Kafka.
    assert counts[OUTBOX_IN_KAFKA] == 11 + 5
    assert counts[KAFKA_HAS_OUTBOX] == 11


async def test_since_scope_follows_an_older_payment_refunded_since(
    api: httpx.AsyncClient,
    app_settings: Settings,
    engine: AsyncEngine,
    temporal_client: Client,
) -> None:
    """Visibility is listed by start time, so a payment started before `since` but refunded
    after it is looked up on its own, and judged like any other."""
    payment_id = await _paid(api, amount=1800)
    since = datetime.now(UTC)
    await _refund(api, payment_id, 800)
    report = await run_checks(
        app_settings,
        scope=CheckScope(since=since, payment_ids=frozenset({payment_id})),
        engine=engine,
        temporal=temporal_client,
        settle_seconds=20,
    )
    assert report.passed, _failures(report)
    counts = {r.name: r.checked for r in report.results}
    # In scope: the payment (its refund is recent), only the refund's transaction and event.
    assert counts[WORKFLOW_AGREES] == counts[REGISTER_MATCHES] == 1
    assert counts[LEDGER_BALANCED] == counts[OUTBOX_IN_KAFKA] == counts[KAFKA_HAS_OUTBOX] == 1
    assert report.result(WORKFLOW_AGREES).notes == []  # judged, not skipped as in flight


# ── planted violations ───────────────────────────────────────────────────────────────────────


@dataclass
class Planted:
    """Rows planted in the ledger; removed at teardown."""

    engine: AsyncEngine
    payment_ids: set[str] = field(default_factory=set)
    transaction_ids: set[uuid.UUID] = field(default_factory=set)

    async def capture(self, payment_id: str, amount: int, *, with_event: bool = False) -> None:
        """A normal posting through the ledger's own write path."""
        self.payment_ids.add(payment_id)
        customer = f"cus_{payment_id[4:14]}"
        event = PaymentEvent(
            id=event_id(payment_id, EventKind.CONFIRMED),
            kind=EventKind.CONFIRMED,
            payment_id=payment_id,
            time=datetime.now(UTC),
            data={"amount": amount},
        )
        await Ledger(self.engine).post(
            LedgerPosting(
                transaction=payment_transaction(
                    payment_id, Parties(customer, FAKE_MERCHANT, "USD"), amount
                ),
                amount=amount,
                parties=PaymentParties(
                    client_id="test-client",
                    customer_id=customer,
                    merchant_id=FAKE_MERCHANT,
                    currency="USD",
                ),
                event=event if with_event else None,
            )
        )

    async def transaction(
        self,
        payment_id: str,
        kind: str,
        entries: list[tuple[str, int]],
        *,
        reference: str = "",
        bypass_triggers: bool = False,
    ) -> None:
        """A raw ledger transaction: `entries` are (account code, signed amount) in USD."""
        txn_id = uuid.uuid4()
        self.transaction_ids.add(txn_id)
        async with self.engine.begin() as conn:
            if bypass_triggers:
                # Superuser only: the balance trigger would refuse this at COMMIT.
                await conn.execute(text("SET LOCAL session_replication_role = replica"))
            await conn.execute(
                text(
                    "INSERT INTO ledger_transactions (id, payment_id, kind, reference, description)"
                    " VALUES (:id, :p, :kind, :ref, 'planted by test_checker')"
                ),
                {"id": txn_id, "p": payment_id, "kind": kind, "ref": reference},
            )
            for code, amount in entries:
                account_id = await _account(conn, code)
                await conn.execute(
                    text(
                        "INSERT INTO ledger_entries (transaction_id, account_id, amount, currency)"
                        " VALUES (:t, :a, :amount, 'USD')"
                    ),
                    {"t": txn_id, "a": account_id, "amount": amount},
                )

    async def remove(self) -> None:
        async with self.engine.begin() as conn:
            # The ledger is append-only by trigger; a test cleaning up after itself is the
            # one legitimate exception.
            await conn.execute(text("SET LOCAL session_replication_role = replica"))
            params = {"p": sorted(self.payment_ids), "t": list(self.transaction_ids)}
            mine = "SELECT id FROM ledger_transactions WHERE payment_id = ANY(:p) OR id = ANY(:t)"
            await conn.execute(
                text(f"DELETE FROM outbox_events WHERE transaction_id IN ({mine})"), params
            )
            await conn.execute(
                text(f"DELETE FROM ledger_entries WHERE transaction_id IN ({mine})"), params
            )
            await conn.execute(
                text("DELETE FROM ledger_transactions WHERE payment_id = ANY(:p) OR id = ANY(:t)"),
                params,
            )
            await conn.execute(text("DELETE FROM payments WHERE payment_id = ANY(:p)"), params)


async def _account(conn: AsyncConnection, code: str) -> uuid.UUID:
    kind = {"customer": "customer_funding", "merchant": "merchant_payable"}[code.split(":")[0]]
    await conn.execute(
        text(
            "INSERT INTO accounts (code, type, currency) VALUES (:c, :k, 'USD') "
            "ON CONFLICT (code) DO NOTHING"
        ),
        {"c": code, "k": kind},
    )
    found = await conn.scalar(text("SELECT id FROM accounts WHERE code = :c"), {"c": code})
    assert isinstance(found, uuid.UUID)
    return found


@pytest.fixture
async def planted(engine: AsyncEngine) -> AsyncIterator[Planted]:
    rows = Planted(engine)
    try:
        yield rows
    finally:
        await rows.remove()


def _produce_orphan_event(bootstrap: str, payment_id: str) -> str:
    """A `payments.confirmed` record that no ledger transaction ever emitted."""
    orphan_id = str(uuid.uuid4())
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(
        EventKind.CONFIRMED.topic,
        key=payment_id.encode(),
        value=json.dumps({"event_id": orphan_id, "payment_id": payment_id}).encode(),
        headers=[
            ("ce_id", orphan_id.encode()),
            ("ce_type", EventKind.CONFIRMED.ce_type.encode()),
            ("ce_subject", payment_id.encode()),
        ],
    )
    assert producer.flush(10) == 0
    return orphan_id


async def test_each_broken_promise_is_caught_and_named(
    real_payments: dict[str, str],
    planted: Planted,
    app_settings: Settings,
    engine: AsyncEngine,
    temporal_client: Client,
    stack: Stack,
) -> None:
    customer, merchant = "customer:cus_planted:USD", f"merchant:{FAKE_MERCHANT}:USD"

    # Debits 1000, credits 900: only possible with the balance trigger switched off.
    unbalanced = _fake_payment_id()
    planted.payment_ids.add(unbalanced)
    await planted.transaction(
        unbalanced, "payment", [(customer, 1000), (merchant, -900)], bypass_triggers=True
    )

    # Captured 1000, then 1500 refunded straight into the entries (the register never knew).
    over_refunded = _fake_payment_id()
    await planted.capture(over_refunded, 1000)
    await planted.transaction(
        over_refunded, "refund", [(merchant, 1500), (customer, -1500)], reference="re_planted"
    )

    # A second capture posting under another reference.
    posted_twice = _fake_payment_id()
    await planted.capture(posted_twice, 700)
    await planted.transaction(
        posted_twice, "payment", [(customer, 700), (merchant, -700)], reference="again"
    )

    # Its confirmed event went into the outbox and never to Kafka.
    unpublished = _fake_payment_id()
    await planted.capture(unpublished, 300, with_event=True)

    # In Kafka with no ledger transaction behind it.
    orphan = _fake_payment_id()
    orphan_event = await asyncio.to_thread(
        _produce_orphan_event, stack.kafka_bootstrap_servers, orphan
    )

    # A real, running payment whose ledger gains a refund its workflow never made.
    tampered = real_payments["succeeded"]
    await planted.transaction(
        tampered,
        "refund",
        [
            ("merchant:test-client:mer_acme:USD", 500),
            (await _customer_code(engine, tampered), -500),
        ],
        reference="re_tampered",
    )

    honest = real_payments["partial"]
    ids = {unbalanced, over_refunded, posted_twice, unpublished, orphan, tampered, honest}
    report = await _check(app_settings, engine, temporal_client, ids)

    assert not report.passed
    assert _flagged(report, LEDGER_BALANCED, unbalanced, "sums to 100 USD, not zero")
    assert _flagged(report, WITHIN_CAPTURED, over_refunded, "ledger entries: 1500 returned")
    assert _flagged(report, REGISTER_MATCHES, over_refunded, "refunded 1500")
    assert _flagged(report, POSTED_ONCE, posted_twice, "posted 2 times")
    assert _flagged(
        report,
        OUTBOX_IN_KAFKA,
        unpublished,
        f"event {event_id(unpublished, EventKind.CONFIRMED)} of payments.confirmed never reached",
    )
    assert _flagged(report, KAFKA_HAS_OUTBOX, orphan, f"event {orphan_event} at payments.confirmed")
    assert _flagged(report, WORKFLOW_AGREES, tampered, "says succeeded")
    assert _flagged(report, WORKFLOW_AGREES, tampered, "implies partially_refunded")
    assert _flagged(report, REGISTER_MATCHES, tampered, "the ledger entries moved captured 2500")
    # A payment with no workflow and no recorded outcome is unaccounted for.
    assert _flagged(report, WORKFLOW_AGREES, unbalanced, "Temporal knows no workflow")
    # Nothing is invented about the honest payment checked alongside.
    assert not any(v.payment_id == honest for r in report.results for v in r.examples)
    assert all(r.error is None for r in report.results)


async def _customer_code(engine: AsyncEngine, payment_id: str) -> str:
    async with engine.connect() as conn:
        customer = await conn.scalar(
            text("SELECT customer_id FROM payments WHERE payment_id = :p"), {"p": payment_id}
        )
    return f"customer:test-client:{customer}:USD"


# ── the command ──────────────────────────────────────────────────────────────────────────────


def _invoke(stack: Stack, *args: str) -> Any:
    app = typer.Typer()
    app.command()(check_cli.main)
    env = {**stack.service_env(), "PAYSAGA_TEMPORAL_NAMESPACE": "default"}
    return CliRunner().invoke(app, list(args), env=env)


async def test_the_command_exits_zero_when_promises_hold_and_non_zero_when_one_breaks(
    real_payments: dict[str, str], planted: Planted, stack: Stack
) -> None:
    honest = [arg for pid in real_payments.values() for arg in ("--payment", pid)]
    # asyncio.run inside: the command gets its own thread and event loop, as in a shell.
    held = await asyncio.to_thread(_invoke, stack, *honest, "--settle-seconds", "20")
    assert held.exit_code == 0, held.output
    assert "all promises hold" in held.output
    assert "FAIL" not in held.output

    posted_twice = _fake_payment_id()
    await planted.capture(posted_twice, 900)
    await planted.transaction(
        posted_twice,
        "payment",
        [("customer:cus_planted:USD", 900), (f"merchant:{FAKE_MERCHANT}:USD", -900)],
        reference="again",
    )
    broken = await asyncio.to_thread(_invoke, stack, *honest, "--payment", posted_twice)
    assert broken.exit_code == check_cli.EXIT_VIOLATIONS, broken.output
    assert "FAIL" in broken.output and f"{posted_twice}: posted 2 times" in broken.output

    as_json = await asyncio.to_thread(
        _invoke, stack, "--payment", posted_twice, "--json", "--examples", "1"
    )
    assert as_json.exit_code == check_cli.EXIT_VIOLATIONS, as_json.output
    report = json.loads(as_json.output)
    assert report["passed"] is False
    failed = {r["name"]: r for r in report["results"] if not r["passed"]}
    assert failed[POSTED_ONCE]["examples"] == [
        {"payment_id": posted_twice, "detail": "posted 2 times"}
    ]


def test_since_takes_an_age_or_an_iso_time() -> None:
    now = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
    assert check_cli.parse_since("90m", now) == now - timedelta(minutes=90)
    assert check_cli.parse_since("2d", now) == now - timedelta(days=2)
    assert check_cli.parse_since("2025-02-28T10:00Z") == datetime(2025, 2, 28, 10, tzinfo=UTC)
    assert check_cli.parse_since("2025-02-28T10:00") == datetime(2025, 2, 28, 10, tzinfo=UTC)
    with pytest.raises(typer.BadParameter):
        check_cli.parse_since("yesterday")


async def test_a_service_that_does_not_answer_fails_the_check_instead_of_passing_it(
    real_payments: dict[str, str],
    app_settings: Settings,
    engine: AsyncEngine,
    temporal_client: Client,
) -> None:
    nobody = app_settings.model_copy(update={"kafka_bootstrap_servers": f"127.0.0.1:{free_port()}"})
    report = await run_checks(
        nobody,
        scope=CheckScope(payment_ids=frozenset(real_payments.values())),
        engine=engine,
        temporal=temporal_client,
        kafka_timeout_seconds=3,
    )
    unproven = {r.name for r in report.results if r.error}
    assert unproven == {OUTBOX_IN_KAFKA, KAFKA_HAS_OUTBOX}
    assert not report.passed
    assert check_cli.exit_status(report) == check_cli.EXIT_UNCHECKED
    # The ledger and Temporal were still judged.
    assert report.result(POSTED_ONCE).passed and report.result(WORKFLOW_AGREES).passed


# ── the acquirer's holds (issue 15) ──────────────────────────────────────────────────────────


async def _post(engine: AsyncEngine, txn: LedgerTransaction, amount: int) -> None:
    customer = txn.entries[0].account.code.split(":")[1]
    await Ledger(engine).post(
        LedgerPosting(
            transaction=txn,
            amount=amount,
            parties=PaymentParties(
                client_id="test-client",
                customer_id=customer,
                merchant_id=FAKE_MERCHANT,
                currency="USD",
            ),
        )
    )


async def _plant_around_write_path(engine: AsyncEngine, txn: LedgerTransaction) -> None:
    """A posting written straight into the tables, past every check of the ledger's `post`."""
    async with engine.begin() as conn:
        txn_id = uuid.uuid4()
        await conn.execute(
            text(
                "INSERT INTO ledger_transactions (id, payment_id, kind, reference, description,"
                " created_at) VALUES (:id, :p, :k, :r, :d, now())"
            ),
            {
                "id": txn_id,
                "p": txn.payment_id,
                "k": txn.kind.value,
                "r": txn.reference,
                "d": txn.description,
            },
        )
        for entry in txn.entries:
            await conn.execute(
                text(
                    "INSERT INTO ledger_entries (transaction_id, account_id, amount, currency)"
                    " SELECT :t, id, :a, :c FROM accounts WHERE code = :code"
                ),
                {
                    "t": txn_id,
                    "a": entry.amount,
                    "c": entry.account.currency,
                    "code": entry.account.code,
                },
            )


async def test_holds_released_twice_over_captured_or_outliving_their_payment_are_caught(
    planted: Planted, app_settings: Settings, engine: AsyncEngine, temporal_client: Client
) -> None:
    """Each hold posted through the ledger's own write path; the saga never writes these."""
    fine, both, over, kept = (_fake_payment_id() for _ in range(4))
    planted.payment_ids.update({fine, both, over, kept})
    for payment_id, captured in ((fine, 1000), (both, 1000), (over, 1500)):
        customer = f"cus_{payment_id[4:14]}"
        await _post(engine, authorization_hold_transaction(payment_id, customer, 1000, "USD"), 1000)
        await _post(
            engine,
            hold_released_transaction(payment_id, customer, 1000, "USD", captured=True),
            1000,
        )
        await _post(
            engine,
            payment_transaction(payment_id, Parties(customer, FAKE_MERCHANT, "USD"), captured),
            captured,
        )
    # The ledger's write path refuses a second release (HoldAlreadyReleased): a row written
    # around it (a bad migration, a hand edit) is what the checker is still there to catch.
    customer = f"cus_{both[4:14]}"
    await _plant_around_write_path(
        engine, hold_released_transaction(both, customer, 1000, "USD", captured=False)
    )
    customer = f"cus_{kept[4:14]}"
    await _post(engine, authorization_hold_transaction(kept, customer, 700, "USD"), 700)
    await Ledger(engine).record_outcome(
        PaymentOutcome(
            payment_id=kept,
            parties=PaymentParties(
                client_id="test-client",
                customer_id=customer,
                merchant_id=FAKE_MERCHANT,
                currency="USD",
            ),
            amount=700,
            status=PaymentStatus.CANCELED,
            summary={},
        )
    )

    report = await _check(app_settings, engine, temporal_client, {fine, both, over, kept})
    holds = report.result(HOLDS_RELEASED)
    assert holds.checked == 4
    assert not any(v.payment_id == fine for v in holds.examples), holds.examples
    assert _flagged(report, HOLDS_RELEASED, both, "both captured and voided")
    assert _flagged(report, HOLDS_RELEASED, over, "captured 1500 of the 1000 held")
    assert _flagged(report, HOLDS_RELEASED, kept, "canceled but its hold of 700 was never")
    assert holds.violation_count == 3
