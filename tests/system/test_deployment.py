"""The production deployment, checked without Docker: docker-compose.yml and the Dockerfile
must only name things that exist (services, images, settings, entry points, ports), start in a
sound order, and the ledger must build on CockroachDB URLs. The setup jobs the compose file
runs are run for real against the test stack."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
import yaml
from confluent_kafka.admin import AdminClient
from sqlalchemy.dialects.postgresql import insert

from infra.database import current_revision, head_revision, make_engine
from infra.embedded.stack import Stack
from ledger.tables import accounts, ledger_entries
from settings import Settings
from tests.helpers.paths import REPO

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
PAYSAGA_SERVICES = {"migrate", "topics", "temporal-setup", "api", "worker", "intake"}
JOBS = {"cockroach-init", "migrate", "topics", "temporal-setup"}
_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def interpolate(value: str) -> str:
    """Compose's `${VAR:-default}` with an empty environment: what a fresh checkout gets."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "", value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: interpolate(str(v)) for k, v in env.items()}


def command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return cmd if isinstance(cmd, list) else str(cmd).split()


def setting_env_names() -> set[str]:
    prefix = str(Settings.model_config.get("env_prefix", ""))
    return {f"{prefix}{name}".upper() for name in Settings.model_fields}


# ── the services and their order ────────────────────────────────────────────────────────────


def test_every_part_of_production_is_there(services: dict[str, dict[str, Any]]) -> None:
    assert {"cockroach1", "cockroach2", "cockroach3", "cockroach-init"} <= set(services)
    assert {"kafka", "temporal", "temporal-db", "temporal-ui"} <= set(services)
    assert set(services) >= PAYSAGA_SERVICES
    assert "zookeeper" not in services
    roles = environment(services["kafka"])["KAFKA_PROCESS_ROLES"]
    assert set(roles.split(",")) == {"broker", "controller"}, "Kafka runs in KRaft mode"
    # Temporal keeps its own database, never the ledger's.
    temporal_env = environment(services["temporal"])
    assert temporal_env["POSTGRES_SEEDS"] == "temporal-db"
    assert "cockroach" not in " ".join(temporal_env.values())
    joins = {
        join
        for n in ("cockroach1", "cockroach2", "cockroach3")
        for join in re.findall(r"--join=(\S+)", " ".join(command(services[n])))
    }
    assert joins == {"cockroach1,cockroach2,cockroach3"}


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image, f"{name} has no image tag"
        repository, _, tag = image.rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: {image} is not pinned"
        assert "/" not in tag


