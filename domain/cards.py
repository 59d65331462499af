"""Detects card numbers (PANs) so they are refused before they reach logs, history or storage.

A *digit run* is a stretch of text made of digits and of separators between them, where a
separator is any run of characters that are neither letters nor digits: spaces, dashes, dots,
underscores, slashes, colons, tabs, newlines, repeated or mixed (`4242.4242 / 4242__4242`).
A letter ends a run. Digits are any Unicode decimal digits (full-width `４２４２` too). The
run's *groups* are its stretches of digits between separators. UUIDs and long hex ids are not
read: 1 in 250 random ones would otherwise pass for a card number (`_IDENTIFIERS`).

A run holds a card number when

1. **all its digits**, 13–19 of them, pass the Luhn check, whatever they begin with
   (`4242 4242 4242 4242`, `4242.4242-4242_4242`, `cus_4242424242424242`); or
2. **some 13–19 of its consecutive digits** pass the Luhn check, begin with the issuer prefix
   of a card brand that issues numbers of that length (`ISSUER_PREFIXES`), and are written as
   a card number would be inside longer text: whole groups (`ref 12 4242 4242 4242 4242`),
   digits glued to other digits (`0094242424242424242`), or digits split by one separator
   used throughout (`99-4242-4242-4242-4242`).

Why the conditions in 2 (docs/security.md, "Card numbers", has the measured rates): about one
window of digits in ten passes Luhn by chance, and a run of n digits has up to 7n windows, so
without the issuer prefix every long number (a 20-digit bank reference, an IBAN's digits) and
without the spelling condition every list of amounts (`12.50 / 3.99 / 8.00 / 10.00`) would be
refused. What slips through is deliberate disguise, e.g. digits glued to other digits *and*
split by mixed separators, or letters between digits: detection stops the numbers people and
programs actually write, not a sender determined to hide one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

MIN_PAN, MAX_PAN = 13, 19

# A digit run: digits, and between them any runs of non-alphanumeric characters. The two
# classes are disjoint, so matching is linear in the text (no backtracking blow-up).
_DIGIT_RUN = re.compile(r"\d+(?:[\W_]+\d+)*")
_DIGITS = re.compile(r"\d+")

# Issuer prefixes (IIN ranges) of the card brands, with the PAN lengths each issues. Broad on
# purpose: a payments system errs on the side of refusing. Only hidden windows consult it.
_ALL = tuple(range(16, MAX_PAN + 1))
ISSUER_PREFIXES: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("1", "1", (15,)),  # UATP
    ("2200", "2204", _ALL),  # Mir
    ("2221", "2720", (16,)),  # Mastercard 2-series
    ("300", "305", (14, *_ALL)),  # Diners Club
    ("34", "34", (15,)),  # American Express
    ("353", "356", _ALL),  # JCB, RuPay
    ("3528", "3589", _ALL),  # JCB
    ("36", "36", (14, *_ALL)),  # Diners Club International
    ("37", "37", (15,)),  # American Express
    ("38", "39", (14, *_ALL)),  # Diners Club, Discover
    ("4", "4", (13, *_ALL)),  # Visa (13 is legacy; 16–19 current)
    ("50", "50", _ALL),  # Maestro, Verve, RuPay
    ("51", "55", (16,)),  # Mastercard
    ("56", "69", _ALL),  # Maestro, Discover (6011, 644–649, 65), UnionPay (62), RuPay (60)
    ("81", "82", _ALL),  # UnionPay, RuPay
    ("9792", "9792", _ALL),  # Troy
)


@lru_cache(maxsize=1)
def _prefix_lengths() -> dict[str, frozenset[int]]:
    """Every issuer prefix spelled out (`"2221"`, `"2222"`, …) with the PAN lengths it issues."""
    table: dict[str, set[int]] = {}
    for low, high, lengths in ISSUER_PREFIXES:
        for value in range(int(low), int(high) + 1):
            table.setdefault(str(value).zfill(len(low)), set()).update(lengths)
    return {prefix: frozenset(lengths) for prefix, lengths in table.items()}


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _ascii_digits(text: str) -> str:
    return text if text.isascii() else "".join(str(int(ch)) for ch in text)


class _LuhnSums:
    """Prefix sums that give the Luhn total of any window of `digits` in O(1).

    Luhn doubles every second digit counted from the window's *last* digit, so which digits
    are doubled depends on the parity of the window's end: one prefix sum per parity."""

    def __init__(self, digits: str) -> None:
        # sums[p][k]: digits[:k], doubling those at positions j with j % 2 == p.
        self.sums: tuple[list[int], list[int]] = ([0], [0])
        for j, ch in enumerate(digits):
            d = ord(ch) - 48
            doubled = d * 2 - 9 if d > 4 else d * 2
            for parity in (0, 1):
                self.sums[parity].append(
                    self.sums[parity][-1] + (doubled if j % 2 == parity else d)
                )

    def valid(self, start: int, length: int) -> bool:
        sums = self.sums[(start + length) % 2]  # doubled: every second digit left of the last
        return (sums[start + length] - sums[start]) % 10 == 0


