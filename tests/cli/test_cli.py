"""`paysaga run` as a user runs it: a real process tree on free ports, driven by the real CLI.

One home directory is used twice: the second `paysaga run` must find the first one's payment
in Temporal's history (SQLite) and in the ledger (pgdata). The second run also loses its worker
to SIGKILL and must stop everything and exit 1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from infra.embedded.process import free_port, port_is_free
from infra.embedded.temporal import temporal_binary

PAYSAGA = str(Path(sys.executable).parent / "paysaga")
READY_LINE = "Press Ctrl-C to stop everything."
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
PAYMENT_ID = re.compile(r"pay_[0-9a-f]{24}")


@dataclass(frozen=True)
class Ports:
    api: int
    temporal: int
    ui: int
    kafka: int
    postgres: int
    worker_metrics: int
    temporal_metrics: int
    crm_sandbox: int
    api_metrics: int
    acquirer_sandbox: int

    @classmethod
    def free(cls) -> Ports:
        return cls(*(free_port() for _ in range(10)))

    def env(self) -> dict[str, str]:
        return {
            "PAYSAGA_API_PORT": str(self.api),
            "PAYSAGA_TEMPORAL_PORT": str(self.temporal),
            "PAYSAGA_TEMPORAL_UI_PORT": str(self.ui),
            "PAYSAGA_KAFKA_PORT": str(self.kafka),
            "PAYSAGA_POSTGRES_PORT": str(self.postgres),
            "PAYSAGA_WORKER_METRICS_PORT": str(self.worker_metrics),
            "PAYSAGA_TEMPORAL_METRICS_PORT": str(self.temporal_metrics),
            "PAYSAGA_CRM_SANDBOX_PORT": str(self.crm_sandbox),
            "PAYSAGA_API_METRICS_PORT": str(self.api_metrics),
            "PAYSAGA_ACQUIRER_SANDBOX_PORT": str(self.acquirer_sandbox),
        }

    def of_the_stack(self) -> list[int]:
        return [
            self.api, self.temporal, self.ui, self.kafka, self.postgres, self.crm_sandbox,
            self.api_metrics, self.acquirer_sandbox,
        ]  # fmt: skip


def paysaga_env(home: Path, ports: Ports) -> dict[str, str]:
    # A developer's PAYSAGA_* (external services, keys, a running `make run`) must not leak in.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    return {**env, **ports.env(), "PAYSAGA_HOME": str(home)}


@dataclass
class PaysagaRun:
    """A `paysaga run` child with its stdout and stderr in files."""

    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    @property
    def output(self) -> str:
        return self.stdout.read_text(errors="replace")

    @property
    def errors(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while READY_LINE not in self.output:
            if self.popen.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"paysaga run never got ready:\n{self.output}\n{self.errors}")
            time.sleep(0.2)

    def descendants(self) -> list[psutil.Process]:
        found: list[psutil.Process] = psutil.Process(self.popen.pid).children(recursive=True)
        return found

    def wait_exit(self) -> int:
        try:
            return self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"paysaga run did not stop within {STOP_TIMEOUT}s:\n{self.output}")


@pytest.fixture
def start_paysaga(tmp_path: Path) -> Iterator[object]:
    runs: list[PaysagaRun] = []

    def start(home: Path, ports: Ports) -> PaysagaRun:
        n = len(runs)
        stdout, stderr = tmp_path / f"run{n}.out", tmp_path / f"run{n}.err"
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            popen = subprocess.Popen(
                [PAYSAGA, "run"], stdout=out, stderr=err, env=paysaga_env(home, ports), cwd=tmp_path
            )
        runs.append(PaysagaRun(popen, stdout, stderr))
        return runs[-1]

    yield start
    for run in runs:  # a failed assertion must not leave a stack behind
        if run.popen.poll() is None:
            children = run.descendants()
            run.popen.send_signal(signal.SIGINT)
            try:
                run.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                for child in [*children, psutil.Process(run.popen.pid)]:
                    child.kill()


def paysaga_cli(home: Path, ports: Ports, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PAYSAGA, *args], env=paysaga_env(home, ports), capture_output=True, text=True, timeout=120
    )


def ledger_postings(ports: Ports, payment_id: str) -> list[tuple[str, str, int]]:
    """(kind, currency, sum of entries) per ledger transaction of the payment."""
    dsn = f"host=127.0.0.1 port={ports.postgres} user=postgres dbname=paysaga connect_timeout=5"
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT t.kind, e.currency, sum(e.amount) FROM ledger_transactions t "
            "JOIN ledger_entries e ON e.transaction_id = t.id WHERE t.payment_id = %s "
            "GROUP BY t.id, t.kind, e.currency ORDER BY t.id",
            (payment_id,),
        ).fetchall()
    return [(kind, currency, int(total)) for kind, currency, total in rows]


def temporal_describe(ports: Ports, workflow_id: str) -> dict[str, object]:
    """Asked of the Temporal server itself (its CLI), not through the API: the API falls back
    to the ledger's record when history is gone, which would hide a lost history."""
    done = subprocess.run(
        [temporal_binary(), "workflow", "describe", "--workflow-id", workflow_id,
         "--address", f"127.0.0.1:{ports.temporal}", "--output", "json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    described: dict[str, object] = json.loads(done.stdout)
    return described


def get_payment(ports: Ports, key: str, payment_id: str) -> dict[str, object]:
    answer = httpx.get(
        f"http://127.0.0.1:{ports.api}/v1/payments/{payment_id}",
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    payment: dict[str, object] = answer.json()
    return payment


def assert_all_gone(processes: list[psutil.Process], ports: Ports) -> None:
    _, alive = psutil.wait_procs(processes, timeout=5)
    assert alive == [], f"still running: {[p.cmdline() for p in alive]}"
    taken = [p for p in ports.of_the_stack() if not port_is_free(p)]
    assert taken == [], f"ports still in use: {taken}"


def test_run_serves_payments_stops_cleanly_and_keeps_data_across_restarts(
    tmp_path: Path, start_paysaga
) -> None:
    home, ports = tmp_path / "home", Ports.free()

    # ── first run: a fresh home ──────────────────────────────────────────────────────────
    first = start_paysaga(home, ports)
    first.wait_ready()
    key_file = home / "dev-api-key"
    key = key_file.read_text().strip()
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key in first.output  # the panel shows the dev key…
    assert f"http://127.0.0.1:{ports.ui}" in first.output  # …and the Temporal UI
    assert f"http://127.0.0.1:{ports.api}/docs" in first.output
    assert f"http://127.0.0.1:{ports.crm_sandbox}" in first.output  # no CRM configured: the sandbox
    assert f"http://127.0.0.1:{ports.acquirer_sandbox}" in first.output  # …and no acquirer
    # The API's metrics: on their own port, printed with the other URLs, not on the API's.
    metrics_url = f"http://127.0.0.1:{ports.api_metrics}/metrics"
    assert metrics_url in first.output
    assert "paysaga_http_requests_total" in httpx.get(metrics_url, timeout=10).text
    assert httpx.get(f"http://127.0.0.1:{ports.api}/metrics", timeout=10).status_code == 404

    # The CLI finds the API (PAYSAGA_API_PORT) and the dev key (PAYSAGA_HOME) by itself.
    paid = paysaga_cli(
        home, ports, "pay", "4200", "EUR", "--customer", "cus_cli", "--merchant", "mer_cli",
        "--wait", "15",
    )  # fmt: skip
    assert paid.returncode == 0, paid.stdout + paid.stderr
    assert "succeeded" in paid.stdout
    found = PAYMENT_ID.search(paid.stdout)
    assert found is not None, paid.stdout
    payment_id = found.group()

    payment = get_payment(ports, key, payment_id)
    assert (payment["status"], payment["amount"], payment["currency"]) == ("succeeded", 4200, "EUR")
    assert payment["amount_captured"] == 4200
    # All five steps on the default stack: the CRM sandbox verified and recorded the payment.
    assert payment["crm_sync"] == "synced"
    tail = paysaga_cli(home, ports, "crm", "tail")
    assert tail.returncode == 0, tail.stderr
    [told] = [line for line in tail.stdout.splitlines() if payment_id in line]
    assert " ok " in told and "confirmed" in told and "4200 EUR" in told
    # The dev key names its scopes: it can refund, as the README's examples do.
    refunded = paysaga_cli(home, ports, "refund", payment_id, "--amount", "200")
    assert refunded.returncode == 0, refunded.stdout + refunded.stderr
    # Through the sandbox acquirer: its hold and the hold's release at capture (issue 15).
    postings = [
        ("authorization_hold", "EUR", 0),
        ("hold_captured", "EUR", 0),
        ("payment", "EUR", 0),
        ("refund", "EUR", 0),
    ]
    assert sorted(ledger_postings(ports, payment_id)) == postings
    assert httpx.get(f"http://127.0.0.1:{ports.ui}/", timeout=10).status_code == 200

    children = first.descendants()
    assert len(children) >= 5  # Temporal, broker, PostgreSQL, API, worker (+ their children)
    first.popen.send_signal(signal.SIGINT)
    assert first.wait_exit() == 0, first.errors
    stopped = first.output[first.output.index("stopping") :]
    assert stopped.index("stopped worker") < stopped.index("stopped API")
    assert "stopped Temporal, Kafka, PostgreSQL" in stopped
    assert_all_gone(children, ports)

    # ── second run, same home: history and ledger are still there ─────────────────────────
    second = start_paysaga(home, ports)
    second.wait_ready()
    assert key_file.read_text().strip() == key  # the same dev key keeps working

    described = temporal_describe(ports, payment_id)
    execution = described["workflowExecutionInfo"]
    assert isinstance(execution, dict)
    assert execution["status"] == "WORKFLOW_EXECUTION_STATUS_RUNNING"  # the dispute window
    assert int(execution["historyLength"]) > 10
    assert sorted(ledger_postings(ports, payment_id)) == postings
    status = paysaga_cli(home, ports, "status", payment_id)
    assert status.returncode == 0, status.stderr
    assert payment_id in status.stdout and "partially_refunded" in status.stdout
    assert get_payment(ports, key, payment_id)["amount_captured"] == 4200
    # The broker restarted empty; the worker's outbox relay put every stored event back.
    checked = paysaga_cli(home, ports, "check", "--settle-seconds", "60")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "all promises hold" in checked.stdout

    # ── a child dies: everything stops, exit 1, with the dead one's log ───────────────────
    children = second.descendants()
    worker = next(p for p in children if p.cmdline()[1:3] == ["-m", "worker"])
    worker.send_signal(signal.SIGKILL)
    assert second.wait_exit() == 1
    assert re.search(r"worker( \d+)? exited with -9", second.errors)
    assert "stopped API" in second.output
    assert_all_gone(children, ports)


@pytest.mark.parametrize(
    "env_var", ["PAYSAGA_API_PORT", "PAYSAGA_KAFKA_PORT", "PAYSAGA_ACQUIRER_SANDBOX_PORT"]
)
def test_a_taken_port_is_named_with_its_setting_and_nothing_starts(
    tmp_path: Path, env_var: str
) -> None:
    home = tmp_path / "home"
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        env = {**paysaga_env(home, Ports.free()), env_var: str(taken)}
        done = subprocess.run([PAYSAGA, "run"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(taken) in done.stderr and env_var in done.stderr
    assert "Traceback" not in done.stderr
    assert not (home / "postgres").exists()  # refused before starting anything


def test_client_commands_take_the_api_from_one_set_of_options_before_the_command(
    tmp_path: Path,
) -> None:
    """README, The `paysaga` command: --api-url / --api-key / --home before the command, or
    their PAYSAGA_* variables; every client command reads them from the one callback."""
    nothing_there = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    by_env = {**env, "PAYSAGA_API_URL": nothing_there, "PAYSAGA_API_KEY": "psk_x"}
    for args in (["status", "pay_x"], ["cancel", "pay_x"], ["refund", "pay_x", "--amount", "1"]):
        for argv, environment in (
            ([PAYSAGA, "--api-url", nothing_there, "--api-key", "psk_x", *args], env),
            ([PAYSAGA, *args], by_env),
        ):
            answer = subprocess.run(
                argv, env=environment, capture_output=True, text=True, timeout=60
            )
            assert answer.returncode == 1, answer.stderr
            assert f"cannot reach the API at {nothing_there}" in answer.stderr
        # No key given and none under --home: refused before any request.
        no_key = subprocess.run(
            [PAYSAGA, "--api-url", nothing_there, "--home", str(tmp_path), *args],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert no_key.returncode == 2, no_key.stderr
        assert "no API key" in no_key.stderr
