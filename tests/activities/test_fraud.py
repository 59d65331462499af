"""Fraud scoring: the rules on their own, the customer's history read from the real payments
register, the activity (also through a real Temporal worker) and the optional HTTP sidecar."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import workflow
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.fraud import FraudActivities, FraudCheck
from domain.errors import FailureType
from domain.fraud import CustomerHistory, amount_for_limit_share, score_payment
from domain.ledger import Parties, payment_transaction, reversal_transaction
from domain.money import CURRENCIES
from domain.payment import FraudAssessment, PaymentRequest
from infra.embedded.process import free_port
from infra.embedded.stack import Stack
from ledger.customer_history import load_customer_history
from ledger.records import LedgerPosting, PaymentParties
from ledger.store import Ledger
from ledger.tables import payments
from settings import Settings

# The documented default band edges; test_default_thresholds_are_the_documented_ones pins them.
REVIEW, REJECT = 0.70, 0.95
TOKEN = "pm_card_visa_0001"
CLIENT = "test"


def _request(amount: int = 2_500, ccy: str = "USD", customer: str = "cus_1") -> PaymentRequest:
    return PaymentRequest(
        amount=amount,
        currency=ccy,
        customer_id=customer,
        merchant_id="mer_1",
        payment_method=TOKEN,
        description="order 17",
    )


def _returning(**overrides: Any) -> CustomerHistory:
    """An established, calm USD customer: no rule fires for a typical payment."""
    values: dict[str, Any] = {
        "payments_total": 20,
        "payments_last_hour": 0,
        "average_amount_same_currency": 2_000,
        "max_amount_same_currency": 5_000,
        "currencies_used": ["USD"],
    }
    return CustomerHistory(**(values | overrides))


def _settings(**overrides: Any) -> Settings:
    # Explicit values: a developer's PAYSAGA_* environment must not change the outcome.
    values: dict[str, Any] = {
        "fraud_review_threshold": REVIEW,
        "fraud_reject_threshold": REJECT,
        "fraud_sidecar_url": None,
        "fraud_sidecar_timeout_seconds": 0.2,
    }
    return Settings(**(values | overrides))


def _reasons(assessment: FraudAssessment) -> str:
    return " | ".join(assessment.reasons)


# --- The rules, pure


def test_default_thresholds_are_the_documented_ones() -> None:
    assert Settings.model_fields["fraud_review_threshold"].default == REVIEW
    assert Settings.model_fields["fraud_reject_threshold"].default == REJECT


def test_a_calm_returning_customer_scores_zero_with_no_reasons() -> None:
    assessment = score_payment(_request(2_500), _returning())
    assert assessment == FraudAssessment(score=0.0, reasons=[], scorer="rules")


def test_a_small_first_payment_is_approved_with_its_reason() -> None:
    assessment = score_payment(_request(2_500), CustomerHistory())
    assert assessment.score == pytest.approx(0.20)
    assert assessment.score < REVIEW
    assert assessment.reasons == ["first payment from this customer"]


@pytest.mark.parametrize("ccy", ["USD", "JPY", "BHD", "VND"])
@pytest.mark.parametrize("percent", [50, 65, 79])
def test_a_first_time_customer_paying_50_to_80_percent_of_the_limit_needs_review(
    ccy: str, percent: int
) -> None:
    amount = amount_for_limit_share(ccy, percent)
    assessment = score_payment(_request(amount, ccy), CustomerHistory())
    assert REVIEW <= assessment.score < REJECT
    assert any(f"{percent}% of the {ccy} per-payment limit" in r for r in assessment.reasons)


def test_the_review_band_ends_one_minor_unit_below_80_percent() -> None:
    just_below = amount_for_limit_share("USD", 80) - 1
    assert just_below * 100 < CURRENCIES["USD"].max_minor * 80
    assert REVIEW <= score_payment(_request(just_below), CustomerHistory()).score < REJECT
    below_half = amount_for_limit_share("USD", 50) - 1
    assert score_payment(_request(below_half), CustomerHistory()).score < REVIEW


@pytest.mark.parametrize("ccy", ["USD", "JPY", "BHD", "VND"])
def test_a_first_time_customer_paying_80_percent_or_more_of_the_limit_is_rejected(
    ccy: str,
) -> None:
    for amount in (amount_for_limit_share(ccy, 80), CURRENCIES[ccy].max_minor):
        assessment = score_payment(_request(amount, ccy), CustomerHistory())
        assert assessment.score >= REJECT
        assert assessment.score <= 1.0


def test_a_large_amount_the_customer_already_paid_before_is_not_flagged() -> None:
    amount = amount_for_limit_share("USD", 85)
    seasoned = _returning(average_amount_same_currency=amount, max_amount_same_currency=amount)
    assert score_payment(_request(amount), seasoned).score == 0.0
    # One minor unit more than ever before is new territory again.
    assessment = score_payment(_request(amount + 1), seasoned)
    assert assessment.score == pytest.approx(0.80)
    assert "more than the customer ever paid" in _reasons(assessment)


@pytest.mark.parametrize(
    ("amount", "expected"),
    [(9_998, 0.0), (10_000, 0.30), (19_999, 0.30), (20_000, 0.50), (24_000, 0.50)],
)
def test_amount_against_the_customers_average(amount: int, expected: float) -> None:
    assessment = score_payment(_request(amount), _returning(max_amount_same_currency=100_000))
    assert assessment.score == pytest.approx(expected)


def test_the_average_ratio_reason_reads_like_an_analyst_would_write_it() -> None:
    assessment = score_payment(_request(24_000), _returning(max_amount_same_currency=100_000))
    assert assessment.reasons == ["amount is 12.0x the customer's average USD payment (20.00 USD)"]


@pytest.mark.parametrize(("last_hour", "expected"), [(4, 0.0), (5, 0.30), (9, 0.30), (10, 0.60)])
def test_velocity_in_the_last_hour(last_hour: int, expected: float) -> None:
    assessment = score_payment(_request(), _returning(payments_last_hour=last_hour))
    assert assessment.score == pytest.approx(expected)
    if expected:
        assert assessment.reasons == [f"{last_hour} payments from this customer in the last hour"]


def test_a_currency_the_customer_never_used_is_unusual() -> None:
    history = _returning(
        average_amount_same_currency=None,
        max_amount_same_currency=None,
        currencies_used=["EUR", "GBP"],
    )
    assessment = score_payment(_request(2_500, "USD"), history)
    assert assessment.score == pytest.approx(0.20)
    assert assessment.reasons == ["first payment in USD; the customer has paid in EUR, GBP before"]
    # A first-time customer has no habits to break: only the first-payment rule applies.
    assert score_payment(_request(2_500, "USD"), CustomerHistory()).reasons == [
        "first payment from this customer"
    ]


def test_rules_add_up_and_the_score_is_capped_at_one() -> None:
    everything = CustomerHistory(
        payments_total=0,  # first captured payment, yet busy and in another currency
        payments_last_hour=12,
        average_amount_same_currency=None,
        currencies_used=["EUR"],
    )
    assessment = score_payment(_request(amount_for_limit_share("USD", 90)), everything)
    assert assessment.score == 1.0
    assert len(assessment.reasons) == 4  # 0.2 + 0.6 + 0.2 + 0.8 would be 1.8
    moderate = _returning(
        payments_last_hour=5, currencies_used=["EUR"], average_amount_same_currency=None
    )
    assert score_payment(_request(), moderate).score == pytest.approx(0.30 + 0.20)


def test_scores_are_deterministic_and_always_within_zero_and_one() -> None:
    histories = [
        CustomerHistory(),
        _returning(),
        _returning(payments_last_hour=50, currencies_used=["EUR"]),
        _returning(average_amount_same_currency=1, max_amount_same_currency=1),
    ]
    for ccy in ("USD", "JPY", "KWD"):
        for percent in (1, 49, 50, 80, 100):
            request = _request(amount_for_limit_share(ccy, percent), ccy)
            for history in histories:
                first = score_payment(request, history)
                assert score_payment(request.model_copy(), history.model_copy()) == first
                assert 0.0 <= first.score <= 1.0
                assert first.scorer == "rules"
                assert TOKEN not in _reasons(first)


# --- History from the real payments register


def _customer() -> str:
    return f"cus_{uuid.uuid4().hex[:12]}"


async def _insert_payments(
    engine: AsyncEngine,
    customer_id: str,
    rows: list[tuple[int, str, timedelta]],
    *,
    captured: bool = True,
    client_id: str = CLIENT,
) -> None:
    """Register rows as the ledger leaves them: (amount, currency, age)."""
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        await conn.execute(
            payments.insert(),
            [
                {
                    "payment_id": f"pay_{uuid.uuid4().hex[:24]}",
                    "client_id": client_id,
                    "customer_id": customer_id,
                    "merchant_id": "mer_1",
                    "currency": ccy,
                    "amount": amount,
                    "captured": amount if captured else 0,
                    "status": "succeeded" if captured else "canceled",
                    "created_at": now - age,
                    "updated_at": now - age,
                }
                for amount, ccy, age in rows
            ],
        )


async def test_a_customer_without_payments_has_an_empty_history(engine: AsyncEngine) -> None:
    customer = _customer()
    # Someone else's busy history must not leak into this customer's.
    await _insert_payments(engine, _customer(), [(1_000, "USD", timedelta(minutes=1))] * 6)
    history = await load_customer_history(engine, CLIENT, customer, "USD")
    assert history == CustomerHistory()
    assert (
        "first payment from this customer"
        in score_payment(_request(customer=customer), history).reasons
    )


async def test_another_clients_customer_with_the_same_id_is_another_customer(
    engine: AsyncEngine,
) -> None:
    """Customer ids are chosen by each API client: client B's `cus_1` is not client A's, so
    B's busy history neither shows in A's fraud reasons nor raises A's score."""
    customer = _customer()
    await _insert_payments(
        engine, customer, [(1_000, "USD", timedelta(minutes=1))] * 12, client_id="tenant-b"
    )

    mine = await load_customer_history(engine, "tenant-a", customer, "USD")
    theirs = await load_customer_history(engine, "tenant-b", customer, "USD")

    assert mine == CustomerHistory()
    assert (theirs.payments_total, theirs.payments_last_hour) == (12, 12)
    assessment = score_payment(_request(1_000, customer=customer), mine)
    assert assessment.reasons == ["first payment from this customer"]
    # Before tenants, the same lookup saw B's twelve payments as this customer's velocity.
    assert score_payment(_request(1_000, customer=customer), theirs).score == pytest.approx(0.60)


