"""The sandbox acquirer's test payment methods (docs/acquirer.md): what each token does when
authorized — approve, decline with a network code, approve late, time out, fail once, approve
in part. Any other token approves."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Behaviour(StrEnum):
    APPROVE = "approve"
    DECLINE = "decline"
    APPROVE_AFTER_DELAY = "approve_after_delay"
    TIMEOUT = "timeout"
    ERROR_ONCE = "error_once"
    PARTIAL_APPROVAL = "partial_approval"


@dataclass(frozen=True)
class SandboxPaymentMethod:
    token: str
    behaviour: Behaviour
    what_happens: str
    decline_code: str | None = None


_DECLINES: tuple[tuple[str, str], ...] = (
    ("insufficient_funds", "The card has insufficient funds."),
    ("do_not_honor", "The issuer declined without giving a reason."),
    ("expired_card", "The card has expired."),
    ("card_velocity_exceeded", "The card's spending or attempt limit was exceeded."),
    ("lost_card", "The card was reported lost."),
    ("stolen_card", "The card was reported stolen."),
    # A real network code paysaga has no name for: it arrives as generic_decline, raw code kept.
    ("restricted_card", "The card cannot be used for this kind of payment."),
)
DECLINE_MESSAGES: dict[str, str] = dict(_DECLINES)

TEST_PAYMENT_METHODS: tuple[SandboxPaymentMethod, ...] = (
    SandboxPaymentMethod(
        "pm_card_visa",
        Behaviour.APPROVE,
        "Approves the full amount. So does every token not in this table, e.g. "
        "`pm_card_visa_0001`.",
    ),
    *(
        SandboxPaymentMethod(
            f"pm_card_decline_{code}", Behaviour.DECLINE, f"Declines with `{code}`.", code
        )
        for code, _ in _DECLINES
    ),
    SandboxPaymentMethod(
        "pm_card_approve_after_delay",
        Behaviour.APPROVE_AFTER_DELAY,
        "Approves after `--delay-seconds` (default 2 s); nothing is authorized until then.",
    ),
    SandboxPaymentMethod(
        "pm_card_timeout",
        Behaviour.TIMEOUT,
        "Every operation (authorize, capture, void, refund) HAPPENS, but its first answer is "
        "held for `--hang-seconds` (default 90 s): the client times out not knowing. Status by "
        "reference shows what happened; a retry with the same reference answers at once.",
    ),
    SandboxPaymentMethod(
        "pm_card_error_once",
        Behaviour.ERROR_ONCE,
        "Every operation answers `500 internal_error` the first time it is asked (per reference, "
        "and per refund reference), WITHOUT happening; asked again, it behaves normally.",
    ),
    SandboxPaymentMethod(
        "pm_card_partial_approval",
        Behaviour.PARTIAL_APPROVAL,
        "Approves half the amount, rounded down (a 1-minor-unit amount is approved in full).",
    ),
)
_BY_TOKEN = {m.token: m for m in TEST_PAYMENT_METHODS}


def payment_method_behaviour(token: str) -> SandboxPaymentMethod:
    return _BY_TOKEN.get(token) or SandboxPaymentMethod(token, Behaviour.APPROVE, "approves")
