"""What `paysaga bench` measures with: percentiles, the result it reports, completion watchers
(the CRM sandbox's inbox, or `payments.confirmed` on Kafka) and the RSS sampler. Completion is
seen the way the outside world sees it, never by asking the system under test."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
import psutil
from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_NOT_AVAILABLE, Consumer, TopicPartition

from domain.events import EventKind


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summarize(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


@dataclass
class PaymentTiming:
    payment_id: str
    sent_at: float
    answered_at: float
    confirmed_at: float | None = None  # payments.confirmed seen on Kafka
    crm_at: float | None = None  # the CRM sandbox received the confirmation

    def completed_at(self, completion: str) -> float | None:
        return self.crm_at if completion == COMPLETION_CRM else self.confirmed_at


@dataclass
class BenchResult:
    payments: int
    concurrency: int | None
    rate: float | None
    succeeded: int
    duration_s: float
    throughput_per_s: float
    post_latency_ms: dict[str, float | None]
    confirm_latency_ms: dict[str, float | None]
    fraud_scoring_ms: dict[str, float | None]
    errors: dict[str, int]
    peak_rss_mb: dict[str, float]
    peak_in_flight: int = 0  # accepted (201) and not yet complete, at the same moment
    # What completes a payment here: "crm" (the CRM sandbox got it) or "confirmed" (Kafka).
    completion: str = "confirmed"
    crm_latency_ms: dict[str, float | None] = field(default_factory=dict)
    shape: list[str] = field(default_factory=list)
    shape_steps: list[str] = field(default_factory=list)  # the activity of each step
    floor_throughput_per_s: float | None = None
    floor_ratio: float | None = None


COMPLETION_CRM = "crm"
COMPLETION_CONFIRMED = "confirmed"
DEFAULT_CRM_SANDBOX_URL = f"http://127.0.0.1:{os.environ.get('PAYSAGA_CRM_SANDBOX_PORT') or 8070}"


class CompletionWatcher:
    """Timestamps payments as a thread sees them complete; closed-loop clients await theirs."""

    def __init__(self) -> None:
        self.confirmed: dict[str, float] = {}
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def _confirm(self, payment_id: str, at: float | None = None) -> None:
        """`at`: when it completed on the monotonic clock (default: now, as the thread sees it)."""
        with self._lock:
            self.confirmed.setdefault(payment_id, time.monotonic() if at is None else at)
            waiter = self._waiters.pop(payment_id, None)
        if waiter is not None:
            loop, future = waiter
            loop.call_soon_threadsafe(_settle, future)

    async def wait_for(self, payment_id: str, timeout: float) -> bool:
        """Closed loop: the caller's next payment waits for this one's completion."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if payment_id in self.confirmed:
                return True
            self._waiters[payment_id] = (loop, future)
        try:
            await asyncio.wait_for(future, timeout)
            return True
        except TimeoutError:
            return False


class ConfirmationWatcher(CompletionWatcher):
    """Reads payments.confirmed from the beginning (no consumer group: tansu's JoinGroup delay and
    wrong high watermarks make groups a poor fit) and timestamps each wanted payment."""

    def __init__(self, bootstrap: str, completes_payments: bool = True) -> None:
        super().__init__()
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"paysaga-bench-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                # When the CRM sandbox completes payments this only times them (by CreateTime),
                # so it need not ask the broker a hundred times a second.
                "fetch.wait.max.ms": 10 if completes_payments else 250,
            }
        )
        topic = EventKind.CONFIRMED.topic
        metadata = self._consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions
        self._consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        self._thread = threading.Thread(target=self._run, name="bench-confirmations", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(num_messages=1000, timeout=0.05):
                key = message.key()
                if message.error() is None and key:
                    # Timed when the worker produced it (the record's CreateTime), as the CRM
                    # sandbox's receipts are: both event times, not when this thread saw them.
                    kind, epoch_ms = message.timestamp()
                    at = _monotonic(epoch_ms / 1000) if kind != TIMESTAMP_NOT_AVAILABLE else None
                    self._confirm(key.decode() if isinstance(key, bytes) else key, at)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._consumer.close()


class CrmSandboxWatcher(CompletionWatcher):
    """Follows the CRM sandbox's notification feed (`/api/notifications?after=`): a payment's
    saga is done when the CRM has verified and recorded its confirmation. The feed is read
    from where it stands when the run starts, so earlier notifications are not counted."""

    def __init__(self, url: str, poll_seconds: float = 0.05) -> None:
        super().__init__()
        # One keep-alive connection of the standard library's: this thread reads the feed
        # twenty times a second, and httpx cost several times its CPU per read.
        parts = urlsplit(url)
        self._http = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, 5.0)
        self._poll = poll_seconds
        self._after = self._end()
        self._thread = threading.Thread(target=self._run, name="bench-crm", daemon=True)
        self._thread.start()

    def _page(self, after: int) -> dict[str, Any]:
        try:
            self._http.request("GET", f"/api/notifications?after={after}&limit=1000")
            response = self._http.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            self._http.close()  # the next request opens a new connection
            raise
        if response.status != 200:
            raise http.client.HTTPException(f"the CRM sandbox's feed answered {response.status}")
        page: dict[str, Any] = json.loads(body)
        return page

    def _end(self) -> int:
        after = 0
        while True:
            page = self._page(after)
            if not page["data"]:
                return after
            after = int(page["next_after"])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                page = self._page(self._after)
            except (OSError, http.client.HTTPException, ValueError):
                self._stop.wait(0.5)
                continue
            for item in page["data"]:
                if item.get("verified") and item.get("event_kind") == EventKind.CONFIRMED.value:
                    self._confirm(str(item["payment_id"]), _monotonic(item.get("received_at")))
            self._after = int(page["next_after"])
            # A pause after every read, not only an empty one: reading again at once made the
            # bench read the feed many times a second under load, one or two payments each
            # time, and the bench and the sandbox spent CPU the measured system needs. A
            # payment's completion is timed by the sandbox's `received_at` (same machine, same
            # clock), so the pause delays only the closed loop's next payment.
            self._stop.wait(self._poll)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._http.close()


def _monotonic(wall_clock: object) -> float | None:
    """A wall-clock time of this machine (ISO 8601, or seconds since the epoch) on the monotonic
    clock; None when unreadable."""
    if isinstance(wall_clock, str):
        try:
            at = datetime.fromisoformat(wall_clock).timestamp()
        except ValueError:
            return None
    elif isinstance(wall_clock, int | float):
        at = float(wall_clock)
    else:
        return None
    return time.monotonic() - (time.time() - at)


def crm_sandbox_answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RssSampler:
    """Peak resident memory of the API (found by its listening port) and the worker processes."""

    def __init__(self, api_port: int | None) -> None:
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._processes = self._find(api_port)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _find(api_port: int | None) -> dict[str, list[psutil.Process]]:
        found: dict[str, list[psutil.Process]] = {"api": [], "worker": []}
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(proc.info.get("cmdline") or [])
            if "api.app:app_from_environment" in cmdline and (
                api_port is None or f"--port {api_port}" in cmdline
            ):
                found["api"].append(proc)
            elif "-m worker" in cmdline or cmdline.endswith("worker.py"):
                found["worker"].append(proc)
        return found

    def _run(self) -> None:
        while not self._stop.is_set():
            for role, processes in self._processes.items():
                try:
                    rss = sum(p.memory_info().rss for p in processes) / 2**20
                except psutil.Error:
                    continue
                if processes:
                    self.peak[role] = max(self.peak.get(role, 0.0), round(rss, 1))
            self._stop.wait(0.5)

    def close(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join(2)
        return self.peak