def test_start_order_waits_for_health_and_for_jobs(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            condition = rule["condition"]
            target = services[dependency]
            if condition == "service_healthy":
                check = target.get("healthcheck") or {}
                assert check.get("test") and not check.get("disable"), (name, dependency)
            elif condition == "service_completed_successfully":
                assert dependency in JOBS and target.get("restart") == "no", (name, dependency)
            else:
                assert condition == "service_started", (name, dependency, condition)
    for long_running in set(services) - JOBS:
        check = services[long_running].get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{long_running} has no healthcheck"
    for app in ("api", "worker", "intake"):
        waits_for = services[app]["depends_on"]
        assert {"migrate", "topics", "temporal-setup"} <= set(waits_for)
    assert services["migrate"]["depends_on"] == {
        "cockroach-init": {"condition": "service_completed_successfully"}
    }
    assert_no_cycles(services)


def assert_no_cycles(services: dict[str, dict[str, Any]]) -> None:
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"dependency cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dependency in services[name].get("depends_on") or {}:
            visit(dependency, (*path, name))
        done.add(name)

    for name in services:
        visit(name, ())


def test_workers_scale_and_ports_match_what_the_code_listens_on(
    services: dict[str, dict[str, Any]],
) -> None:
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N
    assert "container_name" not in services["intake"] and "ports" not in services["intake"]
    env = environment(worker)
    metrics_port = env["PAYSAGA_WORKER_METRICS_PORT"]
    assert metrics_port in {str(p) for p in worker["expose"]}
    assert f":{metrics_port}/metrics" in " ".join(worker["healthcheck"]["test"])
    assert env["PAYSAGA_METRICS_HOST"] == "0.0.0.0"  # reachable by Prometheus
    assert env["PAYSAGA_TEMPORAL_METRICS_PORT"] in {str(p) for p in worker["expose"]}

    api = services["api"]
    cmd = command(api)
    api_port = cmd[cmd.index("--port") + 1]
    assert any(str(p).endswith(f":{api_port}") for p in api["ports"])
    # The API's metrics: reachable by Prometheus inside the network, never published.
    api_metrics = environment(api)["PAYSAGA_API_METRICS_PORT"]
    assert api_metrics in {str(p) for p in api["expose"]}
    assert not any(str(p).endswith(f":{api_metrics}") for p in api["ports"])
    assert environment(api)["PAYSAGA_API_DOCS_ENABLED"] == "false"
    assert f":{api_port}/healthz" in " ".join(api["healthcheck"]["test"])
    # The UI's codec endpoint is the API's /codec, at the port the API publishes.
    codec = urlsplit(environment(services["temporal-ui"])["TEMPORAL_CODEC_ENDPOINT"])
    assert codec.port == int(api_port) and codec.path == "/codec"
    origins = environment(api)["PAYSAGA_CODEC_CORS_ORIGINS"]
    ui_port = services["temporal-ui"]["ports"][0].rsplit(":", 1)[1]
    assert origins == f"http://localhost:{ui_port}"


# ── settings: every PAYSAGA_* variable is real, and the needed ones are set ────────────────


def test_every_paysaga_variable_is_a_setting_and_parses(
    services: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    known = setting_env_names()
    for name in PAYSAGA_SERVICES:
        env = environment(services[name])
        unknown = {k for k in env if k.startswith("PAYSAGA_")} - known
        assert not unknown, f"{name} sets variables no setting reads: {unknown}"
        for key in [k for k in os.environ if k.startswith("PAYSAGA_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()  # the service's real settings: types and JSON lists must parse
        assert settings.temporal_address == "temporal:7233"
        assert settings.kafka_bootstrap_servers == "kafka:9092"
        assert settings.database_url is not None
        assert settings.database_url.startswith("cockroachdb+psycopg://")
        hosts = {h.split(":")[0] for h in re.findall(r"host=([^&]+)", settings.database_url)}
        assert hosts == {"cockroach1", "cockroach2", "cockroach3"}
        assert settings.log_json


# ── entry points: every command names code that exists ─────────────────────────────────────


def assert_module_runs(module: str) -> None:
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations is not None:
        spec = importlib.util.find_spec(f"{module}.__main__")  # a package runs its __main__
    assert spec is not None and spec.origin, f"no module {module}"
    source = Path(spec.origin).read_text()
    assert 'if __name__ == "__main__":' in source, f"`python -m {module}` would do nothing"


def assert_command_exists(cmd: list[str]) -> None:
    if cmd[:2] == ["python", "-m"]:
        assert_module_runs(cmd[2])
        if cmd[2] == "infra.provision":
            from infra.provision import JOBS as PROVISION_JOBS

            assert all(job in PROVISION_JOBS for job in cmd[3:]), cmd
    elif cmd[0] == "uvicorn":
        assert "--factory" in cmd
        target = next(arg for arg in cmd[1:] if ":" in arg and not arg.startswith("-"))
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute))
    else:
        raise AssertionError(f"unexpected command {cmd}")


def test_compose_commands_and_the_dockerfile_name_real_entry_points(
    services: dict[str, dict[str, Any]],
) -> None:
    for name in PAYSAGA_SERVICES:
        assert services[name]["image"] == services["api"]["image"], "one image for all roles"
        assert_command_exists(command(services[name]))

    dockerfile = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert stages and all(re.fullmatch(r"python:3\.11[\w.\-]*-slim[\w\-]*", s) for s in stages)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.MULTILINE):
        for path in source.split():
            assert (REPO / path).exists(), f"Dockerfile copies missing {path}"
    assert "pip install ." in dockerfile
    user = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert user and not user[-1].startswith(("root", "0")), "the image must not run as root"
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert cmd is not None
    assert_command_exists(yaml.safe_load(cmd.group(1)))
    # The roles documented at the top of the Dockerfile.
    for module in re.findall(r"^#.*python -m ([\w.]+)", dockerfile, re.MULTILINE):
        assert_module_runs(module)
    # Everything a role imports is installed by `pip install .` (packages and top-level modules).
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"intake*"' in pyproject and '"worker"' in pyproject
    # ... and the image has every package `pip install .` installs (a package left out of the
    # COPY lines installs nothing, and the role fails at its first import).
    packages = re.search(r"^include = \[(.*)\]$", pyproject, re.MULTILINE)
    assert packages is not None
    for package in re.findall(r'"(\w+)\*"', packages.group(1)):
        assert f"COPY {package}/ {package}/" in dockerfile, f"the image lacks {package}/"


# ── the ledger on CockroachDB URLs (no CockroachDB here: build, don't connect) ─────────────


async def test_the_ledger_engine_builds_for_cockroachdb(
    services: dict[str, dict[str, Any]],
) -> None:
    url = environment(services["api"])["PAYSAGA_DATABASE_URL"]
    engine = make_engine(url)
    try:
        dialect = engine.dialect
        assert (dialect.name, dialect.driver, dialect.is_async) == ("cockroachdb", "psycopg", True)
        assert "SERIALIZABLE" in dialect.get_isolation_level_values(None)  # type: ignore[arg-type]
        _, connect = dialect.create_connect_args(engine.url)
        assert connect["host"] == "cockroach1,cockroach2,cockroach3"  # psycopg fails over
        assert connect["dbname"] == "paysaga"
        # The ledger's statements compile for CockroachDB: ON CONFLICT and the balance read.
        upsert = insert(accounts).values(code="c", type="t", currency="USD", status="open")
        compiled = str(upsert.on_conflict_do_nothing(index_elements=["code"]).compile(engine))
        assert "ON CONFLICT (code) DO NOTHING" in compiled
        balance = sa.select(sa.func.coalesce(sa.func.sum(ledger_entries.c.amount), 0))
        assert "coalesce(sum(ledger_entries.amount)" in str(balance.compile(engine))
    finally:
        await engine.dispose()
    sync = sa.create_engine(url, isolation_level="SERIALIZABLE")  # what migrations use
    assert sync.dialect.name == "cockroachdb"
    sync.dispose()


def test_the_setup_jobs_run_against_real_services(stack: Stack) -> None:
    """What compose's migrate / topics / temporal-setup jobs run, against the test stack."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAYSAGA_")}
    env.update(
        PAYSAGA_DATABASE_URL=stack.database_url,
        PAYSAGA_KAFKA_BOOTSTRAP_SERVERS=stack.kafka_bootstrap_servers,
        PAYSAGA_TEMPORAL_ADDRESS=stack.temporal_address,
        PAYSAGA_LOG_JSON="true",
        PAYSAGA_HOME=str(stack.home),
        PAYSAGA_KAFKA_INTAKE_CLIENTS="billing,erp",
    )
    done = subprocess.run(
        [sys.executable, "-m", "infra.provision", "database", "topics", "search-attributes"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert current_revision(stack.database_url) == head_revision()
    logged = [line for line in done.stderr.splitlines() if line.startswith("{")]
    assert any(f'"ledger schema at revision {head_revision()}"' in line for line in logged)
    # The intake clients' own topics are created with the others.
    admin = AdminClient({"bootstrap.servers": stack.kafka_bootstrap_servers})
    topics = admin.list_topics(timeout=10)
    assert {"payments.requests.billing", "payments.requests.erp"} <= set(topics.topics)
    refused = subprocess.run(
        [sys.executable, "-m", "infra.provision", "nonsense"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "usage" in refused.stderr


def test_env_example_documents_every_variable_compose_reads() -> None:
    example = (REPO / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z0-9_]+)=", example, re.MULTILINE))
    wanted = {m.group(1) for m in _INTERPOLATION.finditer(COMPOSE.read_text())}
    assert wanted <= documented, f"not in .env.example: {wanted - documented}"
    assert {v for v in documented if v.startswith("PAYSAGA_")} <= setting_env_names()
    assert ".env" in (REPO / ".gitignore").read_text().split()
