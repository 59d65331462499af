"""Double-entry ledger transactions. An unbalanced transaction cannot be constructed.

Sign convention: a positive amount is a debit, a negative one a credit; every transaction's
entries sum to zero per currency.

Over 400 lines: balanced transactions and one builder per transaction kind; each builder is
short and they share the sign convention.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from enum import StrEnum

from pydantic import BaseModel, Field, model_validator

from domain.events import EventKind
from domain.money import currency


class AccountType(StrEnum):
    CUSTOMER_FUNDING = "customer_funding"
    MERCHANT_PAYABLE = "merchant_payable"
    DISPUTES = "disputes"
    FEE_REVENUE = "fee_revenue"
    # Platform money an operator still has to recover or place: a manual resolution of a
    # reversal the merchant's account refused is posted against it (docs/runbook.md).
    SUSPENSE = "suspense"
    # What an acquirer holds on a customer's card for an authorization not yet captured or
    # released (TigerBeetle's pending transfer): one per customer and currency.
    AUTHORIZATION_HOLD = "authorization_hold"
    # Reconciliation (docs/reconciliation.md): what the acquirer owes us for movements it has
    # not settled yet, the bank account its payouts arrive in, and what settling costs.
    ACQUIRER_RECEIVABLE = "acquirer_receivable"
    BANK = "bank"
    EXPENSE = "expense"


class TransactionKind(StrEnum):
    PAYMENT = "payment"
    PAYMENT_REVERSAL = "payment_reversal"
    REFUND = "refund"
    DISPUTE_OPENED = "dispute_opened"
    DISPUTE_WON = "dispute_won"
    DISPUTE_LOST = "dispute_lost"
    CHARGEBACK_FEE = "chargeback_fee"
    # The acquirer's hold (issue 15): posted at authorization, released once, either when the
    # authorization is captured (the capture posting, `payment`, then moves what was captured)
    # or when it is voided or expires. Never both: they share the release's meaning.
    AUTHORIZATION_HOLD = "authorization_hold"
    HOLD_CAPTURED = "hold_captured"
    HOLD_VOIDED = "hold_voided"
    # Reconciliation: a ledger movement's claim moved to the acquirer receivable (one per
    # expected settlement line), a payout batch's money from the receivable to the bank, and
    # an operator's resolution of an exception (a manual match or a write-off).
    SETTLEMENT_EXPECTED = "settlement_expected"
    SETTLEMENT_PAYOUT = "settlement_payout"
    SETTLEMENT_MANUAL_MATCH = "settlement_manual_match"
    SETTLEMENT_WRITE_OFF = "settlement_write_off"


# Postings that move no payment's captured money: the payments register is not touched, and
# the checker's per-payment counts leave them out.
RECONCILIATION_KINDS = frozenset(
    {
        TransactionKind.SETTLEMENT_EXPECTED,
        TransactionKind.SETTLEMENT_PAYOUT,
        TransactionKind.SETTLEMENT_MANUAL_MATCH,
        TransactionKind.SETTLEMENT_WRITE_OFF,
    }
)

HOLD_KINDS = frozenset(
    {
        TransactionKind.AUTHORIZATION_HOLD,
        TransactionKind.HOLD_CAPTURED,
        TransactionKind.HOLD_VOIDED,
    }
)


class Account(BaseModel, frozen=True):
    code: str
    type: AccountType
    currency: str


def _owner(tenant: str | None, owner_id: str) -> str:
    """`<client>:<id>` for a tenant's account; identifiers never contain `:`
    (domain.payment.IDENTIFIER_PATTERN), so the code reads back unambiguously."""
    return f"{tenant}:{owner_id}" if tenant is not None else owner_id


def customer_account(customer_id: str, ccy: str, tenant: str | None = None) -> Account:
    """The customer's funding account. `tenant` is the API client the customer belongs to:
    two clients' customers with the same id are two accounts. None: the shared code of
    payments created before tenants (PaymentPolicy.tenant_accounts)."""
    return Account(
        code=f"customer:{_owner(tenant, customer_id)}:{ccy}",
        type=AccountType.CUSTOMER_FUNDING,
        currency=ccy,
    )


def merchant_account(merchant_id: str, ccy: str, tenant: str | None = None) -> Account:
    """What paysaga owes the merchant; its limit (`accounts.max_balance`) is the tenant's too."""
    return Account(
        code=f"merchant:{_owner(tenant, merchant_id)}:{ccy}",
        type=AccountType.MERCHANT_PAYABLE,
        currency=ccy,
    )


def disputes_account(ccy: str) -> Account:
    return Account(code=f"disputes:{ccy}", type=AccountType.DISPUTES, currency=ccy)


def fees_account(ccy: str) -> Account:
    return Account(code=f"fees:chargeback:{ccy}", type=AccountType.FEE_REVENUE, currency=ccy)


def suspense_account(ccy: str) -> Account:
    return Account(code=f"suspense:{ccy}", type=AccountType.SUSPENSE, currency=ccy)


