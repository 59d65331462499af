"""Payments: the request a client makes, the state the saga keeps, the follow-ups it accepts.

Over 400 lines: the types a payment is made of (request and its validators, state, statuses,
follow-ups, signals) that the API, the workflow and the ledger share; each is a short pydantic
model.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)
from pydantic_core import PydanticCustomError

# PaymentStatus is defined with the amounts that imply it; importable from here too, beside the
# state that carries it.
from domain.amounts import Amounts, Movement
from domain.amounts import PaymentStatus as PaymentStatus
from domain.bounds import ID_MAX, REASON_CODE_MAX, TEXT_MAX, TEXT_PATTERN, has_control_characters
from domain.cards import contains_card_number
from domain.constraints import JsonInteger, MaxKeys, MinorUnits, OneOf
from domain.money import CURRENCIES, MAX_JSON_INTEGER, MAX_PAYMENT_MINOR

# Identifiers (customer, merchant, refund, dispute and API client ids) become parts of ledger
# account codes (`customer:<client>:<customer>:<CCY>`), search attributes and Kafka keys: a safe
# charset without `:` or `.` keeps the code's `:` an unambiguous separator (docs/security.md).
IDENTIFIER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=ID_MAX, pattern=IDENTIFIER_PATTERN)
]
# Idempotency keys are hashed into payment and refund ids; a UUID or `order-1001-attempt-2`.
IDEMPOTENCY_KEY_PATTERN = r"^[A-Za-z0-9_-]{8,255}$"
PaymentMethodToken = Annotated[
    str, StringConstraints(min_length=11, max_length=64, pattern=r"^pm_[A-Za-z0-9_]{8,61}$")
]
FreeText = Annotated[str, StringConstraints(max_length=TEXT_MAX, pattern=TEXT_PATTERN)]
MetadataKey = Annotated[
    str, StringConstraints(min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
]
MAX_METADATA_KEYS = 20
Metadata = Annotated[dict[MetadataKey, FreeText], MaxKeys(MAX_METADATA_KEYS, "metadata_too_large")]
# Amounts a client sends: positive and exact in any JSON reader. A payment's currency bounds it
# further (PaymentRequest states each currency's limit); a refund or dispute never returns more
# than the largest payment any currency takes.
PaymentAmount = Annotated[
    int, JsonInteger, MinorUnits(1, MAX_JSON_INTEGER, "amount_too_small", "amount_too_large")
]
FollowUpAmount = Annotated[
    int, JsonInteger, MinorUnits(1, MAX_PAYMENT_MINOR, "amount_invalid", "amount_invalid")
]
CurrencyCode = Annotated[
    str,
    OneOf(
        frozenset(CURRENCIES),
        "currency_unsupported",
        "Currency is not supported; use an upper-case ISO 4217 code such as USD.",
    ),
]


def _reject_card_numbers_and_control_chars(
    value: Any, path: str = "", *, control_chars: bool = True
) -> None:
    if isinstance(value, str):
        if contains_card_number(value):
            # The message never echoes the value: it may be a PAN.
            raise PydanticCustomError(
                "card_data_not_allowed",
                "Card numbers are not accepted; send a payment-method token (pm_…) instead.",
                {"param": path},
            )
        if control_chars and has_control_characters(value):
            raise PydanticCustomError(
                "control_characters", "Control characters are not allowed.", {"param": path}
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}[{key}]" if path else str(key)
            _reject_card_numbers_and_control_chars(key, child, control_chars=control_chars)
            _reject_card_numbers_and_control_chars(item, child, control_chars=control_chars)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_card_numbers_and_control_chars(
                item, f"{path}[{index}]", control_chars=control_chars
            )


class CardDataFree(BaseModel):
    """No string in it (values, keys, nested ones) may carry a card number: a signal or
    update carrying one is not even read. Its validation errors never repeat the input
    (`hide_input_in_errors`): a refused value may be a PAN, and a worker logs the error of a
    signal it cannot read.

    Nothing else is judged here: ids, lengths and control characters are the follow-up rules'
    (domain/follow_ups.py), which refuse with a reason the operator sees instead of dropping
    the signal, and which old histories replay through unchanged (a stricter type here would
    drop, on replay, a signal the payment once acted on)."""

    model_config = ConfigDict(hide_input_in_errors=True)

    @model_validator(mode="before")
    @classmethod
    def _no_card_data(cls, data: Any) -> Any:
        _reject_card_numbers_and_control_chars(data, control_chars=False)
        return data


class StrictRequest(CardDataFree):
    """A client's request: unknown fields are refused and no string may carry a card number
    or control characters."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_card_data(cls, data: Any) -> Any:
        _reject_card_numbers_and_control_chars(data)
        return data


