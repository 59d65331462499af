"""The acquirer boundary: the sandbox acquirer as its own process on a real socket, driven through
the HTTP connector and the Temporal activities (in the SDK's activity context).

Where the far side must misbehave in ways the sandbox does not (drop the connection after reading
the request, answer 429 or garbage), a raw local TCP server stands in for it."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.acquirer import (
    ACQUIRER_OUTCOME_UNKNOWN,
    ACQUIRER_UNAVAILABLE,
    AcquirerActivities,
    AcquirerNotReached,
    AcquirerOutcomeUnknown,
    AcquirerRejected,
    HttpAcquirer,
)
from domain.acquirer import (
    AcquirerAuthorization,
    AcquirerRefundRequest,
    AuthorizationOutcome,
    AuthorizationRequest,
    AuthorizationResult,
    AuthorizationState,
    CaptureRequest,
    CaptureResult,
    DeclineCode,
    RefundResult,
    VoidRequest,
    VoidResult,
)
from domain.cards import luhn_valid
from domain.errors import FailureType
from domain.payment import PaymentRequest
from infra.embedded.process import ManagedProcess, free_port, wait_until
from sandboxes.acquirer import (
    API_KEY_ENV,
    DATABASE_FILE,
    DEFAULT_API_KEY,
    DEFAULT_FEE_BASIS_POINTS,
    DEFAULT_FEE_FIXED_MINOR,
    capture_fee,
    command,
)
from sandboxes.acquirer_store import AcquirerStore
from sandboxes.payment_methods import TEST_PAYMENT_METHODS, Behaviour
from settings import Settings
from tests.helpers.paths import REPO

API_KEY = "sk_test_i15_configured_key_5c1f"
HANG_SECONDS = 4.0  # pm_card_timeout holds its first answers this long ...
IMPATIENT_SECONDS = 0.5  # ... and the impatient client gives up after this
DELAY_SECONDS = 0.6  # pm_card_approve_after_delay
DOCS = REPO / "docs" / "acquirer.md"
DECLINING = [m for m in TEST_PAYMENT_METHODS if m.behaviour is Behaviour.DECLINE]


class SandboxProcess:
    """`python -m sandboxes.acquirer` in its own process, on a free port."""

    def __init__(self, data_dir: Path, api_key: str | None) -> None:
        self.data_dir = data_dir
        self.api_key = api_key or DEFAULT_API_KEY
        self._env = dict(os.environ)
        self._env.pop(API_KEY_ENV, None)
        if api_key is not None:
            self._env[API_KEY_ENV] = api_key
        self.process: ManagedProcess | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        argv = command(
            "127.0.0.1",
            port,
            self.data_dir,
            delay_seconds=DELAY_SECONDS,
            hang_seconds=HANG_SECONDS,
        )
        log = self.data_dir / "sandbox.log"
        self.process = ManagedProcess("sandbox acquirer", argv, log, env=self._env)
        self.process.start()
        process = self.process
        wait_until(lambda: process.alive_or_raise() and self._healthy(), "sandbox", 30, log)

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def operations(self, reference: str) -> list[dict[str, Any]]:
        answer = httpx.get(
            f"{self.url}/v1/operations",
            params={"reference": reference},
            headers={"Authorization": f"Bearer {self.api_key}"},
        )
        assert answer.status_code == 200, answer.text
        return list(reversed(answer.json()["data"]))

    def connector(self, timeout: float = 5.0, api_key: str | None = None) -> HttpAcquirer:
        key = self.api_key if api_key is None else api_key
        return HttpAcquirer(
            self.url, SecretStr(key), timeout_seconds=timeout, connect_timeout_seconds=1.0
        )

    def settings(self, **overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "acquirer_url": self.url,
            "acquirer_api_key": self.api_key,
            "acquirer_timeout_seconds": 5.0,
            "acquirer_connect_timeout_seconds": 1.0,
        }
        fields.update(overrides)
        return Settings(**fields)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SandboxProcess]:
    server = SandboxProcess(tmp_path_factory.mktemp("acquirer"), API_KEY)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def acquirer(sandbox: SandboxProcess) -> AsyncIterator[HttpAcquirer]:
    connector = sandbox.connector()
    yield connector
    await connector.aclose()


@pytest.fixture
async def impatient(sandbox: SandboxProcess) -> AsyncIterator[HttpAcquirer]:
    """A client whose timeout is far shorter than pm_card_timeout's hang."""
    connector = sandbox.connector(timeout=IMPATIENT_SECONDS)
    yield connector
    await connector.aclose()


def _ref(prefix: str = "pay") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def _authorization(
    payment_method: str = "pm_card_visa", amount: int = 10_000, currency: str = "USD"
) -> AuthorizationRequest:
    return AuthorizationRequest(
        reference=_ref(), amount=amount, currency=currency, payment_method=payment_method
    )


