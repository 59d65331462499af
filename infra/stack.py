"""Start, health-check and stop the whole embedded stack (or only the parts not configured).

`paysaga run` and the test fixtures both use `Stack`: one implementation.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from domain.events import ALL_TOPICS
from infra.broker import EmbeddedBroker, ensure_topics
from infra.database import migrate
from infra.postgres import EmbeddedPostgres
from infra.process import require_free_port
from infra.temporal import TemporalDevServer, connect_when_ready, register_search_attributes
from settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Stack:
    """The services paysaga needs. A service given by URL in settings is used as is; the
    others are started here, under `home`, on the ports in settings."""

    settings: Settings
    home: Path
    temporal_ui: bool = True
    codec_endpoint: str | None = None
    temporal: TemporalDevServer | None = None
    broker: EmbeddedBroker | None = None
    postgres: EmbeddedPostgres | None = None
    _started: list[str] = field(default_factory=list)

    @property
    def temporal_address(self) -> str:
        if self.settings.temporal_address:
            return self.settings.temporal_address
        assert self.temporal is not None
        return self.temporal.address

    @property
    def kafka_bootstrap_servers(self) -> str:
        if self.settings.kafka_bootstrap_servers:
            return self.settings.kafka_bootstrap_servers
        assert self.broker is not None
        return self.broker.bootstrap_servers

    @property
    def database_url(self) -> str:
        if self.settings.database_url:
            return self.settings.database_url
        assert self.postgres is not None
        return self.postgres.url()

    @property
    def temporal_ui_url(self) -> str | None:
        if self.temporal is None or self.temporal.ui_port is None:
            return None
        return f"http://127.0.0.1:{self.temporal.ui_port}"

    def service_settings(self) -> Settings:
        """Settings with every service pointed at its address, for the API and the worker."""
        return self.settings.model_copy(
            update={
                "temporal_address": self.temporal_address,
                "kafka_bootstrap_servers": self.kafka_bootstrap_servers,
                "database_url": self.database_url,
                "home": self.home,
            }
        )

    def service_env(self) -> dict[str, str]:
        return {
            "PAYSAGA_HOME": str(self.home),
            "PAYSAGA_TEMPORAL_ADDRESS": self.temporal_address,
            "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "PAYSAGA_DATABASE_URL": self.database_url,
        }

    def check_ports(self) -> None:
        s = self.settings
        if not s.temporal_address:
            require_free_port(s.temporal_port, "Temporal", "PAYSAGA_TEMPORAL_PORT")
            if self.temporal_ui:
                require_free_port(s.temporal_ui_port, "the Temporal UI", "PAYSAGA_TEMPORAL_UI_PORT")
        if not s.kafka_bootstrap_servers:
            require_free_port(s.kafka_port, "Kafka", "PAYSAGA_KAFKA_PORT")
        if not s.database_url:
            require_free_port(s.postgres_port, "PostgreSQL", "PAYSAGA_POSTGRES_PORT")

    def start(self) -> None:
        self.check_ports()
        self.home.mkdir(parents=True, exist_ok=True)
        try:
            self._start_services()
            migrate(self.database_url)
            ensure_topics(
                self.kafka_bootstrap_servers, (*ALL_TOPICS, *self.settings.intake_topics())
            )
            asyncio.run(self._prepare_temporal())
        except BaseException:
            self.stop()
            raise

    def _start_services(self) -> None:
        s = self.settings
        if not s.database_url:
            self.postgres = EmbeddedPostgres(self.home / "postgres", s.postgres_port)
            self.postgres.start()
            self._started.append("postgres")
        if not s.kafka_bootstrap_servers:
            self.broker = EmbeddedBroker(self.home / "kafka", s.kafka_port)
            self.broker.start()
            self._started.append("broker")
        if not s.temporal_address:
            self.temporal = TemporalDevServer(
                self.home / "temporal",
                s.temporal_port,
                s.temporal_ui_port if self.temporal_ui else None,
                codec_endpoint=self.codec_endpoint,
            )
            self.temporal.start()
            self._started.append("temporal")

    async def _prepare_temporal(self) -> None:
        client = await connect_when_ready(self.temporal_address, self.settings.temporal_namespace)
        await register_search_attributes(client)

    def restart_broker(self) -> None:
        """The memory broker forgets every topic when it stops: recreate them."""
        assert self.broker is not None
        self.broker.stop()
        self.broker.start()
        ensure_topics(self.kafka_bootstrap_servers, (*ALL_TOPICS, *self.settings.intake_topics()))

    def stop(self) -> None:
        for name in reversed(self._started):
            service = {"postgres": self.postgres, "broker": self.broker, "temporal": self.temporal}[
                name
            ]
            try:
                if service is not None:
                    service.stop()
            except Exception:
                log.exception("stopping %s failed", name)
        self._started.clear()
