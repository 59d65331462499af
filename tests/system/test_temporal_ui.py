"""An operator's first step with a stuck payment: find it in the Temporal UI by search attribute.

Loads the test stack's real Temporal Web UI in headless Chromium (Debian `chromium`), filtered
by the runbook's kind of query, and checks the payment is listed. The screenshot is kept in
tests/artifacts/ (git-ignored) for a human to look at.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import uuid
from urllib.parse import quote

import httpx
import pytest
from temporalio.client import Client

from infra.embedded.stack import Stack
from tests.helpers.paths import REPO
from tests.helpers.saga import create_payment, payment_body

ARTIFACTS = REPO / "tests" / "artifacts"
_CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # tests may run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--hide-scrollbars",
    "--window-size=1400,900",
)
# Virtual time: the SPA's timers run fast, but network fetches to the UI server are real.
_BUDGET_MS = 8000


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip(
            "Chromium is not installed and could not be installed (make installs the Debian "
            "`chromium` package when run as root: apt-get install -y chromium)"
        )
    return found


def run_chromium(*args: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="paysaga-chromium-") as profile:
        return subprocess.run(
            [chromium(), *_CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


async def listed_by_visibility(temporal: Client, query: str, payment_id: str) -> None:
    """Visibility is eventually consistent: wait until the query finds the payment."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        found = [w.id async for w in temporal.list_workflows(query)]
        if payment_id in found:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{query} never listed {payment_id}")
        await asyncio.sleep(0.2)


async def test_an_operator_finds_a_payment_in_the_temporal_ui_by_search_attribute(
    api: httpx.AsyncClient, stack: Stack, temporal_client: Client
) -> None:
    browser = chromium()
    ui = stack.temporal_ui_url
    assert ui is not None, "the test stack runs the Temporal UI"
    customer = f"cus_ui_{uuid.uuid4().hex[:10]}"
    created = await create_payment(api, payment_body(customer_id=customer))
    assert created.status_code == 201 and created.json()["status"] == "succeeded"
    payment_id = created.json()["id"]

    query = f'PaymentStatus="succeeded" AND CustomerId="{customer}"'
    await listed_by_visibility(temporal_client, query, payment_id)
    url = f"{ui}/namespaces/default/workflows?query={quote(query)}"

    dom = await asyncio.to_thread(
        run_chromium, f"--virtual-time-budget={_BUDGET_MS}", "--dump-dom", url
    )
    assert dom.returncode == 0, f"{browser} failed: {dom.stderr[-2000:]}"
    assert payment_id in dom.stdout, "the UI's workflow list does not show the payment"
    assert "PaymentWorkflow" in dom.stdout

    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "temporal-ui-find-payment.png"
    screenshot.unlink(missing_ok=True)
    shot = await asyncio.to_thread(
        run_chromium,
        f"--virtual-time-budget={_BUDGET_MS}",
        f"--screenshot={screenshot}",
        url,
    )
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 20_000, "the screenshot is (nearly) blank"


async def test_every_query_in_the_runbook_is_valid_visibility_syntax(
    temporal_client: Client,
) -> None:
    """Operators paste these under pressure: each must parse on a real server."""
    runbook = (REPO / "docs" / "runbook.md").read_text()
    table = runbook.split("## 1. Find it", 1)[1].split("## 2.", 1)[0]
    queries = re.findall(r"^\|[^|]+\| `([^`]+)` \|$", table, re.MULTILINE)
    assert len(queries) >= 10
    for query in queries:
        count = await temporal_client.count_workflows(query)  # raises on a syntax error
        assert count.count >= 0, query
