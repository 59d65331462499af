"""An aiohttp.web application (the CRM sandbox) served on a free local port for a test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from infra.embedded.process import free_port


@asynccontextmanager
async def served_aiohttp(app: web.Application) -> AsyncIterator[str]:
    """The application on a real socket; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
