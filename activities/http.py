"""The HTTP client an activity class owns: made on first use (so the worker can build its
activities outside an event loop) and closed by `aclose` only if the class made it; one given
to the class (a test's, a shared one) stays its giver's.

Two flavours: `OwnsHttpClient` (httpx) and `OwnsAiohttpSession` (aiohttp), the latter for calls
on the payment's hot path, where httpx/httpcore costs several times aiohttp's CPU per request
(README "Performance"). The aiohttp one behaves as the httpx one did: no redirects followed,
httpx's TLS trust (certifi, or SSL_CERT_FILE/SSL_CERT_DIR) and the environment's HTTP(S)_PROXY /
NO_PROXY, read once per origin as httpx reads them once per client, and transport errors named
as httpx named them (`transport_error_name`) so operators' messages keep their shape."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import math
from dataclasses import dataclass
from typing import Any

import aiohttp
import httpx
from aiohttp.helpers import get_env_proxy_for_url
from multidict import CIMultiDictProxy
from yarl import URL

# httpx's defaults: at most 100 connections, an idle one kept 5 s.
_MAX_CONNECTIONS = 100
_KEEPALIVE_SECONDS = 5.0
# aiohttp rounds a timeout over 5 s up to the loop clock's next whole second; httpx does not,
# and a 10 s acquirer timeout must not become 11 s against the activity's own timeout.
_NEVER_ROUND = math.inf

# The proxy (and its credentials) a request to an origin goes through; (None, None) for none.
_Proxy = tuple[URL | None, aiohttp.BasicAuth | None]


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


def phase_timeout(seconds: float, *, connect: float | None = None) -> aiohttp.ClientTimeout:
    """httpx.Timeout(seconds, connect=connect) in aiohttp's terms: getting a connection and
    every read bounded by `seconds`, opening the socket by `connect` (default `seconds`), the
    whole exchange not."""
    return aiohttp.ClientTimeout(
        total=None,
        connect=seconds,
        sock_connect=seconds if connect is None else connect,
        sock_read=seconds,
        ceil_threshold=_NEVER_ROUND,
    )


@dataclass(frozen=True)
class HttpAnswer:
    """A response read to its end (as httpx's `request` returns it): the connection is back in
    the pool before the caller looks at it."""

    status_code: int
    headers: CIMultiDictProxy[str]
    content: bytes
    charset: str | None

    @property
    def text(self) -> str:
        """The body decoded as httpx's `Response.text` does: the declared charset if Python
        knows it, else UTF-8, undecodable bytes replaced."""
        encoding = "utf-8"
        if self.charset:
            with contextlib.suppress(LookupError):
                encoding = codecs.lookup(self.charset).name
        return self.content.decode(encoding, errors="replace")


class UnusableUrl(aiohttp.ClientError, ValueError):
    """The URL cannot be requested at all (malformed, not http(s), no host); said as httpx said
    it, without the URL itself, which may carry credentials."""


def _request_target(url: str) -> URL:
    try:
        target = URL(url)
    except ValueError as exc:
        raise UnusableUrl(f"Invalid URL: {exc}") from None
    if target.scheme not in ("http", "https"):
        if not target.scheme or "://" not in url:  # "host:port" parses as scheme "host"
            raise UnusableUrl("Request URL is missing an 'http://' or 'https://' protocol.")
        raise UnusableUrl(f"Request URL has an unsupported protocol '{target.scheme}://'.")
    if not target.host:
        raise UnusableUrl("Request URL is missing a host.")
    return target


def transport_error_name(exc: BaseException) -> str:
    """The httpx exception name for an aiohttp failure to exchange a request (a timeout or a
    `aiohttp.ClientError`), so messages read as they did when the call went through httpx."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "ConnectTimeout"
    if isinstance(exc, TimeoutError):
        return "ReadTimeout"
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, DNS, TLS, proxy
        return "ConnectError"
    if isinstance(exc, UnusableUrl | aiohttp.InvalidURL | aiohttp.NonHttpUrlClientError):
        return "UnsupportedProtocol"
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientResponseError,
    ):
        return "RemoteProtocolError"
    if isinstance(exc, aiohttp.ClientOSError):
        return "ReadError"
    return type(exc).__name__


class OwnsAiohttpSession:
    """`OwnsHttpClient` for aiohttp. The activity class sets `_session` (the given session, or
    None) and `_owns_session` in its `__init__`; its own session is made inside the running loop
    on first use, as aiohttp requires."""

    _session: aiohttp.ClientSession | None
    _owns_session: bool
    _proxies: dict[tuple[str, str | None, int | None], _Proxy] | None = None

    def _aiohttp_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=_MAX_CONNECTIONS,
                keepalive_timeout=_KEEPALIVE_SECONDS,
                timeout_ceil_threshold=_NEVER_ROUND,
                ssl=httpx.create_ssl_context(),
            )
            # Proxies come from `_proxy_for` (once per origin), not from aiohttp's trust_env,
            # which looks them up and reads ~/.netrc in a thread on every request.
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    def _proxy_for(self, url: URL) -> _Proxy:
        if self._proxies is None:
            self._proxies = {}
        origin = (url.scheme, url.host, url.port)
        found = self._proxies.get(origin)
        if found is None:
            try:
                found = get_env_proxy_for_url(url)
            except LookupError:
                found = (None, None)
            self._proxies[origin] = found
        return found

    async def _exchange(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None,
        headers: dict[str, str],
        timeout: aiohttp.ClientTimeout,
    ) -> HttpAnswer:
        """One request, redirects not followed, its answer read to the end. Raises
        `TimeoutError` or `aiohttp.ClientError` (see `transport_error_name`; `UnusableUrl` for
        a URL no request can go to)."""
        target = _request_target(url)
        proxy, proxy_auth = self._proxy_for(target)
        async with self._aiohttp_session().request(
            method,
            target,
            data=body,
            headers=headers,
            timeout=timeout,
            allow_redirects=False,
            proxy=proxy,
            proxy_auth=proxy_auth,
        ) as response:
            content = await response.read()
            return HttpAnswer(response.status, response.headers, content, response.charset)

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()
            await asyncio.sleep(0)  # let the transports' close callbacks run
