"""The client side of the `paysaga` command: HTTP calls to a running API, rendered with rich.

Amounts are integer minor units on the wire and on the command line; they are shown in major
units too (`Money`'s own formatting, integer arithmetic only).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from domain.money import CURRENCIES, Money

# The same PAYSAGA_API_PORT that `paysaga run` listens on; --api-url / PAYSAGA_API_URL win.
DEFAULT_API_URL = f"http://127.0.0.1:{os.environ.get('PAYSAGA_API_PORT') or 8000}"
# How long a request may take beyond the `wait` it asks the API for.
NETWORK_SLACK_SECONDS = 15.0

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

STATUS_STYLE = {
    "succeeded": "green",
    "partially_refunded": "cyan",
    "refunded": "cyan",
    "disputed": "magenta",
    "requires_review": "yellow",
    "received": "yellow",
    "processing": "yellow",
    "rejected": "red",
    "declined": "red",
    "canceled": "red",
    "failed": "red",
    "requires_attention": "bold red",
    "pending": "yellow",
    "open": "magenta",
    "won": "green",
    "lost": "red",
}


class ApiFailure(Exception):
    """The API answered 4xx/5xx (or not at all); the message is what the user should read."""


def default_api_key(home: Path | None) -> str:
    """`--api-key` / PAYSAGA_API_KEY first (typer handles both), else the key `paysaga run`
    keeps under its home."""
    path = (home or Path(os.environ.get("PAYSAGA_HOME", ".paysaga"))) / "dev-api-key"
    if path.exists():
        return path.read_text().strip()
    raise typer.BadParameter(
        f"no API key: pass --api-key, set PAYSAGA_API_KEY, or start `paysaga run` "
        f"(it writes {path})",
        param_hint="--api-key",
    )


@dataclass
class PaysagaApi:
    base_url: str
    api_key: str

    def call(
        self,
        method: str,
        path: str,
        *,
        wait: float = 0.0,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        query = {k: v for k, v in (params or {}).items() if v is not None}
        if wait:
            query["wait"] = wait
        try:
            answer = httpx.request(
                method,
                f"{self.base_url.rstrip('/')}{path}",
                headers=headers,
                json=json,
                params=query,
                timeout=wait + NETWORK_SLACK_SECONDS,
            )
        except httpx.HTTPError as exc:
            raise ApiFailure(
                f"cannot reach the API at {self.base_url} ({type(exc).__name__}); "
                f"is `paysaga run` running?"
            ) from None
        if answer.status_code >= 400:
            raise ApiFailure(describe_error(answer))
        body: dict[str, Any] = answer.json()
        return body


def describe_error(answer: httpx.Response) -> str:
    """The Stripe-style body `{"error": {type, code, message, param}}` as one line."""
    try:
        error = answer.json()["error"]
        where = f" (param: {error['param']})" if error.get("param") else ""
        return f"{answer.status_code} {error['type']}/{error['code']}: {error['message']}{where}"
    except (ValueError, KeyError, TypeError):
        return f"{answer.status_code} {answer.reason_phrase}: {answer.text[:300]}"


def money(amount: int | None, currency: str | None) -> str:
    if amount is None or currency is None:
        return "—"
    if currency not in CURRENCIES:
        return f"{amount} {currency} minor units"
    return str(Money(amount, currency))


def when(iso: str | None, layout: str = "%Y-%m-%d %H:%M:%S %Z") -> str:
    if not iso:
        return "—"
    try:
        return datetime.fromisoformat(iso).strftime(layout).strip()
    except ValueError:
        return iso


def styled_status(status: str | None) -> str:
    if status is None:
        return "—"
    return f"[{STATUS_STYLE.get(status, 'white')}]{status}[/]"


def payment_table(payment: dict[str, Any]) -> Table:
    currency = payment["currency"]
    table = Table(title=f"payment {payment['id']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", styled_status(payment["status"]))
    table.add_row("amount", f"{money(payment['amount'], currency)} ({payment['amount']} minor)")
    table.add_row("customer", payment["customer_id"])
    table.add_row("merchant", payment["merchant_id"])
    table.add_row("captured", money(payment["amount_captured"], currency))
    table.add_row("refunded", money(payment["amount_refunded"], currency))
    table.add_row("disputed", money(payment["amount_disputed"], currency))
    table.add_row("refundable", money(payment["amount_refundable"], currency))
    if payment.get("fraud_score") is not None:
        reasons = ", ".join(payment.get("fraud_reasons") or []) or "no rule fired"
        table.add_row("fraud score", f"{payment['fraud_score']:.2f} ({reasons})")
    table.add_row("CRM sync", payment["crm_sync"])
    table.add_row("waiting for", payment["waiting_for"])
    for field in ("failure_reason", "cancel_refused"):
        if payment.get(field):
            table.add_row(field.replace("_", " "), f"[red]{payment[field]}[/]")
    table.add_row("created", when(payment["created_at"]))
    return table


def follow_ups_table(payment: dict[str, Any]) -> Table | None:
    rows = [("refund", r) for r in payment.get("refunds", [])]
    rows += [("dispute", d) for d in payment.get("disputes", [])]
    if not rows:
        return None
    table = Table("kind", "id", "amount", "status", "detail", title="refunds and disputes")
    for kind, item in rows:
        detail = item.get("failure_reason") or item.get("reason") or item.get("reason_code") or ""
        table.add_row(
            kind,
            item["id"],
            money(item["amount"], item["currency"]),
            styled_status(item["status"]),
            detail,
        )
    return table


def show_payment(payment: dict[str, Any]) -> None:
    out.print(payment_table(payment))
    follow_ups = follow_ups_table(payment)
    if follow_ups is not None:
        out.print(follow_ups)


def listed_cells(item: dict[str, Any]) -> list[str]:
    """The first cells of a listing's row, a payment's or a subscription's alike."""
    return [
        item["id"],
        styled_status(item["status"]),
        money(item["amount"], item["currency"]),
        item["customer_id"] or "—",
    ]


