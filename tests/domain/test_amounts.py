"""The register's arithmetic (domain/amounts.py): one definition for the workflow, the ledger
and the checker. Pure: no stack."""

from __future__ import annotations

import pytest

from domain.amounts import Amounts, Movement, PaymentStatus
from domain.events import EventKind
from domain.ledger import TransactionKind


@pytest.mark.parametrize(
    ("amounts", "status"),
    [
        (Amounts(captured=1000), PaymentStatus.SUCCEEDED),
        (Amounts(captured=1000, refunded=1), PaymentStatus.PARTIALLY_REFUNDED),
        (Amounts(captured=1000, refunded=400, dispute_lost=600), PaymentStatus.REFUNDED),
        (Amounts(captured=1000, refunded=1000), PaymentStatus.REFUNDED),
        # An open dispute shows over any refund.
        (Amounts(captured=1000, refunded=1000 - 1, disputed=1), PaymentStatus.DISPUTED),
        (Amounts(captured=1000, dispute_lost=1), PaymentStatus.PARTIALLY_REFUNDED),
    ],
)
def test_status_follows_from_the_amounts(amounts: Amounts, status: PaymentStatus) -> None:
    assert amounts.status() == status


def test_refunds_and_disputes_share_one_budget() -> None:
    amounts = Amounts(captured=1000, refunded=300, disputed=200, dispute_lost=100)
    assert amounts.returned_or_held == 600
    assert amounts.returnable == 400
    assert amounts.exceeded_by(Movement.REFUND, 400) is None
    assert amounts.exceeded_by(Movement.DISPUTE_OPENED, 400) is None
    for movement in (Movement.REFUND, Movement.DISPUTE_OPENED):
        problem = amounts.exceeded_by(movement, 401)
        assert problem is not None and "400 still refundable" in problem


def test_a_dispute_closes_at_most_what_it_holds() -> None:
    amounts = Amounts(captured=1000, disputed=200)
    for movement in (Movement.DISPUTE_WON, Movement.DISPUTE_LOST):
        assert amounts.exceeded_by(movement, 200) is None
        assert amounts.exceeded_by(movement, 201) is not None


def test_each_movement_keeps_captured_and_never_returns_more_than_it() -> None:
    start = Amounts(captured=1000)
    path = [
        (Movement.REFUND, 100),
        (Movement.DISPUTE_OPENED, 500),
        (Movement.DISPUTE_WON, 200),
        (Movement.DISPUTE_LOST, 300),
        (Movement.REFUND, 600),
    ]
    amounts = start
    for movement, amount in path:
        assert amounts.exceeded_by(movement, amount) is None
        amounts = amounts.after(movement, amount)
        assert amounts.captured == start.captured
        assert 0 <= amounts.returned_or_held <= amounts.captured
    assert amounts == Amounts(captured=1000, refunded=700, disputed=0, dispute_lost=300)
    assert amounts.returnable == 0
    assert amounts.status() == PaymentStatus.REFUNDED


def test_movements_are_the_ledger_postings_and_the_events_that_announce_them() -> None:
    # The ledger reads a posting's movement from its transaction kind, the workflow from the
    # event it publishes: both name every movement, and nothing else moves the amounts.
    for movement in Movement:
        assert TransactionKind(movement.value)
    announced = {k: Movement.announced_by(k) for k in EventKind}
    assert {m for m in announced.values() if m is not None} == set(Movement)
    assert announced[EventKind.CONFIRMED] is None
    assert announced[EventKind.REFUNDED] is Movement.REFUND