def test_an_activity_task_scheduled_before_tenants_still_decodes() -> None:
    """A payment in flight across the upgrade may hand the activity the bare request it was
    scheduled with: the worker reads it as a check without a client (looked up as before)."""
    request = _request()
    [payload] = pydantic_data_converter.payload_converter.to_payloads([request])
    [check] = pydantic_data_converter.payload_converter.from_payloads([payload], [FraudCheck])
    assert check == FraudCheck(client_id=None, request=request)


async def test_captures_posted_through_the_ledger_make_a_returning_customer(
    engine: AsyncEngine,
) -> None:
    customer = _customer()
    ledger = Ledger(engine)
    parties = PaymentParties(
        client_id=CLIENT, customer_id=customer, merchant_id="mer_1", currency="USD"
    )
    captured_ids = [f"pay_{uuid.uuid4().hex[:24]}" for _ in range(3)]
    for payment_id, amount in zip(captured_ids, (1_000, 2_000, 3_300), strict=True):
        txn = payment_transaction(payment_id, Parties(customer, "mer_1", "USD"), amount)
        await ledger.post(LedgerPosting(transaction=txn, amount=amount, parties=parties))
    # A capture reversed before confirmation moved no money: not part of the averages.
    reversed_id = f"pay_{uuid.uuid4().hex[:24]}"
    for txn in (
        payment_transaction(reversed_id, Parties(customer, "mer_1", "USD"), 90_000),
        reversal_transaction(reversed_id, Parties(customer, "mer_1", "USD"), 90_000),
    ):
        await ledger.post(LedgerPosting(transaction=txn, amount=90_000, parties=parties))

    history = await load_customer_history(engine, CLIENT, customer, "USD")

    assert history.payments_total == 3
    assert history.average_amount_same_currency == 2_100  # 6_300 // 3
    assert history.max_amount_same_currency == 3_300
    assert history.currencies_used == ["USD"]
    assert history.payments_last_hour == 4  # velocity counts the reversed attempt too
    assessment = score_payment(_request(2_500, customer=customer), history)
    assert assessment.score == 0.0, assessment.reasons


