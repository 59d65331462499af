"""The side-by-side comparison's accounting: which processes count for which stack, and what
each spent per payment (bench/side_by_side.py). A fake /proc: the real one's processes change
under the test."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.side_by_side import TICKS_PER_SECOND, cpu_ticks_by_kind, ms_per_payment, process_kind


def _proc(root: Path, pid: int, ppid: int, utime: int, stime: int, cmdline: str) -> None:
    entry = root / str(pid)
    entry.mkdir()
    # A command name may hold spaces and parentheses: fields count from the last ')'.
    (entry / "stat").write_text(
        f"{pid} (a (b) c) S {ppid} 1 1 0 -1 4194304 10 0 0 0 {utime} {stime} 0 0 20 0 1 0\n"
    )
    (entry / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")


def test_only_the_sides_descendants_count_summed_by_kind(tmp_path: Path) -> None:
    _proc(tmp_path, 10, 1, 500, 500, "/venv/bin/python .venv/bin/paysaga run --no-ui")
    _proc(tmp_path, 11, 10, 30, 10, "/venv/bin/python -m worker")
    _proc(tmp_path, 12, 10, 5, 5, "/venv/bin/python -m worker")
    _proc(tmp_path, 13, 10, 7, 1, "/pg/bin/postgres -D /data -p 55432")
    _proc(tmp_path, 14, 13, 2, 0, "postgres: postgres paysaga 127.0.0.1(4242) idle")
    _proc(tmp_path, 15, 10, 9, 0, "/venv/bin/temporal server start-dev --port 7233")
    _proc(tmp_path, 16, 10, 4, 0, "/venv/bin/python -m uvicorn --factory api.app:x")
    _proc(tmp_path, 17, 10, 3, 0, "/venv/bin/python -m sandboxes.crm --port 8070")
    # The other side's stack and an unrelated process: not this side's.
    _proc(tmp_path, 20, 1, 900, 0, "/venv/bin/python .venv/bin/paysaga run --no-ui")
    _proc(tmp_path, 21, 20, 800, 0, "/venv/bin/python -m worker")
    _proc(tmp_path, 30, 1, 700, 0, "/usr/bin/python -m bench")
    (tmp_path / "self").mkdir()  # not a pid

    assert cpu_ticks_by_kind(10, tmp_path) == {
        "workers": 50,
        "postgres": 10,
        "temporal": 9,
        "api": 4,
        "crm": 3,
    }


@pytest.mark.parametrize(
    ("cmdline", "kind"),
    [
        ("/root/.calfkit/bin/tansu-v0.6.0 broker --listener-url tcp://127.0.0.1:9092", "tansu"),
        ("/venv/bin/python -m sandboxes.acquirer --port 8020", "acquirer"),
        ("/venv/bin/temporal server start-dev --db-filename /home/postgres/t.sqlite", "temporal"),
        ("/venv/bin/python -m intake", "other"),
    ],
)
def test_each_process_is_told_by_its_command_line(cmdline: str, kind: str) -> None:
    assert process_kind(cmdline) == kind


def test_cpu_per_payment_is_the_difference_over_the_payments() -> None:
    before = {"workers": 100, "api": 40}
    after = {"workers": 100 + 4 * TICKS_PER_SECOND, "api": 40 + TICKS_PER_SECOND, "crm": 2}
    per = ms_per_payment(before, after, payments=400)
    assert per["workers"] == pytest.approx(10.0)
    assert per["api"] == pytest.approx(2.5)
    assert per["crm"] == pytest.approx(2 * 1000 / TICKS_PER_SECOND / 400)  # new since before