def _currency_limits_in_schema(schema: dict[str, Any]) -> None:
    """The per-currency limit in the OpenAPI document, from the table the check reads: for
    each currency, `if currency then amount ≤ its limit`."""
    schema["allOf"] = [
        {
            "if": {"properties": {"currency": {"const": code}}, "required": ["currency"]},
            "then": {"properties": {"amount": {"maximum": unit.max_minor}}},
        }
        for code, unit in sorted(CURRENCIES.items())
    ]


class PaymentRequest(StrictRequest):
    model_config = ConfigDict(json_schema_extra=_currency_limits_in_schema)

    amount: PaymentAmount = Field(
        description="Amount in minor units of `currency` (cents for USD), at most the "
        "currency's per-payment limit."
    )
    currency: CurrencyCode = Field(description="ISO 4217 code, upper case, e.g. USD, JPY, BHD.")
    customer_id: Identifier
    merchant_id: Identifier
    payment_method: PaymentMethodToken = Field(description="A payment-method token, never a PAN.")
    description: FreeText | None = None
    metadata: Metadata = Field(default_factory=dict)
    salesforce_opportunity_id: (
        Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{15,18}$")] | None
    ) = None
    hubspot_deal_id: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}$")] | None = None
    capture_method: Literal["automatic", "manual"] = Field(
        default="automatic",
        description="`automatic`: captured as soon as the acquirer authorizes it. `manual`: the "
        "payment stops at `requires_capture` until `POST /v1/payments/{id}/capture` (or "
        "`/void`); an authorization left uncaptured expires (7 days by default) and is voided.",
    )

    @model_validator(mode="after")
    def _within_currency_limit(self) -> PaymentRequest:
        limit = CURRENCIES[self.currency].max_minor
        if self.amount > limit:
            raise PydanticCustomError(
                "amount_too_large",
                "Amount exceeds the per-payment limit of {limit} minor units for {currency}.",
                {"limit": limit, "currency": self.currency, "param": "amount"},
            )
        return self

    def fingerprint(self) -> str:
        """Stable hash of the body: the same key with a different body is a client bug (409)."""
        # The default capture method is left out: keys sent before it existed keep their body.
        body = self.model_dump(
            mode="json", exclude={"capture_method"} if self.capture_method == "automatic" else None
        )
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class CrmSync(StrEnum):
    PENDING = "pending"
    SYNCED = "synced"
    FAILED = "failed"
    NOT_CONFIGURED = "not_configured"
    # The payment ended before money moved (rejected, declined, canceled early): nothing to tell.
    SKIPPED = "skipped"


class FraudAssessment(BaseModel):
    score: float
    reasons: list[str]
    scorer: str = "rules"
    # Time spent loading the customer's history and scoring: the < 50 ms p99 budget.
    elapsed_ms: float | None = None


class ReviewDecision(CardDataFree):
    reviewer: str
    note: str = ""


class RefundRequest(StrictRequest):
    amount: FollowUpAmount | None = Field(
        default=None, description="Minor units; default all that remains."
    )
    reason: FreeText | None = None


class DisputeRequest(StrictRequest):
    amount: FollowUpAmount | None = Field(
        default=None, description="Minor units; default all that remains."
    )
    reason_code: Annotated[
        str, StringConstraints(min_length=1, max_length=REASON_CODE_MAX, pattern=TEXT_PATTERN)
    ]
    network_reference: Annotated[
        str, StringConstraints(min_length=1, max_length=ID_MAX, pattern=TEXT_PATTERN)
    ]


class DisputeCloseRequest(StrictRequest):
    outcome: Literal["won", "lost"]


