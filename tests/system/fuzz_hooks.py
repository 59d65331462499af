"""Schemathesis hooks for tests/system/test_fuzz.py (the `st` process loads them from its config
file).

The OpenAPI document states every rule the API enforces but one: a card number (13-19 digits
passing Luhn's check, in any spelling) is refused in every string, and JSON Schema cannot say
"not a Luhn-valid run of digits". Positive cases that happen to carry one are dropped here: they
are not valid requests, and the API's 422 `card_data_not_allowed` for them is the contract
(tests/system/test_card_data.py proves it). Negative cases are left alone.

Payment creations are also given an Idempotency-Key of their own (two of three positive ones),
so the fuzzer drives the workflow path rather than replaying one key; the rest keep the
generated key, whose repeats exercise `409 idempotency_key_reused`. The choice comes from a hash
of the generated body, so a run is reproducible from its seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import schemathesis
from schemathesis.core.parameters import ParameterLocation

from domain.cards import contains_card_number

_IDEMPOTENCY_HEADER = "Idempotency-Key"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):  # headers are a case-insensitive mapping, not a dict
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def carries_card_number(case: Any) -> bool:
    parts = (case.path_parameters, case.query, case.headers, case.body)
    return any(contains_card_number(text) for part in parts for text in _strings(part))


def _positive(case: Any, location: ParameterLocation | None = None) -> bool:
    meta = case.meta
    if meta is None:
        return True
    if location is not None:
        return not meta.is_negative_at(location)
    return bool(meta.generation.mode.is_positive)


@schemathesis.hook
def filter_case(context: schemathesis.HookContext, case: Any) -> bool:
    return not (_positive(case) and carries_card_number(case))


# `apply_to` is attached at runtime, so mypy cannot see it.
@schemathesis.hook.apply_to(path="/v1/payments", method="POST")  # type: ignore[attr-defined, untyped-decorator]
def map_case(context: schemathesis.HookContext, case: Any) -> Any:
    body = case.body
    if not isinstance(body, dict) or not _positive(case, ParameterLocation.BODY):
        return case
    seed = zlib.crc32(repr(sorted(body.items(), key=str)).encode())
    if seed % 3 == 0:
        return case  # sent with the generated key
    if _IDEMPOTENCY_HEADER in (case.headers or {}) and _positive(case, ParameterLocation.HEADER):
        # Generated keys repeat (shrinking favours "00000000"), and a repeated key with another
        # body is a 409: unrepaired cases keep exercising that, these get their own.
        headers = case.headers.copy()
        headers[_IDEMPOTENCY_HEADER] = f"fuzz-{seed:08x}-{zlib.adler32(repr(body).encode()):08x}"
        case.headers = headers
    return case
