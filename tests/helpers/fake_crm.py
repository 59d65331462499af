"""A real HTTP server on 127.0.0.1 that stands in for the CRMs' far side.

It records every request and answers from a script, so tests can make Salesforce, HubSpot or a
webhook receiver slow, down or picky, and then assert on exactly what paysaga sent.

    with FakeCrmServer() as crm:
        crm.fail_for(2.0)                      # every request for 2 s gets 503
        crm.respond_with(400, times=1, path_prefix="/crm/v3")   # then HubSpot refuses once
        ...
        [req] = crm.requests_for("/services/data")

Script rules are tried in the order they were added; the first live rule whose path prefix
matches answers the request (and uses up one of its `times`). Unmatched requests get 200
`{"ok": true}`. `stop()` then `start()` brings the server back on the same port, which is how
fault tests model a CRM outage.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # path plus query string, as sent
    headers: dict[str, str]  # names lower-cased
    body: bytes
    received_at: float  # time.time() when the request arrived

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Rule:
    status: int
    body: bytes
    headers: dict[str, str]
    delay: float
    path_prefix: str
    remaining: int | None  # None: every matching request
    until: float | None = None  # time.monotonic() deadline, for time-boxed rules

    def live(self, now: float) -> bool:
        if self.until is not None and now >= self.until:
            return False
        return self.remaining is None or self.remaining > 0

    def matches(self, path: str) -> bool:
        return path.startswith(self.path_prefix)


def _encode_body(status: int, body: Any) -> bytes:
    if body is None:
        default = {"ok": True} if 200 <= status < 300 else {"ok": False, "error": _phrase(status)}
        return json.dumps(default).encode()
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "scripted failure"


_DEFAULT = _Rule(
    status=200, body=b'{"ok": true}', headers={}, delay=0.0, path_prefix="", remaining=None
)


class FakeCrmServer:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._rules: list[_Rule] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Set on stop(): wakes handlers sleeping in a scripted delay so shutdown is instant.
        self._stopping = threading.Event()

    # --- lifecycle

    def start(self) -> FakeCrmServer:
        if self._server is not None:
            return self
        self._stopping.clear()
        server = ThreadingHTTPServer((self._host, self._port), self._handler_class())
        server.daemon_threads = True
        self._port = server.server_address[1]  # keep the port so a restart reuses it
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.name = f"fake-crm-{self._port}"
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server, self._thread = None, None

    @property
    def running(self) -> bool:
        return self._server is not None

    def __enter__(self) -> FakeCrmServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the fake CRM server has not been started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    # --- scripting

    def respond_with(
        self,
        status: int,
        times: int | None = None,
        *,
        body: Any = None,
        headers: dict[str, str] | None = None,
        delay: float = 0.0,
        path_prefix: str = "",
    ) -> None:
        """Answer the next `times` matching requests (all of them if None) with `status`.
        `body` may be bytes, str or anything JSON-serialisable; None means a small JSON default."""
        self._add_rule(
            _Rule(
                status=status,
                body=_encode_body(status, body),
                headers=dict(headers or {}),
                delay=delay,
                path_prefix=path_prefix,
                remaining=times,
            )
        )

    def fail_for(self, seconds: float, status: int = 503, *, path_prefix: str = "") -> None:
        """Answer every matching request with `status` for the next `seconds`."""
        rule = _Rule(
            status=status,
            body=_encode_body(status, None),
            headers={},
            delay=0.0,
            path_prefix=path_prefix,
            remaining=None,
            until=time.monotonic() + seconds,
        )
        self._add_rule(rule)

    def delay_for(
        self, seconds: float, times: int | None = None, *, status: int = 200, path_prefix: str = ""
    ) -> None:
        """Hold each of the next `times` matching requests (all if None) for `seconds` before
        answering: longer than the client's timeout, it simulates a hung CRM."""
        self.respond_with(status, times, delay=seconds, path_prefix=path_prefix)

    def hang_instead(self, seconds: float) -> None:
        """`clear()` and `delay_for(seconds)` in one step: no request in between finds the
        script empty and gets a 200 (a CRM going from failing to hung never answers)."""
        with self._lock:
            self._requests.clear()
            self._rules.clear()
            self._rules.append(
                _Rule(
                    status=200,
                    body=_encode_body(200, None),
                    headers={},
                    delay=seconds,
                    path_prefix="",
                    remaining=None,
                )
            )

    def clear(self) -> None:
        """Forget recorded requests and the script: back to answering 200 to everything."""
        with self._lock:
            self._requests.clear()
            self._rules.clear()

    def _add_rule(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    def _next_rule(self, path: str) -> _Rule:
        now = time.monotonic()
        with self._lock:
            self._rules = [r for r in self._rules if r.live(now)]
            for rule in self._rules:
                if rule.matches(path):
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    return rule
        return _DEFAULT

    # --- what was received

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def requests_for(self, path_prefix: str) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._requests if r.path.startswith(path_prefix)]

    def wait_for_requests_blocking(
        self, count: int, path_prefix: str = "", timeout: float = 10.0
    ) -> list[RecordedRequest]:
        """Block until `count` matching requests arrived; for synchronous tests only."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [r for r in self._requests if r.path.startswith(path_prefix)]
                remaining = deadline - time.monotonic()
                if len(found) >= count or remaining <= 0:
                    break
                self._lock.wait(remaining)
        if len(found) < count:
            raise TimeoutError(f"{len(found)} of {count} requests to {path_prefix!r} arrived")
        return found

    async def wait_for_requests(
        self, count: int, path_prefix: str = "", timeout: float = 10.0
    ) -> list[RecordedRequest]:
        """Await `count` matching requests without blocking the event loop (where a Temporal
        worker under test may be running)."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.requests_for(path_prefix)
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(found)} of {count} requests to {path_prefix!r} arrived")
            await asyncio.sleep(0.02)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)
            self._lock.notify_all()

    # --- the HTTP side

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0 closes each connection after its answer, so stop() really takes the
            # "CRM" offline: no pooled keep-alive connection survives to be answered later.
            protocol_version = "HTTP/1.0"

            def _serve(self) -> None:
                received_at = time.time()
                body = self._read_body()
                fake._record(
                    RecordedRequest(
                        method=self.command,
                        path=self.path,
                        headers={k.lower(): v for k, v in self.headers.items()},
                        body=body,
                        received_at=received_at,
                    )
                )
                rule = fake._next_rule(self.path)
                if rule.delay and fake._stopping.wait(rule.delay):
                    return  # the server is stopping: drop the connection, like a crashed CRM
                try:
                    self.send_response(rule.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(rule.body)))
                    for name, value in rule.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(rule.body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timed out) before the delayed answer

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    return self._read_chunked()
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _read_chunked(self) -> bytes:
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()  # the blank line after the last chunk
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are recorded, not printed

        return Handler
