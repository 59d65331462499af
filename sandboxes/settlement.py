"""The sandbox acquirer's settlement files (docs/reconciliation.md): one day's captures,
refunds, chargebacks and fees from its store, with that day's test discrepancies applied."""

from __future__ import annotations

from datetime import UTC, date, datetime

from domain.settlement import LineType, SettlementLine
from sandboxes.acquirer_store import AcquirerStore, DiscrepancyKind


def batch_id(day: date, ccy: str) -> str:
    return f"po_{day:%Y%m%d}_{ccy.lower()}"


def settlement_report(store: AcquirerStore, day: date) -> list[SettlementLine]:
    """The day's settlement file: every capture, refund and chargeback of `day` (UTC) with a
    fee row per fee, the test discrepancies of that day applied, grouped into one payout batch
    per currency whose payout row is the batch's net (so the file is always self-consistent,
    as a real acquirer's is: a discrepancy is between its file and our ledger)."""
    key = day.isoformat()
    faults = store.discrepancies(key)
    dropped = {f["movement_reference"] for f in faults if f["kind"] == DiscrepancyKind.MISSING}
    amounts = {
        f["movement_reference"]: f["amount"]
        for f in faults
        if f["kind"] == DiscrepancyKind.AMOUNT_MISMATCH
    }
    currencies = {
        f["movement_reference"]: f["currency"]
        for f in faults
        if f["kind"] == DiscrepancyKind.CURRENCY_MISMATCH
    }
    sign = {"capture": 1, "refund": -1, "chargeback": -1, "chargeback_reversal": 1}
    rows: list[tuple[str, SettlementLine]] = []  # (currency, line) before batching

    def line(
        line_id: str, type_: LineType, amount: int, ccy: str, at: datetime, **refs: str
    ) -> None:
        rows.append(
            (
                ccy,
                SettlementLine(
                    line_number=0,
                    settlement_date=day,
                    batch_id=batch_id(day, ccy),
                    line_id=line_id,
                    type=type_,
                    reference=refs.get("reference", ""),
                    acquirer_reference=refs.get("acquirer_reference", ""),
                    movement_reference=refs.get("movement_reference", ""),
                    merchant_reference=refs.get("merchant_reference", ""),
                    amount=amount,
                    currency=ccy,
                    occurred_at=at,
                ),
            )
        )

    for row in store.settlement_rows(key):
        movement = row["movement_reference"]
        if movement in dropped:
            continue
        ccy = currencies.get(movement, row["currency"])
        at = datetime.fromisoformat(row["occurred_at"])
        refs = {
            "reference": row["reference"],
            "acquirer_reference": row["acquirer_reference"],
            "movement_reference": movement,
            "merchant_reference": row["merchant_reference"],
        }
        amount = amounts.get(movement, row["amount"]) * sign[row["kind"]]
        line(f"ln_{movement}", LineType(row["kind"]), amount, ccy, at, **refs)
        if row["fee"]:
            line(f"ln_{movement}_fee", LineType.FEE, -row["fee"], ccy, at, **refs)
    for fault in faults:
        if fault["kind"] == DiscrepancyKind.UNEXPECTED:
            movement = f"cap_{fault['id']}"
            line(
                f"ln_{movement}",
                LineType.CAPTURE,
                fault["amount"],
                fault["currency"],
                datetime.fromisoformat(fault["created_at"]),
                reference=fault["reference"] or f"unknown_{fault['id']}",
                acquirer_reference=f"acq_{fault['id']}",
                movement_reference=movement,
            )
    lines: list[SettlementLine] = []
    end_of_day = datetime.combine(day, datetime.max.time(), tzinfo=UTC).replace(microsecond=0)
    for ccy in sorted({c for c, _ in rows}):
        batch = [ln for c, ln in rows if c == ccy]
        lines += batch
        bid = batch_id(day, ccy)
        lines.append(
            SettlementLine(
                line_number=0,
                settlement_date=day,
                batch_id=bid,
                line_id=bid,
                type=LineType.PAYOUT,
                reference="",
                acquirer_reference="",
                movement_reference=f"tr_{day:%Y%m%d}_{ccy.lower()}",
                merchant_reference="",
                amount=sum(ln.amount for ln in batch),
                currency=ccy,
                occurred_at=end_of_day,
            )
        )
    return lines


# --- HTTP
