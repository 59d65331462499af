"""`paysaga run`: the whole system on one machine, what `make run` starts.

Order matters both ways: the stack (PostgreSQL, Kafka, Temporal: only the parts not configured
as external services) first, then the worker and the API; on Ctrl-C / SIGTERM the worker stops
first (it finishes in-flight activities while the API and the stack still answer), then the API,
then the stack. Everything lives under one home directory, so a restart keeps Temporal history
(SQLite) and the ledger (pgdata).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import make_url

from api.auth import generate_api_key
from cli.client import DEFAULT_API_URL
from infra.codec import DEV_ENCRYPTION_KEY_FILE, load_or_create_dev_key
from infra.embedded.process import ManagedProcess, require_free_port
from infra.embedded.stack import Stack
from infra.errors import StackError
from settings import Settings

READY_TIMEOUT_SECONDS = 60.0
# The worker drains in-flight activities for up to 10 s (worker.py); give it room before SIGKILL.
WORKER_STOP_SECONDS = 20.0
DEV_KEY_FILE = "dev-api-key"
EXIT_CANNOT_START = 2  # a port is taken or the settings are invalid: nothing was started
SHUTDOWN_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def say(message: str) -> None:
    """Progress while stopping: after SIGHUP the terminal may be gone, and a failed write must
    not keep the rest of the stack running."""
    with suppress(OSError):
        out.print(message)


class ShutdownRequested(BaseException):
    """Ctrl-C or SIGTERM: a BaseException, so no `except Exception` on the way swallows it."""


@contextmanager
def shutdown_on_signals() -> Iterator[None]:
    """Ctrl-C, SIGTERM and a closed terminal (SIGHUP) all mean "stop everything in order".
    Children run in their own sessions (ManagedProcess), so a terminal's Ctrl-C reaches only us
    and we decide the order."""

    def request_shutdown(signum: int, _frame: FrameType | None) -> None:
        # Once: an impatient second Ctrl-C must not interrupt the orderly stop it asked for.
        for sig in SHUTDOWN_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise ShutdownRequested(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, request_shutdown) for sig in SHUTDOWN_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def signals_ignored() -> Iterator[None]:
    """While stopping: a second Ctrl-C must not leave half the stack running. Every stop is
    bounded (SIGKILL after a timeout), so this cannot hang forever."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SHUTDOWN_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ensure_dev_api_key(home: Path) -> Path:
    """The development API key, made once and kept (mode 0600) so a restart keeps working
    with the same key. Only its hash reaches the API (Settings.all_api_keys)."""
    path = home / DEV_KEY_FILE
    home.mkdir(parents=True, exist_ok=True)
    with suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as key_file:
            key_file.write(generate_api_key() + "\n")
    return path


def read_dev_api_key(home: Path) -> str | None:
    path = home / DEV_KEY_FILE
    return path.read_text().strip() if path.exists() else None


def check_ports(settings: Settings, stack: Stack) -> None:
    require_free_port(settings.api_port, "the API", "PAYSAGA_API_PORT")
    if settings.api_metrics_port:
        require_free_port(
            settings.api_metrics_port, "the API's metrics", "PAYSAGA_API_METRICS_PORT"
        )
    stack.check_ports()


@dataclass
class Services:
    """The API and the worker: our own code, run as child processes of `paysaga run`."""

    workers: list[ManagedProcess]
    api: ManagedProcess

    def in_stop_order(self) -> list[ManagedProcess]:
        return [*self.workers, self.api]

    def ensure_alive(self) -> None:
        for process in self.in_stop_order():
            try:
                process.alive_or_raise()
            except StackError as exc:
                raise StackError(f"{exc}\n(whole log: {process.log_path})") from None


def service_env(stack: Stack, key_file: Path) -> dict[str, str]:
    """Our environment (other PAYSAGA_* settings pass through) with every service's address,
    and payload encryption on: a development key under the home unless keys are configured."""
    env = {**os.environ, **stack.service_env(), "PAYSAGA_API_KEY_FILE": str(key_file)}
    if not stack.settings.encryption_keys:
        key = load_or_create_dev_key(stack.home / DEV_ENCRYPTION_KEY_FILE)
        env["PAYSAGA_ENCRYPTION_KEYS"] = json.dumps(
            [{"key_id": key.key_id, "key_b64": key.key_b64.get_secret_value()}]
        )
    if stack.temporal_ui_url and stack.settings.api_host in ("127.0.0.1", "localhost"):
        # The dev UI cannot send an API key; trust it by origin on loopback (docs/security.md).
        ui_port = stack.settings.temporal_ui_port
        env["PAYSAGA_CODEC_CORS_ORIGINS"] = f"http://127.0.0.1:{ui_port},http://localhost:{ui_port}"
        env["PAYSAGA_CODEC_TRUST_LOCAL_UI"] = "true"
    return env


