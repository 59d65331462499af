"""Kafka topic administration: create the topics paysaga needs, and ask whether a broker answers.

`ensure_topics` is idempotent and leaves existing topics alone, so it runs on every deploy
(`python -m infra.provision topics`) and after every restart of the embedded broker.
"""

from __future__ import annotations

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from domain.events import ALL_TOPICS
from infra.errors import StackError

DEFAULT_PARTITIONS = 6


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
