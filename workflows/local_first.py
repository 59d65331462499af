"""Remote calls on the payment's forward path that nothing can interrupt (the acquirer's
capture, the CRM's notice of a confirmed payment) try once as a local activity before the
regular one.

A regular activity costs the Temporal server an activity task and the workflow another workflow
task; measured with `paysaga bench` (README Performance), the remote calls as regular
activities made about half of the server's CPU per payment. Most calls succeed at once, so the
first attempt runs in the workflow task like the other forward steps; only what it does not
settle goes on as the regular activity with its long retry policy, as before:

- a refusal (a non-retryable failure) is the call's outcome, as it would have been;
- anything else that may have reached the service goes to the caller's own handling of an
  unknown outcome (the acquirer: its status of our reference, never a blind second send; the
  CRM: the same notification under the same idempotency key, which it deduplicates).

While a local activity runs, the workflow task stays open: signals, Updates and queries wait
for it. That is why the acquirer's *authorization* stays a regular activity: a cancel sent
while the acquirer decides must reach the payment before it posts anything (the capture and
the CRM notice run after the point where a cancel is refused anyway: the payment is posting).

Payments whose history was written before this keep their regular activities (PATCH_LOCAL_FIRST,
decided at the start of new payments' runs); a payment whose policy has local activities off
keeps them too.
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from domain.errors import NON_RETRYABLE
    from domain.payment import PaymentPolicy

PATCH_LOCAL_FIRST = "remote-calls-try-a-local-activity-first"

# One attempt: a retry belongs on the server (the regular activity), not in the workflow task.
ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)


def tries_locally_first(policy: PaymentPolicy, decided: bool | None) -> bool:
    """`decided`: the answer new payments gave at their start (PATCH_DECIDED_AT_START in
    workflows/payment.py: never ask a patch right after a local activity returns); None for
    payments recorded before, which ask it where the first such call is made."""
    if not policy.local_activities:
        return False
    if decided is not None:
        return decided
    return workflow.patched(PATCH_LOCAL_FIRST)


def failure_type(error: BaseException) -> str | None:
    """The ApplicationError type of a failed activity, local (raised as is) or regular (the
    ActivityError's cause); None for a timeout or anything else."""
    cause = error.__cause__ if isinstance(error, ActivityError) else error
    return cause.type if isinstance(cause, ApplicationError) else None


def refused(error: FailureError) -> bool:
    """A failure the regular activity would not retry either: the call's final outcome."""
    cause = error.__cause__ if isinstance(error, ActivityError) else error
    return isinstance(cause, ApplicationError) and (
        cause.non_retryable or cause.type in NON_RETRYABLE
    )
