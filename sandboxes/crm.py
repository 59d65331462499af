"""The CRM sandbox: a local CRM webhook receiver, so the saga's fifth step (tell the CRM) runs
on the default stack. `paysaga run` starts it when no CRM is configured and points the
signed generic webhook (`PAYSAGA_CRM_WEBHOOK_URL`) at it.

It does what a real receiver must (docs/webhooks.md): verifies `Paysaga-Signature` over the raw
body with the shared secret and a 300 s tolerance, refuses what does not verify (400), and
treats a repeated `Idempotency-Key` as the same notification. Every request it receives is
recorded, verified or not, in `<data-dir>/notifications.jsonl` (kept across restarts) and shown:

    GET /                      a small page, newest first
    GET /api/notifications     JSON, `?after=<seq>` for what came since (`paysaga crm tail`)
    POST /webhooks/paysaga     the receiver
    GET /healthz

    python -m sandboxes.crm --host 127.0.0.1 --port 8070 --data-dir .paysaga/crm-sandbox \\
        --secret-file .paysaga/crm-webhook-secret

tests/helpers/fake_crm.py is a different thing on purpose: a test double that fails, hangs and
answers Salesforce- and HubSpot-shaped calls on cue. Both verify with the same code
(`activities.crm.verify_webhook`).
"""

from __future__ import annotations

import argparse
import html
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web

from activities.crm import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify_webhook
from infra.gc_tuning import tune_garbage_collector

RECEIVER_PATH = "/webhooks/paysaga"
SECRET_ENV = "PAYSAGA_CRM_SANDBOX_SECRET"  # noqa: S105 - the variable's name
_PAGE_ROWS = 200
_LIMIT_MAX = 1000


class Notifications:
    """Every request the receiver got, in arrival order, appended to a JSON-lines file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[dict[str, Any]] = []
        self.verified_ids: set[str] = set()
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    self._remember(json.loads(line))
        self._file = open(path, "a")  # noqa: SIM115 - open for the process's life

    def _remember(self, item: dict[str, Any]) -> None:
        self.items.append(item)
        if item["verified"] and item.get("event_id"):
            self.verified_ids.add(item["event_id"])

    def add(self, item: dict[str, Any]) -> dict[str, Any]:
        """Numbered, written and remembered in one step of the event loop (no await), so
        concurrent requests never share a number. The append is one short write to the page
        cache of a file kept open: cheaper inline than a hop to a thread (the sandbox's CPU is
        the machine's, which the benchmark measures)."""
        item["seq"] = len(self.items) + 1
        item["duplicate"] = bool(item["verified"] and item["event_id"] in self.verified_ids)
        self._file.write(json.dumps(item, separators=(",", ":")) + "\n")
        self._file.flush()  # on disk (the page cache) before the sender hears 200
        self._remember(item)
        return item

    def after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        return self.items[seq : seq + limit]


def _summary(body: bytes) -> dict[str, Any]:
    """What the page shows of a notification (activities.crm.CrmNotification's fields)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return {"body": body[:500].decode(errors="replace")}
    if not isinstance(parsed, dict):
        return {"body": parsed}
    keys = ("event_kind", "payment_id", "status", "amount", "currency", "customer_id",
            "merchant_id", "occurred_at", "details")  # fmt: skip
    return {key: parsed.get(key) for key in keys}


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"{name} must be an integer from {low} to {high}"}),
            content_type="application/json",
        )
    return value


def create_app(data_dir: Path, secret: str) -> web.Application:
    """aiohttp.web rather than FastAPI: it runs beside the system the benchmark measures, and
    per request it costs about half the CPU (README "Performance")."""
    if not secret:
        raise ValueError("the CRM sandbox needs the webhook secret to verify signatures")
    data_dir.mkdir(parents=True, exist_ok=True)
    notifications = Notifications(data_dir / "notifications.jsonl")

    async def receive(request: web.Request) -> web.Response:
        body = await request.read()  # the raw bytes: the signature covers exactly these
        verified = verify_webhook(secret, body, request.headers.get(SIGNATURE_HEADER, ""))
        item = notifications.add(
            {
                "received_at": datetime.now(UTC).isoformat(),
                "event_id": request.headers.get(IDEMPOTENCY_HEADER, ""),
                "verified": verified,
                "problem": None if verified else "signature missing, forged or stale",
                **_summary(body),
            }
        )
        if not verified:
            return web.json_response({"error": "signature verification failed"}, status=400)
        return web.json_response({"received": True, "duplicate": item["duplicate"]})

    async def listing(request: web.Request) -> web.Response:
        after = _int_param(request, "after", 0, 0, 2**63 - 1)
        limit = _int_param(request, "limit", 100, 1, _LIMIT_MAX)
        found = notifications.after(after, limit)
        next_after = found[-1]["seq"] if found else after
        return web.json_response({"data": found, "next_after": next_after})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def page(_: web.Request) -> web.Response:
        shown = _page(notifications.items[-_PAGE_ROWS:][::-1], len(notifications.items))
        return web.Response(text=shown, content_type="text/html")

    app = web.Application()
    app.router.add_post(RECEIVER_PATH, receive)
    app.router.add_get("/api/notifications", listing)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/", page)
    return app


def _page(items: list[dict[str, Any]], total: int) -> str:
    def cell(value: Any) -> str:
        return f"<td>{html.escape('' if value is None else str(value))}</td>"

    columns = ("seq", "received_at", "event_kind", "payment_id", "status", "amount", "currency",
               "verified", "duplicate", "event_id")  # fmt: skip
    rows = "".join(
        "<tr class='{}'>{}</tr>".format(
            "ok" if item["verified"] else "bad", "".join(cell(item.get(key)) for key in columns)
        )
        for item in items
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="3">
<title>paysaga CRM sandbox</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}tr.bad{{background:#fdd}}</style>
</head><body><h1>CRM sandbox</h1>
<p>{total} notification(s) received at <code>POST {RECEIVER_PATH}</code>, newest first;
signatures verified with the shared secret. Amounts are minor units.
<code>paysaga crm tail</code> prints them too.</p>
<table><tr><th>#</th><th>received</th><th>event</th><th>payment</th><th>status</th>
<th>amount</th><th>currency</th><th>verified</th><th>duplicate</th><th>event id</th></tr>
{rows}</table></body></html>"""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sandboxes.crm", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8070)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--secret-file", type=Path, help=f"else ${SECRET_ENV}")
    args = parser.parse_args()
    secret = (
        args.secret_file.read_text().strip() if args.secret_file else os.environ.get(SECRET_ENV)
    )
    tune_garbage_collector()  # as the API and the workers run (infra/gc_tuning.py)
    web.run_app(
        create_app(args.data_dir, secret or ""),
        host=args.host,
        port=args.port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