def start_services(settings: Settings, home: Path, env: dict[str, str]) -> Services:
    logs = home / "logs"
    # `-m`: both are installed modules, so this works from any directory. Workers scale out:
    # one Python process is bound to one core, so the default runs two.
    workers = [
        ManagedProcess(
            "worker" if n == 1 else f"worker {n}",
            [sys.executable, "-m", "worker"],
            logs / ("worker.log" if n == 1 else f"worker-{n}.log"),
            env=_worker_env(env, n),
            cwd=home,
        )
        for n in range(1, max(1, settings.worker_processes) + 1)
    ]
    api = ManagedProcess(
        "API",
        [
            sys.executable, "-m", "uvicorn", "--factory", "api.app:app_from_environment",
            "--host", settings.api_host, "--port", str(settings.api_port),
            "--no-access-log",
        ],
        logs / "api.log",
        env=env,
        cwd=home,
    )  # fmt: skip
    services = Services(workers=workers, api=api)
    for process in services.in_stop_order():
        mark_start(process.log_path)
        process.start()
    return services


def _worker_env(env: dict[str, str], n: int) -> dict[str, str]:
    """Each extra worker serves its metrics on the next ports up, and leaves the outbox relay
    and the webhook dispatcher to the first one (several would only publish twice)."""
    if n == 1:
        return env
    bumped = {**env, "PAYSAGA_RELAY_ENABLED": "false"}
    for name, default in (
        ("PAYSAGA_WORKER_METRICS_PORT", 9464),
        ("PAYSAGA_TEMPORAL_METRICS_PORT", 9465),
    ):
        port = int(env.get(name, default))
        if port:
            bumped[name] = str(port + 2 * (n - 1))
    return bumped


def mark_start(log_path: Path) -> None:
    """Logs are appended across runs: a marker shows where this run's lines begin."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"--- paysaga run started {time.strftime('%Y-%m-%d %H:%M:%S %z')} ---\n")


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def api_url(settings: Settings) -> str:
    return f"http://{_reachable(settings.api_host)}:{settings.api_port}"


def api_metrics_url(settings: Settings) -> str | None:
    """The API's Prometheus endpoint: its own port, never the public API's."""
    if not settings.api_metrics_port:
        return None
    return f"http://{_reachable(settings.metrics_host)}:{settings.api_metrics_port}/metrics"


def wait_until_ready(url: str, services: Services, timeout: float) -> None:
    """Until `/readyz` says Temporal, Kafka and the database all answer the API."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=5.0) as http:
        while time.monotonic() < deadline:
            services.ensure_alive()
            try:
                answer = http.get(f"{url}/readyz")
                if answer.status_code == 200:
                    return
                last = f"{answer.status_code} {answer.text[:300]}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            time.sleep(0.3)
    raise StackError(
        f"the API at {url} was not ready within {timeout:.0f}s (last /readyz: {last}); "
        f"see {services.api.log_path} and {services.workers[0].log_path}"
    )


def stack_processes(stack: Stack) -> list[ManagedProcess]:
    parts = (
        stack.postgres,
        stack.broker,
        stack.temporal,
        stack.crm_sandbox,
        stack.acquirer_sandbox,
    )
    return [p.process for p in parts if p is not None and p.process is not None]


def watch(services: Services, stack: Stack) -> None:
    """Block until a signal arrives (ShutdownRequested) or a child dies (StackError)."""
    while True:
        services.ensure_alive()
        for process in stack_processes(stack):
            process.alive_or_raise()
        time.sleep(0.5)


def readiness_panel(settings: Settings, stack: Stack, url: str, key: str) -> Panel:
    home = stack.home
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("API", url)
    if settings.api_docs_enabled:
        grid.add_row("API docs", f"{url}/docs")
    metrics = api_metrics_url(settings)
    if metrics is not None:
        grid.add_row("API metrics", metrics)
    ui = stack.temporal_ui_url
    if ui is not None:
        grid.add_row("Temporal UI", f"{ui}/namespaces/{settings.temporal_namespace}/workflows")
    grid.add_row("Temporal", _where(stack.temporal is not None, stack.temporal_address))
    grid.add_row("Kafka", _where(stack.broker is not None, stack.kafka_bootstrap_servers))
    grid.add_row("PostgreSQL", _where(stack.postgres is not None, _without_password(stack)))
    if stack.crm_sandbox_url is not None:
        grid.add_row("CRM sandbox", f"{stack.crm_sandbox_url}  (or: paysaga crm tail --follow)")
    if stack.acquirer_sandbox_url is not None:
        grid.add_row(
            "sandbox acquirer",
            f"{stack.acquirer_sandbox_url}  (test payment methods: docs/acquirer.md)",
        )
    grid.add_row("dev API key", Text(key, style="bold yellow"))
    grid.add_row("data", str(home))
    grid.add_row("logs", str(home / "logs"))
    return Panel(grid, title="paysaga is running", title_align="left", border_style="green")


