"""The seeded script: which payments, which follow-ups, in which order and when. Everything
random is drawn here from `random.Random(seed)`, before anything runs, so a seed names one
script (the real services still choose how its concurrent steps interleave)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from domain.fraud import amount_for_limit_share

# First payment of a customer at these shares of the currency's limit (domain/fraud.py).
REVIEW_AMOUNT = amount_for_limit_share("USD", 50)  # score 0.80: waits for a human
REJECT_AMOUNT = amount_for_limit_share("USD", 80)  # score 1.00: rejected
# The short policy (window and review timeout), served by a second API with those settings.
SHORT_WINDOW_SECONDS = 12.0
SHORT_REVIEW_TIMEOUT_SECONDS = 3.0
# The short authorization expiry of the acquirer's short-policy API (manual_expiry stories).
SHORT_AUTHORIZATION_EXPIRY_SECONDS = 3.0
DECLINE_METHODS = (
    "pm_card_decline_insufficient_funds",
    "pm_card_decline_do_not_honor",
    "pm_card_decline_expired_card",
    "pm_card_decline_lost_card",
    "pm_card_decline_restricted_card",
)

STORIES = {
    # story: weight
    "plain": 40,
    "review_approve": 8,
    "review_decline": 6,
    "review_timeout": 5,
    "reject": 5,
    "cancel_race": 12,
    "operator_cancel": 10,
    "window": 14,
}
# Through the sandbox acquirer (issue 15, docs/acquirer.md): only when the rig has one.
ACQUIRER_STORIES = {
    "acq_auto": 8,
    "acq_decline": 4,
    "acq_partial": 5,
    "manual_capture": 6,
    "manual_capture_part": 6,
    "manual_void": 4,
    "manual_expiry": 4,
    "manual_race": 6,
}


@dataclass(frozen=True)
class Op:
    """One request. `after`: seconds after the story's previous step; `together`: sent at the
    same time as the previous op instead of after it."""

    # refund, dispute, close, cancel, operator_cancel, approve, decline, get, list, capture, void
    kind: str
    after: float = 0.0
    together: bool = False
    amount: int | None = None
    key: str = ""  # the refund's Idempotency-Key, or the dispute's network reference
    target: int = -1  # close: the index (in ops) of the dispute it closes
    outcome: str = ""  # close: won or lost
    digits: bool = False  # key made of digits only


@dataclass(frozen=True)
class Story:
    index: int
    kind: str
    amount: int
    start_after: float
    ops: tuple[Op, ...]
    payment_method: str = "pm_card_visa_0001"
    # What a capture of this payment captures: the authorized amount, or amount_to_capture.
    capture_amount: int = 0

    @property
    def short_policy(self) -> bool:
        return self.kind in ("window", "review_timeout", "manual_expiry")

    @property
    def acquirer(self) -> bool:
        return self.kind in ACQUIRER_STORIES

    @property
    def manual(self) -> bool:
        return self.kind.startswith("manual_")


# Subscriptions (issue 17), through the acquirer's short-policy API: a declined renewal is
# retried these seconds after its first attempt, then the subscription is canceled.
SHORT_DUNNING_SECONDS = (1.0, 2.5)
SUBSCRIPTION_STORIES = {
    "sub_paid": 4,  # no trial: the first period is charged at once
    "sub_trial": 3,  # a trial: nothing charged during the run
    "sub_dunning": 3,  # a declining method: past_due, retried, canceled when exhausted
    "sub_recover": 3,  # a declining method replaced by a good one while dunning
}
# Changes a subscription story may send (each answered 200 or refused 409 with its reason).
SUBSCRIPTION_OPS = ("price", "pause", "resume", "cancel_end", "sub_get", "cancel_now")


@dataclass(frozen=True)
class SubscriptionStory:
    index: int
    kind: str
    unit_amount: int
    quantity: int
    trial_days: int
    payment_method: str
    start_after: float
    # kinds: price (amount: the new unit_amount), pause, resume, cancel_end, cancel_now,
    # method (the payment method becomes pm_card_visa), sub_get
    ops: tuple[Op, ...]


@dataclass(frozen=True)
class Script:
    seed: int
    stories: tuple[Story, ...]
    subscriptions: tuple[SubscriptionStory, ...] = ()


def _subscription_stories(seed: int, count: int, start_spread: float) -> list[SubscriptionStory]:
    """Drawn from a generator of their own, so a seed's payment stories stay what they were."""
    rng = random.Random(f"subscriptions-{seed}")
    kinds, weights = zip(*SUBSCRIPTION_STORIES.items(), strict=True)
    stories = []
    for index in range(count):
        kind = rng.choices(kinds, weights)[0]
        declining = kind in ("sub_dunning", "sub_recover")
        method = "pm_card_decline_insufficient_funds" if declining else "pm_card_visa"
        ops: list[Op] = []
        if kind == "sub_recover":  # before the last retry, sometimes after the first
            ops.append(Op("method", rng.uniform(0.2, SHORT_DUNNING_SECONDS[-1] - 0.5)))
        for _ in range(rng.randint(0, 3)):
            chosen = rng.choices(SUBSCRIPTION_OPS, (3, 2, 2, 2, 1, 1))[0]
            amount = rng.randint(100, 3_000) if chosen == "price" else None
            ops.append(Op(chosen, rng.uniform(0, 1.5), rng.random() < 0.2, amount))
        stories.append(
            SubscriptionStory(
                index=index,
                kind=kind,
                unit_amount=rng.randint(100, 3_000),
                quantity=rng.randint(1, 3),
                trial_days=rng.randint(1, 14) if kind == "sub_trial" else 0,
                payment_method=method,
                start_after=rng.uniform(0, start_spread),
                ops=tuple(ops),
            )
        )
    return stories


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def is_card_number(digits: str) -> bool:
    """Digits paysaga must refuse whatever else it reads as one (domain/cards.py): 13–19 of
    them, Luhn-valid as a whole. Shorter windows of a longer run may be refused too, by rules
    this test does not repeat."""
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def _digit_key(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(13, 19)))


