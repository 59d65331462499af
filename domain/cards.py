"""Detects card numbers (PANs) so they are refused before they reach logs, history or storage."""

from __future__ import annotations

import re
from collections.abc import Iterator

# Digit groups joined by single spaces or dashes: "4242 4242-4242 4242", "order 12 4242…".
_DIGIT_SEQUENCE = re.compile(r"\d+(?:[ -]\d+)*")
_MIN_PAN, _MAX_PAN = 12, 19


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


def _candidate_runs(text: str) -> Iterator[str]:
    """Every run of whole adjacent groups with 12–19 digits in total.

    Grouping matters: "ref 12 4242 4242 4242 4242" must still find the PAN after "12".
    """
    for match in _DIGIT_SEQUENCE.finditer(text):
        groups = re.split(r"[ -]", match.group())
        for start in range(len(groups)):
            run = ""
            for group in groups[start:]:
                run += group
                if len(run) > _MAX_PAN:
                    break
                if len(run) >= _MIN_PAN:
                    yield run


def contains_card_number(text: str) -> bool:
    return any(luhn_valid(run) for run in _candidate_runs(text))