def _where(embedded: bool, address: str) -> str:
    return address if embedded else f"{address} (external)"


def _without_password(stack: Stack) -> str:
    if stack.postgres is not None:
        return f"127.0.0.1:{stack.postgres.port}"
    return make_url(stack.database_url).render_as_string(hide_password=True)


def curl_example(url: str, key: str) -> str:
    # A fresh Idempotency-Key per paste: pasting twice makes two payments, as a user expects.
    return (
        f"curl -sS '{url}/v1/payments?wait=10' \\\n"
        f"  -H 'Authorization: Bearer {key}' \\\n"
        '  -H "Idempotency-Key: order-$(date +%s%N)" \\\n'
        "  -H 'Content-Type: application/json' \\\n"
        """  -d '{"amount": 2500, "currency": "USD", "customer_id": "cus_alice",\n"""
        """       "merchant_id": "mer_acme", "payment_method": "pm_card_visa_0001"}'"""
    )


def cli_example(url: str, home: Path) -> str:
    """`paysaga pay` as the user would type it: options only where its defaults differ."""
    command = "paysaga pay 2500 USD --customer cus_alice --merchant mer_acme"
    if url != DEFAULT_API_URL:
        command += f" --api-url {url}"
    if home != Path(os.environ.get("PAYSAGA_HOME", ".paysaga")).expanduser().resolve():
        command += f" --home {home}"
    return command


def print_ready(settings: Settings, stack: Stack, url: str, key: str) -> None:
    out.print(readiness_panel(settings, stack, url, key))
    out.print(
        Group(
            Text("Make a payment:", style="bold"),
            Text(curl_example(url, key)),
            Text(""),
            Text(f"or: {cli_example(url, stack.home)}"),
        ),
        soft_wrap=True,  # never break the copy-paste lines
    )
    out.print("[bold]Press Ctrl-C to stop everything.[/]")


def stop_everything(services: Services | None, stack: Stack) -> None:
    with signals_ignored():
        if services is not None:
            for process in services.in_stop_order():
                if process.running:
                    timeout = WORKER_STOP_SECONDS if process in services.workers else 10.0
                    process.stop(timeout=timeout)
                    say(f"stopped {process.name}")
        started = [
            name
            for name, part in (
                ("Temporal", stack.temporal),
                ("Kafka", stack.broker),
                ("PostgreSQL", stack.postgres),
                ("CRM sandbox", stack.crm_sandbox),
                ("sandbox acquirer", stack.acquirer_sandbox),
            )
            if part is not None and part.process is not None and part.process.running
        ]
        stack.stop()
        if started:
            say(f"stopped {', '.join(started)}; data kept in {stack.home}")


def run_system(settings: Settings, temporal_ui: bool = True) -> int:
    """Start, serve until told to stop, stop. Returns the process exit status."""
    home = settings.home.expanduser().resolve()
    settings = settings.model_copy(update={"home": home})
    stack = Stack(
        settings,
        home,
        temporal_ui=temporal_ui,
        codec_endpoint=f"http://{settings.api_host}:{settings.api_port}/codec",
        sandboxes=True,
    )
    try:
        check_ports(settings, stack)
    except StackError as exc:
        err.print(f"[bold red]paysaga run cannot start:[/] {exc}", soft_wrap=True)
        return EXIT_CANNOT_START
    services: Services | None = None
    status = 0
    with shutdown_on_signals():
        try:
            with out.status("starting the stack (PostgreSQL, Kafka, Temporal, sandboxes)…"):
                stack.start()
            key_file = ensure_dev_api_key(home)
            services = start_services(settings, home, service_env(stack, key_file))
            url = api_url(settings)
            with out.status(f"starting the worker and the API on {url}…"):
                wait_until_ready(url, services, READY_TIMEOUT_SECONDS)
            print_ready(settings, stack, url, read_dev_api_key(home) or "")
            watch(services, stack)
        except ShutdownRequested as why:
            say(f"\n{why}: stopping…")
        except StackError as exc:
            err.print(f"[bold red]paysaga run failed:[/] {exc}", soft_wrap=True)
            status = 1
        finally:
            stop_everything(services, stack)
    return status
