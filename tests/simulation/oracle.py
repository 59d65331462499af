"""The oracle: what the simulation was told, per payment, and the verdict on what the system
ended with. Pure: it reads nothing itself, so a test can feed it a wrong ledger and watch it
object (tests/system/test_simulation.py::test_the_oracle_reports_a_ledger_that_disagrees).

What counts is only what a client could rely on: an answer the API gave. A refund answered
`succeeded` must be in the ledger; one refused must not; one accepted `pending` (or lost to a
503 and retried) must have ended succeeded or failed, and the ledger must hold it exactly when
it succeeded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A payment that holds its money (its capture is posted and not reversed).
CAPTURED_STATUSES = frozenset({"succeeded", "partially_refunded", "refunded", "disputed"})
# Ended for good without money moving.
UNCAPTURED_STATUSES = frozenset({"rejected", "declined", "canceled", "failed"})
# Still moving: a payment in one of these after the run settled is stuck.
MOVING_STATUSES = frozenset({"received", "processing"})


@dataclass
class RefundSeen:
    amount: int | None = None
    status: str = "pending"  # the last status an answer gave: pending, succeeded, failed


@dataclass
class DisputeSeen:
    amount: int | None = None
    status: str = "pending"  # pending, open, won, lost, failed


@dataclass
class PaymentSeen:
    """Everything the API (or Temporal, for operators) answered about one payment."""

    payment_id: str
    amount: int
    story: str
    # What a capture captures (the script's truth: the amount, half of it on a partial
    # approval, or amount_to_capture); None: the whole amount.
    capture_amount: int | None = None
    acquirer: bool = False  # through the sandbox acquirer: authorized (held), then captured
    refunds: dict[str, RefundSeen] = field(default_factory=dict)
    disputes: dict[str, DisputeSeen] = field(default_factory=dict)
    refused_refund_ids: set[str] = field(default_factory=set)
    statuses: list[str] = field(default_factory=list)
    canceled_by_api: bool = False  # POST /cancel answered 200 canceled
    notes: list[str] = field(default_factory=list)  # contradictions seen while running

    def saw_status(self, status: str) -> None:
        self.statuses.append(status)

    def refund_answer(self, refund: dict[str, Any]) -> None:
        seen = self.refunds.setdefault(refund["id"], RefundSeen())
        if seen.amount is not None and seen.amount != refund["amount"]:
            self.notes.append(
                f"refund {refund['id']} answered {seen.amount}, then {refund['amount']}"
            )
        seen.amount = refund["amount"]
        if seen.status in ("succeeded", "failed") and refund["status"] != seen.status:
            self.notes.append(
                f"refund {refund['id']} went from {seen.status} to {refund['status']}"
            )
        seen.status = refund["status"]

    def dispute_answer(self, dispute: dict[str, Any]) -> None:
        seen = self.disputes.setdefault(dispute["id"], DisputeSeen())
        seen.amount = dispute["amount"]
        if seen.status in ("won", "lost", "failed") and dispute["status"] != seen.status:
            self.notes.append(
                f"dispute {dispute['id']} went from {seen.status} to {dispute['status']}"
            )
        seen.status = dispute["status"]


@dataclass(frozen=True)
class Money:
    """A payment's money as one source tells it, in minor units."""

    captured: int
    refunded: int
    dispute_lost: int

    @property
    def net(self) -> int:
        return self.captured - self.refunded - self.dispute_lost


@dataclass(frozen=True)
class Holds:
    """The payment's authorization hold in the ledger: transactions placing it, capturing it,
    voiding it, and what is still on the hold account."""

    placed: int = 0
    captured: int = 0
    voided: int = 0
    held: int = 0


@dataclass(frozen=True)
class FinalView:
    """How the system left one payment: the API's last answer, the payments register's row and
    the ledger's own entries (the customer's side of every transaction of the payment)."""

    api: dict[str, Any] | None
    register: Money | None
    ledger_net: int
    holds: Holds = Holds()


def expected_money(seen: PaymentSeen, final: dict[str, Any]) -> Money:
    """What the answers add up to. Captured: the payment ended holding its money (its final
    status says so, and every answer must agree, see `judge`)."""
    capture = seen.amount if seen.capture_amount is None else seen.capture_amount
    captured = capture if final["status"] in CAPTURED_STATUSES else 0
    refunded = sum(r.amount or 0 for r in seen.refunds.values() if r.status == "succeeded")
    lost = sum(d.amount or 0 for d in seen.disputes.values() if d.status == "lost")
    return Money(captured, refunded, lost)


