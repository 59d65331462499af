"""Loading a payment: its workflow's own state while Temporal holds it, the payments register's
record once Temporal has forgotten it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from temporalio.client import WorkflowHandle
from temporalio.service import RPCError, RPCStatusCode

from domain.payment import CrmSync, PaymentRequest, PaymentState, PaymentStatus
from ledger.store import Ledger
from workflows.search_attributes import CLIENT_ID

T = TypeVar("T")
_POLL_SECONDS = 0.05
# query_state: the first attempt's deadline (each next one twice as long), and the answers
# after which it asks again.
_QUERY_ATTEMPT_SECONDS = 5.0
_ASK_AGAIN = frozenset(
    {RPCStatusCode.CANCELLED, RPCStatusCode.DEADLINE_EXCEEDED, RPCStatusCode.RESOURCE_EXHAUSTED}
)
_ASK_AGAIN_FIRST_PAUSE = 0.05
_ASK_AGAIN_MAX_PAUSE = 0.5


async def query_state(handle: WorkflowHandle[Any, Any], timeout: float) -> PaymentState:
    """The payment workflow's state (`ask_state`)."""
    return await ask_state(handle, PaymentState, timeout)


async def ask_state(handle: WorkflowHandle[Any, Any], result_type: type[T], timeout: float) -> T:
    """A workflow's `state` query (a payment's or a subscription's), asked for up to `timeout`
    seconds; past it the RPCError says why (the caller answers that it is unavailable for now).

    Asked in attempts of _QUERY_ATTEMPT_SECONDS, each next one twice as long: a query can be
    lost in Temporal while the workflow itself is well (buffered behind a workflow task that
    then failed — a burst of refund Updates met the SDK's speculative-task race, TMPRL1100
    followed by a retried task — and never answered), and a query asked again reaches the
    workflow's next task; a query held behind a long task (answered after its heartbeat, at 8 s)
    still gets its turn in a longer attempt. A query only reads, so asking again is always safe.
    A busy workflow's RESOURCE_EXHAUSTED (too many queries buffered behind a task) is asked again
    the same way. Without a worker polling every attempt times out (CANCELLED: the client's own
    deadline)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pause = _ASK_AGAIN_FIRST_PAUSE
    patience = _QUERY_ATTEMPT_SECONDS
    while True:
        attempt = min(deadline - loop.time(), patience)
        patience *= 2
        try:
            state: T = await handle.query(
                "state",
                result_type=result_type,
                rpc_timeout=timedelta(seconds=max(attempt, _ASK_AGAIN_FIRST_PAUSE)),
            )
            return state
        except RPCError as exc:
            if exc.status not in _ASK_AGAIN or loop.time() + pause >= deadline:
                raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, _ASK_AGAIN_MAX_PAUSE)


async def held_for(handle: WorkflowHandle[Any, Any], client_id: str) -> bool:
    """Temporal holds this workflow (a payment's or a subscription's) for `client_id`: its
    search attributes, set at its start, say whose it is without a worker answering."""
    try:
        described = await handle.describe()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return False  # removed meanwhile
    return described.typed_search_attributes.get(CLIENT_ID) == client_id


async def recorded_state(
    ledger: Ledger, payment_id: str, body: PaymentRequest | None = None
) -> PaymentState | None:
    """The payment as the payments register knows it once Temporal has forgotten it: the
    workflow's last word (its recorded summary), with the amounts the ledger's postings left.

    Without a summary (the workflow was removed before it ended), the register row alone still
    says what the ledger moved; with the original request `body` (an idempotent replay, whose
    fingerprint matched) that is enough to describe the payment."""
    row = await ledger.payment(payment_id)
    if row is None:
        return None
    if row.summary is not None:
        state = PaymentState.model_validate(row.summary)
    elif body is not None:
        state = PaymentState(
            id=payment_id,
            client_id=row.client_id,
            request=body,
            fingerprint=body.fingerprint(),
            status=row.status,
            created_at=row.created_at,
            updated_at=row.updated_at,
            ledger_posted=row.captured > 0,
            waiting_for="an operator: the payment's workflow was removed before it ended "
            "(docs/runbook.md, a payment removed from Temporal)",
        )
    else:
        return None
    return state.model_copy(
        update={
            "captured": row.captured,
            "refunded": row.refunded,
            "disputed": row.disputed,
            "dispute_lost": row.dispute_lost,
        }
    )


async def wait_until(
    handle: WorkflowHandle[Any, Any],
    seconds: float,
    done: Callable[[PaymentState], bool],
    query_timeout: float = 10.0,
) -> PaymentState | None:
    """Poll the workflow's query until `done(state)` or the deadline. Queries are cheap and need
    no history event, unlike an update or a signal."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    state: PaymentState | None = None
    while True:
        try:
            state = await query_state(handle, query_timeout)
            if done(state):
                return state
        except RPCError:
            pass  # not picked up by a worker yet
        if loop.time() >= deadline:
            return state
        await asyncio.sleep(_POLL_SECONDS)


def settled_for_wait(state: PaymentState) -> bool:
    """The caller can act on the answer; a succeeded payment also waits (within `wait`) for
    its CRM step, the saga's last, so the answer says whether the CRM was told."""
    if state.status == PaymentStatus.SUCCEEDED and state.crm_sync == CrmSync.PENDING:
        return False
    return state.status.settled_for_wait
