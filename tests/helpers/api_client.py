"""The API in-process with its lifespan running, and an authenticated client over ASGI."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from temporalio.client import Client

from api.app import create_app
from settings import Settings


@asynccontextmanager
async def api_client(
    settings: Settings, temporal: Client, api_key: str, base_url: str = "http://paysaga.test"
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings, temporal)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url=base_url,
            headers={"Authorization": f"Bearer {api_key}"},
            timeout=60,
        ) as client,
    ):
        yield client
