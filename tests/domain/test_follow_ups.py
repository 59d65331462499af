"""When a payment takes a refund or a dispute (domain/follow_ups.py): the rules the workflow's
validators and signal handlers share, checked without a stack."""

from __future__ import annotations

from datetime import UTC, datetime

from domain.amounts import Movement
from domain.follow_ups import (
    Door,
    Refusal,
    Taking,
    dispute_closed_refusal,
    dispute_opened_refusal,
    refund_by_void_refusal,
    refund_refusal,
)
from domain.payment import (
    Dispute,
    DisputeClosedSignal,
    DisputeOpenedSignal,
    DisputeStatus,
    PaymentRequest,
    PaymentState,
    PaymentStatus,
    Refund,
    RefundSignal,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
OPEN = Door(Taking.EVERYTHING)


def captured(amount: int = 1000, **changes: object) -> PaymentState:
    request = PaymentRequest(
        amount=amount,
        currency="USD",
        customer_id="cus_1",
        merchant_id="mer_1",
        payment_method="pm_card_visa_0001",
    )
    state = PaymentState(
        id="pay_1",
        client_id="client_1",
        request=request,
        fingerprint=request.fingerprint(),
        status=PaymentStatus.SUCCEEDED,
        created_at=NOW,
        updated_at=NOW,
        ledger_posted=True,
        captured=amount,
    )
    return state.model_copy(update=changes)


def test_refundable_counts_accepted_follow_ups_not_yet_posted() -> None:
    state = captured(
        1000,
        refunded=100,
        refunds=[Refund(id="r1", amount=200, created_at=NOW)],
        disputes=[
            Dispute(id="d1", amount=300, reason_code="x", network_reference="", created_at=NOW),
            Dispute(
                id="d2", amount=50, reason_code="x", network_reference="", created_at=NOW,
                status=DisputeStatus.FAILED,
            ),
        ],
    )  # fmt: skip
    assert state.amounts.returnable == 900
    assert state.refundable == 900 - 200 - 300


def test_a_refund_over_what_remains_is_refused_with_the_amount_left() -> None:
    state = captured(1000, refunded=600)
    refused = refund_refusal(state, RefundSignal(refund_id="r2", amount=401), OPEN)
    assert refused is not None and refused.code == Refusal.AMOUNT_TOO_LARGE
    assert "400" in refused.message
    assert refund_refusal(state, RefundSignal(refund_id="r2", amount=400), OPEN) is None


def test_nothing_left_refuses_refunds_and_disputes_alike() -> None:
    state = captured(1000, refunded=700, disputed=300)
    refund = refund_refusal(state, RefundSignal(refund_id="r9"), OPEN)
    dispute = dispute_opened_refusal(state, DisputeOpenedSignal(dispute_id="d9"), OPEN)
    assert refund is not None and refund.code == Refusal.NOTHING_LEFT
    assert dispute is not None and dispute.code == Refusal.NOTHING_LEFT


def test_the_same_refund_id_for_another_amount_is_refused() -> None:
    state = captured(1000, refunds=[Refund(id="r1", amount=200, created_at=NOW)])
    refused = refund_refusal(state, RefundSignal(refund_id="r1", amount=300), OPEN)
    assert refused is not None and refused.code == Refusal.KEY_REUSED
    assert refund_refusal(state, RefundSignal(refund_id="r1", amount=200), OPEN) is None


def test_an_uncaptured_payment_takes_no_refund() -> None:
    state = captured(1000, ledger_posted=False, captured=0, status=PaymentStatus.PROCESSING)
    refused = refund_refusal(state, RefundSignal(refund_id="r1"), Door(Taking.NOT_YET))
    assert refused is not None and refused.code == Refusal.NOT_CAPTURED


def test_a_payment_being_voided_takes_no_refund_by_void() -> None:
    """Once a cancel or void was accepted the void returns the money: a refund then is refused
    as a canceled payment's is, never answered as a refund the books do not have."""
    state = captured(
        1000, ledger_posted=False, captured=0, status=PaymentStatus.REQUIRES_CAPTURE,
        authorized_amount=1000,
    )  # fmt: skip
    whole = RefundSignal(refund_id="r1")
    assert refund_by_void_refusal(state, whole, capture_requested=False) is None
    refused = refund_by_void_refusal(state, whole, capture_requested=False, voiding=True)
    assert refused is not None and refused.code == Refusal.NOT_CAPTURED


def test_a_closed_dispute_answers_the_same_outcome_and_refuses_the_other() -> None:
    won = Dispute(
        id="d1", amount=100, reason_code="x", network_reference="", created_at=NOW,
        status=DisputeStatus.WON,
    )  # fmt: skip
    state = captured(1000, disputes=[won])
    again = DisputeClosedSignal(dispute_id="d1", outcome="won")
    other = DisputeClosedSignal(dispute_id="d1", outcome="lost")
    assert dispute_closed_refusal(state, again, OPEN) is None
    refused = dispute_closed_refusal(state, other, OPEN)
    assert refused is not None and refused.code == Refusal.DISPUTE_CLOSED


def test_the_workflow_moves_its_amounts_as_the_register_does() -> None:
    state = captured(1000)
    state.record(Movement.DISPUTE_OPENED, 300)
    state.record(Movement.REFUND, 200)
    state.record(Movement.DISPUTE_LOST, 300)
    assert (state.refunded, state.disputed, state.dispute_lost) == (200, 0, 300)
    assert state.amounts.status() == PaymentStatus.PARTIALLY_REFUNDED
    assert state.refundable == 500
