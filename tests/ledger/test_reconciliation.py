"""Reconciliation (issue 16, docs/reconciliation.md) against the real stack: payments, refunds
and disputes through the session's sandbox acquirer over HTTP (a worker and an API of this
module's own pointed at it), its settlement file with each kind of discrepancy injected,
imported twice (the second time by the real `paysaga recon import`), matched against the
PostgreSQL ledger, and the exception queue worked through the CLI and the API.

What is asserted is what reconciliation promises: every line of ours matched or queued exactly
as injected, every payout batch posted once and balanced, the acquirer receivable equal to what
the acquirer has yet to settle, and `paysaga check`'s promises (old and new) holding."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import (
    Client,
    ScheduleActionExecutionStartWorkflow,
    ScheduleActionStartWorkflow,
)

from activities.acquirer import HttpAcquirer
from activities.reconciliation import (
    ImportResult,
    acquirer_endpoint,
    download_settlement_file,
    save_settlement_file,
    settlements_dir,
)
from api.reconciliation import refresh_gauges
from checker.report import (
    LEDGER_BALANCED,
    RECEIVABLE_MATCHES,
    REGISTER_MATCHES,
    SETTLED_LINES_ACCOUNTED,
    WITHIN_CAPTURED,
    CheckScope,
)
from checker.runner import run_checks
from domain.ledger import Entry, TransactionKind, acquirer_receivable_account, bank_account
from domain.settlement import (
    LineType,
    SettlementFileInvalid,
    parse_settlement_file,
    render_settlement_file,
)
from infra.embedded.stack import Stack
from ledger.reconciliation import ExceptionKind, Reconciliation, Resolution
from settings import Settings
from tests.conftest import FINANCE_API_KEY, READONLY_API_KEY, TEST_API_KEY
from tests.helpers.api_client import api_client
from tests.helpers.follow_ups import close_dispute, new_merchant, open_dispute, refund
from tests.helpers.saga import create_payment, payment_body, wait_for_payment
from worker import payment_worker
from workflows.reconciliation import (
    SCHEDULE_ID,
    DailyReconciliationRequest,
    DailyReconciliationWorkflow,
)
from workflows.reconciliation_schedule import ensure_reconciliation_schedule

PAYSAGA = str(Path(sys.executable).parent / "paysaga")


# ── the file format, alone ──────────────────────────────────────────────────────────────────
HEADER = (
    "settlement_date,batch_id,line_id,type,reference,acquirer_reference,movement_reference,"
    "merchant_reference,amount,currency,occurred_at\n"
)
AT = "2026-11-30T10:00:00+00:00"


def _row(line_id: str, type_: str, amount: str, ccy: str = "USD", batch: str = "po_1") -> str:
    # reference, acquirer_reference, movement_reference, merchant_reference
    refs = ",,tr_1,," if type_ == "payout" else "pay_1,acq_1,cap_1,,"
    return f"2026-11-30,{batch},{line_id},{type_},{refs}{amount},{ccy},{AT}\n"


def test_a_well_formed_file_parses_into_batches_whose_payout_is_their_net() -> None:
    content = (
        HEADER
        + _row("l1", "capture", "1000")
        + _row("l2", "fee", "-35")
        + _row("l3", "refund", "-200")
        + _row("po_1", "payout", "765")
    ).encode()
    parsed = parse_settlement_file(content)
    assert [ln.type for ln in parsed.lines] == [
        LineType.CAPTURE, LineType.FEE, LineType.REFUND, LineType.PAYOUT,
    ]  # fmt: skip
    assert [ln.line_number for ln in parsed.lines] == [2, 3, 4, 5]
    assert sum(ln.amount for ln in parsed.lines if ln.type is not LineType.PAYOUT) == 765
    # What the sandbox writes, the importer reads back unchanged.
    assert parse_settlement_file(render_settlement_file(parsed.lines)).lines == parsed.lines


def test_every_malformed_row_is_reported_with_its_line_number() -> None:
    content = (
        HEADER
        + _row("l1", "capture", "10.50")  # not minor units
        + _row("l2", "capture", "1000", ccy="XXQ")  # no such currency
        + _row("l3", "refund", "200")  # a refund takes money back: negative
        + _row("l4", "bogus", "1")
        + "2026-11-30,po_1,l5,capture\n"  # short row
        + _row("po_1", "payout", "765")
    ).encode()
    with pytest.raises(SettlementFileInvalid) as refused:
        parse_settlement_file(content)
    lines = {n for n, _ in refused.value.problems}
    assert lines == {2, 3, 4, 5, 6}, refused.value.problems


def test_a_payout_that_is_not_its_batch_net_refuses_the_file() -> None:
    content = (HEADER + _row("l1", "capture", "1000") + _row("po_1", "payout", "999")).encode()
    with pytest.raises(SettlementFileInvalid) as refused:
        parse_settlement_file(content)
    assert refused.value.problems == [
        (3, "payout 999 of batch po_1 is not the sum of its rows (1000)")
    ]
    with pytest.raises(SettlementFileInvalid, match="header"):
        parse_settlement_file(b"date,amount\n2026-11-30,1\n")


# ── the real stack ──────────────────────────────────────────────────────────────────────────
@dataclass
class Rig:
    api: httpx.AsyncClient
    finance: httpx.AsyncClient
    settings: Settings
    engine: AsyncEngine

    async def sandbox(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        endpoint = acquirer_endpoint(self.settings)
        async with httpx.AsyncClient(base_url=endpoint.url, timeout=30) as http:
            return await http.request(
                method, path, headers={"Authorization": f"Bearer {endpoint.api_key}"}, **kwargs
            )

    async def capture_reference(self, payment_id: str) -> str:
        acquirer = HttpAcquirer.from_settings(self.settings)
        try:
            record = await acquirer.status(payment_id)
        finally:
            await acquirer.aclose()
        assert record is not None and record.acquirer_capture_reference is not None
        return record.acquirer_capture_reference

    async def paid(self, amount: int) -> str:
        body = payment_body(amount=amount, merchant_id=new_merchant())
        created = await create_payment(self.api, body)
        assert created.status_code == 201, created.text
        payment_id: str = created.json()["id"]
        await wait_for_payment(self.api, payment_id, lambda p: p["status"] == "succeeded")
        return payment_id


@pytest.fixture(scope="module")
async def rig(
    stack: Stack, app_settings: Settings, temporal_client: Client, engine: AsyncEngine
) -> AsyncIterator[Rig]:
    at_the_sandbox = stack.service_settings()
    settings = app_settings.model_copy(
        update={
            "task_queue": f"recon-{uuid.uuid4().hex[:8]}",
            "acquirer_url": at_the_sandbox.acquirer_url,
            "acquirer_api_key": at_the_sandbox.acquirer_api_key,
            "home": stack.home,
            # The daily run's refresh turns every unsettled movement `missing` at once.
            "recon_missing_after_days": 0,
        }
    )
    async with (
        payment_worker(settings, temporal_client),
        api_client(settings, temporal_client, TEST_API_KEY) as api,
        api_client(settings, temporal_client, FINANCE_API_KEY) as finance,
    ):
        yield Rig(api=api, finance=finance, settings=settings, engine=engine)


async def _lines_of(engine: AsyncEngine, payment_ids: list[str]) -> list[tuple[str, str, str]]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT reference, type, status FROM settlement_lines "
                "WHERE reference = ANY(:ids) ORDER BY reference, type"
            ),
            {"ids": payment_ids},
        )
        return sorted((r.reference, r.type, r.status) for r in rows)


async def _open_exceptions(
    reconciliation: Reconciliation, payment_ids: set[str], unexpected_ref: str
) -> dict[tuple[str, str], Any]:
    found, _ = await reconciliation.exceptions(status="open", limit=10_000)
    mine = {}
    for exc in found:
        if exc.payment_id in payment_ids or unexpected_ref in exc.detail:
            mine[(exc.payment_id or unexpected_ref, exc.kind.value)] = exc
    return mine


async def _balance(engine: AsyncEngine, code: str) -> int:
    async with engine.connect() as conn:
        total = await conn.scalar(
            text(
                "SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e "
                "JOIN accounts a ON a.id = e.account_id WHERE a.code = :code"
            ),
            {"code": code},
        )
    return int(total or 0)


async def test_settlement_with_every_discrepancy_imported_twice_matches_exactly(
    rig: Rig, tmp_path: Path
) -> None:
    # Payments, a refund and two disputes through the sandbox acquirer.
    matched = await rig.paid(10_000)
    refunded = await rig.paid(20_000)
    answer = await refund(rig.api, refunded, 5_000)
    assert answer.status_code in (200, 201), answer.text
    await wait_for_payment(rig.api, refunded, lambda p: p["status"] == "partially_refunded")
    lost = await rig.paid(30_000)
    won = await rig.paid(12_000)
    disputes: dict[str, str] = {}
    for payment_id, amount, outcome in ((lost, 30_000, "lost"), (won, 4_000, "won")):
        opened = await open_dispute(rig.api, payment_id, amount)
        assert opened.status_code == 201, opened.text
        dispute_id = opened.json()["id"]
        disputes[payment_id] = dispute_id
        charged = await rig.sandbox(
            "POST",
            f"/v1/authorizations/{payment_id}/chargebacks",
            json={"dispute_reference": dispute_id, "amount": amount, "currency": "USD"},
        )
        assert charged.status_code == 200, charged.text
        closed = await close_dispute(rig.api, payment_id, dispute_id, outcome)
        assert closed.status_code in (200, 202), closed.text
        if outcome == "won":
            reversed_ = await rig.sandbox(
                "POST", f"/v1/authorizations/{payment_id}/chargebacks/{dispute_id}/reverse"
            )
            assert reversed_.status_code == 200, reversed_.text
    missing = await rig.paid(7_000)
    short = await rig.paid(8_000)
    in_euros = await rig.paid(9_000)
    ours = [matched, refunded, lost, won, missing, short, in_euros]
    unexpected_ref = f"ord_unknown_{uuid.uuid4().hex[:10]}"

    # Each kind of discrepancy, injected into today's file at the sandbox.
    today = datetime.now(UTC).date()
    for fault in (
        {"kind": "missing", "movement_reference": await rig.capture_reference(missing)},
        {
            "kind": "amount_mismatch",
            "movement_reference": await rig.capture_reference(short),
            "amount": 7_900,
        },
        {
            "kind": "currency_mismatch",
            "movement_reference": await rig.capture_reference(in_euros),
            "currency": "EUR",
        },
        {"kind": "unexpected", "reference": unexpected_ref, "amount": 7_000, "currency": "USD"},
    ):
        injected = await rig.sandbox("POST", f"/v1/settlements/{today}/discrepancies", json=fault)
        assert injected.status_code == 200, injected.text
    # Dispute closes are asynchronous: wait until the ledger has both.
    await wait_for_payment(
        rig.api, won, lambda p: all(d["status"] == "won" for d in p.get("disputes", []))
    )
    await wait_for_payment(
        rig.api, lost, lambda p: all(d["status"] == "lost" for d in p.get("disputes", []))
    )

    content = await download_settlement_file(acquirer_endpoint(rig.settings), today)
    path = save_settlement_file(tmp_path, today, content)
    parsed = parse_settlement_file(content)
    reconciliation = Reconciliation(rig.engine, missing_after=timedelta(0))
    report = await reconciliation.import_file(parsed, path.name)
    assert not report.duplicate

    lines = await _lines_of(rig.engine, [*ours, unexpected_ref])
    assert lines == sorted(
        [
            (matched, "capture", "matched"),
            (matched, "fee", "fee"),
            (refunded, "capture", "matched"),
            (refunded, "fee", "fee"),
            (refunded, "refund", "matched"),
            (lost, "capture", "matched"),
            (lost, "fee", "fee"),
            (lost, "chargeback", "matched"),
            (won, "capture", "matched"),
            (won, "fee", "fee"),
            (won, "chargeback", "matched"),
            (won, "chargeback_reversal", "matched"),
            (short, "capture", "amount_mismatch"),
            (short, "fee", "fee"),
            (in_euros, "capture", "currency_mismatch"),
            (in_euros, "fee", "fee"),
            (unexpected_ref, "capture", "unexpected"),
            # `missing`'s capture (and its fee) were left out of the file.
        ]
    )
    queue = await _open_exceptions(reconciliation, set(ours), unexpected_ref)
    assert sorted(queue) == sorted(
        [
            (missing, "missing"),
            (short, "amount_mismatch"),
            (in_euros, "currency_mismatch"),
            (unexpected_ref, "unexpected"),
        ]
    )
    assert queue[(short, "amount_mismatch")].amount == 100  # ledger 8000, settled 7900
    assert queue[(in_euros, "currency_mismatch")].amount == 9_000
    assert queue[(missing, "missing")].amount == 7_000
    assert (queue[(unexpected_ref, "unexpected")].amount,
            queue[(unexpected_ref, "unexpected")].currency) == (7_000, "USD")  # fmt: skip

    # Every batch is one balanced payout posting: bank + fees = receivable + suspense.
    async with rig.engine.connect() as conn:
        batches = (
            await conn.execute(
                text(
                    "SELECT b.batch_id, b.currency, b.payout_amount, b.ledger_transaction_id, "
                    "(SELECT coalesce(sum(e.amount), 0) FROM ledger_entries e "
                    " WHERE e.transaction_id = b.ledger_transaction_id) AS total "
                    "FROM settlement_batches b WHERE b.batch_id = ANY(:ids)"
                ),
                {"ids": [b["batch_id"] for b in report.batches]},
            )
        ).all()
    assert {b.currency for b in batches} == {"USD", "EUR"}
    assert all(b.ledger_transaction_id is not None and b.total == 0 for b in batches)

    # The second import of the same file: nothing happens, and the CLI says so.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    env["PAYSAGA_DATABASE_URL"] = rig.settings.database_url or ""
    env["PAYSAGA_HOME"] = str(tmp_path)
    again = subprocess.run(
        [PAYSAGA, "recon", "import", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    assert "already imported" in again.stdout
    # `paysaga recon fetch --import` downloads the same day from the acquirer: the same bytes.
    fetched = subprocess.run(
        [PAYSAGA, "recon", "fetch", "--date", today.isoformat(), "--import"],
        env={
            **env,
            "PAYSAGA_ACQUIRER_URL": rig.settings.acquirer_url or "",
            "PAYSAGA_ACQUIRER_API_KEY": rig.settings.acquirer_api_key.get_secret_value(),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "settlements" / f"settlement-{today}.csv").read_bytes() == content
    assert "already imported" in fetched.stdout
    assert await _lines_of(rig.engine, [*ours, unexpected_ref]) == lines
    assert sorted(await _open_exceptions(reconciliation, set(ours), unexpected_ref)) == sorted(
        queue
    )

    # The promises: the old ones and reconciliation's.
    checks = await run_checks(rig.settings, scope=CheckScope(payment_ids=frozenset(ours)))
    for name in (LEDGER_BALANCED, WITHIN_CAPTURED, REGISTER_MATCHES):
        assert checks.result(name).passed, checks.result(name)
    for name in (SETTLED_LINES_ACCOUNTED, RECEIVABLE_MATCHES):
        assert checks.result(name).passed, checks.result(name)
        assert checks.result(name).checked > 0

    # The finance routine: the queue through the API, then each exception resolved.
    listed = await rig.finance.get("/v1/reconciliation/exceptions", params={"limit": 100})
    assert listed.status_code == 200, listed.text
    ids = {e["id"] for e in listed.json()["data"]}
    assert {e.id for e in queue.values()} <= ids or listed.json()["has_more"]
    async with httpx.AsyncClient(
        transport=rig.api._transport,
        base_url=str(rig.api.base_url),
        headers={"Authorization": f"Bearer {READONLY_API_KEY}"},
    ) as merchant:
        merchant_view = await merchant.get("/v1/reconciliation/exceptions")
    assert merchant_view.status_code == 403, merchant_view.text

    receivable_before = await _balance(rig.engine, "acquirer:receivable:USD")
    matched_by_hand = await rig.finance.post(
        f"/v1/reconciliation/exceptions/{queue[(unexpected_ref, 'unexpected')].id}/resolve",
        json={
            "action": "manual_match",
            "reason": "the acquirer settled it under another order id",
            "counterpart": queue[(missing, "missing")].id,
        },
    )
    assert matched_by_hand.status_code == 200, matched_by_hand.text
    assert matched_by_hand.json()["resolution"] == "manual_match"
    assert await _balance(rig.engine, "acquirer:receivable:USD") == receivable_before - 7_000
    twice = await rig.finance.post(
        f"/v1/reconciliation/exceptions/{queue[(missing, 'missing')].id}/resolve",
        json={"action": "write_off", "reason": "again"},
    )
    assert twice.status_code == 409, twice.text

    cli = subprocess.run(
        [PAYSAGA, "recon", "resolve", queue[(short, "amount_mismatch")].id, "--write-off",
         "--reason", "acquirer fee taken from the capture; not worth chasing"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    written = await reconciliation.resolve(
        queue[(in_euros, "currency_mismatch")].id, Resolution.WRITE_OFF, "refunded in EUR"
    )
    assert written.ledger_transaction_id is not None
    assert await _open_exceptions(reconciliation, set(ours), unexpected_ref) == {}

    listed_cli = subprocess.run(
        [PAYSAGA, "recon", "exceptions", "--status", "resolved", "--json", "--limit", "10000"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed_cli.returncode == 0, listed_cli.stderr
    assert {e.id for e in queue.values()} <= {
        e["id"] for e in json.loads(listed_cli.stdout)["data"]
    }

    checks = await run_checks(rig.settings, scope=CheckScope(payment_ids=frozenset(ours)))
    for name in (LEDGER_BALANCED, SETTLED_LINES_ACCOUNTED, RECEIVABLE_MATCHES):
        assert checks.result(name).passed, checks.result(name)


async def test_a_malformed_file_is_refused_whole_with_line_numbers(
    rig: Rig, tmp_path: Path
) -> None:
    bad = tmp_path / "settlement-bad.csv"
    bad.write_text(
        HEADER
        + _row("ln_bad_1", "capture", "1000", batch="po_bad")
        + _row("ln_bad_2", "capture", "ten", batch="po_bad")
        + _row("po_bad", "payout", "1000", batch="po_bad")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    env["PAYSAGA_DATABASE_URL"] = rig.settings.database_url or ""
    env["PAYSAGA_HOME"] = str(tmp_path)
    result = subprocess.run(
        [PAYSAGA, "recon", "import", str(bad)], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "line 3: amount is not an integer number of minor units" in result.stderr
    async with rig.engine.connect() as conn:
        kept = await conn.scalar(
            text("SELECT count(*) FROM settlement_lines WHERE batch_id = 'po_bad'")
        )
    assert kept == 0


async def test_the_exception_gauges_count_and_value_the_queue_by_age(rig: Rig) -> None:
    reconciliation = Reconciliation(rig.engine, missing_after=timedelta(0))
    await refresh_gauges(reconciliation)
    summary = await reconciliation.open_summary()
    for kind in ExceptionKind:
        for age in ("0-1d", "1-3d", "3-7d", "7d+"):
            expected = sum(n for k, a, _, n, _ in summary if (k, a) == (kind.value, age))
            value = REGISTRY.get_sample_value(
                "paysaga_reconciliation_exceptions", {"kind": kind.value, "age": age}
            )
            assert value == expected


async def test_the_daily_workflow_and_its_schedule_fetch_and_import(
    rig: Rig, temporal_client: Client
) -> None:
    quiet_day = date(2020, 1, 2)  # nothing happened at the sandbox: an empty file
    # Captured today, settled in no file: the daily run ages it even though its file is empty.
    unsettled = await rig.paid(1_111)
    handle = await temporal_client.start_workflow(
        DailyReconciliationWorkflow.run,
        DailyReconciliationRequest(day=quiet_day),
        id=f"reconciliation-test-{uuid.uuid4().hex[:8]}",
        task_queue=rig.settings.task_queue,
    )
    first = await handle.result()
    assert first.lines == 0
    queue = await _open_exceptions(Reconciliation(rig.engine), {unsettled}, "no-such-line")
    assert sorted(queue) == [(unsettled, "missing")]
    saved = settlements_dir(rig.settings) / f"settlement-{quiet_day}.csv"
    assert saved.exists()

    settings = rig.settings.model_copy(update={"recon_schedule_cron": "15 5 * * *"})
    schedule = temporal_client.get_schedule_handle(SCHEDULE_ID)
    try:
        await ensure_reconciliation_schedule(temporal_client, settings)
        # Idempotent: `paysaga recon schedule` again updates the same schedule.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
        cli = subprocess.run(
            [PAYSAGA, "recon", "schedule"],
            env={
                **env,
                "PAYSAGA_TEMPORAL_ADDRESS": rig.settings.temporal_address or "",
                "PAYSAGA_TEMPORAL_NAMESPACE": rig.settings.temporal_namespace,
                "PAYSAGA_TASK_QUEUE": rig.settings.task_queue,
                "PAYSAGA_RECON_SCHEDULE_CRON": "15 5 * * *",
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 0, cli.stderr
        assert f"schedule {SCHEDULE_ID} updated" in cli.stdout
        described = await schedule.describe()
        action = described.schedule.action
        assert isinstance(action, ScheduleActionStartWorkflow)
        assert (action.workflow, action.task_queue) == (
            "DailyReconciliation",
            rig.settings.task_queue,
        )
        await schedule.trigger()
        deadline = asyncio.get_running_loop().time() + 60
        while not (described := await schedule.describe()).info.recent_actions:
            assert asyncio.get_running_loop().time() < deadline, "the schedule never ran"
            await asyncio.sleep(0.5)
        started = described.info.recent_actions[0].action
        assert isinstance(started, ScheduleActionExecutionStartWorkflow)
        run = temporal_client.get_workflow_handle(
            started.workflow_id, run_id=started.first_execution_run_id, result_type=ImportResult
        )
        result = await run.result()  # yesterday's file, imported (or already)
        assert result.sha256
    finally:
        await schedule.delete()


async def test_the_checker_names_an_unaccounted_line_and_a_receivable_out_of_line(
    rig: Rig,
) -> None:
    """Both reconciliation promises break and are named; the plants are undone after."""
    reconciliation = Reconciliation(rig.engine)
    plant = f"plant_{uuid.uuid4().hex[:8]}"
    file_id, line_id = uuid.uuid4(), uuid.uuid4()
    async with rig.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO settlement_files (id, sha256, filename, imported_at, line_count, "
                "summary) VALUES (:id, :sha, 'planted.csv', now(), 1, '{}')"
            ),
            {"id": file_id, "sha": uuid.uuid4().hex * 2},
        )
        await conn.execute(
            text(
                "INSERT INTO settlement_lines (id, file_id, line_number, line_id, batch_id, "
                "settlement_date, type, reference, acquirer_reference, movement_reference, "
                "merchant_reference, amount, currency, occurred_at, status) VALUES (:id, :f, 2, "
                ":line, :line, current_date, 'capture', :line, 'acq_x', 'cap_x', '', 500, "
                "'JPY', now(), 'matched')"
            ),
            {"id": line_id, "f": file_id, "line": plant},
        )
        # The receivable moved by something no expectation explains.
        await reconciliation._post(
            conn,
            plant,
            TransactionKind.SETTLEMENT_WRITE_OFF,
            "planted",
            "planted",
            [
                Entry(account=acquirer_receivable_account("JPY"), amount=500),
                Entry(account=bank_account("JPY"), amount=-500),
            ],
        )
    try:
        report = await run_checks(rig.settings, scope=CheckScope(payment_ids=frozenset()))
        lines = report.result(SETTLED_LINES_ACCOUNTED)
        assert [v.payment_id for v in lines.examples] == [plant], lines
        receivable = report.result(RECEIVABLE_MATCHES)
        assert any("receivable JPY holds 500" in v.detail for v in receivable.examples)
    finally:
        async with rig.engine.begin() as conn:
            await conn.execute(text("DELETE FROM settlement_lines WHERE id = :id"), {"id": line_id})
            await conn.execute(text("DELETE FROM settlement_files WHERE id = :id"), {"id": file_id})
            await reconciliation._post(
                conn,
                plant,
                TransactionKind.SETTLEMENT_WRITE_OFF,
                "planted-undone",
                "planted, undone",
                [
                    Entry(account=acquirer_receivable_account("JPY"), amount=-500),
                    Entry(account=bank_account("JPY"), amount=500),
                ],
            )
    report = await run_checks(rig.settings, scope=CheckScope(payment_ids=frozenset()))
    assert report.result(SETTLED_LINES_ACCOUNTED).passed
    assert report.result(RECEIVABLE_MATCHES).passed


async def test_two_imports_of_one_file_at_once_import_it_once(rig: Rig) -> None:
    """The daily schedule and an operator's `paysaga recon import` racing on the same file:
    SERIALIZABLE lets one write it; the other, run again, finds it imported."""
    batch = f"po_race_{uuid.uuid4().hex[:8]}"
    content = (
        HEADER
        + _row(f"{batch}_1", "capture", "1200", batch=batch).replace("pay_1", f"{batch}_pay")
        + _row(batch, "payout", "1200", batch=batch)
    ).encode()
    parsed = parse_settlement_file(content)
    reconciliation = Reconciliation(rig.engine)
    reports = await asyncio.gather(
        reconciliation.import_file(parsed, "race-a.csv"),
        reconciliation.import_file(parsed, "race-b.csv"),
    )
    assert sorted(r.duplicate for r in reports) == [False, True]
    async with rig.engine.connect() as conn:
        kept = await conn.scalar(
            text("SELECT count(*) FROM settlement_lines WHERE batch_id = :b"), {"b": batch}
        )
    assert kept == 2  # the capture and the payout, once
    # The line nobody expected is queued; written off, it leaves no trace in the receivable.
    found, _ = await reconciliation.exceptions(status="open", limit=10_000)
    [mine] = [e for e in found if f"{batch}_pay" in e.detail]
    assert (mine.kind, mine.amount) == (ExceptionKind.UNEXPECTED, 1200)
    await reconciliation.resolve(mine.id, Resolution.WRITE_OFF, "test money")


async def test_the_sandbox_refuses_incomplete_discrepancies_and_excess_chargebacks(
    rig: Rig,
) -> None:
    incomplete = await rig.sandbox(
        "POST", "/v1/settlements/2026-11-30/discrepancies", json={"kind": "amount_mismatch"}
    )
    assert incomplete.status_code == 400, incomplete.text
    assert "movement_reference, amount" in incomplete.json()["error"]["message"]
    payment_id = await rig.paid(1_000)
    excess = await rig.sandbox(
        "POST",
        f"/v1/authorizations/{payment_id}/chargebacks",
        json={"dispute_reference": "dp_excess", "amount": 1_001, "currency": "USD"},
    )
    assert excess.status_code == 422, excess.text
    assert excess.json()["error"]["type"] == "chargeback_exceeds_captured"


async def test_a_missing_movement_whose_line_arrives_later_closes_itself(rig: Rig) -> None:
    """Expected, not settled in time: `missing`. Its line in a later file matches it and the
    exception resolves itself as settled late (nobody has to)."""
    late = await rig.paid(4_321)
    reconciliation = Reconciliation(rig.engine, missing_after=timedelta(0))
    await reconciliation.refresh()
    queue = await _open_exceptions(reconciliation, {late}, "no-such-line")
    assert sorted(queue) == [(late, "missing")]
    acquirer = HttpAcquirer.from_settings(rig.settings)
    try:
        record = await acquirer.status(late)
    finally:
        await acquirer.aclose()
    assert record is not None and record.acquirer_capture_reference
    batch = f"po_late_{uuid.uuid4().hex[:8]}"
    at = datetime.now(UTC).isoformat()
    content = (
        HEADER + f"2026-12-01,{batch},{batch}_1,capture,{late},{record.acquirer_reference},"
        f"{record.acquirer_capture_reference},,4321,USD,{at}\n"
        + f"2026-12-01,{batch},{batch},payout,,,tr_{batch},,4321,USD,{at}\n"
    ).encode()
    report = await reconciliation.import_file(parse_settlement_file(content), "late.csv")
    assert report.statuses == {"matched": 1, "payout": 1}
    assert await _open_exceptions(reconciliation, {late}, "no-such-line") == {}
    closed = await reconciliation.exception(queue[(late, "missing")].id)
    assert closed is not None and closed.resolution == "settled_late"
