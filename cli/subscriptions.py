"""`paysaga subscriptions …`: recurring payments through the REST API (docs/subscriptions.md).

paysaga subscriptions create 1500 EUR --interval month --trial-days 14 --customer cus_1
paysaga subscriptions show sub_…
paysaga subscriptions list --status past_due
paysaga subscriptions price sub_… --unit-amount 2500       # prorated onto the next renewal
paysaga subscriptions cancel sub_… --at-period-end
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import typer
from rich.table import Table

from cli.client import (
    call_api,
    listed_cells,
    money,
    out,
    styled_status,
    when,
)

app = typer.Typer(help="Recurring payments: create, show, change, cancel.", no_args_is_help=True)

SubscriptionId = Annotated[str, typer.Argument(help="sub_…")]


def show_subscription(sub: dict[str, Any]) -> None:
    currency = sub["currency"]
    table = Table(title=f"subscription {sub['id']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    every = f"{sub['interval_count']} {sub['interval']}(s)"
    table.add_row("status", styled_status(sub["status"]))
    table.add_row(
        "price", f"{money(sub['unit_amount'], currency)} × {sub['quantity']} every {every}"
    )
    table.add_row("customer / merchant", f"{sub['customer_id']} / {sub['merchant_id']}")
    table.add_row("next renewal", when(sub["next_renewal_at"]))
    table.add_row("trial ends", when(sub["trial_end"]))
    table.add_row("MRR", money(sub["mrr"], currency))
    table.add_row("paid so far", money(sub["paid_total"], currency))
    if sub["pending_adjustment"]:
        table.add_row("next renewal adds", money(sub["pending_adjustment"], currency))
    if sub["cancel_at_period_end"]:
        table.add_row("cancels", "at the current period's end")
    refused = sub.get("last_refused_change")
    if refused:
        table.add_row(
            "last refused change",
            f"{refused['kind']} at {when(refused['at'])}: {refused['code']} (not applied)",
        )
    out.print(table)
    if sub["periods"]:
        periods = Table(title="periods", title_justify="left")
        for column in ("#", "from", "to", "amount", "status", "paid by", "attempts"):
            periods.add_column(column)
        for p in sub["periods"]:
            periods.add_row(
                str(p["number"]),
                p["start"],
                p["end"],
                money(p["amount"], currency),
                p["status"],
                p["paid_by"] or "—",
                str(len(p["attempts"])),
            )
        out.print(periods)


@app.command()
def create(
    ctx: typer.Context,
    unit_amount: Annotated[int, typer.Argument(min=1, help="Minor units per unit per period.")],
    currency: Annotated[str, typer.Argument(help="ISO 4217 code.")] = "USD",
    interval: Annotated[str, typer.Option(help="day, week, month or year.")] = "month",
    interval_count: Annotated[int, typer.Option(min=1, max=12)] = 1,
    quantity: Annotated[int, typer.Option(min=1)] = 1,
    trial_days: Annotated[int, typer.Option(min=0, max=730)] = 0,
    anchor: Annotated[
        str | None, typer.Option(help="Billing anchor date (YYYY-MM-DD).", show_default=False)
    ] = None,
    customer: Annotated[str, typer.Option(help="Customer id.")] = "cus_demo",
    merchant: Annotated[str, typer.Option(help="Merchant id.")] = "mer_demo",
    payment_method: Annotated[
        str, typer.Option("--token", help="Payment-method token (pm_…), never a card number.")
    ] = "pm_card_visa_0001",
    idempotency_key: Annotated[
        str | None, typer.Option(help="Reuse a key to retry safely.", show_default=False)
    ] = None,
) -> None:
    """Create a subscription (its first renewal is charged when the trial ends)."""
    key = idempotency_key or f"cli-sub-{uuid.uuid4().hex}"
    body: dict[str, Any] = {
        "customer_id": customer,
        "merchant_id": merchant,
        "payment_method": payment_method,
        "unit_amount": unit_amount,
        "currency": currency.upper(),
        "quantity": quantity,
        "interval": interval,
        "interval_count": interval_count,
        "trial_days": trial_days,
    }
    if anchor is not None:
        body["billing_anchor"] = anchor
    sub = call_api(ctx, "POST", "/v1/subscriptions", json=body, idempotency_key=key)
    show_subscription(sub)
    out.print(f"Idempotency-Key: {key}", soft_wrap=True)


@app.command()
def show(
    ctx: typer.Context,
    subscription_id: SubscriptionId,
) -> None:
    """Show a subscription: status, price, next renewal, MRR, its periods and their payments."""
    show_subscription(call_api(ctx, "GET", f"/v1/subscriptions/{subscription_id}"))


@app.command("list")
def list_subscriptions(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="e.g. active, past_due.")] = None,
    customer: Annotated[str | None, typer.Option(help="Customer id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
) -> None:
    """List subscriptions (Temporal visibility)."""
    params = {"status": status, "customer_id": customer, "limit": limit}
    listing = call_api(ctx, "GET", "/v1/subscriptions", params=params)
    table = Table(title="subscriptions", title_justify="left")
    for column in ("id", "status", "amount", "customer", "next renewal"):
        table.add_column(column)
    for item in listing["data"]:
        table.add_row(*listed_cells(item), when(item["next_renewal_at"]))
    out.print(table)


def _change(
    subscription_id: str, action: str, body: dict[str, Any] | None, ctx: typer.Context
) -> None:
    path = f"/v1/subscriptions/{subscription_id}/{action}"
    show_subscription(call_api(ctx, "POST", path, json=body))


@app.command()
def cancel(
    ctx: typer.Context,
    subscription_id: SubscriptionId,
    at_period_end: Annotated[
        bool, typer.Option("--at-period-end", help="Renew no more; end at the period's end.")
    ] = False,
) -> None:
    """Cancel now, or at the end of the current period."""
    _change(subscription_id, "cancel", {"at_period_end": at_period_end}, ctx)


@app.command()
def pause(
    ctx: typer.Context,
    subscription_id: SubscriptionId,
) -> None:
    """Pause an active subscription: boundaries passing meanwhile are not charged."""
    _change(subscription_id, "pause", {}, ctx)


@app.command()
def resume(
    ctx: typer.Context,
    subscription_id: SubscriptionId,
) -> None:
    """Resume a paused subscription at its next boundary."""
    _change(subscription_id, "resume", {}, ctx)


@app.command()
def price(
    ctx: typer.Context,
    subscription_id: SubscriptionId,
    unit_amount: Annotated[int | None, typer.Option(min=1, show_default=False)] = None,
    quantity: Annotated[int | None, typer.Option(min=1, show_default=False)] = None,
) -> None:
    """Change the price or quantity; the running period's difference goes onto the next renewal."""
    body = {k: v for k, v in {"unit_amount": unit_amount, "quantity": quantity}.items() if v}
    _change(subscription_id, "price", body, ctx)


@app.command("payment-method")
def payment_method(
    ctx: typer.Context,
    subscription_id: SubscriptionId,
    token: Annotated[str, typer.Argument(help="The new payment-method token (pm_…).")],
) -> None:
    """Replace the payment method the next renewal (or dunning retry) charges."""
    _change(subscription_id, "payment_method", {"payment_method": token}, ctx)