def _refund(auth: AuthorizationRequest, amount: int) -> AcquirerRefundRequest:
    return AcquirerRefundRequest(
        reference=auth.reference, refund_reference=_ref("re"), amount=amount, currency=auth.currency
    )


def _performed(operations: list[dict[str, Any]], operation: str) -> list[dict[str, Any]]:
    """Operations that changed something: answered 200 and were not replays."""
    return [
        o
        for o in operations
        if o["operation"] == operation
        and o["http_status"] == 200
        and not o["result"].startswith("replayed")
    ]


# --- the test payment methods


def test_every_test_payment_method_is_a_valid_token_and_documented() -> None:
    docs = DOCS.read_text()
    for method in TEST_PAYMENT_METHODS:
        PaymentRequest.model_validate(
            {
                "amount": 100,
                "currency": "USD",
                "customer_id": "cus_1",
                "merchant_id": "mer_1",
                "payment_method": method.token,
            }
        )
        assert f"`{method.token}`" in docs, f"{method.token} is missing from docs/acquirer.md"


async def test_a_known_approving_token_and_any_unknown_token_approve_in_full(
    acquirer: HttpAcquirer,
) -> None:
    for token in ("pm_card_visa", "pm_card_visa_0001", "pm_anything_at_all_42"):
        request = _authorization(token, amount=2_500)
        result = await acquirer.authorize(request)
        assert result.outcome is AuthorizationOutcome.APPROVED
        assert (result.authorized_amount, result.requested_amount) == (2_500, 2_500)
        assert result.acquirer_reference.startswith("acq_")
        assert result.decline_code is None


async def test_an_id_holding_a_luhn_valid_digit_run_is_not_mistaken_for_a_card_number(
    acquirer: HttpAcquirer,
) -> None:
    # A real payment id shape whose 18-digit run passes Luhn: one in a few hundred of ours do.
    reference = "pay_226027147195490890f969c4"
    assert luhn_valid("226027147195490890")
    request = AuthorizationRequest(
        reference=reference,
        amount=100,
        currency="USD",
        payment_method="pm_card_visa",
    )
    assert (await acquirer.authorize(request)).approved


@pytest.mark.parametrize("method", DECLINING, ids=[m.token for m in DECLINING])
async def test_each_declining_token_declines_with_its_network_code(
    acquirer: HttpAcquirer, sandbox: SandboxProcess, method: Any
) -> None:
    request = _authorization(method.token)
    result = await acquirer.authorize(request)
    assert result.outcome is AuthorizationOutcome.DECLINED
    assert not result.approved
    assert result.authorized_amount == 0
    assert result.acquirer_decline_code == method.decline_code
    # Codes paysaga knows keep their name; the one it does not arrives as generic_decline.
    assert result.decline_code is DeclineCode.from_acquirer(method.decline_code)
    if method.decline_code == "restricted_card":
        assert result.decline_code is DeclineCode.GENERIC_DECLINE
    else:
        assert result.decline_code.value == method.decline_code
    # A retry of a declined reference is the same answer, never a second attempt.
    assert await acquirer.authorize(request) == result
    record = await acquirer.status(request.reference)
    assert record is not None and record.state is AuthorizationState.DECLINED
    assert len(_performed(sandbox.operations(request.reference), "authorize")) == 1
    # Nothing is held, so nothing can be captured.
    with pytest.raises(AcquirerRejected) as refused:
        await acquirer.capture(CaptureRequest(reference=request.reference, currency="USD"))
    assert refused.value.code == "authorization_declined"


def test_soft_and_hard_declines() -> None:
    assert DeclineCode.INSUFFICIENT_FUNDS.retry_may_succeed
    assert DeclineCode.CARD_VELOCITY_EXCEEDED.retry_may_succeed
    assert not DeclineCode.LOST_CARD.retry_may_succeed
    assert not DeclineCode.STOLEN_CARD.retry_may_succeed
    assert not DeclineCode.EXPIRED_CARD.retry_may_succeed


async def test_partial_approval_authorizes_half_and_only_that_can_be_captured(
    acquirer: HttpAcquirer,
) -> None:
    request = _authorization("pm_card_partial_approval", amount=1_001)
    result = await acquirer.authorize(request)
    assert result.outcome is AuthorizationOutcome.PARTIALLY_APPROVED
    assert result.approved
    assert (result.requested_amount, result.authorized_amount) == (1_001, 500)
    with pytest.raises(AcquirerRejected) as refused:
        await acquirer.capture(
            CaptureRequest(reference=request.reference, amount=501, currency="USD")
        )
    assert refused.value.code == "amount_exceeds_authorized"
    captured = await acquirer.capture(CaptureRequest(reference=request.reference, currency="USD"))
    assert (captured.captured_amount, captured.released_amount) == (500, 0)


