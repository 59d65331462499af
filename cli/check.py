"""`paysaga check`: verify the system's promises against the live ledger, Kafka and Temporal.

Exit status: 0 when every check passes, 1 when any promise is broken, 3 when a check could not
run (a service did not answer) and nothing was found broken. Services come from PAYSAGA_*
(PAYSAGA_DATABASE_URL, PAYSAGA_KAFKA_BOOTSTRAP_SERVERS, PAYSAGA_TEMPORAL_ADDRESS); those not
set are the embedded ones `paysaga run` starts on their default ports.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from checker.report import CheckReport, CheckScope
from checker.runner import run_checks
from settings import Settings

EXIT_VIOLATIONS = 1
EXIT_UNCHECKED = 3

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`30m`, `2h`, `7d` (an age) or an ISO 8601 time; a time without zone is UTC."""
    text = value.strip()
    age = _AGE.match(text.lower())
    if age:
        amount, unit = float(age.group(1)), age.group(2)
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: amount})
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            "expected an age such as 30m, 2h, 7d or an ISO time such as 2025-01-31T12:00Z"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def exit_status(report: CheckReport) -> int:
    if any(r.violation_count for r in report.results):
        return EXIT_VIOLATIONS
    if any(r.error for r in report.results):
        return EXIT_UNCHECKED
    return 0


def render(report: CheckReport, console: Console) -> None:
    table = Table(box=box.SIMPLE_HEAVY, title=f"paysaga check — {report.scope.describe()}")
    table.add_column("", no_wrap=True)
    table.add_column("promise")
    table.add_column("checked", justify="right")
    table.add_column("violations", justify="right")
    for result in report.results:
        mark = (
            "[green]PASS[/]"
            if result.passed
            else (
                "[yellow]ERROR[/]"
                if result.error and not result.violation_count
                else "[red]FAIL[/]"
            )
        )
        table.add_row(
            mark,
            escape(result.promise),
            str(result.checked),
            f"[red]{result.violation_count}[/]" if result.violation_count else "0",
        )
    console.print(table)
    for result in report.results:
        if result.error:
            console.print(f"[yellow]{result.name}[/]: could not check: {escape(result.error)}")
        for example in result.examples:
            who = f"{example.payment_id}: " if example.payment_id else ""
            console.print(f"[red]{result.name}[/]: {escape(who + example.detail)}", soft_wrap=True)
        hidden = result.violation_count - len(result.examples)
        if hidden > 0:
            console.print(f"[red]{result.name}[/]: … and {hidden} more")
        for note in result.notes:
            console.print(f"[dim]{result.name}: {escape(note)}[/]", soft_wrap=True)
    verdict = "[bold green]all promises hold[/]" if report.passed else "[bold red]broken[/]"
    tries = f", {report.attempts} attempts" if report.attempts > 1 else ""
    console.print(f"{verdict} ({report.elapsed_seconds:.1f}s{tries})")


def main(
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only payments and events touched since then: an age (30m, 2h, 7d) or an ISO "
            "time. Use it when the broker's log does not reach back to the first payment.",
            show_default=False,
        ),
    ] = None,
    payment: Annotated[
        list[str] | None,
        typer.Option(
            "--payment", "-p", help="Check only this payment (repeatable).", show_default=False
        ),
    ] = None,
    settle_seconds: Annotated[
        float,
        typer.Option(
            "--settle-seconds",
            min=0,
            help="Keep re-checking for up to this long while anything fails, so payments "
            "still finishing are not reported as violations.",
        ),
    ] = 0.0,
    examples: Annotated[
        int, typer.Option("--examples", min=1, help="Violations shown per check.")
    ] = 10,
    kafka_timeout: Annotated[
        float, typer.Option("--kafka-timeout", min=1, help="Seconds allowed to read Kafka.")
    ] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Verify the ledger, Kafka and Temporal agree: balanced transactions, never refunded
    beyond capture, posted once, every ledger event in Kafka, workflows agreeing with the
    ledger. Exits non-zero on any violation. Meant for a quiet system (see --settle-seconds)."""
    try:
        settings = Settings()
    except ValidationError as exc:
        err.print(f"[bold red]invalid PAYSAGA_* settings:[/]\n{exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    scope = CheckScope(
        since=parse_since(since) if since else None,
        payment_ids=frozenset(payment) if payment else None,
    )
    report = asyncio.run(
        run_checks(
            settings,
            scope=scope,
            max_examples=examples,
            settle_seconds=settle_seconds,
            kafka_timeout_seconds=kafka_timeout,
        )
    )
    if as_json:
        print(report.model_dump_json(indent=2))
    else:
        render(report, out)
    status = exit_status(report)
    if status:
        raise typer.Exit(status)


__all__ = ["EXIT_UNCHECKED", "EXIT_VIOLATIONS", "exit_status", "main", "parse_since", "render"]
