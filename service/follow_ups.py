"""Asking a payment for a follow-up (refund, dispute, its close, cancel, capture, void) through
an Update of its workflow.

The workflow answers: its validator refuses what it cannot honour (nothing is written to its
history; the reason comes back as `FollowUpRefused`), and the Update's result is the outcome
(the refund once the ledger posted or refused it). `wait` bounds how long the caller waits for
that outcome; past it the answer is `ACCEPTED`: the workflow carries the follow-up out whatever
happens (it never ends or continues as new before that).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from temporalio.client import (
    Client,
    WorkflowExecutionStatus,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
    WorkflowUpdateStage,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from domain.follow_ups import Refusal

log = logging.getLogger(__name__)

# A payment handing its history over to a fresh run refuses follow-ups for a moment ("busy"):
# asked again, for at least this long.
_BUSY_PATIENCE_SECONDS = 10.0
_BUSY_PAUSE_SECONDS = 0.2
# How long `wait=0` still listens for the workflow's refusal, which comes back at once.
_REFUSAL_SECONDS = 0.05
# Temporal refuses an Update for now when ten are already in flight on the payment
# (RESOURCE_EXHAUSTED, once the SDK's own retries gave up), and aborts one whose workflow task
# it lost (CANCELLED, UNAVAILABLE): the Update may or may not have reached the workflow. Asked
# again with the same id it is the same Update (accepted once, its result shared), so it is
# asked again within the patience; past it the client gets 503 payment_unavailable (retry).
_ASK_AGAIN = frozenset(
    {RPCStatusCode.RESOURCE_EXHAUSTED, RPCStatusCode.CANCELLED, RPCStatusCode.UNAVAILABLE}
)

# Temporal itself rejects an Update that a workflow task completed without processing (failure
# type "UnprocessedUpdate"; seen under a burst of twenty refunds on one payment, when the SDK's
# speculative task for it raced another). Nothing was applied: it is asked again like a busy
# one, and past the patience the client gets 503 payment_busy, never the 409 of a refusal.
_UNPROCESSED_UPDATE = "UnprocessedUpdate"


def unprocessed(cause: BaseException | None) -> bool:
    """Temporal rejected the Update without the workflow seeing it: nothing was applied."""
    return isinstance(cause, ApplicationError) and cause.type == _UNPROCESSED_UPDATE


class Accepted:
    """The follow-up was accepted but not carried out within `wait`."""


ACCEPTED = Accepted()


class PaymentBusy(Exception):
    """Temporal did not accept the Update in time (it bounds the Updates in flight per
    workflow): asking again with the same follow-up id is safe."""


class PaymentClosed(Exception):
    """The payment's workflow is no longer running: its dispute window has closed."""


class FollowUpRefused(Exception):
    """The workflow refused the follow-up; `code` is its reason (None: not one of ours)."""

    def __init__(self, code: Refusal | None, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def follow_up_id(prefix: str, payment_id: str, key: str) -> str:
    """A follow-up's id from the caller's key: the same key is the same follow-up."""
    digest = hashlib.sha256(f"{payment_id}:{key}".encode()).hexdigest()
    return f"{prefix}_{digest[:24]}"


async def ask_payment(
    temporal: Client, payment_id: str, update: Any, arg: Any, update_id: str, wait: float
) -> Any:
    """Send the follow-up Update; its result once carried out within `wait`, else ACCEPTED.
    Raises FollowUpRefused with the workflow's reason, PaymentClosed or PaymentBusy."""
    handle = temporal.get_workflow_handle(payment_id)
    loop = asyncio.get_running_loop()
    patience = loop.time() + max(wait, _BUSY_PATIENCE_SECONDS)
    while True:
        try:
            asked = await handle.start_update(
                update, arg, id=update_id, wait_for_stage=WorkflowUpdateStage.ACCEPTED
            )
        except WorkflowUpdateRPCTimeoutOrCancelledError:
            raise PaymentBusy(payment_id) from None
        except RPCError as exc:
            if exc.status in _ASK_AGAIN and loop.time() < patience:
                await asyncio.sleep(_BUSY_PAUSE_SECONDS)
                continue
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            # Completed (its window closed), or continued as new under the request.
            if await _is_running(handle) and loop.time() < patience:
                await asyncio.sleep(_BUSY_PAUSE_SECONDS)
                continue
            raise PaymentClosed(payment_id) from None
        try:
            # A refusal comes back at once, as an Update completed with a failure.
            return await asyncio.wait_for(asked.result(), timeout=max(wait, _REFUSAL_SECONDS))
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            # Accepted, still under way. (temporalio turns the poll's cancellation by wait_for
            # into its own error.)
            return ACCEPTED
        except RPCError as exc:
            if exc.status in _ASK_AGAIN and loop.time() < patience:
                await asyncio.sleep(_BUSY_PAUSE_SECONDS)
                continue
            raise
        except WorkflowUpdateFailedError as exc:
            refused = exc.cause
            busy = isinstance(refused, ApplicationError) and refused.type == Refusal.BUSY
            if (busy or unprocessed(refused)) and loop.time() < patience:
                await asyncio.sleep(_BUSY_PAUSE_SECONDS)
                continue
            if unprocessed(refused):
                raise PaymentBusy(payment_id) from None
            raise _refusal(refused) from None


def _refusal(cause: BaseException) -> FollowUpRefused:
    known = {r.value for r in Refusal}
    if not isinstance(cause, ApplicationError) or cause.type not in known:
        log.warning(
            "follow-up failed with no refusal of ours: %s: %s (type %s)",
            type(cause).__name__,
            cause,
            getattr(cause, "type", None),
        )
        return FollowUpRefused(None, "The payment refused it.")
    return FollowUpRefused(Refusal(str(cause.type)), cause.message)


async def _is_running(handle: WorkflowHandle[Any, Any]) -> bool:
    try:
        return (await handle.describe()).status == WorkflowExecutionStatus.RUNNING
    except RPCError:
        return False