def judge(seen: PaymentSeen, view: FinalView) -> list[str]:
    """Every way the payment's end disagrees with what the simulation was told."""
    problems = [f"while running: {note}" for note in seen.notes]
    final = view.api
    if final is None:
        return [*problems, "the API no longer knows the payment"]
    accepted = set(seen.refunds)
    # Fold the final answer in: a follow-up accepted `pending` is settled by now.
    for refund in final["refunds"]:
        seen.refund_answer(refund)
    for dispute in final["disputes"]:
        seen.dispute_answer(dispute)
    status = final["status"]
    named = status in UNCAPTURED_STATUSES or status in CAPTURED_STATUSES or final["waiting_for"]
    if status in MOVING_STATUSES or not named:
        problems.append(f"ended {status!r} waiting for nothing named")
    for refund_id, refund in seen.refunds.items():
        if refund.status == "pending":
            problems.append(f"refund {refund_id} accepted and never carried out")
    refused = seen.refused_refund_ids - accepted  # (a key refused once may be accepted later)
    for refund_id in refused & {r["id"] for r in final["refunds"]}:
        problems.append(f"refund {refund_id} was refused, yet the payment recorded it")
    for dispute_id, dispute in seen.disputes.items():
        if dispute.status == "pending":
            problems.append(f"dispute {dispute_id} accepted and never recorded")
    expected = expected_money(seen, final)
    if expected.captured == 0 and (expected.refunded or expected.dispute_lost):
        problems.append(f"money returned from a payment that ended {status!r}: {expected}")
    if seen.canceled_by_api and status != "canceled":
        problems.append(f"the API answered canceled, yet it ended {status!r}")
    if expected.refunded + expected.dispute_lost > expected.captured:
        problems.append(f"more returned than captured: {expected}")
    told = Money(final["amount_captured"], final["amount_refunded"], final["amount_dispute_lost"])
    if told != expected:
        problems.append(f"the API says {told}, the answers add up to {expected}")
    if view.register is None:
        if expected.captured:
            problems.append("captured, yet the payments register has no row")
    elif view.register != expected:
        problems.append(f"the payments register says {view.register}, expected {expected}")
    if view.ledger_net != expected.net:
        problems.append(
            f"the ledger moved {view.ledger_net} from the customer, expected {expected.net} "
            f"(captured {expected.captured} - refunded {expected.refunded} - dispute lost "
            f"{expected.dispute_lost})"
        )
    problems.extend(judge_holds(seen, status, view.holds))
    return problems


def judge_holds(seen: PaymentSeen, status: str, holds: Holds) -> list[str]:
    """Every hold released exactly once (captured or voided), nothing left held; through the
    acquirer a captured payment captured its hold, a declined one was never held, one that
    ended without money (voided, expired, canceled) released its hold uncaptured."""
    problems = []
    if holds.placed > 1 or holds.captured + holds.voided != holds.placed or holds.held != 0:
        problems.append(f"the hold was not released exactly once: {holds}")
    if not seen.acquirer:
        if holds.placed:
            problems.append(f"held without an acquirer: {holds}")
    elif status in CAPTURED_STATUSES and (holds.placed, holds.captured) != (1, 1):
        problems.append(f"captured, yet the hold was not captured once: {holds}")
    elif status == "declined" and holds.placed:
        problems.append(f"declined, yet held: {holds}")
    elif status in UNCAPTURED_STATUSES and holds.captured:
        problems.append(f"ended {status!r}, yet the hold was captured: {holds}")
    return problems


def verdict(seen: dict[str, PaymentSeen], views: dict[str, FinalView]) -> dict[str, list[str]]:
    """Problems per payment; empty when everything reconciles."""
    found: dict[str, list[str]] = {}
    for payment_id, payment in seen.items():
        problems = judge(payment, views[payment_id])
        if problems:
            found[payment_id] = problems
    return found


# ── subscriptions (issue 17) ─────────────────────────────────────────────────────────────────