class FollowUpStatus(StrEnum):
    """A refund's status."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class DisputeStatus(StrEnum):
    """A dispute's status: pending until the ledger holds its amount, then open until the card
    network closes it won or lost; failed if it was never opened."""

    PENDING = "pending"
    OPEN = "open"
    WON = "won"
    LOST = "lost"
    FAILED = "failed"


# Signals come from the API (already validated) and from operators' tools, which are not: a
# signal carrying a card number or a malformed id fails to deserialize in the workflow, which
# drops it (temporalio logs the error, never the input: CardDataFree).


class RefundSignal(CardDataFree):
    """Sent by the API, the CLI or an operator (`temporal workflow signal --name refund`)."""

    kind: Literal["refund"] = "refund"
    refund_id: str
    amount: int | None = None
    reason: str | None = None


class DisputeOpenedSignal(CardDataFree):
    kind: Literal["dispute_opened"] = "dispute_opened"
    dispute_id: str
    amount: int | None = None
    reason_code: str = "unknown"
    network_reference: str = ""


class DisputeClosedSignal(CardDataFree):
    kind: Literal["dispute_closed"] = "dispute_closed"
    dispute_id: str
    outcome: Literal["won", "lost"]


class CancelSignal(CardDataFree):
    reason: str = "requested_by_customer"


FollowUp = Annotated[
    RefundSignal | DisputeOpenedSignal | DisputeClosedSignal, Field(discriminator="kind")
]


class Refund(BaseModel):
    id: str
    amount: int
    reason: str | None = None
    status: FollowUpStatus = FollowUpStatus.PENDING
    failure_reason: str | None = None
    created_at: datetime


class Dispute(BaseModel):
    id: str
    amount: int
    reason_code: str
    network_reference: str
    status: DisputeStatus = DisputeStatus.PENDING
    failure_reason: str | None = None
    created_at: datetime


class UndoFailure(BaseModel):
    """A compensation step that failed for good (the ledger refused the reversal, …)."""

    step: str
    error: str
    attempts: int = 1


class Attention(BaseModel):
    """Why a payment is `requires_attention` and what ends it: the compensations that could not
    complete, and the status the payment takes once an operator resolves them."""

    since: datetime
    ends_as: PaymentStatus
    failures: list[UndoFailure]
    what_to_do: str


class AttentionResolution(BaseModel):
    """An operator's answer to `requires_attention` (update or signal `resolve_attention`).

    `retry` runs the failed compensations again (after the cause was fixed: the account
    reopened, the limit raised). `manual` settles them by hand: a reversal the ledger refused is
    posted against the platform's `suspense:<CCY>` account instead of the merchant's (the
    customer is made whole; the suspense balance is what operations still has to recover), and
    the operator's reason is kept with the ledger transaction and the payment."""

    action: Literal["retry", "manual"]
    operator: str
    reason: str = ""


class ResolutionRecord(BaseModel):
    action: str
    operator: str
    reason: str
    at: datetime
    resolved: bool
    # What is still failing after this attempt (empty once resolved).
    remaining: list[UndoFailure] = Field(default_factory=list)


class StatusChange(BaseModel):
    status: PaymentStatus
    at: datetime
    note: str = ""


class PaymentState(BaseModel):
    """Everything the workflow knows; returned by its `state` query and carried across
    continue-as-new."""

    id: str
    client_id: str
    request: PaymentRequest
    fingerprint: str
    status: PaymentStatus = PaymentStatus.RECEIVED
    waiting_for: str = ""
    created_at: datetime
    updated_at: datetime
    fraud: FraudAssessment | None = None
    review: ReviewDecision | None = None
    ledger_posted: bool = False
    captured: int = 0
    refunded: int = 0
    disputed: int = 0
    dispute_lost: int = 0
    crm_sync: CrmSync = CrmSync.PENDING
    crm_error: str | None = None
    failure_reason: str | None = None
    cancel_refused: str | None = None
    refunds: list[Refund] = Field(default_factory=list)
    disputes: list[Dispute] = Field(default_factory=list)
    history: list[StatusChange] = Field(default_factory=list)
    # Set while the payment is `requires_attention`; every operator resolution is kept.
    attention: Attention | None = None
    resolutions: list[ResolutionRecord] = Field(default_factory=list)
    # Each event of this payment gets the next number, once (retries reuse it), so consumers
    # can order a payment's events across topics: `data.sequence`.
    event_sequence: int = 0
    event_sequences: dict[str, int] = Field(default_factory=dict)
    # Through the acquirer (PaymentPolicy.acquirer): its id of our authorization, what it held,
    # and why it declined (`decline_code` one of domain.acquirer.DeclineCode; the acquirer's
    # own code verbatim in `acquirer_decline_code`).
    acquirer_reference: str | None = None
    authorized_amount: int = 0
    # What the ledger holds on the customer's account for the authorization (its
    # `authorization_hold` posting); 0 before it and once it was released (captured or voided).
    held: int = 0
    # `capture_method: manual`: when the authorization expires (is voided) if not captured.
    authorization_expires_at: datetime | None = None
    decline_code: str | None = None
    acquirer_decline_code: str | None = None

    @property
    def amounts(self) -> Amounts:
        return Amounts(self.captured, self.refunded, self.disputed, self.dispute_lost)

    def record(self, movement: Movement, amount: int) -> None:
        """A follow-up posted: the amounts move as the register's do (domain/amounts.py)."""
        after = self.amounts.after(movement, amount)
        self.refunded, self.disputed, self.dispute_lost = (
            after.refunded,
            after.disputed,
            after.dispute_lost,
        )

    @property
    def refundable(self) -> int:
        """What can still go back to the customer: what the amounts leave returnable, less the
        refunds and disputes accepted and not yet posted."""
        reserved = sum(r.amount for r in self.refunds if r.status == FollowUpStatus.PENDING)
        reserved += sum(d.amount for d in self.disputes if d.status == DisputeStatus.PENDING)
        return self.amounts.returnable - reserved


