"""Two checkouts measured at once: each one's whole `paysaga run` stack, side by side on one
machine, under the same open-loop load in the same seconds; prints the CPU each process of
each stack spent per payment.

    .venv/bin/python -m bench.side_by_side --baseline ../paysaga-684a9b2 --rounds 3

Why: the shared machine's speed drifts by a fifth or more within minutes, so two stacks
measured one after the other differ by the hour as much as by their code (README Performance).
Run at once, both meet the same drift, and the ratio of their CPU per payment is what the code
costs. The baseline runs on the default ports; this checkout on ports shifted by 100 (API
8100, Temporal 7333, Kafka 9192, PostgreSQL 55532, CRM sandbox 8170, metrics 95xx). Both run
without the acquirer (the baseline may predate it). Each checkout needs its own installed
`.venv` (`make .venv/.paysaga-installed` there); the bench client of each side is its own.

CPU is utime + stime from /proc of every process descending from each side's `paysaga run`,
grouped by what the process is. The bench clients are not counted. `tansu` is shown apart in
the totals: a bench that times payments by Kafka polls the broker on a fixed period (older
checkouts do, every 10 ms), a cost of the client, not of the payment, that grows per payment
as the rate falls.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from cli.client import default_api_key

# This checkout's ports, shifted away from the baseline's defaults.
SHIFTED_PORTS = {
    "PAYSAGA_API_PORT": 8100,
    "PAYSAGA_TEMPORAL_PORT": 7333,
    "PAYSAGA_TEMPORAL_UI_PORT": 8333,
    "PAYSAGA_KAFKA_PORT": 9192,
    "PAYSAGA_POSTGRES_PORT": 55532,
    "PAYSAGA_API_METRICS_PORT": 9563,
    "PAYSAGA_WORKER_METRICS_PORT": 9574,
    "PAYSAGA_TEMPORAL_METRICS_PORT": 9575,
    "PAYSAGA_CRM_SANDBOX_PORT": 8170,
    "PAYSAGA_ACQUIRER_SANDBOX_PORT": 8120,
}
# Where this checkout's bench finds those services.
SHIFTED_BENCH_ARGS = [
    f"--api-url=http://127.0.0.1:{SHIFTED_PORTS['PAYSAGA_API_PORT']}",
    f"--kafka=127.0.0.1:{SHIFTED_PORTS['PAYSAGA_KAFKA_PORT']}",
    f"--temporal=127.0.0.1:{SHIFTED_PORTS['PAYSAGA_TEMPORAL_PORT']}",
    f"--crm-sandbox-url=http://127.0.0.1:{SHIFTED_PORTS['PAYSAGA_CRM_SANDBOX_PORT']}",
]
_READY = "Press Ctrl-C"
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def process_kind(cmdline: str) -> str:
    """What a process of the stack is, from its command line."""
    if "temporal" in cmdline and "server" in cmdline:
        return "temporal"
    for kind, marker in (
        ("postgres", "postgres"),
        ("tansu", "tansu"),
        ("api", "uvicorn"),
        ("workers", "-m worker"),
        ("crm", "sandboxes.crm"),
        ("acquirer", "sandboxes.acquirer"),
    ):
        if marker in cmdline:
            return kind
    return "other"


def cpu_ticks_by_kind(root: int, proc: Path = Path("/proc")) -> dict[str, int]:
    """utime + stime (clock ticks) of `root` and every process below it, summed by kind."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    cmdlines: dict[int, str] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        ticks[pid] = int(fields[11]) + int(fields[12])
        cmdlines[pid] = cmdline
    totals: dict[str, int] = {}
    for pid, spent in ticks.items():
        ancestor = pid
        while ancestor > 1 and ancestor != root:
            ancestor = parents.get(ancestor, 0)
        if ancestor != root or pid == root:
            continue
        kind = process_kind(cmdlines[pid])
        totals[kind] = totals.get(kind, 0) + spent
    return totals


def ms_per_payment(
    before: dict[str, int], after: dict[str, int], payments: int
) -> dict[str, float]:
    return {
        kind: (after[kind] - before.get(kind, 0)) * 1000 / TICKS_PER_SECOND / payments
        for kind in sorted(after)
    }


