"""Temporal's promise: each payment's workflow status agrees with its ledger state (or, once
Temporal forgot the workflow, the outcome recorded in the register does)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from checker.ledger import (
    CAPTURED,
    IN_FLIGHT,
    PaymentLedger,
    payment_status,
    recorded_amounts,
    recorded_status,
)
from checker.report import WORKFLOW_AGREES, CheckResult, CheckScope, Findings
from domain.payment import PaymentStatus
from workflows import search_attributes as sa

_VISIBILITY_PAGE = 1000
_IDS_PER_QUERY = 100
_DESCRIBE_CONCURRENCY = 16


@dataclass(frozen=True)
class WorkflowView:
    payment_id: str
    execution_status: WorkflowExecutionStatus | None
    payment_status: str | None
    amount: int | None
    start_time: datetime | None

    @property
    def running(self) -> bool:
        return self.execution_status == WorkflowExecutionStatus.RUNNING


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _visibility_queries(scope: CheckScope) -> list[str]:
    base = f"WorkflowType = {_quote('PaymentWorkflow')}"
    if scope.since is not None:
        base += f" AND StartTime >= {_quote(scope.since.astimezone(UTC).isoformat())}"
    if scope.payment_ids is None:
        return [base]
    ids = sorted(scope.payment_ids)
    return [
        f"{base} AND WorkflowId IN ({', '.join(_quote(i) for i in ids[s : s + _IDS_PER_QUERY])})"
        for s in range(0, len(ids), _IDS_PER_QUERY)
    ]


def _view(
    payment_id: str,
    status: WorkflowExecutionStatus | None,
    attributes: Any,
    start_time: datetime | None,
) -> WorkflowView:
    return WorkflowView(
        payment_id=payment_id,
        execution_status=status,
        payment_status=attributes.get(sa.PAYMENT_STATUS),
        amount=attributes.get(sa.AMOUNT_MINOR),
        start_time=start_time,
    )


def _newer(candidate: WorkflowView, current: WorkflowView | None) -> bool:
    """A workflow id has one run per continue-as-new: the running (else latest) one speaks."""
    if current is None or (candidate.running and not current.running):
        return True
    if current.running and not candidate.running:
        return False
    started = candidate.start_time or datetime.min.replace(tzinfo=UTC)
    return started > (current.start_time or datetime.min.replace(tzinfo=UTC))


async def visible_workflows(client: Client, scope: CheckScope) -> dict[str, WorkflowView]:
    views: dict[str, WorkflowView] = {}
    for query in _visibility_queries(scope):
        async for execution in client.list_workflows(query, page_size=_VISIBILITY_PAGE):
            view = _view(
                execution.id,
                execution.status,
                execution.typed_search_attributes,
                execution.start_time,
            )
            if _newer(view, views.get(view.payment_id)):
                views[view.payment_id] = view
    return views


async def describe_workflows(client: Client, ids: Iterable[str]) -> dict[str, WorkflowView]:
    """Targeted look-ups for payments the listing's time filter could not see."""
    limit = asyncio.Semaphore(_DESCRIBE_CONCURRENCY)

    async def describe(payment_id: str) -> WorkflowView | None:
        async with limit:
            try:
                described = await client.get_workflow_handle(payment_id).describe()
            except RPCError as exc:
                if exc.status == RPCStatusCode.NOT_FOUND:
                    return None
                raise
        return _view(
            payment_id, described.status, described.typed_search_attributes, described.start_time
        )

    found = await asyncio.gather(*(describe(i) for i in ids))
    return {view.payment_id: view for view in found if view is not None}


