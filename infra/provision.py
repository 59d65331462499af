"""One-shot jobs that prepare external services for paysaga (the compose file's init jobs).

    python -m infra.provision database           # migrate the ledger schema to head
    python -m infra.provision topics             # create the Kafka topics that are missing
    python -m infra.provision search-attributes  # register the Temporal search attributes
    python -m infra.provision all

Every job is idempotent: run it on each deploy, before the new api and worker start.
Reads the same PAYSAGA_* settings as the services; exits non-zero with the reason on failure.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

from domain.events import ALL_TOPICS
from infra.database import current_revision, migrate
from infra.logs import configure_logging
from infra.temporal_client import connect_when_ready, register_search_attributes
from infra.topics import ensure_topics
from settings import Settings, get_settings

log = logging.getLogger("paysaga.provision")


def migrate_database(settings: Settings) -> None:
    if not settings.database_url:
        raise SystemExit("PAYSAGA_DATABASE_URL is not set")
    migrate(settings.database_url)
    log.info("ledger schema at revision %s", current_revision(settings.database_url))


def create_topics(settings: Settings) -> None:
    if not settings.kafka_bootstrap_servers:
        raise SystemExit("PAYSAGA_KAFKA_BOOTSTRAP_SERVERS is not set")
    topics = (*ALL_TOPICS, *settings.intake_topics())
    ensure_topics(
        settings.kafka_bootstrap_servers,
        topics,
        partitions=settings.kafka_topic_partitions,
        replication_factor=settings.kafka_replication_factor,
        timeout=60.0,
    )
    log.info("kafka topics present: %s", ", ".join(topics))


def register_temporal_search_attributes(settings: Settings) -> None:
    if not settings.temporal_address:
        raise SystemExit("PAYSAGA_TEMPORAL_ADDRESS is not set")
    address = settings.temporal_address

    async def register() -> None:
        client = await connect_when_ready(address, settings.temporal_namespace, timeout=120.0)
        await register_search_attributes(client)

    asyncio.run(register())
    log.info("search attributes registered in namespace %s", settings.temporal_namespace)


JOBS: dict[str, Callable[[Settings], None]] = {
    "database": migrate_database,
    "topics": create_topics,
    "search-attributes": register_temporal_search_attributes,
}


def main(argv: list[str]) -> int:
    wanted = argv[1:] or ["all"]
    unknown = [job for job in wanted if job != "all" and job not in JOBS]
    if unknown:
        print(f"usage: python -m infra.provision [{'|'.join([*JOBS, 'all'])}] …", file=sys.stderr)
        return 2
    settings = get_settings()
    configure_logging(settings)
    for job in JOBS if "all" in wanted else wanted:
        JOBS[job](settings)
    return 0


if __name__ == "__main__":
    from infra.exit import hard_exit

    status = 1
    try:
        status = main(sys.argv)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        status = exc.code if isinstance(exc.code, int) else 1
    except Exception:
        log.exception("provisioning failed")
    hard_exit(status)
