"""The saga's randomized simulation ("our VOPR", issue 11 part 5).

A seed makes a script (tests/simulation/script.py): ~25 payments of every kind — approved,
rejected, reviewed and approved, declined or timed out, canceled at every stage by the API or
by an operator in Temporal, windows closing mid-run — each followed by random refunds
(partial, full, over, repeated keys, keys of digits), disputes (opened, won, lost, during
refunds) and cancels, sent concurrently. The real API, worker, ledger and broker carry it out;
then the oracle (tests/simulation/oracle.py) compares every payment's end with the answers the
API gave, the payments register and the ledger's entries, and `paysaga check` must pass.

Profiles:
- interleavings: the session stack; a second API with a short policy (a window of seconds, a
  review timeout of seconds) makes windows close and reviews time out in real time.
- faults (`slow`): a private stack whose worker is SIGKILLed and restarted, whose PostgreSQL
  is stopped and started and whose broker is killed and restarted while the script runs.

Seeds: 3 of each by default. PAYSAGA_SIM_SEED=17 runs that seed only; PAYSAGA_SIM_SEEDS=N
runs N seeds from PAYSAGA_SIM_SEED_BASE (default 1) on (`make simulate SEEDS=N`). A failure
names its seed and the command that runs it again.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from temporalio.client import Client

from settings import Settings
from tests.api_client import api_client
from tests.conftest import TEST_API_KEY
from tests.simulation.oracle import FinalView, Money, PaymentSeen, RefundSeen, verdict
from tests.simulation.runner import SimRig, Simulation
from tests.simulation.script import (
    SHORT_REVIEW_TIMEOUT_SECONDS,
    SHORT_WINDOW_SECONDS,
    luhn_valid,
    make_script,
)

PAYMENTS_PER_SEED = 25
DEFAULT_SEEDS = (1, 2, 3)


def simulation_seeds() -> list[int]:
    if os.environ.get("PAYSAGA_SIM_SEED"):
        return [int(os.environ["PAYSAGA_SIM_SEED"])]
    if os.environ.get("PAYSAGA_SIM_SEEDS"):
        base = int(os.environ.get("PAYSAGA_SIM_SEED_BASE", "1"))
        return list(range(base, base + int(os.environ["PAYSAGA_SIM_SEEDS"])))
    return list(DEFAULT_SEEDS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        seeds = simulation_seeds()
        metafunc.parametrize("seed", seeds, ids=[f"seed={s}" for s in seeds])


def short_policy(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "dispute_window_days": SHORT_WINDOW_SECONDS / 86400,
            "review_timeout_seconds": SHORT_REVIEW_TIMEOUT_SECONDS,
        }
    )


async def simulate(rig: SimRig, seed: int, profile: str, chaos: object = None) -> Simulation:
    """Run one seed; fail naming it and how to run it again."""
    simulation = Simulation(rig, make_script(seed, PAYMENTS_PER_SEED))
    print(f"simulation {profile}: seed {seed}", file=sys.stderr)
    began = time.monotonic()
    if chaos is not None:
        await chaos(simulation)  # type: ignore[operator]
    else:
        await simulation.run()
    ran = time.monotonic()
    problems = await simulation.judge()
    print(f"ran {ran - began:.1f}s, judged {time.monotonic() - ran:.1f}s", file=sys.stderr)
    if problems:
        listing = "\n  ".join(problems[:40])
        raise AssertionError(
            f"simulation {profile} seed {seed} failed ({len(problems)} problems):\n  {listing}\n"
            f"{simulation.summary()}\nreproduce: PAYSAGA_SIM_SEED={seed} .venv/bin/python -m "
            f"pytest tests/test_simulation.py -k {profile}"
        )
    print(simulation.summary(), file=sys.stderr)
    return simulation


# ── the oracle can fail ─────────────────────────────────────────────────────────────────────


def _captured_payment() -> tuple[PaymentSeen, dict[str, object]]:
    seen = PaymentSeen("pay_0", 10_000, "plain")
    seen.refund_answer({"id": "re_1", "amount": 3_000, "status": "succeeded"})
    final = {
        "status": "partially_refunded",
        "waiting_for": "refunds or disputes until the window closes",
        "amount_captured": 10_000,
        "amount_refunded": 3_000,
        "amount_dispute_lost": 0,
        "refunds": [{"id": "re_1", "amount": 3_000, "status": "succeeded"}],
        "disputes": [],
    }
    return seen, final


def test_the_oracle_passes_a_ledger_that_agrees() -> None:
    seen, final = _captured_payment()
    right = FinalView(final, Money(10_000, 3_000, 0), 7_000)
    assert verdict({"pay_0": seen}, {"pay_0": right}) == {}


@pytest.mark.parametrize(
    ("register", "ledger_net", "complaint"),
    [
        (Money(10_000, 3_000, 0), 10_000, "the ledger moved 10000"),  # a refund not posted
        (Money(10_000, 3_000, 0), 4_000, "the ledger moved 4000"),  # a refund posted twice
        (Money(10_000, 0, 0), 7_000, "the payments register says"),
        (None, 7_000, "no row"),
    ],
)
def test_the_oracle_reports_a_ledger_that_disagrees(
    register: Money | None, ledger_net: int, complaint: str
) -> None:
    seen, final = _captured_payment()
    found = verdict({"pay_0": seen}, {"pay_0": FinalView(final, register, ledger_net)})
    assert any(complaint in p for p in found["pay_0"]), found


def test_the_oracle_reports_what_the_api_answered_but_did_not_happen() -> None:
    seen, final = _captured_payment()
    seen.refunds["re_2"] = RefundSeen(500, "succeeded")  # answered, then missing everywhere
    found = verdict({"pay_0": seen}, {"pay_0": FinalView(final, Money(10_000, 3_000, 0), 7_000)})
    assert any("the API says" in p for p in found["pay_0"]), found
    assert any("the ledger moved" in p for p in found["pay_0"]), found

    seen, final = _captured_payment()
    seen.refused_refund_ids.add("re_1")
    seen.refunds.clear()
    found = verdict({"pay_0": seen}, {"pay_0": FinalView(final, Money(10_000, 3_000, 0), 7_000)})
    assert any("was refused, yet the payment recorded it" in p for p in found["pay_0"]), found

    seen, final = _captured_payment()
    seen.canceled_by_api = True
    stuck = {**final, "status": "processing", "waiting_for": ""}
    found = verdict({"pay_0": seen}, {"pay_0": FinalView(stuck, Money(10_000, 3_000, 0), 7_000)})
    assert any("waiting for nothing named" in p for p in found["pay_0"]), found
    assert any("answered canceled" in p for p in found["pay_0"]), found


def test_a_seed_names_one_script() -> None:
    assert make_script(7, 25) == make_script(7, 25)
    assert make_script(7, 25) != make_script(8, 25)
    kinds = {s.kind for seed in range(1, 4) for s in make_script(seed, 25).stories}
    assert {"plain", "window", "cancel_race", "operator_cancel"} <= kinds
    assert luhn_valid("4242424242424242") and not luhn_valid("4242424242424241")
    story = make_script(7, 25).stories[0]
    assert replace(story, ops=()).ops == ()


# ── interleavings: the session stack ────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
async def short_api(
    app_settings: Settings, temporal_client: Client, worker: None
) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(short_policy(app_settings), temporal_client, TEST_API_KEY) as client:
        yield client


async def test_interleavings(
    seed: int,
    api: httpx.AsyncClient,
    short_api: httpx.AsyncClient,
    temporal_client: Client,
    engine: AsyncEngine,
    app_settings: Settings,
) -> None:
    rig = SimRig(api, short_api, temporal_client, engine, app_settings)
    simulation = await simulate(rig, seed, "interleavings")
    assert simulation.seen, "the script created no payment"