async def test_velocity_counts_only_the_last_hour(engine: AsyncEngine) -> None:
    customer = _customer()
    await _insert_payments(
        engine, customer, [(1_000, "USD", timedelta(minutes=m)) for m in range(1, 7)]
    )
    await _insert_payments(
        engine, customer, [(1_000, "USD", timedelta(hours=2, minutes=m)) for m in range(3)]
    )

    history = await load_customer_history(engine, CLIENT, customer, "USD")

    assert (history.payments_total, history.payments_last_hour) == (9, 6)
    assessment = score_payment(_request(1_000, customer=customer), history)
    assert assessment.score == pytest.approx(0.30)
    assert assessment.reasons == ["6 payments from this customer in the last hour"]


async def test_an_amount_far_above_the_customers_history(engine: AsyncEngine) -> None:
    customer = _customer()
    old = timedelta(days=3)
    await _insert_payments(
        engine, customer, [(1_000, "USD", old), (2_000, "USD", old), (3_000, "USD", old)]
    )
    # Payments in another currency do not move the USD average.
    await _insert_payments(engine, customer, [(900_000, "JPY", old)])

    history = await load_customer_history(engine, CLIENT, customer, "USD")

    assert history.average_amount_same_currency == 2_000
    assert history.max_amount_same_currency == 3_000
    assessment = score_payment(_request(24_000, customer=customer), history)
    assert assessment.score == pytest.approx(0.50)
    assert assessment.reasons == ["amount is 12.0x the customer's average USD payment (20.00 USD)"]