def check_workflows_agree(
    payments: Sequence[PaymentLedger], workflows: Mapping[str, WorkflowView], max_examples: int
) -> CheckResult:
    findings = Findings(WORKFLOW_AGREES, max_examples)
    by_id = {p.payment_id: p for p in payments}
    in_flight = terminated = recorded_only = attention = 0
    for payment_id in sorted(set(by_id) | set(workflows)):
        findings.checked(1)
        verdict = _judge(by_id.get(payment_id), workflows.get(payment_id))
        if verdict is _IN_FLIGHT:
            in_flight += 1
        elif verdict is _TERMINATED:
            terminated += 1
        elif verdict is _RECORDED_ONLY:
            recorded_only += 1
        elif verdict is _NEEDS_ATTENTION:
            attention += 1
        elif isinstance(verdict, str):
            findings.violation(payment_id, verdict)
    if in_flight:
        findings.note(f"{in_flight} payment(s) in flight, not judged (re-run when quiet)")
    if recorded_only:
        findings.note(f"{recorded_only} payment(s) judged by their recorded outcome (history gone)")
    if terminated:
        findings.note(f"{terminated} workflow(s) terminated before capture by an operator")
    if attention:
        findings.note(
            f"{attention} payment(s) require attention: a compensation could not complete; "
            'an operator resolves it (docs/runbook.md, PaymentStatus="requires_attention")'
        )
    return findings.result


class _Verdict:
    def __init__(self, name: str) -> None:
        self.name = name


_IN_FLIGHT, _TERMINATED, _RECORDED_ONLY, _NEEDS_ATTENTION, _AGREES = (
    _Verdict("in flight"),
    _Verdict("terminated"),
    _Verdict("recorded only"),
    _Verdict("requires attention"),
    _Verdict("agrees"),
)


def _judge(p: PaymentLedger | None, wf: WorkflowView | None) -> _Verdict | str:
    """`_Verdict` when fine (or not judged), else what disagrees."""
    if wf is None:
        assert p is not None
        return _judge_by_recorded_outcome(p)
    status = payment_status(wf.payment_status)
    if status is None:
        return f"workflow has no valid PaymentStatus search attribute ({wf.payment_status!r})"
    closed = f"closed ({_execution(wf)})" if not wf.running else "running"
    if p is None:
        if wf.running and status not in CAPTURED:
            return _IN_FLIGHT  # not captured yet, or recording its outcome
        if wf.running or wf.execution_status != WorkflowExecutionStatus.TERMINATED:
            return f"workflow {closed} says {status} but the ledger has no record of the payment"
        return _TERMINATED if status not in CAPTURED else f"workflow {closed} says {status}"
    if wf.running and status in IN_FLIGHT:
        return _IN_FLIGHT
    if wf.running and status == PaymentStatus.REQUIRES_ATTENTION:
        # Waiting for an operator, by design and in plain sight: reported, not a violation.
        return _NEEDS_ATTENTION
    agreeing = p.workflow_statuses_that_agree()
    if status not in agreeing:
        implied = " or ".join(sorted(agreeing)) or "nothing"
        return (
            f"workflow {closed} says {status}; the ledger ({p.moved}, {p.postings} posting(s), "
            f"{p.reversals} reversal(s)) implies {implied}"
        )
    # A partial approval at the acquirer captures less than the payment asked, never more.
    if p.register is not None and wf.amount is not None and wf.amount < p.register.amount:
        return f"workflow amount {wf.amount} but the register has {p.register.amount}"
    if (
        not wf.running
        and wf.execution_status != WorkflowExecutionStatus.TERMINATED
        and (p.register is None or recorded_status(p.register) is None)
    ):
        return f"workflow {closed} but its outcome was never recorded in the register"
    return _AGREES


def _judge_by_recorded_outcome(p: PaymentLedger) -> _Verdict | str:
    """Temporal no longer (or never) knew the workflow: the register's recorded outcome — the
    workflow's last state, written when it ended — must agree with the ledger instead."""
    reg = p.register
    recorded = recorded_status(reg) if reg is not None else None
    if reg is None or recorded is None:
        return (
            "the ledger has this payment but Temporal knows no workflow and no outcome was recorded"
        )
    status = payment_status(recorded)
    if status is None or status not in p.workflow_statuses_that_agree():
        return f"recorded outcome {recorded} disagrees with the ledger ({p.moved})"
    amounts = recorded_amounts(reg)
    if amounts is not None and amounts != p.moved:
        return f"recorded outcome has {amounts}; the ledger moved {p.moved}"
    return _RECORDED_ONLY


def _execution(wf: WorkflowView) -> str:
    return wf.execution_status.name.lower() if wf.execution_status is not None else "unknown"