async def test_approve_after_delay_answers_once_the_delay_has_passed(
    acquirer: HttpAcquirer,
) -> None:
    started = time.monotonic()
    result = await acquirer.authorize(_authorization("pm_card_approve_after_delay"))
    assert time.monotonic() - started >= DELAY_SECONDS
    assert result.outcome is AuthorizationOutcome.APPROVED


async def test_a_client_that_gives_up_during_the_delay_retries_into_one_authorization(
    impatient: HttpAcquirer, acquirer: HttpAcquirer, sandbox: SandboxProcess
) -> None:
    request = _authorization("pm_card_approve_after_delay")
    with pytest.raises(AcquirerOutcomeUnknown):
        await asyncio.wait_for(impatient.authorize(request), 5)
    # The abandoned request is still being decided; the retry races it, same reference.
    result = await acquirer.authorize(request)
    await asyncio.sleep(DELAY_SECONDS * 2)  # let the abandoned request finish too
    record = await acquirer.status(request.reference)
    assert record is not None and record.acquirer_reference == result.acquirer_reference
    assert len(_performed(sandbox.operations(request.reference), "authorize")) == 1


async def test_a_timeout_is_ambiguous_the_authorization_happened_and_a_retry_never_repeats_it(
    impatient: HttpAcquirer, acquirer: HttpAcquirer, sandbox: SandboxProcess
) -> None:
    request = _authorization("pm_card_timeout", amount=4_200)
    with pytest.raises(AcquirerOutcomeUnknown, match="no answer within"):
        await impatient.authorize(request)
    # The truth: it was authorized.
    record = await acquirer.status(request.reference)
    assert record is not None
    assert record.state is AuthorizationState.AUTHORIZED
    assert record.authorized_amount == 4_200
    # Retrying with the same reference answers at once with that same authorization.
    started = time.monotonic()
    retried = await impatient.authorize(request)
    assert time.monotonic() - started < HANG_SECONDS
    assert retried.acquirer_reference == record.acquirer_reference
    assert retried.outcome is AuthorizationOutcome.APPROVED
    for _ in range(3):
        await acquirer.authorize(request)
    operations = sandbox.operations(request.reference)
    assert len(_performed(operations, "authorize")) == 1
    assert sum(o["result"].startswith("replayed") for o in operations) == 4

    # Capture times out the same way: it happened; status says so; the retry replays it.
    capture = CaptureRequest(reference=request.reference, amount=4_000, currency="USD")
    with pytest.raises(AcquirerOutcomeUnknown):
        await impatient.capture(capture)
    record = await acquirer.status(request.reference)
    assert record is not None and record.state is AuthorizationState.CAPTURED
    assert (record.captured_amount, record.released_amount) == (4_000, 200)
    assert (await impatient.capture(capture)) == record.capture_result()
    assert len(_performed(sandbox.operations(request.reference), "capture")) == 1


async def test_error_once_fails_each_operation_once_without_doing_it(
    acquirer: HttpAcquirer, sandbox: SandboxProcess
) -> None:
    request = _authorization("pm_card_error_once", amount=9_000)
    with pytest.raises(AcquirerOutcomeUnknown, match="answered 500"):
        await acquirer.authorize(request)
    assert await acquirer.status(request.reference) is None  # definitely not authorized
    authorized = await acquirer.authorize(request)
    assert authorized.outcome is AuthorizationOutcome.APPROVED

    capture = CaptureRequest(reference=request.reference, amount=6_000, currency="USD")
    with pytest.raises(AcquirerOutcomeUnknown):
        await acquirer.capture(capture)
    record = await acquirer.status(request.reference)
    assert record is not None and record.state is AuthorizationState.AUTHORIZED
    assert (await acquirer.capture(capture)).captured_amount == 6_000

    refund = _refund(request, 1_000)
    with pytest.raises(AcquirerOutcomeUnknown):
        await acquirer.refund(refund)
    record = await acquirer.status(request.reference)
    assert record is not None and record.refund(refund.refund_reference) is None
    refunded = await acquirer.refund(refund)
    assert refunded.amount == 1_000
    record = await acquirer.status(request.reference)
    assert record is not None and record.refunds == (refunded,)

    voidable = _authorization("pm_card_error_once")
    await _succeed_after_one_fault(acquirer.authorize(voidable), acquirer.authorize(voidable))
    with pytest.raises(AcquirerOutcomeUnknown):
        await acquirer.void(VoidRequest(reference=voidable.reference))
    voided = await acquirer.void(VoidRequest(reference=voidable.reference))
    assert voided.released_amount == voidable.amount


