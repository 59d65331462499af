"""The HTTP client an activity class owns: made on first use (so the worker can build its
activities outside an event loop) and closed by `aclose` only if the class made it; one given
to the class (a test's, a shared one) stays its giver's."""

from __future__ import annotations

from typing import Any

import httpx


class OwnsHttpClient:
    """Mixed into an activity class that sets `_http` (the given client, or None) and
    `_owns_http` in its `__init__`; `_http_options` says how to make its own."""

    _http: httpx.AsyncClient | None
    _owns_http: bool

    def _http_options(self) -> dict[str, Any]:
        return {}

    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(follow_redirects=False, **self._http_options())
        return self._http

    async def aclose(self) -> None:
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None
