"""`paysaga`: start the whole system (`run`) and work with payments through its REST API.

Sub-commands that live in their own module are added with one line at the bottom
(`app.command("name")(module.main)`).
"""

from __future__ import annotations

import logging
import uuid
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from bench import run as bench
from cli import check, crm, events, recon, subscriptions, webhooks
from cli.client import (
    DEFAULT_API_URL,
    Connection,
    api_client,
    err,
    out,
    reporting_api_errors,
    show_follow_up,
    show_payment,
    show_payment_list,
)
from infra.exit import hard_exit
from settings import Settings

app = typer.Typer(
    name="paysaga",
    help="Payments as durable Temporal sagas. `paysaga run` starts everything locally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals may hold API keys
)

# ── options shared by the client commands ────────────────────────────────────────────────
ApiUrl = Annotated[
    str, typer.Option("--api-url", envvar="PAYSAGA_API_URL", help="Base URL of the API.")
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="PAYSAGA_API_KEY",
        help="API key; default: the dev key of `paysaga run` (<home>/dev-api-key).",
        show_default=False,
    ),
]
Home = Annotated[
    Path | None,
    typer.Option("--home", envvar="PAYSAGA_HOME", help="paysaga's data directory [.paysaga]"),
]
Wait = Annotated[
    float, typer.Option("--wait", min=0, max=30, help="Seconds the API may wait for the outcome.")
]
AmountOption = Annotated[
    int | None,
    typer.Option(
        "--amount", min=1, help="Minor units; default: all that remains.", show_default=False
    ),
]
IdempotencyKey = Annotated[
    str | None,
    typer.Option(
        "--idempotency-key",
        help="Reuse a key to retry safely; default: a new one (printed).",
        show_default=False,
    ),
]


@app.callback()
def connect(
    ctx: typer.Context,
    api_url: ApiUrl = DEFAULT_API_URL,
    api_key: ApiKey = None,
    home: Home = None,
) -> None:
    """Payments as durable Temporal sagas. `paysaga run` starts everything locally."""
    ctx.obj = Connection(api_url, api_key, home)


