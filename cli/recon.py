"""`paysaga recon`: the finance operator's daily routine (README "Reconciliation",
docs/reconciliation.md) — fetch the acquirer's settlement file, import it, work the exceptions.

Talks to the ledger's database directly, like `paysaga check` (PAYSAGA_DATABASE_URL, or the
embedded PostgreSQL of `paysaga run`), and to the acquirer (PAYSAGA_ACQUIRER_URL, or the
sandbox `paysaga run` starts).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from activities.reconciliation import (
    SettlementFileUnavailable,
    acquirer_endpoint,
    download_settlement_file,
    save_settlement_file,
    settlements_dir,
)
from checker.runner import resolve_endpoints
from domain.settlement import SettlementFileInvalid, parse_settlement_file
from infra.database import make_engine
from infra.temporal_client import connect_client
from ledger.reconciliation import (
    ExceptionKind,
    ImportReport,
    Reconciliation,
    ReconciliationException,
    ReconciliationRefused,
    Resolution,
    age_bucket,
)
from settings import Settings
from workflows.reconciliation import SCHEDULE_ID
from workflows.reconciliation_schedule import ensure_reconciliation_schedule

app = typer.Typer(
    help="Reconcile the ledger against the acquirer's settlement files.", no_args_is_help=True
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
T = TypeVar("T")

EXIT_INVALID_FILE = 1
EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 3


def _settings() -> Settings:
    try:
        return resolve_endpoints(Settings())
    except ValidationError as exc:
        err.print(f"[bold red]invalid PAYSAGA_* settings:[/]\n{exc}", soft_wrap=True)
        raise typer.Exit(2) from None


def _with_reconciliation(settings: Settings, work: Callable[[Reconciliation], Awaitable[T]]) -> T:
    async def run() -> T:
        engine: AsyncEngine = make_engine(settings.database_url or "", pool_size=2)
        try:
            return await work(
                Reconciliation(
                    engine,
                    missing_after=timedelta(days=settings.recon_missing_after_days),
                    max_attempts=settings.db_max_retries,
                )
            )
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _show_import(report: ImportReport, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.as_json(), indent=2))
        return
    if report.duplicate:
        out.print(
            f"[yellow]already imported[/] {escape(report.filename)} "
            f"(sha256 {report.sha256[:12]}…, {report.lines} lines) at "
            f"{report.imported_at:%Y-%m-%d %H:%M:%S} UTC: nothing to do"
        )
        return
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(report.statuses.items()))
    out.print(f"[green]imported[/] {escape(report.filename)}: {report.lines} lines ({statuses})")
    for batch in report.batches:
        out.print(
            f"  batch {batch['batch_id']}: payout {batch['payout']} {batch['currency']} = "
            f"{batch['matched_to_receivable']} matched + {batch['to_suspense']} in suspense "
            f"- {batch['fees']} fees"
        )
    opened = ", ".join(f"{n} {k}" for k, n in sorted(report.exceptions_opened.items()))
    out.print(f"exceptions opened: {opened or 'none'}")


def _import(settings: Settings, path: Path, as_json: bool) -> None:
    try:
        content = path.read_bytes()
    except OSError as exc:
        err.print(f"[red]cannot read {escape(str(path))}:[/] {escape(exc.strerror or str(exc))}")
        raise typer.Exit(EXIT_INVALID_FILE) from None
    try:
        parsed = parse_settlement_file(content)
        report = _with_reconciliation(settings, lambda r: r.import_file(parsed, path.name))
    except SettlementFileInvalid as exc:
        err.print(f"[bold red]{escape(path.name)} was not imported[/] (nothing of it was kept):")
        for number, problem in exc.problems:
            where = f"line {number}: " if number else ""
            err.print(f"  {where}{escape(problem)}", soft_wrap=True)
        raise typer.Exit(EXIT_INVALID_FILE) from None
    _show_import(report, as_json)


@app.command("import")
def import_file(
    file: Annotated[Path, typer.Argument(help="A settlement file (docs/reconciliation.md).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Import a settlement file and match it against the ledger, all or nothing. The same file
    again is a no-op (by its SHA-256), and says so."""
    _import(_settings(), file, as_json)


def _yesterday() -> date:
    return datetime.now(UTC).date() - timedelta(days=1)


