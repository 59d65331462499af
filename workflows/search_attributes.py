"""Search attributes operators filter on in the Temporal UI (`PaymentStatus="requires_review"`)."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

PAYMENT_STATUS = SearchAttributeKey.for_keyword("PaymentStatus")
CUSTOMER_ID = SearchAttributeKey.for_keyword("CustomerId")
MERCHANT_ID = SearchAttributeKey.for_keyword("MerchantId")
AMOUNT_MINOR = SearchAttributeKey.for_int("AmountMinor")
CURRENCY = SearchAttributeKey.for_keyword("Currency")
FRAUD_SCORE = SearchAttributeKey.for_float("FraudScore")
CRM_SYNC = SearchAttributeKey.for_keyword("CrmSync")
# The API client that created the payment: list results are scoped to it.
CLIENT_ID = SearchAttributeKey.for_keyword("ClientId")
# `capture_method: manual`: when the uncaptured authorization expires (is voided), set when
# the payment enters requires_capture: "authorizations expiring within 24 h".
AUTHORIZATION_EXPIRES_AT = SearchAttributeKey.for_datetime("AuthorizationExpiresAt")

# Subscriptions (issue 17): `SubscriptionStatus="past_due"`; `NextRenewalAt < "…"` finds the
# renewals due soon (unset while paused, unpaid or canceled).
SUBSCRIPTION_STATUS = SearchAttributeKey.for_keyword("SubscriptionStatus")
NEXT_RENEWAL_AT = SearchAttributeKey.for_datetime("NextRenewalAt")

ALL_KEYS = (
    PAYMENT_STATUS,
    CUSTOMER_ID,
    MERCHANT_ID,
    AMOUNT_MINOR,
    CURRENCY,
    FRAUD_SCORE,
    CRM_SYNC,
    CLIENT_ID,
    AUTHORIZATION_EXPIRES_AT,
    SUBSCRIPTION_STATUS,
    NEXT_RENEWAL_AT,
)