def new_idempotency_key(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ── run ──────────────────────────────────────────────────────────────────────────────────
@app.command()
def run(
    home: Annotated[
        Path | None,
        typer.Option(
            "--home", help="Data directory [PAYSAGA_HOME or .paysaga]", show_default=False
        ),
    ] = None,
    ui: Annotated[bool, typer.Option("--ui/--no-ui", help="Serve the Temporal Web UI.")] = True,
) -> None:
    """Start the whole system: PostgreSQL, Kafka, Temporal (+ UI), the worker and the API.

    Services given by PAYSAGA_TEMPORAL_ADDRESS, PAYSAGA_KAFKA_BOOTSTRAP_SERVERS or
    PAYSAGA_DATABASE_URL are used as they are instead. Ctrl-C stops everything it started.
    """
    from cli.run import EXIT_CANNOT_START, run_system  # the stack's imports only when needed

    try:
        settings = Settings()
    except ValidationError as exc:
        err.print(f"[bold red]invalid PAYSAGA_* settings:[/]\n{exc}", soft_wrap=True)
        raise typer.Exit(EXIT_CANNOT_START) from None
    if home is not None:
        settings = settings.model_copy(update={"home": home})
    logging.basicConfig(level=logging.WARNING)  # the stack's own warnings reach the terminal
    raise typer.Exit(run_system(settings, temporal_ui=ui))


# ── payments ─────────────────────────────────────────────────────────────────────────────
@app.command()
def pay(
    ctx: typer.Context,
    amount: Annotated[int, typer.Argument(min=1, help="Minor units: 2500 is 25.00 USD.")],
    currency: Annotated[str, typer.Argument(help="ISO 4217 code.")] = "USD",
    customer: Annotated[str, typer.Option(help="Customer id.")] = "cus_demo",
    merchant: Annotated[str, typer.Option(help="Merchant id.")] = "mer_demo",
    payment_method: Annotated[
        str,
        typer.Option("--token", help="Payment-method token (pm_…), never a card number."),
    ] = "pm_card_visa_0001",
    description: Annotated[str | None, typer.Option(show_default=False)] = None,
    manual_capture: Annotated[
        bool,
        typer.Option(
            "--manual-capture",
            help="Stop at requires_capture: `paysaga capture` or `paysaga void` it later.",
        ),
    ] = False,
    idempotency_key: IdempotencyKey = None,
    wait: Wait = 10.0,
) -> None:
    """Create a payment and show where it got to within --wait seconds."""
    key = idempotency_key or new_idempotency_key("cli")
    body = {
        "amount": amount,
        "currency": currency.upper(),
        "customer_id": customer,
        "merchant_id": merchant,
        "payment_method": payment_method,
    }
    if description is not None:
        body["description"] = description
    if manual_capture:
        body["capture_method"] = "manual"
    with reporting_api_errors():
        payment = api_client(ctx).call(
            "POST", "/v1/payments", json=body, wait=wait, idempotency_key=key
        )
    show_payment(payment)
    out.print(f"Idempotency-Key: {key}", soft_wrap=True)


@app.command()
def status(
    ctx: typer.Context,
    payment_id: Annotated[str, typer.Argument(help="pay_…")],
) -> None:
    """Show a payment: status, amounts, fraud score, CRM sync, refunds and disputes."""
    with reporting_api_errors():
        payment = api_client(ctx).call("GET", f"/v1/payments/{payment_id}")
    show_payment(payment)


@app.command("list")
def list_payments(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help="e.g. succeeded, requires_review.")] = None,
    customer: Annotated[str | None, typer.Option(help="Customer id.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    cursor: Annotated[str | None, typer.Option(help="From a previous page.")] = None,
) -> None:
    """List recent payments (Temporal visibility), newest first."""
    params = {"status": status, "customer_id": customer, "limit": limit, "cursor": cursor}
    with reporting_api_errors():
        listing = api_client(ctx).call("GET", "/v1/payments", params=params)
    show_payment_list(listing)


@app.command()
def refund(
    ctx: typer.Context,
    payment_id: Annotated[str, typer.Argument(help="pay_…")],
    amount: AmountOption = None,
    reason: Annotated[str | None, typer.Option(show_default=False)] = None,
    idempotency_key: IdempotencyKey = None,
    wait: Wait = 10.0,
) -> None:
    """Refund a payment, in full or in part."""
    key = idempotency_key or new_idempotency_key("cli-refund")
    body = {"amount": amount, "reason": reason}
    with reporting_api_errors():
        made = api_client(ctx).call(
            "POST",
            f"/v1/payments/{payment_id}/refunds",
            json={k: v for k, v in body.items() if v is not None},
            wait=wait,
            idempotency_key=key,
        )
    show_follow_up("refund", made)
    out.print(f"Idempotency-Key: {key}", soft_wrap=True)


@app.command()
def dispute(
    ctx: typer.Context,
    payment_id: Annotated[str, typer.Argument(help="pay_…")],
    reason_code: Annotated[str, typer.Option(help="The network's reason code, e.g. 10.4.")],
    network_reference: Annotated[
        str, typer.Option(help="The network's dispute id; repeating it is a no-op.")
    ],
    amount: AmountOption = None,
    wait: Wait = 10.0,
) -> None:
    """Record a dispute (chargeback) the card network opened."""
    body: dict[str, object] = {"reason_code": reason_code, "network_reference": network_reference}
    if amount is not None:
        body["amount"] = amount
    with reporting_api_errors():
        opened = api_client(ctx).call(
            "POST", f"/v1/payments/{payment_id}/disputes", json=body, wait=wait
        )
    show_follow_up("dispute", opened)


@app.command()
def cancel(
    ctx: typer.Context,
    payment_id: Annotated[str, typer.Argument(help="pay_…")],
    wait: Wait = 10.0,
) -> None:
    """Cancel a payment that is not posted to the ledger yet (e.g. waiting for review)."""
    _act_on_payment(ctx, payment_id, "cancel", None, wait)


@app.command()
def capture(
    ctx: typer.Context,
    payment_id: Annotated[str, typer.Argument(help="pay_… in requires_capture")],
    amount: Annotated[
        int | None,
        typer.Option(
            "--amount",
            min=1,
            help="Minor units to capture; default: all that was authorized (the rest is released).",
            show_default=False,
        ),
    ] = None,
    wait: Wait = 10.0,
) -> None:
    """Capture a payment created with --manual-capture, all or part of its authorization."""
    body = {"amount_to_capture": amount} if amount is not None else {}
    _act_on_payment(ctx, payment_id, "capture", body, wait)


@app.command()
def void(
    ctx: typer.Context,
    payment_id: Annotated[str, typer.Argument(help="pay_… in requires_capture")],
    wait: Wait = 10.0,
) -> None:
    """Void a payment's uncaptured authorization: the whole hold is released."""
    _act_on_payment(ctx, payment_id, "void", None, wait)


def _act_on_payment(
    ctx: typer.Context, payment_id: str, action: str, body: dict[str, Any] | None, wait: float
) -> None:
    """POST /v1/payments/{id}/{action} (cancel, capture, void) and show the payment."""
    with reporting_api_errors():
        payment = api_client(ctx).call(
            "POST", f"/v1/payments/{payment_id}/{action}", json=body, wait=wait
        )
    show_payment(payment)


# ── sub-commands from their own modules: one line each ───────────────────────────────────
app.command("bench")(bench.main)
app.command("check")(check.main)
app.add_typer(crm.app, name="crm")
app.add_typer(events.app, name="events")
app.add_typer(recon.app, name="recon")
app.add_typer(subscriptions.app, name="subscriptions")
app.add_typer(webhooks.app, name="webhooks")


def main() -> None:
    """The console script. Leaves through hard_exit: temporalio (imported by `run` and
    `bench`) can crash the interpreter's finalization after all work succeeded."""
    # platformdirs warns about XDG_RUNTIME_DIR while the stack starts: noise for a user.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
    status = 0
    try:
        app()
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            err.print(exc.code, soft_wrap=True)
    except KeyboardInterrupt:
        status = 130
    except Exception:
        err.print_exception()
        status = 1
    hard_exit(status)
