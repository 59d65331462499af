"""`paysaga crm tail`: what the CRM sandbox received (sandboxes/crm.py), one line each."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

app = typer.Typer(help="The local CRM sandbox that `paysaga run` starts.", no_args_is_help=True)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

DEFAULT_URL = f"http://127.0.0.1:{os.environ.get('PAYSAGA_CRM_SANDBOX_PORT') or 8070}"


def line(item: dict[str, Any]) -> str:
    mark = "ok " if item.get("verified") else "BAD"
    if item.get("duplicate"):
        mark = "dup"
    return (
        f"{item.get('seq', ''):>5} {item.get('received_at', '')[:23]} {mark} "
        f"{item.get('event_kind') or '-':<16} {item.get('payment_id') or '-':<28} "
        f"{item.get('status') or '-':<18} {item.get('amount', '')} {item.get('currency') or ''}"
        + (f"  ({item['problem']})" if item.get("problem") else "")
    )


@app.command()
def tail(
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, help="How many to show.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new ones.")] = False,
    url: Annotated[str, typer.Option(envvar="PAYSAGA_CRM_SANDBOX_URL")] = DEFAULT_URL,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between polls.")] = 1.0,
) -> None:
    """Print the notifications the CRM sandbox received: sequence, time, signature (ok / BAD /
    dup), event, payment, status, amount (minor units)."""
    with httpx.Client(base_url=url, timeout=5.0) as http:
        try:
            everything: list[dict[str, Any]] = []
            after = 0
            while True:  # read it all once to know where the end is
                page = http.get("/api/notifications", params={"after": after, "limit": 1000})
                page.raise_for_status()
                found = page.json()
                everything += found["data"]
                if not found["data"]:
                    break
                after = found["next_after"]
        except httpx.HTTPError as exc:
            err.print(f"[bold red]the CRM sandbox at {url} does not answer:[/] {exc}")
            raise typer.Exit(1) from None
        for item in everything[-lines:] if lines else []:
            out.print(line(item), soft_wrap=True)
        while follow:
            time.sleep(interval)
            try:
                found = http.get("/api/notifications", params={"after": after}).json()
            except httpx.HTTPError:
                continue  # restarting: keep trying until Ctrl-C
            for item in found["data"]:
                out.print(line(item), soft_wrap=True)
            after = found["next_after"]
