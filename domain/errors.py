"""Names of business failures. Activities raise them as non-retryable `ApplicationError`s with
`type=` one of these, so retry policies, the workflow and tests match on the name."""

from __future__ import annotations

from enum import StrEnum


class FailureType(StrEnum):
    INVALID_PAYMENT = "InvalidPayment"
    ACCOUNT_CLOSED = "AccountClosed"
    MERCHANT_OVER_LIMIT = "MerchantOverLimit"
    REFUND_EXCEEDS_CAPTURED = "RefundExceedsCaptured"
    CRM_REJECTED = "CrmRejected"
    FRAUD_SIDECAR_INVALID = "FraudSidecarInvalid"
    # The acquirer refused an instruction (bad state, amount, credentials); nothing happened.
    ACQUIRER_REJECTED = "AcquirerRejected"
    # We built an instruction the acquirer must never see (checked before sending).
    INVALID_ACQUIRER_REQUEST = "InvalidAcquirerRequest"
    # The (payment, kind, reference) slot already holds a posting that moved other amounts,
    # currency or accounts: never a harmless duplicate, and never worth retrying.
    POSTING_CONFLICT = "PostingConflict"
    # A second release of an acquirer's hold (captured after voided, voided or captured again
    # under another reference): the hold was released once, a second release moves money twice.
    HOLD_ALREADY_RELEASED = "HoldAlreadyReleased"
    # The database refused the data itself (SQLSTATE class 22 or 23: a value too long, out of
    # range, a constraint): the same input would fail on every retry.
    DATA_REJECTED = "DataRejected"


NON_RETRYABLE: tuple[str, ...] = tuple(t.value for t in FailureType)
