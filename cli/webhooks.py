"""`paysaga webhooks reseal`: move every webhook signing secret under the current encryption key
before an older key is removed from PAYSAGA_ENCRYPTION_KEYS (docs/security.md)."""

from __future__ import annotations

import asyncio

import typer
from pydantic import ValidationError
from rich.console import Console

app = typer.Typer(help="Merchant webhook endpoints.", no_args_is_help=True)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@app.command()
def reseal() -> None:
    """Seal every endpoint's signing secrets with the first of PAYSAGA_ENCRYPTION_KEYS (the
    secrets stay the same: merchants change nothing). Every key that sealed one must still be
    configured; exits 1 naming the endpoints it could not open. Without PAYSAGA_ENCRYPTION_KEYS,
    the development key `paysaga run` keeps under its home (PAYSAGA_HOME) is the one."""
    from activities.webhook_endpoints import WebhookEndpoints
    from checker.runner import resolve_endpoints
    from infra.codec import DEV_ENCRYPTION_KEY_FILE, EncryptionCodec, load_or_create_dev_key
    from infra.database import make_engine
    from settings import Settings

    try:
        settings = resolve_endpoints(Settings())
    except ValidationError as exc:
        err.print(f"[bold red]invalid PAYSAGA_* settings:[/]\n{exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    keys = settings.encryption_keys
    dev_key_file = settings.home.expanduser() / DEV_ENCRYPTION_KEY_FILE
    if not keys and dev_key_file.is_file():
        # The development stack's key: `paysaga run` seals with it when no keys are configured.
        keys = [load_or_create_dev_key(dev_key_file)]
    if not keys:
        err.print(
            "[bold red]PAYSAGA_ENCRYPTION_KEYS is not set[/] and there is no development key "
            f"at {dev_key_file}: nothing to seal with",
            soft_wrap=True,
        )
        raise typer.Exit(2)
    sealer = EncryptionCodec.from_keys(keys)

    async def run() -> None:
        engine = make_engine(settings.database_url or "", pool_size=1)
        try:
            done = await WebhookEndpoints(engine, sealer=sealer).reseal_all()
        finally:
            await engine.dispose()
        out.print(
            f"resealed {done.resealed} endpoint(s) with key {sealer.key_ids[0]!r}; "
            f"{done.current} already were"
        )
        if done.unopenable:
            err.print(
                f"[bold red]{len(done.unopenable)} endpoint(s) sealed with a key that is not "
                f"configured:[/] {', '.join(done.unopenable)}"
            )
            raise typer.Exit(1)

    asyncio.run(run())