async def _succeed_after_one_fault(first: Any, second: Any) -> Any:
    with pytest.raises(AcquirerOutcomeUnknown):
        await first
    return await second


# --- the lifecycle


async def test_partial_capture_captures_once_and_releases_the_rest(
    acquirer: HttpAcquirer, sandbox: SandboxProcess
) -> None:
    request = _authorization(amount=10_000)
    await acquirer.authorize(request)
    capture = CaptureRequest(reference=request.reference, amount=2_500, currency="USD")
    captured = await acquirer.capture(capture)
    assert (captured.captured_amount, captured.released_amount) == (2_500, 7_500)
    assert captured.acquirer_capture_reference.startswith("cap_")
    assert await acquirer.capture(capture) == captured  # idempotent
    with pytest.raises(AcquirerRejected) as second:
        await acquirer.capture(CaptureRequest(reference=request.reference, currency="USD"))
    assert second.value.code == "already_captured"
    with pytest.raises(AcquirerRejected) as void:
        await acquirer.void(VoidRequest(reference=request.reference))
    assert void.value.code == "already_captured"
    record = await acquirer.status(request.reference)
    assert record is not None
    assert (record.authorized_amount, record.captured_amount, record.released_amount) == (
        10_000,
        2_500,
        7_500,
    )
    assert record.refundable_amount == 2_500
    assert len(_performed(sandbox.operations(request.reference), "capture")) == 1


async def test_a_capture_in_another_currency_is_refused(acquirer: HttpAcquirer) -> None:
    request = _authorization(currency="EUR")
    await acquirer.authorize(request)
    with pytest.raises(AcquirerRejected) as refused:
        await acquirer.capture(CaptureRequest(reference=request.reference, currency="USD"))
    assert refused.value.code == "currency_mismatch"
    captured = await acquirer.capture(CaptureRequest(reference=request.reference, currency="EUR"))
    assert (captured.currency, captured.captured_amount) == ("EUR", request.amount)


async def test_void_releases_the_whole_hold_and_nothing_can_be_captured_after(
    acquirer: HttpAcquirer,
) -> None:
    request = _authorization(amount=7_700)
    await acquirer.authorize(request)
    voided = await acquirer.void(VoidRequest(reference=request.reference))
    assert voided.released_amount == 7_700
    assert await acquirer.void(VoidRequest(reference=request.reference)) == voided  # idempotent
    with pytest.raises(AcquirerRejected) as refused:
        await acquirer.capture(CaptureRequest(reference=request.reference, currency="USD"))
    assert refused.value.code == "authorization_voided"
    record = await acquirer.status(request.reference)
    assert record is not None and record.state is AuthorizationState.VOIDED
    assert (record.captured_amount, record.released_amount) == (0, 7_700)
    with pytest.raises(AcquirerRejected) as refund:
        await acquirer.refund(_refund(request, 100))
    assert refund.value.code == "not_captured"


async def test_refunds_never_exceed_what_was_captured(
    acquirer: HttpAcquirer, sandbox: SandboxProcess
) -> None:
    request = _authorization(amount=8_000)
    await acquirer.authorize(request)
    with pytest.raises(AcquirerRejected) as uncaptured:
        await acquirer.refund(_refund(request, 100))
    assert uncaptured.value.code == "not_captured"
    await acquirer.capture(
        CaptureRequest(reference=request.reference, amount=5_000, currency="USD")
    )

    first = _refund(request, 3_000)
    assert (await acquirer.refund(first)).amount == 3_000
    with pytest.raises(AcquirerRejected) as too_much:
        await acquirer.refund(_refund(request, 2_001))
    assert too_much.value.code == "refund_exceeds_captured"
    last = _refund(request, 2_000)
    refunded = await acquirer.refund(last)
    assert refunded.acquirer_refund_reference.startswith("rfd_")
    # Retrying a refund returns it again; reusing its reference for another amount is refused.
    assert await acquirer.refund(last) == refunded
    with pytest.raises(AcquirerRejected) as conflict:
        await acquirer.refund(last.model_copy(update={"amount": 1}))
    assert conflict.value.code == "idempotency_conflict"
    with pytest.raises(AcquirerRejected) as nothing_left:
        await acquirer.refund(_refund(request, 1))
    assert nothing_left.value.code == "refund_exceeds_captured"

    record = await acquirer.status(request.reference)
    assert record is not None
    assert record.refunded_amount == record.captured_amount == 5_000
    assert sorted(r.amount for r in record.refunds) == [2_000, 3_000]
    assert len(_performed(sandbox.operations(request.reference), "refund")) == 2


