"""When a payment takes a refund, a dispute, a dispute's close or a cancel, and when it refuses.

One set of rules for every way a follow-up arrives: the workflow's Update validators (the REST
API and the CLI; a refusal never enters the history and the caller gets the reason), and the
operators' signals (a refusal is recorded on the refund or dispute as failed, with the reason).
Pure functions of the payment's state: no Temporal, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from domain.bounds import FOLLOW_UP_ID, ID_MAX, REASON_CODE_MAX, TEXT_MAX, has_control_characters
from domain.money import MAX_INT64
from domain.payment import (
    AttentionResolution,
    CancelSignal,
    CaptureSignal,
    DisputeClosedSignal,
    DisputeOpenedSignal,
    DisputeStatus,
    PaymentState,
    PaymentStatus,
    RefundSignal,
)

ENDED = frozenset(
    {PaymentStatus.REJECTED, PaymentStatus.DECLINED, PaymentStatus.CANCELED, PaymentStatus.FAILED}
)


class Taking(StrEnum):
    """What the payment's workflow takes right now. It only ever narrows within a run, and it
    narrows *before* the workflow stops serving: whatever was accepted is carried out."""

    NOT_YET = "not_yet"  # not captured (yet, or ever): nothing to return
    EVERYTHING = "everything"  # captured and within its dispute window
    DISPUTE_CLOSES = "dispute_closes"  # window closed or canceled: only closing open disputes
    NOTHING = "nothing"  # ending: nothing more
    BUSY = "busy"  # handing over to a fresh run (continue-as-new): ask again in a moment


class Refusal(StrEnum):
    """Why a follow-up was refused: the REST API's error code for it."""

    INVALID = "invalid_follow_up"
    AMOUNT_INVALID = "amount_invalid"
    NOT_CAPTURED = "payment_not_captured"
    NOTHING_LEFT = "charge_already_refunded"
    AMOUNT_TOO_LARGE = "amount_too_large"
    CLOSED = "payment_closed"
    BUSY = "payment_busy"
    KEY_REUSED = "idempotency_key_reused"
    DISPUTE_MISSING = "dispute_missing"
    DISPUTE_FAILED = "dispute_failed"
    DISPUTE_CLOSED = "dispute_closed"
    NOT_CANCELABLE = "payment_not_cancelable"
    NOTHING_TO_RESOLVE = "nothing_to_resolve"
    NOT_CAPTURABLE = "payment_not_capturable"


@dataclass(frozen=True)
class Refused:
    code: Refusal
    message: str  # for the client: built from rules and amounts, never from the request's text


@dataclass(frozen=True)
class Door:
    """What the payment takes, and why it narrowed (shown to whoever is refused)."""

    taking: Taking
    why: str = ""


def refund_refusal(state: PaymentState, request: RefundSignal, door: Door) -> Refused | None:
    problem = _id_problem("refund_id", request.refund_id) or _text_problem(
        "reason", request.reason, TEXT_MAX
    )
    if problem:
        return problem
    if request.amount is not None and not 0 < request.amount <= MAX_INT64:
        return Refused(Refusal.AMOUNT_INVALID, "Refund amount must be a positive integer.")
    existing = next((r for r in state.refunds if r.id == request.refund_id), None)
    if existing is not None:
        if request.amount is not None and request.amount != existing.amount:
            return Refused(
                Refusal.KEY_REUSED, "This refund id was already used for another amount."
            )
        return None  # the same refund again: answered with the first one
    return _door_refusal(state, door) or _budget_refusal(state, request.amount)


def dispute_opened_refusal(
    state: PaymentState, request: DisputeOpenedSignal, door: Door
) -> Refused | None:
    problem = (
        _id_problem("dispute_id", request.dispute_id)
        or _text_problem("reason_code", request.reason_code, REASON_CODE_MAX)
        or _text_problem("network_reference", request.network_reference, ID_MAX)
    )
    if problem:
        return problem
    if request.amount is not None and not 0 < request.amount <= MAX_INT64:
        return Refused(Refusal.AMOUNT_INVALID, "Dispute amount must be a positive integer.")
    if any(d.id == request.dispute_id for d in state.disputes):
        return None  # the card network resent its notice: the same dispute
    return _door_refusal(state, door) or _budget_refusal(state, request.amount)


def dispute_closed_refusal(
    state: PaymentState, request: DisputeClosedSignal, door: Door
) -> Refused | None:
    problem = _id_problem("dispute_id", request.dispute_id)
    if problem:
        return problem
    dispute = next((d for d in state.disputes if d.id == request.dispute_id), None)
    if dispute is None:
        return Refused(Refusal.DISPUTE_MISSING, "No such dispute.")
    if dispute.status == DisputeStatus.FAILED:
        return Refused(Refusal.DISPUTE_FAILED, "The dispute was never opened.")
    if dispute.status in (DisputeStatus.WON, DisputeStatus.LOST):
        if dispute.status == DisputeStatus(request.outcome):
            return None  # closed that way already: answered with it
        return Refused(Refusal.DISPUTE_CLOSED, f"The dispute was already {dispute.status}.")
    if door.taking in (Taking.EVERYTHING, Taking.DISPUTE_CLOSES):
        return None
    return _door_refusal(state, door)


def cancel_refusal(
    state: PaymentState, request: CancelSignal, *, posting_started: bool, requested: bool
) -> Refused | None:
    problem = _text_problem("reason", request.reason, TEXT_MAX)
    if problem:
        return problem
    if state.status == PaymentStatus.CANCELED or requested:
        return None  # canceled, or being canceled: the same answer
    if posting_started:
        return Refused(Refusal.NOT_CANCELABLE, not_cancelable_reason(state, posting_started=True))
    if state.status in ENDED or state.status == PaymentStatus.REQUIRES_ATTENTION:
        return Refused(Refusal.NOT_CANCELABLE, not_cancelable_reason(state, posting_started=False))
    return None