SECONDS_PER_DAY = 86400.0


class PaymentPolicy(BaseModel):
    """Fixed when the payment is created (from settings), so a running payment's rules never
    change under it and every decision can be explained later. Its defaults are the settings'
    (settings.py reads them from here) and what a recorded history without a field means."""

    review_threshold: float = 0.70
    reject_threshold: float = 0.95
    review_timeout_seconds: float = 24 * 3600.0
    dispute_window_seconds: float = 120 * SECONDS_PER_DAY
    chargeback_fee_minor: int = 1500
    continue_as_new_after_events: int = 2000
    # Run the short forward steps (scoring, raw and confirmed events, the capture posting) as
    # local activities: one server round trip fewer per step. Every step is idempotent, so the
    # re-execution a local activity gets after a worker crash is harmless.
    local_activities: bool = False
    # CRM systems told about this payment ("webhook", "salesforce", "hubspot"): chosen from the
    # configuration and the request's CRM references when the payment is created.
    crm_targets: list[str] = Field(default_factory=list)
    # Customer and merchant ledger accounts belong to the API client, the tenant
    # (`customer:<client>:<customer>:<CCY>`). The starter sets it for every new payment;
    # payments started before tenants (no such field in their history) keep the shared codes
    # they were created with, so their refunds and disputes post to the same accounts.
    tenant_accounts: bool = False
    # Money moves through the acquirer (docs/acquirer.md): authorize, then capture, refunds
    # returned there too. False for payments booked in the ledger only: no acquirer was
    # configured when they were created, or they were started before issue 15.
    acquirer: bool = False
    # How long an ambiguous acquirer outcome (timeout, 5xx, lost connection) is resolved by
    # asking the status of our reference before the payment stops guessing nothing and hands
    # the money to an operator (requires_attention).
    acquirer_resolve_seconds: float = 600.0
    # An authorization left uncaptured (`capture_method: manual`) is voided after this.
    authorization_expiry_seconds: float = 7 * SECONDS_PER_DAY
    # The PaymentWorkflow revision the payment was started under (`SAGA_REVISION` when the
    # starter set it; 0 in every history from before the field). From revision 1 the policy,
    # not `workflow.patched()`, says that every patched branch is taken: a patch marker is a
    # command, and the SDK adds a search-attribute upsert (`TemporalChangeVersion`) to each, so
    # three of them cost every new payment six history events and three visibility writes on
    # the server (README "Performance"). Revision 0 asks the patches as before.
    revision: int = 0


# The revision new payments are started under (see PaymentPolicy.revision; docs/upgrades.md).
# 1: every PaymentWorkflow patch taken without asking, the fraud score's search attribute sent
# with the status that follows it.
SAGA_REVISION = 1


class PaymentWorkflowInput(BaseModel):
    payment_id: str
    client_id: str
    request: PaymentRequest
    fingerprint: str
    policy: PaymentPolicy = Field(default_factory=PaymentPolicy)
    # Set only when the workflow continues as new: the state it had, and follow-ups not yet run.
    carried_state: PaymentState | None = None
    pending_follow_ups: list[FollowUp] = Field(default_factory=list)


# What payment_id_for makes: no payment has any other id.
PAYMENT_ID_PATTERN = r"^pay_[0-9a-f]{24}$"


def payment_id_for(client_id: str, idempotency_key: str) -> str:
    """The payment id (and workflow id) is derived from the key, scoped by API client, so a
    retried POST can only ever address the same workflow."""
    digest = hashlib.sha256(f"{client_id}\x1f{idempotency_key}".encode()).hexdigest()
    return f"pay_{digest[:24]}"


class PaymentCaptureRequest(StrictRequest):
    """`POST /v1/payments/{id}/capture` of a `requires_capture` payment."""

    amount_to_capture: FollowUpAmount | None = Field(
        default=None,
        description="Minor units, at most what was authorized; default all of it. The rest of "
        "the authorization is released.",
    )


class CaptureSignal(CardDataFree):
    """The `capture` Update (the API, the CLI, an operator)."""

    amount_to_capture: int | None = None


class VoidSignal(CardDataFree):
    """The `void` Update: release an uncaptured authorization."""

    reason: str = "voided"