async def test_a_reference_reused_for_another_authorization_is_refused(
    acquirer: HttpAcquirer,
) -> None:
    request = _authorization(amount=1_000)
    first = await acquirer.authorize(request)
    for changed in ({"amount": 1_001}, {"currency": "EUR"}, {"payment_method": "pm_card_other_1"}):
        with pytest.raises(AcquirerRejected) as refused:
            await acquirer.authorize(request.model_copy(update=changed))
        assert refused.value.code == "idempotency_conflict"
    record = await acquirer.status(request.reference)
    assert record is not None and record.authorization_result() == first


async def test_status_of_an_unknown_reference_is_none_and_instructions_on_it_are_refused(
    acquirer: HttpAcquirer,
) -> None:
    reference = _ref()
    assert await acquirer.status(reference) is None
    with pytest.raises(AcquirerRejected) as refused:
        await acquirer.void(VoidRequest(reference=reference))
    assert (refused.value.code, refused.value.http_status) == ("authorization_not_found", 404)


async def test_captures_and_refunds_are_recorded_for_settlement_with_their_fee(
    acquirer: HttpAcquirer, sandbox: SandboxProcess
) -> None:
    request = _authorization(amount=12_345, currency="JPY")
    authorized = await acquirer.authorize(request)
    captured = await acquirer.capture(
        CaptureRequest(reference=request.reference, amount=10_000, currency="JPY")
    )
    refund = await acquirer.refund(_refund(request, 2_500))
    store = AcquirerStore(sandbox.data_dir / DATABASE_FILE)
    try:
        movements = [m for m in store.movements() if m.reference == request.reference]
    finally:
        store.close()
    assert [(m.kind, m.amount, m.currency) for m in movements] == [
        ("capture", 10_000, "JPY"),
        ("refund", 2_500, "JPY"),
    ]
    capture_line, refund_line = movements
    assert capture_line.movement_reference == captured.acquirer_capture_reference
    assert capture_line.acquirer_reference == authorized.acquirer_reference
    assert capture_line.fee == DEFAULT_FEE_FIXED_MINOR + 150 == 170
    assert capture_line.occurred_at == captured.captured_at
    assert refund_line.movement_reference == refund.acquirer_refund_reference
    assert refund_line.refund_reference == refund.refund_reference
    assert refund_line.fee == 0


def test_the_capture_fee_rule() -> None:
    def fee(amount: int) -> int:
        return capture_fee(amount, fixed_minor=20, basis_points=150)

    assert (DEFAULT_FEE_FIXED_MINOR, DEFAULT_FEE_BASIS_POINTS) == (20, 150)
    assert fee(10_000) == 20 + 150
    assert fee(33) == 20  # 0.495 rounds down
    assert fee(34) == 21  # 0.51 rounds up
    assert fee(100) == 22  # exactly 1.5 rounds half up
    assert fee(5) == 5  # never more than the capture
    assert fee(2**62) == 20 + (2**62 * 150 + 5_000) // 10_000  # integers, no float rounding


# --- authentication, restarts, the page


async def test_without_the_key_nothing_is_done(
    sandbox: SandboxProcess, acquirer: HttpAcquirer
) -> None:
    request = _authorization()
    for wrong in ("sk_test_wrong", DEFAULT_API_KEY):
        intruder = sandbox.connector(api_key=wrong)
        try:
            with pytest.raises(AcquirerRejected, match="PAYSAGA_ACQUIRER_API_KEY") as refused:
                await intruder.authorize(request)
            assert (refused.value.code, refused.value.http_status) == (
                "authentication_failed",
                401,
            )
            assert wrong not in str(refused.value)
        finally:
            await intruder.aclose()
    async with httpx.AsyncClient() as http:
        bare = await http.post(f"{sandbox.url}/v1/authorizations", json=request.model_dump())
        assert bare.status_code == 401
        assert bare.headers["WWW-Authenticate"] == "Bearer"
        assert (
            await http.get(f"{sandbox.url}/v1/authorizations/{request.reference}")
        ).status_code == 401
    assert await acquirer.status(request.reference) is None


async def test_the_sandbox_keeps_its_state_across_a_restart(tmp_path: Path) -> None:
    server = SandboxProcess(tmp_path, api_key=None)  # the documented test key
    server.start()
    try:
        before = server.connector()
        request = _authorization(amount=6_000)
        await before.authorize(request)
        await before.capture(
            CaptureRequest(reference=request.reference, amount=5_000, currency="USD")
        )
        await before.refund(_refund(request, 1_200))
        flaky = _authorization("pm_card_error_once", amount=3_000)
        await _succeed_after_one_fault(before.authorize(flaky), before.authorize(flaky))
        with pytest.raises(AcquirerOutcomeUnknown):  # the capture's one fault is served now
            await before.capture(CaptureRequest(reference=flaky.reference, currency="USD"))
        remembered = await before.status(request.reference)
        await before.aclose()

        server.stop()
        server.start()  # same data dir, another port

        after = server.connector()
        try:
            assert await after.status(request.reference) == remembered
            again = await after.authorize(request)
            assert remembered is not None
            assert again.acquirer_reference == remembered.acquirer_reference
            # "once" stays once across the restart.
            captured = await after.capture(
                CaptureRequest(reference=flaky.reference, currency="USD")
            )
            assert captured.captured_amount == 3_000
        finally:
            await after.aclose()
    finally:
        server.stop()