@dataclass
class SubscriptionSeen:
    """What the API answered about one subscription: the changes it accepted, in order."""

    subscription_id: str
    story: str
    # The dunning retries its policy allows after a period's first attempt.
    retries: int
    accepted: list[str] = field(default_factory=list)  # pause, resume, cancel_now, …
    notes: list[str] = field(default_factory=list)

    @property
    def canceled_now(self) -> bool:
        return "cancel_now" in self.accepted

    @property
    def paused(self) -> bool:
        """The last pause or resume accepted was a pause."""
        last = [a for a in self.accepted if a in ("pause", "resume")]
        return bool(last) and last[-1] == "pause"


@dataclass(frozen=True)
class RenewalMoney:
    """One renewal payment as the payments register and the ledger tell it."""

    captured: int = 0  # the register's captured amount (0: no row, nothing captured)
    ledger_net: int = 0  # what the ledger moved from the customer for it


def judge_subscription(
    seen: SubscriptionSeen, final: dict[str, Any] | None, money: dict[str, RenewalMoney]
) -> list[str]:
    """At most one captured renewal per period; a paid period has exactly one, for exactly its
    amount, and it is the one the subscription names; nothing captured for a period it did not
    collect; every renewal balanced in the ledger; the final status follows from the story."""
    problems = [f"while running: {note}" for note in seen.notes]
    if final is None:
        return [*problems, "the API no longer knows the subscription"]
    paid_total = 0
    for period in final["periods"]:
        number = period["number"]
        took = [p for p in period["attempts"] if money.get(p, RenewalMoney()).captured > 0]
        for pid in period["attempts"]:
            got = money.get(pid, RenewalMoney())
            if got.ledger_net != got.captured:
                problems.append(
                    f"renewal {pid} (period {number}): the ledger moved {got.ledger_net}, the "
                    f"register says {got.captured} captured"
                )
        if len(took) > 1:
            problems.append(f"period {number} captured by {len(took)} renewals: {took}")
        if period["status"] == "paid":
            paid_total += period["amount"]
            if took != [period["paid_by"]]:
                problems.append(f"period {number} paid by {period['paid_by']}, captured by {took}")
            elif money[took[0]].captured != period["amount"]:
                problems.append(
                    f"period {number} of {period['amount']} captured {money[took[0]].captured}"
                )
        elif took:
            problems.append(f"period {number} is {period['status']!r}, yet {took} captured")
    if final["paid_total"] != paid_total:
        problems.append(
            f"paid_total {final['paid_total']}, the paid periods add up to {paid_total}"
        )
    problems.extend(_judge_status(seen, final))
    return problems


def _exhausted(seen: SubscriptionSeen, final: dict[str, Any]) -> bool:
    return any(
        p["status"] == "unpaid" and len(p["attempts"]) == 1 + seen.retries for p in final["periods"]
    )


def _judge_status(seen: SubscriptionSeen, final: dict[str, Any]) -> list[str]:
    status = final["status"]
    if seen.canceled_now:
        return [] if status == "canceled" else [f"canceled now (200), yet it ended {status!r}"]
    if status == "canceled":
        # Not by the client: only dunning that ran out may have ended it (or a cancel at the
        # period's end, which no run lasts long enough to reach).
        return [] if _exhausted(seen, final) else ["canceled, though nobody canceled it now"]
    problems = []
    if status in ("past_due", "unpaid"):
        problems.append(f"ended {status!r} after the run settled (dunning should have ended)")
    if seen.paused != (status == "paused"):
        problems.append(f"ended {status!r}, yet the last pause/resume accepted: {seen.accepted}")
    if "cancel_end" in seen.accepted and not final["cancel_at_period_end"]:
        problems.append("cancel at period end accepted, yet not set")
    if status == "trialing" and any(p["attempts"] for p in final["periods"]):
        problems.append("trialing, yet a renewal was attempted")
    if status == "active" and seen.story != "sub_trial":
        charged = [p for p in final["periods"] if p["attempts"]]
        if not charged or charged[-1]["status"] not in ("paid", "paid_by_credit"):
            problems.append(f"active, yet its charged periods are {charged}")
    return problems


def subscription_verdict(
    seen: dict[str, SubscriptionSeen],
    finals: dict[str, dict[str, Any] | None],
    money: dict[str, RenewalMoney],
) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for subscription_id, subscription in seen.items():
        problems = judge_subscription(subscription, finals.get(subscription_id), money)
        if problems:
            found[subscription_id] = problems
    return found
