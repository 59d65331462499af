"""`paysaga bench`: drive the REST API of a running system and print what it sustains.

Completion is observed the way the outside world sees it, never by asking the system under
test: a payment is complete when the CRM sandbox (the saga's fifth and last step, on the
default stack) has received its confirmation, or, without a sandbox, when its
`payments.confirmed` event arrives on Kafka. Both are recorded when available.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import aiohttp
import typer
import uvloop
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.worker import Worker

from bench.floor import LOCAL, REGULAR, FloorWorkflow, floor_step
from bench.measure import (
    COMPLETION_CONFIRMED,
    COMPLETION_CRM,
    DEFAULT_CRM_SANDBOX_URL,
    BenchResult,
    CompletionWatcher,
    ConfirmationWatcher,
    CrmSandboxWatcher,
    PaymentTiming,
    RssSampler,
    crm_sandbox_answers,
    summarize,
)
from infra.gc_tuning import tune_garbage_collector

console = Console(stderr=True)


def _body(i: int) -> dict[str, Any]:
    # Returning customers with small amounts: the rules score them well below review.
    return {
        "amount": 1000 + i % 500,
        "currency": "USD",
        "customer_id": f"cus_bench_{i % 997}",
        "merchant_id": f"mer_bench_{i % 13}",
        "payment_method": "pm_bench_token_0001",
        "description": "bench",
    }


async def _post(
    http: aiohttp.ClientSession,
    run_id: str,
    i: int,
    timings: list[PaymentTiming],
    errors: Counter[str],
) -> str | None:
    sent = time.monotonic()
    try:
        async with http.post(
            "/v1/payments", json=_body(i), headers={"Idempotency-Key": f"bench-{run_id}-{i}"}
        ) as response:
            body = await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        errors[f"transport:{type(exc).__name__}"] += 1
        return None
    answered = time.monotonic()
    if response.status != 201:
        code = json.loads(body).get("error", {}).get("code", "") if body else ""
        errors[f"http_{response.status}:{code}"] += 1
        return None
    payment_id: str = json.loads(body)["id"]
    timings.append(PaymentTiming(payment_id, sent, answered))
    return payment_id


async def _drive(
    http: aiohttp.ClientSession,
    watcher: CompletionWatcher,
    payments: int,
    concurrency: int | None,
    rate: float | None,
    timings: list[PaymentTiming],
    errors: Counter[str],
) -> None:
    run_id = uuid.uuid4().hex[:8]
    if rate:  # open loop: send on schedule whatever the system's pace
        start = time.monotonic()
        pending = []
        for i in range(payments):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            pending.append(asyncio.create_task(_post(http, run_id, i, timings, errors)))
        await asyncio.gather(*pending)
        return
    # Closed loop: each of `concurrency` clients waits for its payment to complete before
    # paying again, so latency is measured at the load the system actually sustains.
    next_payment = iter(range(payments))

    async def client() -> None:
        for i in next_payment:
            payment_id = await _post(http, run_id, i, timings, errors)
            if payment_id is not None:
                await watcher.wait_for(payment_id, 120)  # late ones are counted at the end

    await asyncio.gather(*(client() for _ in range(concurrency or 50)))


async def _shape_of(client: Client, payment_id: str) -> tuple[list[str], list[str]]:
    """The kinds of activities a real payment ran, read from its history, and what each was
    (a regular activity's type is in the clear; a local one's sits in its encrypted marker)."""
    shape, steps = [], []
    async for event in client.get_workflow_handle(payment_id).fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            shape.append(REGULAR)
            name = event.activity_task_scheduled_event_attributes.activity_type.name
            steps.append(f"{REGULAR}:{name}")
        elif (
            event.event_type == EventType.EVENT_TYPE_MARKER_RECORDED
            and event.marker_recorded_event_attributes.marker_name == "core_local_activity"
        ):
            shape.append(LOCAL)
            steps.append(LOCAL)
    return shape, steps


async def run_floor(client: Client, shape: list[str], workflows: int, concurrency: int) -> float:
    queue = f"bench-floor-{uuid.uuid4().hex[:8]}"
    gate = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with gate:
            await client.execute_workflow(
                FloorWorkflow.run, shape, id=f"floor-{queue}-{i}", task_queue=queue
            )

    async with Worker(
        client,
        task_queue=queue,
        workflows=[FloorWorkflow],
        activities=[floor_step],
        max_concurrent_activities=200,
        max_concurrent_workflow_tasks=100,
    ):
        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(workflows)))
        return workflows / (time.monotonic() - started)


async def _fraud_timings(
    http: aiohttp.ClientSession, ids: list[str]
) -> tuple[list[float], Counter[str]]:
    """After the run: each payment's final status and the scorer's own timing."""
    scoring: list[float] = []
    statuses: Counter[str] = Counter()
    gate = asyncio.Semaphore(20)

    async def one(pid: str) -> None:
        async with gate:
            async with http.get(f"/v1/payments/{pid}") as response:
                if response.status != 200:
                    statuses[f"get_{response.status}"] += 1
                    return
                payment = await response.json()
            statuses[payment["status"]] += 1
            if payment.get("fraud_scoring_ms") is not None:
                scoring.append(float(payment["fraud_scoring_ms"]))

    await asyncio.gather(*(one(pid) for pid in ids))
    return scoring, statuses


async def bench(
    api_url: str,
    api_key: str,
    kafka: str,
    temporal_address: str,
    namespace: str,
    payments: int,
    concurrency: int | None,
    rate: float | None,
    floor: bool,
    completion_timeout: float,
    crm_sandbox_url: str | None = None,
) -> BenchResult:
    timings: list[PaymentTiming] = []
    errors: Counter[str] = Counter()
    crm = CrmSandboxWatcher(crm_sandbox_url) if crm_sandbox_url else None
    confirmations = ConfirmationWatcher(kafka, completes_payments=crm is None)
    completion = COMPLETION_CRM if crm is not None else COMPLETION_CONFIRMED
    watcher: CompletionWatcher = crm or confirmations
    sampler = RssSampler(urlsplit(api_url).port)
    # aiohttp rather than httpx: the client shares the machine with the system it measures, and
    # httpx (its pool scans every connection per request) cost ~10 ms of CPU per payment there,
    # aiohttp ~2 ms (README "Performance").
    async with aiohttp.ClientSession(
        base_url=api_url,
        headers={"Authorization": f"Bearer {api_key}"},
        # Open loop queues its POSTs in the client when the API falls behind: no limit on the
        # wait for a connection, 60 s on each request once sent.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=60, sock_read=60),
        connector=aiohttp.TCPConnector(limit=(concurrency or 200) + 10),
    ) as http:
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress:
            task = progress.add_task(
                "synced to the CRM" if crm is not None else "confirmed", total=payments
            )
            first_post = time.monotonic()
            driver = asyncio.create_task(
                _drive(http, watcher, payments, concurrency, rate, timings, errors)
            )
            deadline = None
            peak_in_flight = 0
            while True:
                await asyncio.sleep(0.2)
                done = sum(1 for t in timings if t.payment_id in watcher.confirmed)
                progress.update(task, completed=done)
                peak_in_flight = max(peak_in_flight, len(timings) - done)
                if driver.done():
                    if deadline is None:
                        deadline = time.monotonic() + completion_timeout
                    if done >= len(timings) or time.monotonic() > deadline:
                        break
            await driver
        for timing in timings:
            timing.confirmed_at = confirmations.confirmed.get(timing.payment_id)
            timing.crm_at = crm.confirmed.get(timing.payment_id) if crm is not None else None
        confirmations.close()
        if crm is not None:
            crm.close()
        peak = sampler.close()
        confirmed = [t for t in timings if t.confirmed_at is not None]
        completed = [t for t in timings if t.completed_at(completion) is not None]
        last = max((t.completed_at(completion) or 0.0 for t in completed), default=time.monotonic())
        duration = last - first_post
        scoring, statuses = await _fraud_timings(http, [t.payment_id for t in timings])
    for status, count in statuses.items():
        if status != "succeeded":
            errors[f"status:{status}"] += count
    missing = len(timings) - len(completed)
    if missing:
        errors[f"not_{'synced_to_the_crm' if crm else 'confirmed'}_in_time"] += missing
    result = BenchResult(
        payments=payments,
        concurrency=None if rate else concurrency,
        rate=rate,
        succeeded=statuses.get("succeeded", 0),
        duration_s=round(duration, 2),
        throughput_per_s=round(len(completed) / duration, 2) if duration > 0 else 0.0,
        post_latency_ms=summarize([(t.answered_at - t.sent_at) * 1000 for t in timings]),
        confirm_latency_ms=summarize(
            [((t.confirmed_at or 0) - t.sent_at) * 1000 for t in confirmed]
        ),
        fraud_scoring_ms=summarize(scoring),
        errors=dict(errors),
        peak_rss_mb=peak,
        peak_in_flight=peak_in_flight,
        completion=completion,
        crm_latency_ms=summarize([((t.crm_at or 0) - t.sent_at) * 1000 for t in completed])
        if crm is not None
        else {},
    )
    if floor and completed:
        client = await Client.connect(temporal_address, namespace=namespace)
        # The floor copies a finished payment's shape, local and regular steps alike.
        result.shape, result.shape_steps = await _shape_of(client, completed[0].payment_id)
        with console.status("measuring the floor: same shape, empty bodies"):
            floor_rate = await run_floor(client, result.shape, payments, concurrency or 50)
        result.floor_throughput_per_s = round(floor_rate, 2)
        result.floor_ratio = round(result.throughput_per_s / floor_rate, 3) if floor_rate else None
    return result


def _render(result: BenchResult) -> None:
    table = Table(title="paysaga bench", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")

    def ms(values: dict[str, float | None]) -> str:
        return " / ".join(f"{v:.0f}" if v is not None else "–" for v in values.values())

    mode = f"open loop at {result.rate}/s" if result.rate else f"concurrency {result.concurrency}"
    table.add_row("payments", f"{result.payments} ({mode})")
    table.add_row("succeeded", str(result.succeeded))
    done = "synced to the CRM" if result.completion == COMPLETION_CRM else "confirmed"
    table.add_row(f"throughput (first POST → last {done})", f"{result.throughput_per_s} /s")
    table.add_row("POST response p50/p90/p99/max ms", ms(result.post_latency_ms))
    table.add_row("POST → confirmed p50/p90/p99/max ms", ms(result.confirm_latency_ms))
    if result.crm_latency_ms:
        table.add_row("POST → synced to the CRM p50/p90/p99/max ms", ms(result.crm_latency_ms))
    table.add_row("fraud scoring p50/p90/p99/max ms", ms(result.fraud_scoring_ms))
    table.add_row(f"peak payments in flight (accepted, not {done})", str(result.peak_in_flight))
    table.add_row("errors", ", ".join(f"{k}: {v}" for k, v in result.errors.items()) or "0")
    table.add_row(
        "peak RSS MiB", ", ".join(f"{k} {v}" for k, v in result.peak_rss_mb.items()) or "–"
    )
    if result.floor_throughput_per_s is not None:
        table.add_row("payment shape", ", ".join(result.shape_steps or result.shape))
        table.add_row("floor (same shape, empty bodies)", f"{result.floor_throughput_per_s} /s")
        table.add_row("paysaga / floor", f"{result.floor_ratio}")
    Console().print(table)


def _default_key() -> str:
    key = os.environ.get("PAYSAGA_API_KEY")
    if key:
        return key
    home = Path(os.environ.get("PAYSAGA_HOME", ".paysaga"))
    path = home / "dev-api-key"
    if path.exists():
        return path.read_text().strip()
    raise typer.BadParameter("no API key: pass --api-key or run `make run` first")


def main(
    payments: Annotated[int, typer.Option(help="How many payments (closed loop).")] = 2000,
    concurrency: Annotated[int, typer.Option(help="Payments in flight at once.")] = 50,
    rate: Annotated[float | None, typer.Option(help="Open loop: payments per second.")] = None,
    duration: Annotated[float, typer.Option(help="Open loop: seconds to send for.")] = 60.0,
    floor: Annotated[bool, typer.Option(help="Also measure the floor workflow.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    api_url: Annotated[str, typer.Option(envvar="PAYSAGA_API_URL")] = "http://127.0.0.1:8000",
    api_key: Annotated[str | None, typer.Option(envvar="PAYSAGA_API_KEY")] = None,
    kafka: Annotated[
        str, typer.Option(envvar="PAYSAGA_KAFKA_BOOTSTRAP_SERVERS")
    ] = "127.0.0.1:9092",
    temporal: Annotated[str, typer.Option(envvar="PAYSAGA_TEMPORAL_ADDRESS")] = "127.0.0.1:7233",
    namespace: Annotated[str, typer.Option(envvar="PAYSAGA_TEMPORAL_NAMESPACE")] = "default",
    completion_timeout: Annotated[
        float, typer.Option(help="Seconds to wait after the last POST.")
    ] = 300.0,
    crm_sandbox_url: Annotated[
        str,
        typer.Option(
            envvar="PAYSAGA_CRM_SANDBOX_URL",
            help="A payment is complete when this CRM sandbox has its confirmation (the saga's "
            "last step); if it does not answer, when payments.confirmed is on Kafka.",
        ),
    ] = DEFAULT_CRM_SANDBOX_URL,
    crm: Annotated[
        bool, typer.Option(help="Complete payments at the CRM step (--no-crm: at Kafka).")
    ] = True,
) -> None:
    """Measure throughput and latency of a running paysaga, side by side with the floor."""
    total = int(rate * duration) if rate else payments
    sandbox = crm_sandbox_url if crm and crm_sandbox_answers(crm_sandbox_url) else None
    if crm and sandbox is None:
        console.print(
            f"[yellow]no CRM sandbox at {crm_sandbox_url}: payments complete at payments.confirmed"
        )
    # uvloop and the garbage collector's service tuning, as the API and workers run: the
    # client's own CPU is taken from the system it measures (one machine), so it should cost as
    # little as it can.
    tune_garbage_collector()
    result = uvloop.run(
        bench(
            api_url,
            api_key or _default_key(),
            kafka,
            temporal,
            namespace,
            total,
            concurrency,
            rate,
            floor,
            completion_timeout,
            sandbox,
        )
    )
    if as_json:
        print(json.dumps(asdict(result), indent=2))
    else:
        _render(result)
    if result.errors:
        raise typer.Exit(1)