def show_payment_list(listing: dict[str, Any]) -> None:
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("id", no_wrap=True)  # what the user copies into the next command
    for name in ("status", "amount", "customer", "merchant", "CRM"):
        table.add_column(name)
    table.add_column("created (UTC)", no_wrap=True)
    for item in listing["data"]:
        table.add_row(
            *listed_cells(item),
            item["merchant_id"] or "—",
            item["crm_sync"] or "—",
            when(item["created_at"], "%m-%d %H:%M:%S"),
        )
    out.print(table)
    if listing.get("has_more"):
        out.print(f"more: --cursor {listing['next_cursor']}", soft_wrap=True)


def show_follow_up(kind: str, item: dict[str, Any]) -> None:
    table = Table(title=f"{kind} {item['id']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("payment", item["payment_id"])
    table.add_row("status", styled_status(item["status"]))
    table.add_row("amount", money(item["amount"], item["currency"]))
    for field in ("reason", "reason_code", "network_reference", "failure_reason"):
        if item.get(field):
            table.add_row(field.replace("_", " "), item[field])
    out.print(table)


# ── the connection the client commands share (set by `paysaga`'s callback, cli/main.py) ──
@dataclass(frozen=True)
class Connection:
    """Where the client commands find the API, and the key they use: the options before the
    command (`paysaga --api-url … status pay_…`) or their environment variables."""

    api_url: str
    api_key: str | None
    home: Path | None


def api_client(ctx: typer.Context) -> PaysagaApi:
    connection: Connection = ctx.obj
    return PaysagaApi(connection.api_url, connection.api_key or default_api_key(connection.home))


@contextmanager
def reporting_api_errors() -> Iterator[None]:
    """An API error is an answer for the user, not a crash: one line on stderr, exit 1."""
    try:
        yield
    except ApiFailure as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None


def call_api(ctx: typer.Context, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """One API call of a client command; an API error is reported, exit 1."""
    with reporting_api_errors():
        return api_client(ctx).call(method, path, **kwargs)