async def test_a_first_payment_in_a_new_currency_is_unusual(engine: AsyncEngine) -> None:
    customer = _customer()
    await _insert_payments(
        engine, customer, [(5_000, "GBP", timedelta(days=9)), (4_000, "EUR", timedelta(days=2))]
    )

    history = await load_customer_history(engine, CLIENT, customer, "USD")

    assert history.currencies_used == ["EUR", "GBP"]
    assert history.average_amount_same_currency is None
    assert history.max_amount_same_currency is None
    assessment = score_payment(_request(3_000, "USD", customer=customer), history)
    assert assessment.score == pytest.approx(0.20)
    assert assessment.reasons == ["first payment in USD; the customer has paid in EUR, GBP before"]


# --- The activity


async def test_the_activity_scores_with_the_customers_history(engine: AsyncEngine) -> None:
    customer = _customer()
    await _insert_payments(engine, customer, [(1_000, "USD", timedelta(minutes=5))] * 10)
    activities = FraudActivities(engine, _settings())

    assessment = await ActivityEnvironment().run(
        activities.assess_payment,
        FraudCheck(client_id=CLIENT, request=_request(20_000, customer=customer)),
    )

    # 10 payments in the last hour (0.6) and 20x the average (0.5): capped, rejected.
    assert assessment.score == 1.0
    assert assessment.scorer == "rules"
    assert len(assessment.reasons) == 2


async def test_the_activity_refuses_an_invalid_request_for_good(engine: AsyncEngine) -> None:
    activities = FraudActivities(engine, _settings())
    valid = _request()
    invalid = [
        valid.model_copy(update={"amount": 0}),
        valid.model_copy(update={"amount": CURRENCIES["USD"].max_minor + 1}),
        valid.model_copy(update={"currency": "XXX"}),
        valid.model_copy(update={"payment_method": "4242424242424242"}),
        valid.model_copy(update={"merchant_id": ""}),
    ]
    for request in invalid:
        with pytest.raises(ApplicationError) as caught:
            await ActivityEnvironment().run(
                activities.assess_payment,
                FraudCheck.model_construct(client_id=CLIENT, request=request),
            )
        assert caught.value.type == FailureType.INVALID_PAYMENT.value
        assert caught.value.non_retryable
        assert "4242424242424242" not in str(caught.value)
        assert caught.value.__cause__ is None


@workflow.defn(sandboxed=False)
class AssessOnlyWorkflow:
    @workflow.run
    async def run(self, check: FraudCheck) -> FraudAssessment:
        return await workflow.execute_activity_method(
            FraudActivities.assess_payment,
            check,
            start_to_close_timeout=timedelta(seconds=10),
        )


async def test_a_real_worker_runs_the_assessment(stack: Stack, engine: AsyncEngine) -> None:
    client = await Client.connect(stack.temporal_address, data_converter=pydantic_data_converter)
    activities = FraudActivities(engine, _settings())
    queue = f"fraud-{uuid.uuid4()}"
    request = _request(amount_for_limit_share("EUR", 80), "EUR", customer=_customer())
    async with Worker(
        client,
        task_queue=queue,
        workflows=[AssessOnlyWorkflow],
        activities=[activities.assess_payment],
    ):
        assessment = await client.execute_workflow(
            AssessOnlyWorkflow.run,
            FraudCheck(client_id=CLIENT, request=request),
            id=f"wf-{uuid.uuid4()}",
            task_queue=queue,
        )
    assert isinstance(assessment, FraudAssessment)
    assert assessment.score >= REJECT
    assert assessment.reasons[0] == "first payment from this customer"