@dataclass
class Side:
    name: str
    tree: Path
    env: dict[str, str]
    bench_args: list[str]
    home: Path
    process: subprocess.Popen[bytes] | None = None
    api_key: str = ""
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.home / "run.out"

    def paysaga(self) -> str:
        return str(self.tree / ".venv" / "bin" / "paysaga")

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [self.paysaga(), "run", "--no-ui"],
                cwd=self.tree,
                env={**self.env, "PAYSAGA_HOME": str(self.home)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if _READY in text:
                self.api_key = default_api_key(self.home)  # the key `paysaga run` wrote
                return
            if self.process is not None and self.process.poll() is not None:
                raise SystemExit(f"{self.name}: paysaga run exited; see {self.log}")
            time.sleep(1)
        raise SystemExit(f"{self.name}: not ready after {timeout:.0f} s; see {self.log}")

    def bench(self, *load: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [self.paysaga(), "bench", *load, "--no-floor", "--json", *self.bench_args],
            cwd=self.tree,
            env={**self.env, "PAYSAGA_API_KEY": self.api_key},
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def cpu(self) -> dict[str, int]:
        assert self.process is not None
        return cpu_ticks_by_kind(self.process.pid)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def succeeded(run: subprocess.Popen[bytes], side: str) -> int:
    out, _ = run.communicate()
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        raise SystemExit(f"{side}: the bench printed no report") from None
    count = int(report["succeeded"])
    if count == 0:
        raise SystemExit(f"{side}: no payment completed")
    return count


def measure_round(sides: list[Side], rate: float, seconds: float) -> list[dict[str, float]]:
    before = [s.cpu() for s in sides]
    runs = [s.bench("--rate", str(rate), "--duration", str(seconds)) for s in sides]
    done = [succeeded(run, s.name) for run, s in zip(runs, sides, strict=True)]
    time.sleep(2)  # the last payments' tails (the CRM step, the acknowledgements)
    after = [s.cpu() for s in sides]
    return [ms_per_payment(b, a, n) for b, a, n in zip(before, after, done, strict=True)]


def total(per_kind: dict[str, float], *, without: tuple[str, ...] = ()) -> float:
    return sum(v for k, v in per_kind.items() if k not in without)


def report(round_no: int, sides: list[Side], figures: list[dict[str, float]]) -> None:
    kinds = sorted({k for f in figures for k in f})
    print(f"round {round_no}: CPU ms per payment")
    heading = "".join(f"{k:>10}" for k in kinds)
    print(f"  {'':10}{heading}{'stack':>10}{'w/o tansu':>11}")
    for side, f in zip(sides, figures, strict=True):
        cells = "".join(f"{f.get(k, 0.0):10.2f}" for k in kinds)
        print(f"  {side.name:10}{cells}{total(f):10.1f}{total(f, without=('tansu',)):11.1f}")
    base, this = figures
    print(
        f"  ratio this/baseline: {total(this) / total(base):.3f} "
        f"(without tansu {total(this, without=('tansu',)) / total(base, without=('tansu',)):.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other checkout")
    parser.add_argument("--rate", type=float, default=10.0, help="payments/s on each side")
    parser.add_argument("--seconds", type=float, default=40.0, help="of load per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=100, help="payments before measuring")
    args = parser.parse_args(argv)
    this_tree = Path(__file__).resolve().parent.parent
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    base_env["PAYSAGA_ACQUIRER_SANDBOX"] = "false"
    work = Path(tempfile.mkdtemp(prefix="paysaga-side-by-side-"))
    sides = [
        Side("baseline", args.baseline.resolve(), dict(base_env), [], work / "baseline"),
        Side(
            "this",
            this_tree,
            {**base_env, **{name: str(port) for name, port in SHIFTED_PORTS.items()}},
            SHIFTED_BENCH_ARGS,
            work / "this",
        ),
    ]
    try:
        for side in sides:
            side.start()
        for side in sides:
            side.wait_ready()
        warmups = [s.bench("--payments", str(args.warmup), "--concurrency", "20") for s in sides]
        for run, side in zip(warmups, sides, strict=True):
            succeeded(run, side.name)
        for n in range(1, args.rounds + 1):
            report(n, sides, measure_round(sides, args.rate, args.seconds))
            sys.stdout.flush()
    finally:
        for side in sides:
            side.stop()
    print(f"logs and data: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