async def test_health_and_the_operations_page(
    sandbox: SandboxProcess, acquirer: HttpAcquirer
) -> None:
    request = _authorization("pm_card_decline_insufficient_funds")
    await acquirer.authorize(request)
    async with httpx.AsyncClient() as http:
        health = await http.get(f"{sandbox.url}/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        page = await http.get(f"{sandbox.url}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert request.reference in page.text
    assert "declined: insufficient_funds" in page.text
    assert all(m.token in page.text for m in TEST_PAYMENT_METHODS)
    assert API_KEY not in page.text  # a configured key is never shown


async def test_bad_requests_get_structured_errors_never_500s(sandbox: SandboxProcess) -> None:
    headers = {"Authorization": f"Bearer {sandbox.api_key}"}
    pan = "4242424242424242"
    bodies: list[Any] = [
        {"reference": pan, "amount": 100, "currency": "USD", "payment_method": "pm_card_visa"},
        {"reference": _ref(), "amount": 1.5, "currency": "USD", "payment_method": "pm_card_visa"},
        {"reference": _ref(), "amount": "100", "currency": "USD", "payment_method": "pm_card_visa"},
        {"reference": _ref(), "amount": 0, "currency": "USD", "payment_method": "pm_card_visa"},
        {"reference": _ref(), "amount": 2**63, "currency": "USD", "payment_method": "pm_card_visa"},
        {"reference": _ref(), "amount": 100, "currency": "usd", "payment_method": "pm_card_visa"},
        {"reference": _ref(), "amount": 100, "currency": "USD", "payment_method": pan},
        {"reference": "a/b", "amount": 100, "currency": "USD", "payment_method": "pm_card_visa"},
        {"reference": _ref(), "amount": 100, "currency": "USD"},
        [],
    ]
    async with httpx.AsyncClient(base_url=sandbox.url, headers=headers) as http:
        for body in bodies:
            answer = await http.post("/v1/authorizations", json=body)
            assert answer.status_code == 400, (body, answer.text)
            assert answer.json()["error"]["type"] == "invalid_request"
            assert pan not in answer.text
        garbled = await http.post("/v1/authorizations", content=b"{not json")
        assert garbled.status_code == 400
        capture = await http.post(f"/v1/authorizations/{_ref()}/capture", json={"amount": 5})
        assert capture.status_code == 400  # an amount without its currency
        unknown = await http.post("/v1/nowhere", json={})
        assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found"


# --- what the connector makes of a misbehaving far side


@asynccontextmanager
async def _far_side(answer: bytes | None) -> AsyncIterator[str]:
    """A TCP server that reads one request, then answers `answer` raw, or (None) hangs up."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answer is not None:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


def _http(status: str, body: bytes, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Connection: close", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _against(url: str, request: AuthorizationRequest) -> AuthorizationResult:
    connector = HttpAcquirer(url, SecretStr(API_KEY), timeout_seconds=2.0)
    try:
        return await connector.authorize(request)
    finally:
        await connector.aclose()


async def test_connection_refused_is_definitely_not_done() -> None:
    with pytest.raises(AcquirerNotReached, match="not sent"):
        await _against(f"http://127.0.0.1:{free_port()}", _authorization())


async def test_a_connection_lost_after_sending_is_ambiguous() -> None:
    async with _far_side(None) as url:
        with pytest.raises(AcquirerOutcomeUnknown, match="connection lost"):
            await _against(url, _authorization())


async def test_an_unreadable_success_is_ambiguous_not_believed() -> None:
    for body in (b"<html>ok</html>", b'{"status": "authorized"}'):
        async with _far_side(_http("200 OK", body)) as url:
            with pytest.raises(AcquirerOutcomeUnknown, match="unusable answer"):
                await _against(url, _authorization())


async def test_an_answer_breaking_money_invariants_is_not_believed(
    sandbox: SandboxProcess, acquirer: HttpAcquirer
) -> None:
    request = _authorization(amount=1_000)
    await acquirer.authorize(request)
    record = await acquirer.status(request.reference)
    assert record is not None
    async with httpx.AsyncClient() as http:
        wire = (
            await http.get(
                f"{sandbox.url}/v1/authorizations/{request.reference}",
                headers={"Authorization": f"Bearer {API_KEY}"},
            )
        ).json()
    wire.update(status="captured", captured_amount=1_001, captured_at=wire["created_at"])
    async with _far_side(_http("200 OK", httpx.Response(200, json=wire).content)) as url:
        with pytest.raises(AcquirerOutcomeUnknown, match="unusable answer"):
            await _against(url, request)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://user:pw-secret@127.0.0.1:8020",
        "127.0.0.1:8020",
        "http://user:pw-secret@[::1",
        "http:///no-host",
    ],
)
async def test_an_unusable_url_is_a_configuration_error_never_a_request(url: str) -> None:
    with pytest.raises(AcquirerRejected) as refused:
        await _against(url, _authorization())
    assert (refused.value.code, refused.value.http_status) == ("not_configured", 0)
    assert "PAYSAGA_ACQUIRER_URL is unusable: " in str(refused.value)
    assert "pw-secret" not in str(refused.value)


async def test_a_404_from_somewhere_else_is_never_read_as_never_authorized() -> None:
    # A wrong base URL answers 404 too; only the acquirer's own "no such authorization" means
    # the reference was never authorized. Anything else would invite a second authorization.
    async with _far_side(_http("404 Not Found", b"<h1>Not Found</h1>")) as url:
        connector = HttpAcquirer(url, SecretStr(API_KEY))
        try:
            with pytest.raises(AcquirerRejected) as refused:
                await connector.status(_ref())
        finally:
            await connector.aclose()
    assert (refused.value.code, refused.value.http_status) == ("http_404", 404)


async def test_rate_limiting_is_not_done_and_says_when_to_retry() -> None:
    async with _far_side(_http("429 Too Many Requests", b"{}", "Retry-After: 7")) as url:
        with pytest.raises(AcquirerNotReached) as caught:
            await _against(url, _authorization())
    assert caught.value.retry_after is not None and caught.value.retry_after.total_seconds() == 7


# --- the Temporal activities


def _env() -> ActivityEnvironment:
    return ActivityEnvironment()


async def _activity_failure(call: Any, *args: Any) -> ApplicationError:
    with pytest.raises(ApplicationError) as caught:
        await _env().run(call, *args)
    return caught.value


@pytest.fixture
async def activities(sandbox: SandboxProcess) -> AsyncIterator[AcquirerActivities]:
    acts = AcquirerActivities(sandbox.settings())
    yield acts
    await acts.aclose()


async def test_activities_a_decline_is_a_result_and_the_lifecycle_runs(
    activities: AcquirerActivities,
) -> None:
    declined = await _env().run(
        activities.authorize_payment, _authorization("pm_card_decline_insufficient_funds")
    )
    assert declined.outcome is AuthorizationOutcome.DECLINED
    assert declined.decline_code is DeclineCode.INSUFFICIENT_FUNDS

    request = _authorization(amount=3_000)
    approved = await _env().run(activities.authorize_payment, request)
    assert approved.outcome is AuthorizationOutcome.APPROVED
    captured = await _env().run(
        activities.capture_payment,
        CaptureRequest(reference=request.reference, amount=2_000, currency="USD"),
    )
    assert captured.released_amount == 1_000
    refunded = await _env().run(activities.refund_payment, _refund(request, 500))
    assert refunded.amount == 500
    record = await _env().run(activities.acquirer_status, request.reference)
    assert isinstance(record, AcquirerAuthorization)
    assert (record.captured_amount, record.refunded_amount) == (2_000, 500)
    assert await _env().run(activities.acquirer_status, _ref()) is None

    voidable = _authorization()
    await _env().run(activities.authorize_payment, voidable)
    voided = await _env().run(
        activities.void_authorization, VoidRequest(reference=voidable.reference)
    )
    assert voided.released_amount == voidable.amount


async def test_activities_ambiguous_outcomes_are_a_named_retryable_error(
    sandbox: SandboxProcess, activities: AcquirerActivities
) -> None:
    impatient = AcquirerActivities(sandbox.settings(acquirer_timeout_seconds=IMPATIENT_SECONDS))
    try:
        request = _authorization("pm_card_timeout")
        failure = await _activity_failure(impatient.authorize_payment, request)
        assert failure.type == ACQUIRER_OUTCOME_UNKNOWN
        assert not failure.non_retryable
        assert list(failure.details) == ["authorize", request.reference]
    finally:
        await impatient.aclose()
    record = await _env().run(activities.acquirer_status, request.reference)
    assert record is not None and record.state is AuthorizationState.AUTHORIZED

    flaky = _authorization("pm_card_error_once")
    failure = await _activity_failure(activities.authorize_payment, flaky)
    assert (failure.type, failure.non_retryable) == (ACQUIRER_OUTCOME_UNKNOWN, False)
    assert (await _env().run(activities.authorize_payment, flaky)).approved


async def test_activities_an_unreachable_acquirer_is_retryable_unavailable() -> None:
    unreachable = AcquirerActivities(
        Settings(
            acquirer_url=f"http://127.0.0.1:{free_port()}", acquirer_api_key=SecretStr(API_KEY)
        )
    )
    try:
        for call, arg in (
            (unreachable.authorize_payment, _authorization()),
            (unreachable.acquirer_status, _ref()),
        ):
            failure = await _activity_failure(call, arg)
            assert (failure.type, failure.non_retryable) == (ACQUIRER_UNAVAILABLE, False)
    finally:
        await unreachable.aclose()


async def test_activities_refusals_are_non_retryable_and_carry_the_acquirer_code(
    activities: AcquirerActivities,
) -> None:
    request = _authorization(amount=1_000)
    await _env().run(activities.authorize_payment, request)
    await _env().run(activities.void_authorization, VoidRequest(reference=request.reference))
    failure = await _activity_failure(
        activities.capture_payment, CaptureRequest(reference=request.reference, currency="USD")
    )
    assert (failure.type, failure.non_retryable) == (FailureType.ACQUIRER_REJECTED, True)
    assert list(failure.details) == ["authorization_voided"]

    captured = _authorization(amount=1_000)
    await _env().run(activities.authorize_payment, captured)
    await _env().run(
        activities.capture_payment, CaptureRequest(reference=captured.reference, currency="USD")
    )
    failure = await _activity_failure(activities.refund_payment, _refund(captured, 1_001))
    assert (failure.type, failure.non_retryable) == (FailureType.REFUND_EXCEEDS_CAPTURED, True)


async def test_activities_misconfiguration_is_non_retryable_and_never_leaks_the_key(
    sandbox: SandboxProcess,
) -> None:
    secret = "sk_live_not_this_acquirers_key_77"
    for settings in (
        sandbox.settings(acquirer_api_key=secret),
        sandbox.settings(acquirer_api_key=""),
        Settings(acquirer_url=None, acquirer_api_key=SecretStr(API_KEY)),
    ):
        acts = AcquirerActivities(settings)
        try:
            failure = await _activity_failure(acts.authorize_payment, _authorization())
        finally:
            await acts.aclose()
        assert (failure.type, failure.non_retryable) == (FailureType.ACQUIRER_REJECTED, True)
        assert "PAYSAGA_ACQUIRER_" in str(failure)
        assert secret not in str(failure)


async def test_activities_refuse_malformed_instructions_before_sending(
    activities: AcquirerActivities, acquirer: HttpAcquirer
) -> None:
    reference = _ref()
    malformed: list[tuple[Any, Any]] = [
        (
            activities.authorize_payment,
            AuthorizationRequest.model_construct(
                reference=reference, amount=0, currency="USD", payment_method="pm_card_visa"
            ),
        ),
        (
            activities.authorize_payment,
            AuthorizationRequest.model_construct(
                reference=reference, amount=100, currency="XXX", payment_method="pm_card_visa"
            ),
        ),
        (
            activities.capture_payment,
            CaptureRequest.model_construct(reference=reference, amount=-1, currency="USD"),
        ),
        (activities.acquirer_status, "not/a/reference"),
    ]
    for call, argument in malformed:
        failure = await _activity_failure(call, argument)
        assert (failure.type, failure.non_retryable) == (FailureType.INVALID_ACQUIRER_REQUEST, True)
    assert await acquirer.status(reference) is None


async def test_activity_results_survive_the_temporal_data_converter(acquirer: HttpAcquirer) -> None:
    request = _authorization(amount=5_000)
    authorized = await acquirer.authorize(request)
    captured = await acquirer.capture(
        CaptureRequest(reference=request.reference, amount=4_000, currency="USD")
    )
    refunded = await acquirer.refund(_refund(request, 1_000))
    record = await acquirer.status(request.reference)
    other = _authorization()
    await acquirer.authorize(other)
    voided = await acquirer.void(VoidRequest(reference=other.reference))
    converter = pydantic_data_converter.payload_converter
    hints: tuple[tuple[Any, Any], ...] = (
        (authorized, AuthorizationResult),
        (captured, CaptureResult),
        (refunded, RefundResult),
        (voided, VoidResult),
        (record, AcquirerAuthorization | None),
        (None, AcquirerAuthorization | None),
    )
    for value, hint in hints:
        [back] = converter.from_payloads(converter.to_payloads([value]), [hint])
        assert back == value
