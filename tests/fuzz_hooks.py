"""Schemathesis hooks for tests/test_fuzz.py (the `st` process loads them from its config file).

The OpenAPI document cannot say which currencies exist, what a currency's per-payment limit is,
that text may not hold control characters, or which metadata keys are allowed, so payment
bodies made from it alone almost never get past validation. Here two of three *positive*
payment cases are repaired (a supported currency, an amount within every limit, text without
control characters, metadata keys in the allowed form) and sent under an Idempotency-Key of
their own, so the fuzzer drives the workflow path as well as validation. Negative cases are
left alone: they must stay invalid for schemathesis to judge their rejection.

The choice and the values come from a hash of the generated body, so a run is reproducible
from its seed.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import schemathesis
from schemathesis.core.parameters import ParameterLocation

from domain.money import CURRENCIES
from domain.payment import MAX_METADATA_KEYS

_SUPPORTED = sorted(CURRENCIES)
# Below every currency's per-payment limit, so any currency can carry it.
_MAX_AMOUNT = 10_000_000
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_METADATA_KEY = re.compile(r"[A-Za-z0-9_.-]{1,40}")
_IDEMPOTENCY_HEADER = "Idempotency-Key"


def _clean(value: Any) -> Any:
    return _CONTROL.sub("", value) if isinstance(value, str) else value


def repaired(body: dict[str, Any], seed: int) -> dict[str, Any]:
    fixed = {key: _clean(value) for key, value in body.items()}
    fixed.update(currency=_SUPPORTED[seed % len(_SUPPORTED)], amount=1 + seed % _MAX_AMOUNT)
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        kept = [(k, _clean(v)) for k, v in metadata.items() if _METADATA_KEY.fullmatch(k)]
        fixed["metadata"] = dict(kept[:MAX_METADATA_KEYS])
    return fixed


def _positive(case: Any, location: ParameterLocation) -> bool:
    meta = case.meta
    return meta is None or not meta.is_negative_at(location)


# `apply_to` is attached at runtime, so mypy cannot see it.
@schemathesis.hook.apply_to(path="/v1/payments", method="POST")  # type: ignore[attr-defined, untyped-decorator]
def map_case(context: schemathesis.HookContext, case: Any) -> Any:
    body = case.body
    if not isinstance(body, dict) or not _positive(case, ParameterLocation.BODY):
        return case
    seed = zlib.crc32(repr(sorted(body.items(), key=str)).encode())
    if seed % 3 == 0:
        return case  # sent as generated
    case.body = repaired(body, seed)
    if _IDEMPOTENCY_HEADER in case.headers and _positive(case, ParameterLocation.HEADER):
        # Generated keys repeat (shrinking favours "00000000"), and a repeated key with another
        # body is a 409: unrepaired cases keep exercising that, repaired ones get their own.
        headers = case.headers.copy()
        headers[_IDEMPOTENCY_HEADER] = f"fuzz-{seed:08x}-{zlib.adler32(repr(body).encode()):08x}"
        case.headers = headers
    return case
