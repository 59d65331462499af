"""Structured JSON logs with payment and workflow ids; never card data or secrets.

Temporal's `workflow.logger` and `activity.logger` attach their context as a dict
(`temporal_workflow` / `temporal_activity`); the formatter flattens it into top-level fields
(`workflow_id`, `payment_id`, `activity`, `attempt`, …) so a log pipeline can index them, and
adds the `trace_id` of the current OpenTelemetry span when there is one.

Request bodies are never logged anywhere; as a last line of defence any message or traceback
that still contains something shaped like a card number is redacted here.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import temporalio.activity
import temporalio.workflow
from opentelemetry import trace

from domain.cards import card_number_spans
from settings import Settings

_TEMPORAL_EXTRAS = {"temporal_workflow", "temporal_activity", "activity_info", "workflow_info"}
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"} | _TEMPORAL_EXTRAS
REDACTED = "[redacted card number]"


def redact_card_numbers(text: str) -> str:
    """Every digit run holding a card number (domain.cards: any separators, hidden in longer
    runs) is replaced whole, separators included."""
    spans = card_number_spans(text)
    for start, end in reversed(spans):
        text = text[:start] + REDACTED + text[end:]
    return text


def current_trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def temporal_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The workflow/activity context Temporal's loggers attached, as flat fields. A payment's
    workflow id is its payment id (`pay_…`), so both are given."""
    fields: dict[str, Any] = {}
    workflow: Mapping[str, Any] | None = getattr(record, "temporal_workflow", None)
    activity: Mapping[str, Any] | None = getattr(record, "temporal_activity", None)
    if isinstance(workflow, Mapping):
        fields["workflow_id"] = workflow.get("workflow_id")
        fields["run_id"] = workflow.get("run_id")
        fields["workflow_type"] = workflow.get("workflow_type")
        fields["task_queue"] = workflow.get("task_queue")
    if isinstance(activity, Mapping):
        fields["workflow_id"] = activity.get("workflow_id")
        fields["run_id"] = activity.get("workflow_run_id")
        fields["workflow_type"] = activity.get("workflow_type")
        fields["task_queue"] = activity.get("task_queue")
        fields["activity"] = activity.get("activity_type")
        fields["activity_id"] = activity.get("activity_id")
        fields["attempt"] = activity.get("attempt")
    workflow_id = fields.get("workflow_id")
    if isinstance(workflow_id, str) and workflow_id.startswith("pay_"):
        fields["payment_id"] = workflow_id
    return {k: v for k, v in fields.items() if v is not None}


def _plain(value: object) -> object:
    return value if isinstance(value, str | int | float | bool | None) else str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact_card_numbers(record.getMessage()),
        }
        entry.update(temporal_fields(record))
        trace_id = current_trace_id()
        if trace_id is not None:
            entry["trace_id"] = trace_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                plain = _plain(value)
                entry[key] = redact_card_numbers(plain) if isinstance(plain, str) else plain
        if record.exc_info:
            entry["exception"] = redact_card_numbers(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
        # The context travels as fields; don't also append it to every message.
        temporalio.activity.logger.activity_info_on_message = False
        temporalio.workflow.logger.workflow_info_on_message = False
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    logging.getLogger("httpx").setLevel(logging.WARNING)
