"""temporalio can abort during interpreter shutdown after all work succeeded (sdk-python#300).
A green run must exit 0 every time and a red one non-zero: run a real Temporal round trip in a
child pytest many times and look at the exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers.paths import REPO

RUNS = int(os.environ.get("PAYSAGA_EXIT_PROBE_RUNS", "8"))


def _run_probe(fail: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    env["PAYSAGA_PROBE_FAIL"] = "1" if fail else "0"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "tests/system/exit_probe.py", "-q",
         "-p", "no:cacheprovider", "-o", "python_files=exit_probe.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
def test_green_runs_exit_zero_every_time() -> None:
    codes = [_run_probe(fail=False).returncode for _ in range(RUNS)]
    assert codes == [0] * RUNS


def test_a_red_run_exits_non_zero() -> None:
    done = _run_probe(fail=True)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "this run is meant to fail" in done.stdout
