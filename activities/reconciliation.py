"""Talks to the acquirer's settlement files and imports them (docs/reconciliation.md).

`download_settlement_file` is the HTTP client `paysaga recon fetch` and the daily workflow share;
`ReconciliationActivities.import_settlement_day` is the workflow's step: fetch a day's file, keep
a copy in the settlements directory, import it (idempotent by the file's hash, all or nothing).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import httpx
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio import activity
from temporalio.exceptions import ApplicationError

from domain.settlement import SettlementFileInvalid, parse_settlement_file
from ledger.reconciliation import Reconciliation
from settings import Settings

SETTLEMENT_FILE_INVALID = "SettlementFileInvalid"
SETTLEMENT_FILE_UNAVAILABLE = "SettlementFileUnavailable"


@dataclass(frozen=True)
class AcquirerEndpoint:
    url: str
    api_key: str


def acquirer_endpoint(settings: Settings) -> AcquirerEndpoint:
    """The configured acquirer, or the sandbox `paysaga run` starts (its key in <home>)."""
    url = settings.acquirer_url or f"http://127.0.0.1:{settings.acquirer_sandbox_port}"
    key = settings.acquirer_api_key.get_secret_value()
    if not key:
        key_file = settings.home / "acquirer-api-key"
        key = key_file.read_text().strip() if key_file.exists() else ""
    return AcquirerEndpoint(url=url.rstrip("/"), api_key=key)


class SettlementFileUnavailable(Exception):
    pass


async def download_settlement_file(
    endpoint: AcquirerEndpoint, day: date, *, timeout_seconds: float = 30.0
) -> bytes:
    """The acquirer's settlement file of `day` (GET /v1/settlements/<day>.csv)."""
    async with httpx.AsyncClient(timeout=timeout_seconds) as http:
        try:
            answer = await http.get(
                f"{endpoint.url}/v1/settlements/{day.isoformat()}.csv",
                headers={"Authorization": f"Bearer {endpoint.api_key}"},
            )
        except httpx.HTTPError as exc:
            raise SettlementFileUnavailable(f"the acquirer did not answer: {exc}") from None
    if answer.status_code != 200:
        raise SettlementFileUnavailable(
            f"the acquirer answered {answer.status_code}: {answer.text[:300]}"
        )
    return answer.content


def settlements_dir(settings: Settings) -> Path:
    folder = settings.recon_settlements_dir
    return folder if folder.is_absolute() else settings.home / folder


def save_settlement_file(folder: Path, day: date, content: bytes) -> Path:
    """Written whole or not at all (a temporary file renamed into place)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"settlement-{day.isoformat()}.csv"
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".settlement-", suffix=".part")
    with os.fdopen(fd, "wb") as out:
        out.write(content)
    Path(temporary).replace(target)
    return target


class SettlementDay(BaseModel):
    day: date


class ImportResult(BaseModel):
    day: date
    path: str  # the copy kept in the settlements directory of the worker that imported it
    sha256: str
    duplicate: bool
    lines: int
    statuses: dict[str, int]
    exceptions_opened: dict[str, int]


class ReconciliationActivities:
    """Register on the worker: `import_settlement_day`."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        self._settings = settings
        self._reconciliation = Reconciliation(
            engine,
            missing_after=timedelta(days=settings.recon_missing_after_days),
            max_attempts=settings.db_max_retries,
        )

    @activity.defn(name="import_settlement_day")
    async def import_settlement_day(self, request: SettlementDay) -> ImportResult:
        """Download the day's file, keep a copy, import it. One activity, not two: a file saved
        by one worker host is not on the next one's disk, and the bytes are too big for a
        workflow history. Retried as a whole: the import is idempotent by the file's hash."""
        try:
            content = await download_settlement_file(acquirer_endpoint(self._settings), request.day)
        except SettlementFileUnavailable as exc:
            raise ApplicationError(str(exc), type=SETTLEMENT_FILE_UNAVAILABLE) from None
        path = await asyncio.to_thread(
            save_settlement_file, settlements_dir(self._settings), request.day, content
        )
        try:
            parsed = parse_settlement_file(content)
            report = await self._reconciliation.import_file(parsed, path.name)
        except SettlementFileInvalid as exc:
            # The same bytes will not get better: an operator looks at the file.
            raise ApplicationError(
                str(exc), type=SETTLEMENT_FILE_INVALID, non_retryable=True
            ) from None
        # Age the queue even when the file brought nothing new (a quiet day's file is the same
        # bytes every day): a movement never settled must still turn `missing`.
        _, opened = await self._reconciliation.refresh()
        return ImportResult(
            day=request.day,
            path=str(path),
            sha256=report.sha256,
            duplicate=report.duplicate,
            lines=report.lines,
            statuses=report.statuses,
            exceptions_opened={
                kind: report.exceptions_opened.get(kind, 0) + opened.get(kind, 0)
                for kind in {*report.exceptions_opened, *opened}
            },
        )
