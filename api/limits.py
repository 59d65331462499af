"""Request body size limit, enforced before any route (or JSON parser) sees the bytes."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response


def _declared_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length")
    if value is None or not value.isdigit():
        return None  # the server rejects malformed lengths; the byte count below still applies
    return int(value)


class _ClientGone(Exception):
    pass


class BodyLimitMiddleware:
    """Pure ASGI: refuses a body over `max_bytes` with 413 `request_too_large`.

    An honest Content-Length is refused without reading anything. A chunked (or lying) body
    is read up to the limit and buffered, then replayed to the app: the whole body has to be
    in memory for JSON parsing anyway, and refusing here means FastAPI never turns the
    overflow into a generic "error parsing the body" 400.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        try:
            body = await self._read_body_within_limit(receive)
        except _ClientGone:
            return  # nobody is left to answer
        if body is None:
            await self._refuse(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _read_body_within_limit(self, receive: Receive) -> bytes | None:
        """The whole body, or None as soon as it passes the limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientGone
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413,
            "invalid_request_error",
            "request_too_large",
            f"The request body exceeds the limit of {self.max_bytes} bytes.",
            # The rest of the body is never read; the connection cannot be reused.
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the buffered body to the app once, then pass through (for `http.disconnect`)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def install_body_limit(app: FastAPI, max_bytes: int) -> None:
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes)


__all__ = ["BodyLimitMiddleware", "install_body_limit"]
