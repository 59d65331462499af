"""A payment's money and the status it implies: one arithmetic for the workflow, the ledger's
register and the invariant checker.

What was captured is returned by refunds and lost disputes, or held by open disputes; what is
neither can still be returned (`returnable`). A follow-up moves these amounts one way only,
and the status a captured payment shows follows from them alone (`status`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from domain.events import EventKind


class PaymentStatus(StrEnum):
    RECEIVED = "received"
    REQUIRES_REVIEW = "requires_review"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    DISPUTED = "disputed"
    REJECTED = "rejected"
    DECLINED = "declined"
    CANCELED = "canceled"
    FAILED = "failed"
    # A compensation could not complete (the ledger refused a reversal): the payment waits for
    # an operator's `resolve_attention` (docs/runbook.md).
    REQUIRES_ATTENTION = "requires_attention"
    # `capture_method: manual`: authorized and held, waiting for a capture or a void (issue 15).
    REQUIRES_CAPTURE = "requires_capture"

    @property
    def settled_for_wait(self) -> bool:
        """States where `?wait=` returns: the client can act on the answer."""
        return self not in (PaymentStatus.RECEIVED, PaymentStatus.PROCESSING)


class Movement(StrEnum):
    """What a follow-up posting does to a captured payment's amounts."""

    REFUND = "refund"
    DISPUTE_OPENED = "dispute_opened"
    DISPUTE_WON = "dispute_won"
    DISPUTE_LOST = "dispute_lost"

    @classmethod
    def announced_by(cls, kind: EventKind) -> Movement | None:
        """The movement a payment event announces; None for events that move no amounts."""
        return _ANNOUNCED_BY.get(kind)


_ANNOUNCED_BY = {
    EventKind.REFUNDED: Movement.REFUND,
    EventKind.DISPUTE_OPENED: Movement.DISPUTE_OPENED,
    EventKind.DISPUTE_WON: Movement.DISPUTE_WON,
    EventKind.DISPUTE_LOST: Movement.DISPUTE_LOST,
}


@dataclass(frozen=True)
class Amounts:
    """Minor units of one payment, in its currency (the register's columns)."""

    captured: int = 0
    refunded: int = 0
    disputed: int = 0
    dispute_lost: int = 0

    @property
    def returned_or_held(self) -> int:
        return self.refunded + self.disputed + self.dispute_lost

    @property
    def returnable(self) -> int:
        """What refunds and new disputes may still take: they share one budget."""
        return self.captured - self.returned_or_held

    def status(self) -> PaymentStatus:
        """The status a captured payment's amounts imply."""
        returned = self.refunded + self.dispute_lost
        if self.disputed > 0:
            return PaymentStatus.DISPUTED
        if self.captured > 0 and returned >= self.captured:
            return PaymentStatus.REFUNDED
        if returned > 0:
            return PaymentStatus.PARTIALLY_REFUNDED
        return PaymentStatus.SUCCEEDED

    def exceeded_by(self, movement: Movement, amount: int) -> str | None:
        """Why `movement` of `amount` would return more than was captured or close more than a
        dispute holds; None when it fits."""
        match movement:
            case Movement.REFUND | Movement.DISPUTE_OPENED if amount > self.returnable:
                return f"{movement} of {amount} exceeds the {self.returnable} still refundable"
            case Movement.DISPUTE_WON | Movement.DISPUTE_LOST if amount > self.disputed:
                return f"dispute of {amount} exceeds {self.disputed} held"
        return None

    def after(self, movement: Movement, amount: int) -> Amounts:
        """The amounts once `movement` of `amount` is posted (checked by `exceeded_by`)."""
        match movement:
            case Movement.REFUND:
                return replace(self, refunded=self.refunded + amount)
            case Movement.DISPUTE_OPENED:
                return replace(self, disputed=self.disputed + amount)
            case Movement.DISPUTE_WON:
                return replace(self, disputed=self.disputed - amount)
            case Movement.DISPUTE_LOST:
                return replace(
                    self, disputed=self.disputed - amount, dispute_lost=self.dispute_lost + amount
                )

    def __str__(self) -> str:
        return (
            f"captured {self.captured}, refunded {self.refunded}, "
            f"disputed {self.disputed}, lost {self.dispute_lost}"
        )
