"""Settings for a private stack on free ports: the session stack, the fault tests' stack (which
they kill), and the history recorder all start from here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from infra.embedded.process import free_port
from settings import Settings


def private_stack_settings(home: Path, **overrides: Any) -> Settings:
    """Explicit values, never the defaults: a developer's PAYSAGA_* environment must not point
    tests at a real service (which a fault test would then kill), and the ports never clash
    with `make run` or anything else listening on the machine."""
    values: dict[str, Any] = {
        "home": home,
        "temporal_address": None,
        "kafka_bootstrap_servers": None,
        "database_url": None,
        "temporal_port": free_port(),
        "temporal_ui_port": free_port(),
        "kafka_port": free_port(),
        "postgres_port": free_port(),
        "crm_sandbox_port": free_port(),
        "acquirer_sandbox_port": free_port(),
        "kafka_session_timeout_ms": 2000,
        # Many apps run in one test process: the API's metrics port is opened where a test
        # asks for it (test_observability.py), never by default.
        "api_metrics_port": 0,
        "log_json": False,
    }
    values.update(overrides)
    return Settings(**values)