def acquirer_receivable_account(ccy: str) -> Account:
    """What the acquirer owes us: movements it has captured, refunded or charged back and not
    yet settled into the bank account (its balance is checked against the open expectations)."""
    return Account(
        code=f"acquirer:receivable:{ccy}", type=AccountType.ACQUIRER_RECEIVABLE, currency=ccy
    )


def bank_account(ccy: str) -> Account:
    return Account(code=f"bank:cash:{ccy}", type=AccountType.BANK, currency=ccy)


def acquirer_fees_account(ccy: str) -> Account:
    return Account(code=f"expense:acquirer_fees:{ccy}", type=AccountType.EXPENSE, currency=ccy)


def reconciliation_write_off_account(ccy: str) -> Account:
    """Differences finance decided not to chase (a debit: a loss; a credit: a gain)."""
    return Account(code=f"expense:reconciliation:{ccy}", type=AccountType.EXPENSE, currency=ccy)


def settlement_suspense_account(ccy: str) -> Account:
    """Money settled that no ledger movement explains (yet): unexpected lines, lines in another
    currency than their movement. Emptied by a manual match or a write-off."""
    return Account(code=f"suspense:settlement:{ccy}", type=AccountType.SUSPENSE, currency=ccy)


class Entry(BaseModel, frozen=True):
    account: Account
    amount: int  # signed minor units: + debit, - credit

    @model_validator(mode="after")
    def _nonzero(self) -> Entry:
        if self.amount == 0:
            raise ValueError("a ledger entry moves a non-zero amount")
        currency(self.account.currency)
        return self


class UnbalancedTransaction(ValueError):
    pass


class LedgerTransaction(BaseModel, frozen=True):
    payment_id: str
    kind: TransactionKind
    # Refund or dispute id; "" for the payment posting itself. Unique with payment id + kind.
    reference: str = ""
    description: str = ""
    entries: list[Entry] = Field(min_length=2)
    # The event this transaction emits, written to the outbox in the same database transaction.
    event_kind: EventKind | None = None
    event_id: str | None = None

    @model_validator(mode="after")
    def _balanced(self) -> LedgerTransaction:
        totals: dict[str, int] = defaultdict(int)
        for entry in self.entries:
            totals[entry.account.currency] += entry.amount
        unbalanced = {ccy: total for ccy, total in totals.items() if total != 0}
        if unbalanced:
            raise UnbalancedTransaction(f"entries do not sum to zero per currency: {unbalanced}")
        return self


def transfer(debit: Account, credit: Account, amount: int) -> list[Entry]:
    """Move `amount` from `credit` to `debit` (a debit on one side, a credit on the other)."""
    if amount <= 0:
        raise ValueError("a transfer moves a positive amount")
    return [Entry(account=debit, amount=amount), Entry(account=credit, amount=-amount)]


# Builders: each business event becomes one balanced transaction. `tenant` is the API client
# whose customer and merchant accounts move (None: the shared codes of older payments).


@dataclass(frozen=True)
class Parties:
    """Whose accounts a payment's postings move: its customer's and its merchant's, in its
    currency, under its tenant."""

    customer_id: str
    merchant_id: str
    ccy: str
    tenant: str | None = None

    @property
    def customer(self) -> Account:
        return customer_account(self.customer_id, self.ccy, self.tenant)

    @property
    def merchant(self) -> Account:
        return merchant_account(self.merchant_id, self.ccy, self.tenant)


def _posting(
    payment_id: str,
    kind: TransactionKind,
    event_kind: EventKind,
    description: str,
    entries: list[Entry],
    reference: str = "",
) -> LedgerTransaction:
    return LedgerTransaction(
        payment_id=payment_id,
        kind=kind,
        reference=reference,
        description=description,
        entries=entries,
        event_kind=event_kind,
    )


def payment_transaction(payment_id: str, parties: Parties, amount: int) -> LedgerTransaction:
    """Capture: debit the customer's funding account, credit the merchant."""
    return _posting(
        payment_id, TransactionKind.PAYMENT, EventKind.CONFIRMED, "payment captured",
        transfer(parties.customer, parties.merchant, amount),
    )  # fmt: skip


def reversal_transaction(payment_id: str, parties: Parties, amount: int) -> LedgerTransaction:
    """Compensation: undo a posting that was never confirmed."""
    return _posting(
        payment_id, TransactionKind.PAYMENT_REVERSAL, EventKind.CANCELED,
        "payment canceled before confirmation",
        transfer(parties.merchant, parties.customer, amount),
    )  # fmt: skip


def manual_reversal_transaction(
    payment_id: str,
    customer_id: str,
    amount: int,
    ccy: str,
    description: str,
    tenant: str | None,
) -> LedgerTransaction:
    """An operator's resolution of a reversal the ledger refused (the merchant's account closed
    or over its limit): the customer is made whole from the suspense account, whose balance is
    what operations still has to recover from the merchant. It takes the reversal's own slot
    (payment, `payment_reversal`, ''), so the payment can never be reversed twice."""
    customer = customer_account(customer_id, ccy, tenant)
    return _posting(
        payment_id, TransactionKind.PAYMENT_REVERSAL, EventKind.CANCELED, description,
        transfer(suspense_account(ccy), customer, amount),
    )  # fmt: skip


