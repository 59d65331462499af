"""`paysaga events replay --since …`: republish the stored events of a time window to Kafka.

The outbox relay republishes everything by itself when the broker lost its log (the embedded
one after a restart). On a real cluster that never happens; this is for consumers that need a
window again (a new consumer group, a topic recreated by hand, a downstream restore).
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from cli.check import parse_since

app = typer.Typer(help="The events store and its copy on Kafka.", no_args_is_help=True)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


async def _replay(since: datetime, until: datetime | None) -> int:
    from activities.event_store import EventStore
    from activities.kafka import EventPublisher
    from checker.runner import resolve_endpoints
    from infra.database import make_engine
    from infra.relay import replay
    from settings import Settings

    settings = resolve_endpoints(Settings())
    engine = make_engine(settings.database_url or "", pool_size=2)
    publisher = EventPublisher(settings.kafka_bootstrap_servers or "", settings)
    try:
        return await replay(EventStore(engine), publisher, since, until)
    finally:
        await asyncio.to_thread(publisher.close, 10.0)
        await engine.dispose()


@app.command()
def replay(
    since: Annotated[
        str, typer.Option(help="An age (30m, 2h, 7d) or an ISO time: events recorded since.")
    ],
    until: Annotated[
        str | None, typer.Option(help="Up to (default: now); same forms.", show_default=False)
    ] = None,
) -> None:
    """Republish every event recorded in the window, oldest first, with its original id
    (consumers deduplicate by `ce_id`)."""
    from activities.kafka import KafkaPublishError

    try:
        count = asyncio.run(_replay(parse_since(since), parse_since(until) if until else None))
    except ValidationError as exc:
        err.print(f"[bold red]invalid PAYSAGA_* settings:[/]\n{exc}", soft_wrap=True)
        raise typer.Exit(2) from None
    except KafkaPublishError as exc:
        err.print(f"[bold red]replay stopped:[/] {exc}", soft_wrap=True)
        raise typer.Exit(1) from None
    out.print(f"republished {count} event(s) recorded since {parse_since(since).isoformat()}")