# --- The scoring sidecar: a real HTTP server on 127.0.0.1


@dataclass
class _Sidecar:
    status: int = 200
    body: bytes = b'{"score": 0.42, "reasons": ["model v7: merchant risk"]}'
    delay: float = 0.0
    received: list[bytes] = field(default_factory=list)
    url: str = ""


@pytest.fixture
def sidecar() -> Iterator[_Sidecar]:
    state = _Sidecar()
    release = threading.Event()  # ends a scripted delay at teardown

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            state.received.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if state.delay and release.wait(state.delay):
                return
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(state.body)))
            self.end_headers()
            self.wfile.write(state.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/score"
    try:
        yield state
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def _assess_with_sidecar(
    engine: AsyncEngine, url: str, request: PaymentRequest
) -> FraudAssessment:
    activities = FraudActivities(engine, _settings(fraud_sidecar_url=url))
    try:
        check = FraudCheck(client_id=CLIENT, request=request)
        return await ActivityEnvironment().run(activities.assess_payment, check)
    finally:
        await activities.aclose()


async def test_a_configured_sidecar_replaces_the_rules(
    engine: AsyncEngine, sidecar: _Sidecar
) -> None:
    request = _request(amount_for_limit_share("USD", 90), customer=_customer())

    assessment = await _assess_with_sidecar(engine, sidecar.url, request)

    # The rules would reject this first payment outright; the sidecar's word counts.
    assert assessment.model_copy(update={"elapsed_ms": None}) == FraudAssessment(
        score=0.42, reasons=["model v7: merchant risk"], scorer="sidecar"
    )
    [body] = sidecar.received
    assert TOKEN.encode() not in body
    sent = json.loads(body)
    assert sent["client_id"] == CLIENT  # a sidecar keying customers keys them per client
    assert "payment_method" not in sent["request"]
    assert sent["request"]["amount"] == request.amount
    assert sent["request"]["customer_id"] == request.customer_id
    assert sent["history"] == CustomerHistory().model_dump(mode="json")


@pytest.mark.parametrize(
    ("status", "body", "why"),
    [
        (200, b"<html>oops</html>", "invalid answer"),
        (200, b'{"score": 1.7, "reasons": []}', "invalid answer (score:"),
        (200, b'{"score": "0.1", "reasons": []}', "invalid answer (score:"),
        (200, b'{"score": 0.1}', "invalid answer (reasons:"),
        (503, b'{"error": "overloaded"}', "answered 503"),
    ],
)
async def test_a_sidecar_answering_nonsense_falls_back_to_the_rules(
    engine: AsyncEngine, sidecar: _Sidecar, status: int, body: bytes, why: str
) -> None:
    sidecar.status, sidecar.body = status, body
    request = _request(amount_for_limit_share("USD", 90), customer=_customer())

    assessment = await _assess_with_sidecar(engine, sidecar.url, request)

    assert assessment.scorer == "rules"
    assert assessment.score >= REJECT  # the rules still stop a first-time 90%-of-limit payment
    assert assessment.reasons[-1].startswith(f"sidecar unavailable: {why}")
    assert len(sidecar.received) == 1


async def test_a_slow_sidecar_falls_back_to_the_rules(
    engine: AsyncEngine, sidecar: _Sidecar
) -> None:
    sidecar.delay = 5.0
    assessment = await _assess_with_sidecar(engine, sidecar.url, _request(customer=_customer()))
    assert assessment.scorer == "rules"
    assert assessment.reasons == [
        "first payment from this customer",
        "sidecar unavailable: no answer within 0.2s",
    ]


async def test_a_sidecar_that_is_down_falls_back_to_the_rules(engine: AsyncEngine) -> None:
    nobody_listens = f"http://127.0.0.1:{free_port()}/score"
    assessment = await _assess_with_sidecar(engine, nobody_listens, _request(customer=_customer()))
    assert assessment.scorer == "rules"
    assert assessment.score == pytest.approx(0.20)
    assert assessment.reasons[-1] == "sidecar unavailable: ConnectError"
    assert nobody_listens not in _reasons(assessment)
