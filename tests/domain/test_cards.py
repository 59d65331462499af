"""Card-number detection on its own (domain/cards.py): what it refuses, what it lets through,
and the false-positive rates docs/security.md promises, measured on seeded samples."""

from __future__ import annotations

import datetime
import random
import uuid
from collections.abc import Callable

import pytest

from domain.cards import card_number_spans, contains_card_number, luhn_valid
from infra.logs import REDACTED, redact_card_numbers

VISA, AMEX, DISCOVER = "4242424242424242", "378282246310005", "6011111111111117"


def luhn_complete(prefix: str) -> str:
    return next(prefix + d for d in "0123456789" if luhn_valid(prefix + d))


@pytest.mark.parametrize(
    "text",
    [
        VISA,
        "4242 4242 4242 4242",
        "4242.4242.4242.4242",
        "4242_4242_4242_4242",
        "4242/4242/4242/4242",
        "4242:4242:4242:4242",
        "4242\t4242\n4242\r\n4242",
        "4242 -- 4242 .. 4242 // 4242",  # repeated and mixed
        "4.2.4.2.4.2.4.2.4.2.4.2.4.2.4.2",
        "3782 822463 10005",  # Amex grouping
        f"cus_{DISCOVER}",
        "ref 12 / 4242-4242-4242-4242 / 2027",  # after other digits: whole groups
        f"order 00{DISCOVER}99",  # glued inside a longer run
        "99-4242-4242-4242-424211",  # glued, one separator throughout
        "４２４２ ４２４２ ４２４２ ４２４２",  # full-width digits
        luhn_complete("4" + "0" * 11),  # 13 digits, Visa's shortest
        luhn_complete("6" + "1" * 17),  # 19 digits
    ],
)
def test_card_numbers_are_found_in_any_spelling(text: str) -> None:
    assert contains_card_number(text)
    assert REDACTED in redact_card_numbers(text)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-30",
        "2026-11-30 12:34:56 UTC",
        "from 2026-01-15 to 2026-02-15",
        "12.50 USD",
        "Total: 1,234.56",
        "+1 415 555 0100",
        "+44 20 7946 0958",
        "4242424242424241",  # the test card with a wrong check digit
        luhn_complete("4" + "2" * 10),  # 12 digits: shorter than any PAN
        "6f1c2d1e-3b0e-4d8e-9a57-0c2b8f6d1e34",  # letters end digit runs
        "pay_0123456789abcdef01234567",
    ],
)
def test_ordinary_numbers_pass(text: str) -> None:
    assert not contains_card_number(text)
    assert redact_card_numbers(text) == text


def test_the_redactor_replaces_only_the_run_holding_the_card_number() -> None:
    line = "refund re_1 for 4242.4242.4242.4242 on 2026-01-15, amount 12.50"
    assert redact_card_numbers(line) == f"refund re_1 for {REDACTED} on 2026-01-15, amount 12.50"
    spans = card_number_spans(f"a {VISA} b {AMEX} c")
    assert len(spans) == 2


def test_what_slips_through_is_deliberate_disguise() -> None:
    """The documented limits (docs/security.md): letters between the digits, or digits glued
    to other digits *and* split by mixed separators. A whole number in mixed separators, or
    glued with one separator throughout, is still found."""
    assert not contains_card_number("4242x4242x4242x4242")
    assert not contains_card_number("99424.2424-2424 24242")  # glued and mixed
    assert contains_card_number("4242.4242-4242 4242")  # mixed, not glued
    assert contains_card_number("994242.4242.4242.424211")  # glued, one separator
    # A card number glued to a word is still one; inside a long hex id it is not read.
    assert contains_card_number("card4242424242424242x")
    assert not contains_card_number("deadbeef4242424242424242")


_rng = random.Random(20261130)


def _digits(n: int) -> str:
    return "".join(_rng.choice("0123456789") for _ in range(n))


def _not_luhn(n: int) -> str:
    while True:
        number = _digits(n)
        if not luhn_valid(number):
            return number


def _date() -> str:
    return (datetime.date(2000, 1, 1) + datetime.timedelta(days=_rng.randrange(20_000))).isoformat()


def _amount() -> str:
    return f"{_rng.randrange(1, 1000)}.{_rng.randrange(100):02d}"


# (what, sample, the most docs/security.md says is refused): measured 2026-11-30 at about
# 7 %, 12 %, 11 %, 0.4 %, 11 %, 14 % and 48 %.
FALSE_POSITIVES: list[tuple[str, Callable[[], str], float]] = [
    ("16-digit order number, not Luhn-valid", lambda: _not_luhn(16), 0.09),
    ("three amounts", lambda: ", ".join(_amount() for _ in range(3)), 0.13),
    ("a date range", lambda: f"{_date()} - {_date()}", 0.12),
    (
        "a timestamp with microseconds",
        lambda: (
            f"{_date()} {_rng.randrange(24):02d}:{_rng.randrange(60):02d}:"
            f"{_rng.randrange(60):02d}.{_rng.randrange(10**6):06d}"
        ),
        0.01,
    ),
    ("an international phone number", lambda: f"+{_rng.randrange(1, 999)} {_digits(11)}", 0.13),
    ("four amounts", lambda: " / ".join(_amount() for _ in range(4)), 0.17),
    ("a 20-digit reference", lambda: _digits(20), 0.50),
    # What clients use as idempotency keys and references (1 in 250 was refused before UUIDs
    # and hex ids stopped being read).
    ("a UUID", lambda: str(uuid.UUID(int=_rng.getrandbits(128), version=4)), 0.0),
    ("a hex id", lambda: f"key-{uuid.UUID(int=_rng.getrandbits(128), version=4).hex}", 0.0),
]


@pytest.mark.parametrize(("what", "sample", "at_most"), FALSE_POSITIVES)
def test_false_positive_rates_stay_as_documented(
    what: str, sample: Callable[[], str], at_most: float
) -> None:
    _rng.seed(what)  # the same sample whichever tests run before
    texts = [sample() for _ in range(3000 if at_most else 20_000)]
    rate = sum(contains_card_number(t) for t in texts) / len(texts)
    assert rate <= at_most, f"{what}: {rate:.3f} refused"
