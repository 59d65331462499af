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


NON_RETRYABLE: tuple[str, ...] = tuple(t.value for t in FailureType)
