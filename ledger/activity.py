"""The ledger's Temporal activities. Their names are in every recorded history: never rename
them."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from infra.database import TooMuchContention, step_failure
from ledger.records import LedgerPosting, LedgerReceipt, LedgerRejected, PaymentOutcome
from ledger.store import Ledger


class LedgerActivities:
    """Temporal activities over the ledger. Business refusals become non-retryable errors;
    everything else (database down, contention) is retried by Temporal."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    @activity.defn(name="post_ledger_transaction")
    async def post_ledger_transaction(self, posting: LedgerPosting) -> LedgerReceipt:
        txn = posting.transaction
        try:
            return await self.ledger.post(posting)
        except LedgerRejected as exc:
            raise ApplicationError(
                f"ledger refused {txn.kind} for {txn.payment_id}: {exc}",
                type=exc.failure.value,
                non_retryable=True,
            ) from exc
        except (DBAPIError, TooMuchContention) as exc:
            raise step_failure(exc, f"{txn.kind} for {txn.payment_id}") from None

    @activity.defn(name="captured_in_ledger")
    async def captured_in_ledger(self, payment_id: str) -> int:
        """What the payment's capture posting took from the customer and no reversal returned:
        the truth a reversal goes by when the workflow cannot know whether its posting
        committed (an attempt in a lost workflow task)."""
        try:
            row = await self.ledger.payment(payment_id)
        except (DBAPIError, TooMuchContention) as exc:
            raise step_failure(exc, f"the register row of {payment_id}") from None
        return row.captured if row is not None else 0

    @activity.defn(name="held_in_ledger")
    async def held_in_ledger(self, payment_id: str) -> int:
        """What the payment's authorization hold still holds in the ledger: the truth the
        hold's release goes by when the workflow cannot know whether its hold posting
        committed (an attempt in a lost workflow task)."""
        try:
            return await self.ledger.held(payment_id)
        except (DBAPIError, TooMuchContention) as exc:
            raise step_failure(exc, f"the hold of {payment_id}") from None

    @activity.defn(name="record_payment_outcome")
    async def record_payment_outcome(self, outcome: PaymentOutcome) -> None:
        try:
            await self.ledger.record_outcome(outcome)
        except (DBAPIError, TooMuchContention) as exc:
            raise step_failure(exc, f"the outcome of {outcome.payment_id}") from None
