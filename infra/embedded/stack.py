"""Start, health-check and stop the whole embedded stack (or only the parts not configured).

`paysaga run` and the test fixtures both use `Stack`: one implementation. With `sandboxes`,
the stack also starts the CRM sandbox (sandboxes/crm.py) when no CRM is configured, and points
the services' CRM webhook at it; and the sandbox acquirer (sandboxes/acquirer.py) when no
acquirer is configured, pointing the services' acquirer URL and key at it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from domain.events import ALL_TOPICS
from infra.database import migrate
from infra.embedded.broker import EmbeddedBroker
from infra.embedded.postgres import EmbeddedPostgres
from infra.embedded.process import require_free_port
from infra.embedded.sandboxes import SandboxService, load_or_create_secret
from infra.embedded.temporal import TemporalDevServer
from infra.temporal_client import connect_when_ready, register_search_attributes
from infra.topics import ensure_topics
from sandboxes.acquirer import API_KEY_ENV
from settings import Settings

log = logging.getLogger(__name__)

CRM_SECRET_FILE = "crm-webhook-secret"  # noqa: S105 - a file name, not a secret
CRM_RECEIVER_PATH = "/webhooks/paysaga"
ACQUIRER_KEY_FILE = "acquirer-api-key"


@dataclass
class Stack:
    """The services paysaga needs. A service given by URL in settings is used as is; the
    others are started here, under `home`, on the ports in settings."""

    settings: Settings
    home: Path
    temporal_ui: bool = True
    codec_endpoint: str | None = None
    sandboxes: bool = False
    temporal: TemporalDevServer | None = None
    broker: EmbeddedBroker | None = None
    postgres: EmbeddedPostgres | None = None
    crm_sandbox: SandboxService | None = None
    # The sandbox acquirer also without `sandboxes` (the tests' stack: their CRM is their own),
    # and the options it is started with (the tests' shorter delays).
    acquirer: bool = False
    acquirer_sandbox_args: list[str] = field(default_factory=list)
    acquirer_sandbox: SandboxService | None = None
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

    @property
    def crm_sandbox_url(self) -> str | None:
        return self.crm_sandbox.url if self.crm_sandbox is not None else None

    @property
    def wants_crm_sandbox(self) -> bool:
        """No CRM of any kind configured: the sandbox stands in, so the fifth step runs."""
        s = self.settings
        configured = s.crm_webhook_url or s.salesforce_base_url or s.hubspot_base_url
        return self.sandboxes and s.crm_sandbox and not configured

    @property
    def acquirer_sandbox_url(self) -> str | None:
        return self.acquirer_sandbox.url if self.acquirer_sandbox is not None else None

    @property
    def wants_acquirer_sandbox(self) -> bool:
        """No acquirer configured: the sandbox acquirer stands in, so payments authorize."""
        s = self.settings
        return (self.sandboxes or self.acquirer) and s.acquirer_sandbox and not s.acquirer_url

    def _acquirer(self) -> tuple[str, str] | None:
        if self.acquirer_sandbox is None:
            return None
        key = load_or_create_secret(self.home / ACQUIRER_KEY_FILE, prefix="sk_test_")
        return self.acquirer_sandbox.url, key

    def _crm_webhook(self) -> tuple[str, str] | None:
        if self.crm_sandbox is None:
            return None
        secret = load_or_create_secret(self.home / CRM_SECRET_FILE)
        return f"{self.crm_sandbox.url}{CRM_RECEIVER_PATH}", secret

    def service_settings(self) -> Settings:
        """Settings with every service pointed at its address, for the API and the worker."""
        update: dict[str, object] = {
            "temporal_address": self.temporal_address,
            "kafka_bootstrap_servers": self.kafka_bootstrap_servers,
            "database_url": self.database_url,
            "home": self.home,
        }
        crm = self._crm_webhook()
        if crm is not None:
            update["crm_webhook_url"], update["crm_webhook_secret"] = crm[0], SecretStr(crm[1])
        acquirer = self._acquirer()
        if acquirer is not None:
            update["acquirer_url"], update["acquirer_api_key"] = acquirer[0], SecretStr(acquirer[1])
        return self.settings.model_copy(update=update)

    def service_env(self) -> dict[str, str]:
        env = {
            "PAYSAGA_HOME": str(self.home),
            "PAYSAGA_TEMPORAL_ADDRESS": self.temporal_address,
            "PAYSAGA_KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "PAYSAGA_DATABASE_URL": self.database_url,
        }
        crm = self._crm_webhook()
        if crm is not None:
            env["PAYSAGA_CRM_WEBHOOK_URL"], env["PAYSAGA_CRM_WEBHOOK_SECRET"] = crm
        acquirer = self._acquirer()
        if acquirer is not None:
            env["PAYSAGA_ACQUIRER_URL"], env["PAYSAGA_ACQUIRER_API_KEY"] = acquirer
        return env

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
        if self.wants_crm_sandbox:
            require_free_port(s.crm_sandbox_port, "the CRM sandbox", "PAYSAGA_CRM_SANDBOX_PORT")
        if self.wants_acquirer_sandbox:
            require_free_port(
                s.acquirer_sandbox_port, "the sandbox acquirer", "PAYSAGA_ACQUIRER_SANDBOX_PORT"
            )

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
        if self.wants_crm_sandbox:
            secret_file = self.home / CRM_SECRET_FILE
            load_or_create_secret(secret_file)
            self.crm_sandbox = SandboxService(
                "crm",
                s.crm_sandbox_port,
                self.home / "crm-sandbox",
                ["--secret-file", str(secret_file)],
            )
            self.crm_sandbox.start()
            self._started.append("crm_sandbox")
        if self.wants_acquirer_sandbox:
            self._start_acquirer_sandbox()

    def _start_acquirer_sandbox(self) -> None:
        # A key of its own per home (kept 0600 like the CRM's secret), handed over in the
        # environment: the documented public test key is for a sandbox only you can reach.
        key = load_or_create_secret(self.home / ACQUIRER_KEY_FILE, prefix="sk_test_")
        self.acquirer_sandbox = SandboxService(
            "acquirer",
            self.settings.acquirer_sandbox_port,
            self.home / "acquirer-sandbox",
            list(self.acquirer_sandbox_args),
            env={API_KEY_ENV: key},
        )
        self.acquirer_sandbox.start()
        self._started.append("acquirer_sandbox")

    async def _prepare_temporal(self) -> None:
        client = await connect_when_ready(self.temporal_address, self.settings.temporal_namespace)
        await register_search_attributes(client)

    def stop(self) -> None:
        for name in reversed(self._started):
            service = {
                "postgres": self.postgres,
                "broker": self.broker,
                "temporal": self.temporal,
                "crm_sandbox": self.crm_sandbox,
                "acquirer_sandbox": self.acquirer_sandbox,
            }[name]
            try:
                if service is not None:
                    service.stop()
            except Exception:
                log.exception("stopping %s failed", name)
        self._started.clear()