@app.command()
def fetch(
    day: Annotated[
        str | None,
        typer.Option(
            "--date", help="Settlement date, YYYY-MM-DD [yesterday, UTC].", show_default=False
        ),
    ] = None,
    and_import: Annotated[
        bool, typer.Option("--import/--no-import", help="Import it once downloaded.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the import as JSON.")] = False,
) -> None:
    """Download the acquirer's settlement file of a day into <home>/settlements/."""
    settings = _settings()
    try:
        when = date.fromisoformat(day) if day else _yesterday()
    except ValueError:
        raise typer.BadParameter(
            "expected a date such as 2026-11-30", param_hint="--date"
        ) from None
    try:
        content = asyncio.run(download_settlement_file(acquirer_endpoint(settings), when))
    except SettlementFileUnavailable as exc:
        err.print(f"[red]could not fetch the settlement file of {when}:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    path = save_settlement_file(settlements_dir(settings), when, content)
    if not as_json:
        out.print(f"saved {escape(str(path))} ({len(content)} bytes)")
    if and_import:
        _import(settings, path, as_json)


def _age(exc: ReconciliationException, now: datetime) -> str:
    age = exc.age(now)
    if age >= timedelta(days=1):
        return f"{age.days}d"
    return f"{int(age.total_seconds() // 3600)}h"


def _exception_json(exc: ReconciliationException, now: datetime) -> dict[str, Any]:
    return {
        "id": exc.id,
        "kind": exc.kind.value,
        "status": exc.status,
        "payment_id": exc.payment_id,
        "amount": exc.amount,
        "currency": exc.currency,
        "detail": exc.detail,
        "opened_at": exc.opened_at.isoformat(),
        "age_seconds": int(exc.age(now).total_seconds()),
        "age_bucket": age_bucket(exc.age(now)),
        "resolution": exc.resolution,
        "reason": exc.reason,
        "resolved_at": exc.resolved_at.isoformat() if exc.resolved_at else None,
        "ledger_transaction_id": exc.ledger_transaction_id,
    }


@app.command()
def exceptions(
    status: Annotated[
        str, typer.Option("--status", help="open, resolved or all.", case_sensitive=False)
    ] = "open",
    kind: Annotated[
        ExceptionKind | None, typer.Option("--kind", help="Only this kind.", show_default=False)
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print them as JSON.")] = False,
) -> None:
    """The exception queue, oldest first: missing, unexpected, amount and currency mismatches,
    each with its age."""
    if status not in ("open", "resolved", "all"):
        raise typer.BadParameter("open, resolved or all", param_hint="--status")
    settings = _settings()
    found, more = _with_reconciliation(
        settings,
        lambda r: r.exceptions(status=None if status == "all" else status, kind=kind, limit=limit),
    )
    now = datetime.now(UTC)
    if as_json:
        print(json.dumps({"data": [_exception_json(e, now) for e in found], "has_more": more}))
        return
    table = Table(box=box.SIMPLE_HEAVY, title=f"reconciliation exceptions ({status})")
    for column in ("id", "kind", "age", "amount", "payment", "detail", "resolution"):
        table.add_column(column, justify="right" if column == "amount" else "left")
    for e in found:
        table.add_row(
            e.id,
            e.kind.value,
            _age(e, now),
            f"{e.amount} {e.currency}",
            e.payment_id or "",
            escape(e.detail),
            escape(f"{e.resolution}: {e.reason}") if e.resolution else "",
        )
    out.print(table)
    out.print(f"{len(found)} shown{' (more: raise --limit)' if more else ''}")


@app.command()
def resolve(
    exception_id: Annotated[str, typer.Argument(help="The exception's id (rex_…).")],
    reason: Annotated[str, typer.Option("--reason", help="Why: recorded with the resolution.")],
    write_off: Annotated[
        bool, typer.Option("--write-off", help="Write the difference off (a ledger posting).")
    ] = False,
    match: Annotated[
        str | None,
        typer.Option(
            "--match",
            help="Match by hand with this other exception (an unexpected line with a missing "
            "movement of the same amount and currency).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Resolve an exception with a recorded reason: a write-off or a manual match."""
    if write_off == (match is not None):
        raise typer.BadParameter("give exactly one of --write-off or --match OTHER_ID")
    settings = _settings()
    resolution = Resolution.WRITE_OFF if write_off else Resolution.MANUAL_MATCH
    try:
        resolved = _with_reconciliation(
            settings, lambda r: r.resolve(exception_id, resolution, reason, counterpart=match)
        )
    except ReconciliationRefused as exc:
        err.print(f"[red]not resolved:[/] {escape(str(exc))}")
        raise typer.Exit(EXIT_REFUSED) from None
    out.print(
        f"[green]resolved[/] {resolved.id} ({resolved.kind.value}) by {resolved.resolution}; "
        f"ledger transaction {resolved.ledger_transaction_id or 'none (nothing to move)'}"
    )


@app.command()
def schedule(
    trigger: Annotated[
        bool, typer.Option("--trigger", help="Also start a run now (yesterday's file).")
    ] = False,
) -> None:
    """Create (or update) the Temporal Schedule that fetches and imports yesterday's settlement
    file every day (PAYSAGA_RECON_SCHEDULE_CRON, UTC)."""
    settings = _settings()

    async def run() -> bool:
        client = await connect_client(settings)
        created = await ensure_reconciliation_schedule(client, settings)
        if trigger:
            await client.get_schedule_handle(SCHEDULE_ID).trigger()
        return created

    created = asyncio.run(run())
    out.print(
        f"schedule {SCHEDULE_ID} {'created' if created else 'updated'}: "
        f"cron {escape(settings.recon_schedule_cron)} (UTC), task queue {settings.task_queue}"
        + ("; a run was started" if trigger else "")
    )
