"""The settlement file: what an acquirer says it settled on one day (docs/reconciliation.md).

One CSV row per money movement (capture, refund, chargeback, chargeback reversal), one per fee,
and one `payout` row per payout batch: the bank transfer of the batch's net amount. Amounts are
signed integers in minor units from the merchant's side (+ money to us, - money from us) and
every batch is in one currency: its payout equals the sum of its other rows, exactly.

Parsing is all or nothing: `parse_settlement_file` returns every row or raises
`SettlementFileInvalid` listing each problem with its line number, so an import never writes
half a file. The sandbox acquirer writes files with `render_settlement_file`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum

from domain.money import CURRENCIES, MAX_INT64


class LineType(StrEnum):
    CAPTURE = "capture"
    REFUND = "refund"
    CHARGEBACK = "chargeback"
    CHARGEBACK_REVERSAL = "chargeback_reversal"
    FEE = "fee"
    PAYOUT = "payout"


# Rows that move a payment's money: each one is expected by a ledger movement.
MOVEMENT_TYPES = frozenset(
    {LineType.CAPTURE, LineType.REFUND, LineType.CHARGEBACK, LineType.CHARGEBACK_REVERSAL}
)
# The sign each type's amount must have (fees and payouts: see `_sign_problem`).
_SIGN = {
    LineType.CAPTURE: 1,
    LineType.REFUND: -1,
    LineType.CHARGEBACK: -1,
    LineType.CHARGEBACK_REVERSAL: 1,
    LineType.FEE: -1,
}

COLUMNS = (
    "settlement_date",
    "batch_id",
    "line_id",
    "type",
    "reference",
    "acquirer_reference",
    "movement_reference",
    "merchant_reference",
    "amount",
    "currency",
    "occurred_at",
)
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_FILE_BYTES = 50 * 1024 * 1024


@dataclass(frozen=True)
class SettlementLine:
    line_number: int  # in the file, the header being line 1
    settlement_date: date
    batch_id: str
    line_id: str  # the acquirer's id of this row: unique across every file it sends
    type: LineType
    reference: str  # ours: the payment id we sent as the authorization's reference
    acquirer_reference: str  # the acquirer's id of the authorization
    movement_reference: str  # the acquirer's id of the capture, refund or chargeback
    merchant_reference: str  # ours for a refund (its refund reference) or a dispute's id
    amount: int
    currency: str
    occurred_at: datetime


@dataclass(frozen=True)
class SettlementFile:
    sha256: str
    lines: tuple[SettlementLine, ...]

    @property
    def settlement_dates(self) -> list[date]:
        return sorted({line.settlement_date for line in self.lines})

    def batches(self) -> dict[str, list[SettlementLine]]:
        grouped: dict[str, list[SettlementLine]] = defaultdict(list)
        for line in self.lines:
            grouped[line.batch_id].append(line)
        return dict(grouped)


class SettlementFileInvalid(ValueError):
    """The file cannot be imported; `problems` are (line number, what is wrong), line 0 for
    the file as a whole."""

    def __init__(self, problems: list[tuple[int, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"line {n}: {p}" if n else p for n, p in problems[:20]))


def file_sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def _parse_row(number: int, row: dict[str, str]) -> tuple[SettlementLine | None, list[str]]:
    problems: list[str] = []

    def text(name: str, *, required: bool = True) -> str:
        value = (row.get(name) or "").strip()
        if not value:
            if required:
                problems.append(f"{name} is empty")
            return ""
        if not _ID.match(value):
            problems.append(f"{name} is not an identifier (letters, digits, _ . : -)")
            return ""
        return value

    try:
        settled = date.fromisoformat((row.get("settlement_date") or "").strip())
    except ValueError:
        problems.append("settlement_date is not a date (YYYY-MM-DD)")
        settled = date.min
    try:
        type_ = LineType((row.get("type") or "").strip())
    except ValueError:
        problems.append(f"type is not one of {', '.join(t.value for t in LineType)}")
        type_ = LineType.FEE
    raw_amount = (row.get("amount") or "").strip()
    if not re.fullmatch(r"-?[0-9]{1,19}", raw_amount):
        problems.append("amount is not an integer number of minor units")
        amount = 0
    else:
        amount = int(raw_amount)
        if abs(amount) > MAX_INT64:
            problems.append("amount is out of range")
    ccy = (row.get("currency") or "").strip()
    if ccy not in CURRENCIES:
        problems.append("currency is not a supported ISO 4217 code")
    try:
        occurred = datetime.fromisoformat((row.get("occurred_at") or "").strip())
        if occurred.tzinfo is None:
            problems.append("occurred_at has no time zone")
    except ValueError:
        problems.append("occurred_at is not an ISO 8601 time")
        occurred = datetime.min
    movement = type_ in MOVEMENT_TYPES
    line = SettlementLine(
        line_number=number,
        settlement_date=settled,
        batch_id=text("batch_id"),
        line_id=text("line_id"),
        type=type_,
        reference=text("reference", required=movement),
        acquirer_reference=text("acquirer_reference", required=movement),
        movement_reference=text("movement_reference"),
        merchant_reference=text("merchant_reference", required=False),
        amount=amount,
        currency=ccy,
        occurred_at=occurred,
    )
    if not problems:
        sign = _SIGN.get(type_)
        if amount == 0 and type_ is not LineType.PAYOUT:
            problems.append("amount is zero")
        elif sign is not None and amount * sign < 0:
            problems.append(f"a {type_.value} amount is {'positive' if sign > 0 else 'negative'}")
    return (None if problems else line), problems


def parse_settlement_file(content: bytes) -> SettlementFile:
    """Every row, or SettlementFileInvalid with every problem found (by line number)."""
    if len(content) > MAX_FILE_BYTES:
        raise SettlementFileInvalid([(0, f"the file is over {MAX_FILE_BYTES} bytes")])
    try:
        decoded = content.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SettlementFileInvalid([(0, "the file is not UTF-8 text")]) from None
    reader = csv.DictReader(io.StringIO(decoded, newline=""), strict=True)
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise SettlementFileInvalid([(1, f"unreadable header: {exc}")]) from None
    if header is None or [h.strip() for h in header] != list(COLUMNS):
        raise SettlementFileInvalid([(1, f"the header must be exactly: {','.join(COLUMNS)}")])
    problems: list[tuple[int, str]] = []
    lines: list[SettlementLine] = []
    try:
        for row in reader:
            number = reader.line_num
            if None in row or any(v is None for v in row.values()):
                problems.append((number, f"expected {len(COLUMNS)} columns"))
                continue
            line, row_problems = _parse_row(number, row)
            problems += [(number, p) for p in row_problems]
            if line is not None:
                lines.append(line)
    except csv.Error as exc:
        problems.append((reader.line_num, f"unreadable CSV: {exc}"))
    if not problems:
        problems += _consistency_problems(lines)
    if problems:
        raise SettlementFileInvalid(problems)
    return SettlementFile(sha256=file_sha256(content), lines=tuple(lines))


def _consistency_problems(lines: list[SettlementLine]) -> list[tuple[int, str]]:
    """Unique line ids; each batch in one currency with one payout row equal to its net."""
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    for line in lines:
        if line.line_id in seen:
            problems.append(
                (line.line_number, f"line_id {line.line_id} repeats line {seen[line.line_id]}")
            )
        seen.setdefault(line.line_id, line.line_number)
    batches: dict[str, list[SettlementLine]] = defaultdict(list)
    for line in lines:
        batches[line.batch_id].append(line)
    for batch_id, rows in batches.items():
        payouts = [r for r in rows if r.type is LineType.PAYOUT]
        if len(payouts) != 1:
            problems.append(
                (rows[0].line_number, f"batch {batch_id} has {len(payouts)} payout rows, not 1")
            )
            continue
        payout = payouts[0]
        for row in rows:
            if row.currency != payout.currency:
                problems.append(
                    (
                        row.line_number,
                        f"{row.currency} in batch {batch_id} paid in {payout.currency}",
                    )
                )
        net = sum(r.amount for r in rows if r.type is not LineType.PAYOUT)
        if net != payout.amount:
            problems.append(
                (payout.line_number, f"payout {payout.amount} of batch {batch_id} is not the "
                 f"sum of its rows ({net})")
            )  # fmt: skip
    return problems


def render_settlement_file(lines: Iterable[SettlementLine]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for line in lines:
        writer.writerow(
            [
                line.settlement_date.isoformat(),
                line.batch_id,
                line.line_id,
                line.type.value,
                line.reference,
                line.acquirer_reference,
                line.movement_reference,
                line.merchant_reference,
                str(line.amount),
                line.currency,
                line.occurred_at.isoformat(),
            ]
        )
    return buffer.getvalue().encode()