def manual_refund_transaction(
    payment_id: str,
    refund_id: str,
    customer_id: str,
    amount: int,
    ccy: str,
    description: str,
    tenant: str | None = None,
) -> LedgerTransaction:
    """An operator's resolution of a refund the acquirer paid and the ledger refused (the
    merchant's account closed or over its limit): the customer's refund is recorded from the
    suspense account, whose balance is what operations still has to recover from the merchant.
    It takes the refund's own slot (payment, `refund`, refund id): never posted twice."""
    customer = customer_account(customer_id, ccy, tenant)
    return _posting(
        payment_id, TransactionKind.REFUND, EventKind.REFUNDED, description,
        transfer(suspense_account(ccy), customer, amount), refund_id,
    )  # fmt: skip


def refund_transaction(
    payment_id: str, refund_id: str, parties: Parties, amount: int
) -> LedgerTransaction:
    return _posting(
        payment_id, TransactionKind.REFUND, EventKind.REFUNDED, "refund",
        transfer(parties.merchant, parties.customer, amount), refund_id,
    )  # fmt: skip


def dispute_opened_transaction(
    payment_id: str, dispute_id: str, parties: Parties, amount: int
) -> LedgerTransaction:
    """The disputed amount is held away from the merchant until the dispute closes."""
    disputes = disputes_account(parties.ccy)
    return _posting(
        payment_id, TransactionKind.DISPUTE_OPENED, EventKind.DISPUTE_OPENED,
        "dispute opened: funds held", transfer(parties.merchant, disputes, amount), dispute_id,
    )  # fmt: skip


def dispute_won_transaction(
    payment_id: str, dispute_id: str, parties: Parties, amount: int
) -> LedgerTransaction:
    return _posting(
        payment_id, TransactionKind.DISPUTE_WON, EventKind.DISPUTE_WON,
        "dispute won: funds returned to the merchant",
        transfer(disputes_account(parties.ccy), parties.merchant, amount), dispute_id,
    )  # fmt: skip


def dispute_lost_transaction(
    payment_id: str, dispute_id: str, parties: Parties, amount: int, fee: int
) -> LedgerTransaction:
    """Funds go back to the customer; the merchant also pays the chargeback fee."""
    entries = transfer(disputes_account(parties.ccy), parties.customer, amount)
    if fee > 0:
        entries += transfer(parties.merchant, fees_account(parties.ccy), fee)
    return _posting(
        payment_id, TransactionKind.DISPUTE_LOST, EventKind.DISPUTE_LOST,
        "dispute lost: chargeback", entries, dispute_id,
    )  # fmt: skip


# The acquirer's hold. The customer's funding account is debited by what the acquirer holds;
# the release credits it back in full, and the capture posting (`payment_transaction`) debits
# what was captured: captured + released = authorized, each step balanced on its own.


def authorization_hold_account(customer_id: str, ccy: str, tenant: str | None = None) -> Account:
    return Account(
        code=f"authorization_hold:{_owner(tenant, customer_id)}:{ccy}",
        type=AccountType.AUTHORIZATION_HOLD,
        currency=ccy,
    )


def authorization_hold_transaction(
    payment_id: str, customer_id: str, amount: int, ccy: str, tenant: str | None = None
) -> LedgerTransaction:
    """Authorized: the acquirer holds `amount` of the customer's money (pending)."""
    customer = customer_account(customer_id, ccy, tenant)
    hold = authorization_hold_account(customer_id, ccy, tenant)
    return _posting(
        payment_id, TransactionKind.AUTHORIZATION_HOLD, EventKind.AUTHORIZED,
        "authorization: funds held by the acquirer", transfer(customer, hold, amount),
    )  # fmt: skip


def hold_released_transaction(
    payment_id: str,
    customer_id: str,
    held: int,
    ccy: str,
    tenant: str | None = None,
    *,
    captured: bool,
) -> LedgerTransaction:
    """The whole hold back to the customer: at capture (the capture posting then takes what
    was captured, so the rest stays released) or at a void or expiry (everything released)."""
    customer = customer_account(customer_id, ccy, tenant)
    hold = authorization_hold_account(customer_id, ccy, tenant)
    if captured:
        return _posting(
            payment_id, TransactionKind.HOLD_CAPTURED, EventKind.CAPTURED,
            "authorization captured: hold released, the capture posting takes its part",
            transfer(hold, customer, held),
        )  # fmt: skip
    return _posting(
        payment_id, TransactionKind.HOLD_VOIDED, EventKind.VOIDED,
        "authorization voided: hold released", transfer(hold, customer, held),
    )  # fmt: skip