class _Run:
    """One digit run: its digits, which group each digit is in, and how far from each group
    the same separator keeps being used."""

    def __init__(self, run: str) -> None:
        groups = _DIGITS.findall(run)
        separators = _DIGITS.split(run)[1:-1]
        self.digits = _ascii_digits("".join(groups))
        self.group_of: list[int] = []
        self.boundaries = {0}
        for index, group in enumerate(groups):
            self.group_of.extend([index] * len(group))
            self.boundaries.add(len(self.group_of))
        # same_separator_until[i]: the last group reached from group i crossing only
        # separators equal to the one right after group i.
        last = len(groups) - 1
        self.same_separator_until = list(range(len(groups)))
        for i in range(last - 1, -1, -1):
            follows = i + 1 < last and separators[i] == separators[i + 1]
            self.same_separator_until[i] = self.same_separator_until[i + 1] if follows else i + 1

    def written_as_a_card_number(self, start: int, end: int) -> bool:
        """Whole groups, or crossing one kind of separator only (none: glued digits)."""
        if start in self.boundaries and end in self.boundaries:
            return True
        first, final = self.group_of[start], self.group_of[end - 1]
        return final <= self.same_separator_until[first]

    def holds_card_number(self) -> bool:
        digits = self.digits
        if MIN_PAN <= len(digits) <= MAX_PAN and luhn_valid(digits):
            return True
        if len(digits) < MIN_PAN:
            return False
        table = _prefix_lengths()
        luhn = _LuhnSums(digits)
        for start in range(len(digits) - MIN_PAN + 1):
            lengths: set[int] = set()
            for size in (1, 2, 3, 4):
                lengths.update(table.get(digits[start : start + size], ()))
            for length in lengths:
                end = start + length
                if (
                    end <= len(digits)
                    and luhn.valid(start, length)
                    and self.written_as_a_card_number(start, end)
                ):
                    return True
        return False


# Identifiers, not card numbers: a UUID (8-4-4-4-12 hex, what most clients send as an
# `Idempotency-Key`) and a hex id of 20 or more characters with a letter in it (a hash, a UUID
# without dashes). Their digits are not read (blanked in place, so spans keep their positions):
# about 1 in 250 random ones holds a Luhn-valid run of 13-19 digits. A card number is never
# written as either.
_IDENTIFIERS = re.compile(
    r"(?<![0-9A-Za-z])(?:"
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|(?=[0-9a-fA-F]*[a-fA-F])[0-9a-fA-F]{20,}"
    r")(?![0-9A-Za-z])"
)


def _blank(match: re.Match[str]) -> str:
    return "x" * len(match.group())


def _runs(text: str) -> Iterator[re.Match[str]]:
    text = _IDENTIFIERS.sub(_blank, text)
    for match in _DIGIT_RUN.finditer(text):
        # Fewer than 13 characters cannot hold 13 digits: most runs end here, cheaply.
        if match.end() - match.start() >= MIN_PAN and _Run(match.group()).holds_card_number():
            yield match


def card_number_spans(text: str) -> list[tuple[int, int]]:
    """The (start, end) of every digit run in `text` that holds a card number."""
    return [match.span() for match in _runs(text)]


def contains_card_number(text: str) -> bool:
    return next(_runs(text), None) is not None


__all__ = [
    "ISSUER_PREFIXES",
    "MAX_PAN",
    "MIN_PAN",
    "card_number_spans",
    "contains_card_number",
    "luhn_valid",
]
