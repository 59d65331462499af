"""One hot merchant account under PostgreSQL SERIALIZABLE: concurrent captures really conflict
(SQLSTATE 40001), are run again, and the money still adds up to the minor unit.

The merchant has a limit (accounts.max_balance), so every capture reads the account's balance
and writes an entry that changes it: a read-modify-write on one account from 50 transactions at
once, which is exactly what SERIALIZABLE must serialise and what CockroachDB does the same way.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.errors import FailureType
from domain.ledger import Parties, customer_account, merchant_account, payment_transaction
from infra.database import RetryStats, make_engine
from infra.embedded.stack import Stack
from ledger.records import LedgerPosting, LedgerReceipt, LedgerRejected, PaymentParties
from ledger.store import Ledger
from tests.helpers.saga import account_balance

CONCURRENT_CAPTURES = 50
# Generous on purpose: in production Temporal retries the activity after `db_max_retries`;
# here the bound only keeps one unlucky transaction from failing the test.
ATTEMPTS = 200


@pytest.fixture(scope="module")
async def wide_engine(stack: Stack) -> AsyncIterator[AsyncEngine]:
    """Enough connections for every capture to be in flight at once."""
    engine = make_engine(stack.database_url, pool_size=CONCURRENT_CAPTURES)
    yield engine
    await engine.dispose()


def capture(merchant: str, amount: int) -> LedgerPosting:
    payment_id = f"pay_{uuid.uuid4().hex[:24]}"
    customer = f"cus_{uuid.uuid4().hex[:12]}"
    return LedgerPosting(
        transaction=payment_transaction(payment_id, Parties(customer, merchant, "USD"), amount),
        amount=amount,
        parties=PaymentParties(
            client_id="contention", customer_id=customer, merchant_id=merchant, currency="USD"
        ),
    )


def retries() -> tuple[int, float]:
    metric = REGISTRY.get_sample_value(
        "paysaga_ledger_serialization_retries_total", {"sqlstate": "40001"}
    )
    return RetryStats.serialization_retries, metric or 0.0


async def capture_all(
    ledger: Ledger, postings: list[LedgerPosting]
) -> list[LedgerReceipt | BaseException]:
    return await asyncio.gather(*(ledger.post(p) for p in postings), return_exceptions=True)


async def test_concurrent_captures_to_one_hot_account_retry_and_stay_exact(
    wide_engine: AsyncEngine,
) -> None:
    ledger = Ledger(wide_engine, max_attempts=ATTEMPTS)
    merchant = f"mer_hot_{uuid.uuid4().hex[:8]}"
    hot = merchant_account(merchant, "USD")
    await ledger.set_account_limit(hot, 10**12)  # far away: every capture must go through
    postings = [capture(merchant, 100 + i) for i in range(CONCURRENT_CAPTURES)]
    retries_before, metric_before = retries()

    results = await capture_all(ledger, postings)

    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    retries_after, metric_after = retries()
    assert retries_after > retries_before, "no 40001 at all: the captures did not contend"
    assert metric_after - metric_before == retries_after - retries_before
    # Exact to the minor unit: the merchant holds every capture once, each customer paid once.
    assert await account_balance(wide_engine, hot.code) == -sum(p.amount for p in postings)
    for posting in postings:
        assert posting.parties is not None
        customer = customer_account(posting.parties.customer_id, "USD")
        assert await account_balance(wide_engine, customer.code) == posting.amount


async def test_a_limit_is_never_overshot_by_concurrent_captures(
    wide_engine: AsyncEngine,
) -> None:
    ledger = Ledger(wide_engine, max_attempts=ATTEMPTS)
    merchant = f"mer_capped_{uuid.uuid4().hex[:8]}"
    capped = merchant_account(merchant, "USD")
    room_for = 20
    await ledger.set_account_limit(capped, room_for * 1000)
    postings = [capture(merchant, 1000) for _ in range(CONCURRENT_CAPTURES)]

    results = await capture_all(ledger, postings)

    posted = [r for r in results if isinstance(r, LedgerReceipt)]
    refused = [r for r in results if isinstance(r, LedgerRejected)]
    others = [r for r in results if not isinstance(r, LedgerReceipt | LedgerRejected)]
    assert not others, others[:3]
    assert len(posted) == room_for
    assert len(refused) == CONCURRENT_CAPTURES - room_for
    assert {r.failure for r in refused} == {FailureType.MERCHANT_OVER_LIMIT}
    assert await account_balance(wide_engine, capped.code) == -room_for * 1000

    # Lifting the limit lets the next capture through; refunds never needed headroom.
    await ledger.set_account_limit(capped, None)
    await ledger.post(capture(merchant, 1000))
    assert await account_balance(wide_engine, capped.code) == -(room_for + 1) * 1000
