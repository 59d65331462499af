"""How long each kind of string may be: what the database schema stores, in one place.

Every edge checks against these (the REST API's models and headers, the Kafka intake, the
workflow's signals and updates) so that nothing reaches a column it does not fit: a value too
long for its column would make PostgreSQL raise 22001 deep inside a saga step instead of a
clear refusal at the door. `tests/system/test_bounds.py` reads the live schema and fails when a
column and its bound here disagree.
"""

from __future__ import annotations

import re

# Identifiers: payment, client, customer, merchant, refund and dispute ids; the ledger's
# `reference` (a refund or dispute id) and the payments register's id columns: VARCHAR(64).
ID_MAX = 64
# Free text kept with a payment: descriptions, refund reasons, operators' notes: VARCHAR(500)
# for the ledger's `description`; the same bound for text that lives in the state.
TEXT_MAX = 500
# A card network's dispute reason code ("fraudulent", "4837").
REASON_CODE_MAX = 32
# The `Idempotency-Key` header / `idempotency-key` Kafka header (never stored: hashed into the
# payment id).
IDEMPOTENCY_KEY_MIN = 8
IDEMPOTENCY_KEY_MAX = 255
# A request fingerprint: the hex SHA-256 of the canonical body.
FINGERPRINT_LENGTH = 64

# Ids chosen by operators for refunds and disputes they send by hand (`re_manual_1`): they
# become the ledger's reference and part of an event id, so a safe, bounded charset.
FOLLOW_UP_ID = re.compile(rf"^[A-Za-z0-9_-]{{1,{ID_MAX}}}$")
# Control characters (tab and newline excepted) are refused in every text a
# client sends; the API's schema declares TEXT_PATTERN, which the same class builds.
_CONTROL_CLASS = r"\x00-\x08\x0b-\x1f\x7f"
_CONTROL_CHARS = re.compile(f"[{_CONTROL_CLASS}]")
TEXT_PATTERN = f"^[^{_CONTROL_CLASS}]*$"


def has_control_characters(value: str) -> bool:
    return _CONTROL_CHARS.search(value) is not None


def clipped_text(value: str, limit: int = TEXT_MAX) -> str:
    """Operator-supplied text that is only ever displayed (a reviewer's note): control
    characters dropped (PostgreSQL's JSONB refuses NUL), clipped to `limit`."""
    return _CONTROL_CHARS.sub("", value)[:limit]