def _follow_ups(rng: random.Random, amount: int, story: str) -> list[Op]:
    ops: list[Op] = []
    spread = SHORT_WINDOW_SECONDS + 4 if story == "window" else 1.5
    n = rng.randint(1, 7)
    for i in range(n):
        after = rng.uniform(0, spread / n * 2) if story == "window" else rng.uniform(0, spread)
        together = bool(ops) and rng.random() < 0.3
        roll = rng.random()
        digits = rng.random() < 0.15
        key = _digit_key(rng) if digits else f"k{i}-{rng.getrandbits(48):012x}"
        if roll < 0.40:
            size = rng.choice(("partial", "partial", "full", "over"))
            value = {
                "partial": rng.randint(1, max(1, amount // 3)),
                "full": None,
                "over": amount + rng.randint(1, amount),
            }[size]
            ops.append(Op("refund", after, together, value, key, digits=digits))
            previous = [o for o in ops if o.kind == "refund"]
            if rng.random() < 0.25:  # the same request again, or the key with another amount
                again = previous[-1]
                other = (again.amount or amount) + rng.choice((0, 0, 1))
                ops.append(Op("refund", rng.uniform(0, 0.5), rng.random() < 0.5, other, again.key,
                              digits=again.digits))  # fmt: skip
        elif roll < 0.65:
            value = rng.choice((None, rng.randint(1, max(1, amount // 2)), amount + 1))
            ops.append(Op("dispute", after, together, value, key, digits=digits))
        elif roll < 0.82:
            opened = [j for j, o in enumerate(ops) if o.kind == "dispute"]
            if opened:
                outcome = rng.choice(("won", "lost"))
                ops.append(Op("close", after, together, target=rng.choice(opened), outcome=outcome))
        elif roll < 0.88:
            ops.append(Op("cancel", after, together))
        elif roll < 0.94:
            ops.append(Op("get", after, together))
        else:
            ops.append(Op("list", after, together))
    return ops


def _acquirer_story(rng: random.Random, kind: str, amount: int) -> tuple[str, int, list[Op]]:
    """(payment method, what a capture captures, ops) of a story through the acquirer."""
    method, captured, ops = "pm_card_visa", amount, []
    if kind == "acq_decline":
        method = rng.choice(DECLINE_METHODS)
    elif kind == "acq_partial":
        method, captured = "pm_card_partial_approval", amount // 2
    elif kind == "manual_capture":
        ops.append(Op("capture", rng.uniform(0, 1.0)))
    elif kind == "manual_capture_part":
        captured = rng.randint(1, amount)
        ops.append(Op("capture", rng.uniform(0, 1.0), amount=captured))
    elif kind == "manual_void":
        ops.append(Op("void", rng.uniform(0, 1.0)))
        if rng.random() < 0.3:  # the same void again, or a late capture
            ops.append(Op(rng.choice(("void", "capture")), 0, rng.random() < 0.5))
    elif kind == "manual_race":  # a capture or a void sent together with a cancel
        if rng.random() < 0.5:
            captured = rng.choice((amount, rng.randint(1, amount)))
            ops.append(Op("capture", rng.uniform(0, 0.5), amount=captured))
        else:
            ops.append(Op("void", rng.uniform(0, 0.5)))
        ops.insert(rng.randint(0, 1), Op("cancel", 0))
        ops[1] = Op(ops[1].kind, 0, True, ops[1].amount)
    if kind in ("acq_auto", "acq_partial", "manual_capture", "manual_capture_part", "manual_race"):
        ops.extend(_follow_ups(rng, amount, kind))  # refunds and disputes after the capture
    return method, captured, ops


def make_script(
    seed: int,
    payments: int,
    start_spread: float = 4.0,
    acquirer: bool = False,
    subscriptions: int = 0,
) -> Script:
    """`subscriptions` stories need the acquirer (their renewals go through it)."""
    rng = random.Random(seed)
    stories_of = {**STORIES, **ACQUIRER_STORIES} if acquirer else STORIES
    kinds, weights = zip(*stories_of.items(), strict=True)
    stories = []
    for index in range(payments):
        kind = rng.choices(kinds, weights)[0]
        amount = rng.randint(100, 50_000)
        ops: list[Op] = []
        method, captured = "pm_card_visa_0001", amount
        if kind in ACQUIRER_STORIES:
            method, captured, ops = _acquirer_story(rng, kind, amount)
        elif kind in ("review_approve", "review_decline", "review_timeout"):
            amount = REVIEW_AMOUNT
            if kind != "review_timeout":
                decision = "approve" if kind == "review_approve" else "decline"
                ops.append(Op(decision, rng.uniform(0, 1.0)))
                if rng.random() < 0.3:  # a second reviewer, too late or contradicting
                    ops.append(Op(rng.choice(("approve", "decline")), 0, rng.random() < 0.5))
            if rng.random() < 0.3:
                ops.append(Op("cancel", rng.uniform(0, 0.5), rng.random() < 0.5))
        elif kind == "reject":
            amount = REJECT_AMOUNT
        elif kind == "cancel_race":
            ops.append(Op("cancel", rng.choice((0.0, rng.uniform(0, 0.4)))))
            if rng.random() < 0.3:
                ops.append(Op("cancel", 0, True))
        elif kind == "operator_cancel":
            ops.append(Op("operator_cancel", rng.uniform(0, 2.0)))
        if kind in ("plain", "review_approve", "window", "operator_cancel", "cancel_race"):
            ops.extend(_follow_ups(rng, amount, kind))
        start = rng.uniform(0, start_spread)
        stories.append(Story(index, kind, amount, start, tuple(ops), method, captured))
    subscription_stories = _subscription_stories(seed, subscriptions, start_spread)
    return Script(seed, tuple(stories), tuple(subscription_stories))