def not_cancelable_reason(state: PaymentState, *, posting_started: bool) -> str:
    if posting_started:
        return "the payment is already posted to the ledger; refund it instead"
    return f"the payment is already {state.status}"


def resolution_refusal(state: PaymentState, request: AttentionResolution) -> Refused | None:
    if state.attention is None:
        return Refused(
            Refusal.NOTHING_TO_RESOLVE,
            "Nothing to resolve: the payment does not require attention.",
        )
    if not request.operator.strip():
        return Refused(Refusal.INVALID, "operator names who resolves it.")
    problem = _text_problem("operator", request.operator, ID_MAX) or _text_problem(
        "reason", request.reason, TEXT_MAX
    )
    if problem:
        return problem
    if request.action == "manual" and not request.reason.strip():
        return Refused(
            Refusal.INVALID, "A manual resolution needs a reason: it is kept in the ledger."
        )
    return None


def _door_refusal(state: PaymentState, door: Door) -> Refused | None:
    match door.taking:
        case Taking.EVERYTHING:
            return None
        case Taking.BUSY:
            return Refused(
                Refusal.BUSY,
                "The payment is moving its history to a fresh workflow run; retry in a moment.",
            )
        case Taking.NOT_YET:
            if state.status in ENDED or not state.ledger_posted:
                return Refused(
                    Refusal.NOT_CAPTURED,
                    f"The payment is {state.status}; there is nothing captured to return.",
                )
            return Refused(
                Refusal.NOT_CAPTURED,
                f"The payment is {state.status}: it takes refunds and disputes once it succeeded.",
            )
        case _:
            return Refused(
                Refusal.CLOSED, door.why or "The payment accepts no more refunds or disputes."
            )


def _budget_refusal(state: PaymentState, amount: int | None) -> Refused | None:
    available = state.refundable
    if available <= 0:
        return Refused(Refusal.NOTHING_LEFT, "Nothing is left to refund or dispute.")
    if amount is not None and amount > available:
        return Refused(
            Refusal.AMOUNT_TOO_LARGE,
            f"Amount exceeds the {available} minor units still refundable.",
        )
    return None


def _id_problem(name: str, value: str) -> Refused | None:
    if FOLLOW_UP_ID.match(value):
        return None
    return Refused(Refusal.INVALID, f"{name} must be 1-{ID_MAX} characters of A-Z a-z 0-9 _ -.")


def _text_problem(name: str, value: str | None, limit: int) -> Refused | None:
    if value is None:
        return None
    if len(value) > limit or has_control_characters(value):
        return Refused(
            Refusal.INVALID, f"{name} must be at most {limit} characters, without control ones."
        )
    return None


# ── manual capture (issue 15) ────────────────────────────────────────────────────────────────


def capture_refusal(
    state: PaymentState, request: CaptureSignal, *, requested: bool, voiding: bool
) -> Refused | None:
    """A capture is taken once, while the payment is `requires_capture`, for at most what the
    acquirer authorized."""
    if state.status != PaymentStatus.REQUIRES_CAPTURE or requested or voiding:
        return Refused(
            Refusal.NOT_CAPTURABLE,
            f"Cannot capture: the payment is {state.status}"
            + (" and already being captured or voided" if requested or voiding else "")
            + "; only a requires_capture payment is captured, once.",
        )
    amount = request.amount_to_capture
    if amount is not None and amount <= 0:
        return Refused(Refusal.AMOUNT_INVALID, "amount_to_capture must be a positive integer.")
    if amount is not None and amount > state.authorized_amount:
        return Refused(
            Refusal.AMOUNT_TOO_LARGE,
            f"amount_to_capture {amount} exceeds the {state.authorized_amount} authorized.",
        )
    return None


def void_refusal(state: PaymentState, *, capture_requested: bool) -> Refused | None:
    """Only an uncaptured authorization is voided: a captured payment is refunded instead."""
    if state.status == PaymentStatus.REQUIRES_CAPTURE and not capture_requested:
        return None
    if state.status == PaymentStatus.CANCELED:
        return None  # voided already: the same answer
    return Refused(
        Refusal.NOT_CAPTURABLE,
        f"Cannot void: the payment is {state.status}"
        + (" and being captured" if capture_requested else "")
        + "; only a requires_capture payment is voided (refund a captured one).",
    )


def refund_by_void_refusal(
    state: PaymentState, request: RefundSignal, *, capture_requested: bool, voiding: bool = False
) -> Refused | None:
    """A payment not captured yet is refunded by voiding its whole authorization; once a
    cancel or void was accepted (`voiding`) it is being canceled, and the void, not a refund,
    returns the money: refused as a canceled payment's refund is (nothing captured to return),
    never answered with a refund the register and the ledger do not have."""
    problem = _text_problem("reason", request.reason, TEXT_MAX) if request.reason else None
    if problem:
        return problem
    if capture_requested:
        return Refused(
            Refusal.NOT_CAPTURABLE, "Cannot refund: the payment is being captured; refund it after."
        )
    if voiding:
        return Refused(
            Refusal.NOT_CAPTURED,
            "The payment is being canceled: its authorization is voided, nothing was captured "
            "to return.",
        )
    if request.amount is not None and request.amount != state.authorized_amount:
        return Refused(
            Refusal.AMOUNT_INVALID,
            f"A payment not captured yet is refunded whole ({state.authorized_amount}), by "
            "voiding its authorization; to keep part of it, capture less instead.",
        )
    return None
