"""Runs a script against the real system and judges the end: every story concurrently, each
step a real request (the API over ASGI, or Temporal for what operators do: review decisions and
the UI's cancel), then the oracle, the ledger, the payments register and `paysaga check`."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from temporalio.client import Client
from temporalio.service import RPCError

from checker.report import CheckScope
from checker.runner import run_checks
from domain.cards import contains_card_number
from domain.payment import ReviewDecision
from settings import Settings
from tests.simulation.oracle import (
    MOVING_STATUSES,
    UNCAPTURED_STATUSES,
    FinalView,
    Holds,
    Money,
    PaymentSeen,
    RenewalMoney,
    SubscriptionSeen,
    subscription_verdict,
    verdict,
)
from tests.simulation.script import (
    SHORT_DUNNING_SECONDS,
    Op,
    Script,
    Story,
    SubscriptionStory,
    is_card_number,
)
from workflows.payment import PaymentWorkflow

# 503s the API promises to answer while a backing service is away; a client retries them with
# the same key. Anything else 5xx is a broken promise.
RETRYABLE_CODES = frozenset(
    {"payment_busy", "database_busy", "database_unavailable", "payment_unavailable"}
)
# Refusals a follow-up may meet in some interleaving (the request itself is well-formed).
REFUND_REFUSALS = frozenset(
    {
        "amount_too_large",
        "charge_already_refunded",
        "payment_not_captured",
        "payment_closed",
        "idempotency_key_reused",
        "refund_failed",
    }
)
DISPUTE_REFUSALS = frozenset(
    {"amount_too_large", "charge_already_refunded", "payment_not_captured", "payment_closed",
     "dispute_failed"}
)  # fmt: skip
CLOSE_REFUSALS = frozenset(
    {"dispute_closed", "dispute_close_failed", "dispute_failed", "payment_closed"}
)
CANCEL_REFUSALS = frozenset({"payment_not_cancelable"})
# A capture or void the payment's state refuses (not requires_capture, being captured or voided,
# over the authorization): always 409, with a code.
CAPTURE_STATUSES = frozenset({200, 202})


@dataclass
class SimRig:
    """What a simulation drives: two API clients of one API client id (the default policy, and
    a short one: a window of seconds and a review timeout of seconds), Temporal for operators,
    the ledger's database, and the settings `paysaga check` runs with."""

    api: httpx.AsyncClient
    short_api: httpx.AsyncClient
    temporal: Client
    engine: AsyncEngine
    settings: Settings
    # How long a request keeps being retried through 503s and dropped connections.
    retry_seconds: float = 30.0
    settle_seconds: float = 60.0
    # Through the sandbox acquirer (issue 15): the default policy, and a short authorization
    # expiry. None: the rig has no acquirer and scripts make no acquirer stories.
    acquirer_api: httpx.AsyncClient | None = None
    acquirer_short_api: httpx.AsyncClient | None = None


def follow_up_id(prefix: str, payment_id: str, key: str) -> str:
    """The API's refund/dispute id for a key (service/follow_ups.py::follow_up_id), so a refusal can
    be looked for in the payment's final record."""
    return f"{prefix}_{hashlib.sha256(f'{payment_id}:{key}'.encode()).hexdigest()[:24]}"


def error_code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else None


@dataclass
class Simulation:
    rig: SimRig
    script: Script
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    seen: dict[str, PaymentSeen] = field(default_factory=dict)
    subscriptions: dict[str, SubscriptionSeen] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    requests: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)  # "201", "409 payment_closed", …
    # How the subscriptions ended: "canceled", "active", …, and "paid periods" / "declines".
    subscription_ends: Counter[str] = field(default_factory=Counter)

    # ── requests ─────────────────────────────────────────────────────────────────────────
    async def send(
        self, what: str, call: Callable[[], Awaitable[httpx.Response]]
    ) -> httpx.Response | None:
        """One request, retried as a client would (same key) through 503s and dropped
        connections; any other 5xx, or a 4xx without the structured error, is a problem."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.rig.retry_seconds
        while True:
            self.requests += 1
            try:
                response = await call()
            except httpx.TransportError as exc:
                self.answers["no answer"] += 1
                if loop.time() > deadline:
                    self.problems.append(f"{what}: no answer ({exc!r})")
                    return None
                await asyncio.sleep(0.5)
                continue
            code = error_code(response)
            self.answers[f"{response.status_code} {code or ''}".strip()] += 1
            if response.status_code == 503 and code in RETRYABLE_CODES:
                if loop.time() > deadline:
                    self.problems.append(f"{what}: still 503 {code} after retrying")
                    return None
                await asyncio.sleep(0.5)
                continue
            if response.status_code >= 500:
                self.problems.append(f"{what}: {response.status_code} {response.text[:300]}")
                return None
            if response.status_code >= 400 and code is None:
                self.problems.append(f"{what}: unstructured {response.status_code}")
            return response

    def unexpected(self, what: str, response: httpx.Response, key: str = "") -> None:
        sent = f" (key {key!r})" if key else ""
        self.problems.append(
            f"{what}{sent}: unexpected {response.status_code} {response.text[:300]}"
        )

    # ── the run ──────────────────────────────────────────────────────────────────────────
    async def run(self) -> None:
        await asyncio.gather(
            *(self.play(story) for story in self.script.stories),
            *(self.play_subscription(story) for story in self.script.subscriptions),
        )

    def api_for(self, story: Story) -> httpx.AsyncClient:
        if story.acquirer:
            api = self.rig.acquirer_short_api if story.short_policy else self.rig.acquirer_api
            assert api is not None, "an acquirer story on a rig without an acquirer"
            return api
        return self.rig.short_api if story.short_policy else self.rig.api

    async def play(self, story: Story) -> None:
        await asyncio.sleep(story.start_after)
        api = self.api_for(story)
        key = f"sim-{self.script.seed}-{self.nonce}-{story.index}"
        body = {
            "amount": story.amount,
            "currency": "USD",
            "customer_id": f"cus_sim_{self.nonce}_{story.index}",
            "merchant_id": f"mer_sim_{self.nonce}_{story.index}",
            "payment_method": story.payment_method,
            "description": f"simulation {self.script.seed} story {story.index} ({story.kind})",
        }
        if story.manual:
            body["capture_method"] = "manual"
        quick = story.kind in ("cancel_race", "operator_cancel")
        what = f"story {story.index} ({story.kind}) create"
        created = await self.send(
            what,
            lambda: api.post(
                "/v1/payments",
                json=body,
                headers={"Idempotency-Key": key},
                params={"wait": 0 if quick else 10},
            ),
        )
        if created is None:
            return
        if created.status_code != 201:
            self.unexpected(what, created)
            return
        payment = created.json()
        seen = PaymentSeen(
            payment["id"],
            story.amount,
            story.kind,
            capture_amount=story.capture_amount if story.acquirer else None,
            acquirer=story.acquirer,
        )
        self.seen[seen.payment_id] = seen
        seen.saw_status(payment["status"])
        if story.kind in ("review_approve", "review_decline"):
            await self.wait_for_status(api, seen, {"requires_review"})
        if story.manual and story.kind != "manual_expiry":
            # A client captures or voids once the payment is authorized: `wait` may answer
            # before (a worker or the database away), and a capture then is rightly refused.
            stops = {"requires_capture", "requires_attention", *UNCAPTURED_STATUSES}
            await self.wait_for_status(api, seen, stops, timeout=self.rig.retry_seconds)
        disputes: dict[int, str] = {}
        groups: list[list[tuple[int, Op]]] = []
        for index, op in enumerate(story.ops):
            if op.together and groups:
                groups[-1].append((index, op))
            else:
                groups.append([(index, op)])
        for group in groups:
            await asyncio.sleep(group[0][1].after)
            await asyncio.gather(
                *(self.step(api, story, seen, index, op, disputes) for index, op in group)
            )

    async def wait_for_status(
        self, api: httpx.AsyncClient, seen: PaymentSeen, statuses: set[str], timeout: float = 30
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            got = await self.send("get", lambda: api.get(f"/v1/payments/{seen.payment_id}"))
            if got is not None and got.status_code == 200:
                seen.saw_status(got.json()["status"])
                if got.json()["status"] in statuses:
                    return
            await asyncio.sleep(0.1)

    async def step(
        self,
        api: httpx.AsyncClient,
        story: Story,
        seen: PaymentSeen,
        index: int,
        op: Op,
        disputes: dict[int, str],
    ) -> None:
        pid = seen.payment_id
        what = f"story {story.index} ({story.kind}) op {index} {op.kind}"
        # A key may read as a card number by the documented rules (domain/cards.py: digits glued
        # to a letter count, so `k2-985151620978` is one); a key that is a Luhn-valid
        # 13–19-digit number as a whole must be refused, and nothing else may be.
        card = op.digits and is_card_number(op.key)
        may_be_card = card or contains_card_number(op.key)
        if op.kind == "refund":
            refund_body = {} if op.amount is None else {"amount": op.amount}
            # An over-amount refund of a manual-capture payment not seen captured yet: if the
            # payment is still `requires_capture` (neither capture nor cancel has taken effect)
            # it is refunded whole, by its void, and any other amount is `400 amount_invalid`
            # (tests/workflows/test_acquirer_saga.py asserts it). Nowhere else.
            uncaptured_over = (
                story.manual
                and op.amount is not None
                and op.amount > story.amount
                and "succeeded" not in seen.statuses
            )
            got = await self.send(
                what,
                lambda: api.post(
                    f"/v1/payments/{pid}/refunds",
                    json=refund_body,
                    headers={"Idempotency-Key": op.key},
                    params={"wait": 5},
                ),
            )
            if got is None:
                return
            code = error_code(got)
            refund_id = follow_up_id("re", pid, op.key)
            if got.status_code == 201 and not card:
                seen.refund_answer(got.json())
            elif got.status_code in (400, 422) and code == "card_data_not_allowed" and may_be_card:
                pass
            elif got.status_code == 400 and code == "amount_invalid" and uncaptured_over:
                seen.refused_refund_ids.add(refund_id)
            elif got.status_code in (400, 409) and code in REFUND_REFUSALS:
                if code == "refund_failed":
                    seen.refund_answer({"id": refund_id, "amount": op.amount, "status": "failed"})
                elif code != "idempotency_key_reused":
                    seen.refused_refund_ids.add(refund_id)
            else:
                self.unexpected(what, got, op.key)
        elif op.kind == "dispute":
            dispute_body: dict[str, Any] = {
                "reason_code": "fraudulent",
                "network_reference": op.key,
            }
            if op.amount is not None:
                dispute_body["amount"] = op.amount
            got = await self.send(
                what,
                lambda: api.post(
                    f"/v1/payments/{pid}/disputes", json=dispute_body, params={"wait": 5}
                ),
            )
            if got is None:
                return
            code = error_code(got)
            if got.status_code == 201 and not card:
                seen.dispute_answer(got.json())
                disputes[index] = got.json()["id"]
            elif (
                got.status_code in (400, 422) and code == "card_data_not_allowed" and may_be_card
            ) or (got.status_code in (400, 409) and code in DISPUTE_REFUSALS):
                pass
            else:
                self.unexpected(what, got, op.key)
        elif op.kind == "close":
            dispute_id = disputes.get(op.target)
            if dispute_id is None:
                return
            got = await self.send(
                what,
                lambda: api.post(
                    f"/v1/payments/{pid}/disputes/{dispute_id}/close",
                    json={"outcome": op.outcome},
                    params={"wait": 5},
                ),
            )
            if got is None:
                return
            if got.status_code == 200:
                seen.dispute_answer(got.json())
            elif got.status_code != 409 or error_code(got) not in CLOSE_REFUSALS:
                self.unexpected(what, got)
        elif op.kind == "cancel":
            got = await self.send(
                what, lambda: api.post(f"/v1/payments/{pid}/cancel", params={"wait": 5})
            )
            if got is None:
                return
            if got.status_code == 200:
                seen.saw_status(got.json()["status"])
                seen.canceled_by_api = seen.canceled_by_api or got.json()["status"] == "canceled"
            elif got.status_code == 202:
                seen.saw_status(got.json()["status"])
            elif got.status_code != 409 or error_code(got) not in CANCEL_REFUSALS:
                self.unexpected(what, got)
        elif op.kind in ("capture", "void"):
            capture_body = {} if op.amount is None else {"amount_to_capture": op.amount}
            got = await self.send(
                what,
                lambda: api.post(f"/v1/payments/{pid}/{op.kind}", json=capture_body,
                                 params={"wait": 5}),
            )  # fmt: skip
            if got is None:
                return
            if got.status_code in CAPTURE_STATUSES:
                seen.saw_status(got.json()["status"])
                if op.kind == "void" and got.status_code == 200:
                    seen.canceled_by_api = got.json()["status"] == "canceled"
            elif got.status_code != 409 or error_code(got) is None:
                self.unexpected(what, got)
        elif op.kind in ("approve", "decline", "operator_cancel"):
            handle = self.rig.temporal.get_workflow_handle(pid)
            try:
                if op.kind == "operator_cancel":
                    await handle.cancel()
                else:
                    signal = (
                        PaymentWorkflow.approve if op.kind == "approve" else PaymentWorkflow.decline
                    )
                    await handle.signal(signal, ReviewDecision(reviewer="simulation"))
            except RPCError:
                pass  # the payment has already ended: nothing to decide or cancel
        elif op.kind == "get":
            got = await self.send(what, lambda: api.get(f"/v1/payments/{pid}"))
            if got is not None and got.status_code == 200:
                seen.saw_status(got.json()["status"])
            elif got is not None:
                self.unexpected(what, got)
        elif op.kind == "list":
            got = await self.send(
                what,
                lambda: api.get(
                    "/v1/payments", params={"customer_id": f"cus_sim_{self.nonce}_{story.index}"}
                ),
            )
            if got is not None and got.status_code != 200:
                self.unexpected(what, got)

    # ── subscriptions (issue 17) ─────────────────────────────────────────────────────────
    async def play_subscription(self, story: SubscriptionStory) -> None:
        """Through the acquirer's short-policy API: renewals through the sandbox acquirer, a
        declined one retried within seconds (SHORT_DUNNING_SECONDS)."""
        await asyncio.sleep(story.start_after)
        api = self.rig.acquirer_short_api
        assert api is not None, "subscription stories need the acquirer"
        key = f"sim-sub-{self.script.seed}-{self.nonce}-{story.index}"
        body = {
            "customer_id": f"cus_simsub_{self.nonce}_{story.index}",
            "merchant_id": f"mer_simsub_{self.nonce}_{story.index}",
            "payment_method": story.payment_method,
            "unit_amount": story.unit_amount,
            "currency": "USD",
            "quantity": story.quantity,
            "interval": "month",
            "trial_days": story.trial_days,
        }
        what = f"subscription {story.index} ({story.kind})"
        created = await self.send(
            f"{what} create",
            lambda: api.post("/v1/subscriptions", json=body, headers={"Idempotency-Key": key}),
        )
        if created is None:
            return
        if created.status_code != 201:
            self.unexpected(f"{what} create", created)
            return
        sub_id = created.json()["id"]
        seen = SubscriptionSeen(sub_id, story.kind, retries=len(SHORT_DUNNING_SECONDS))
        self.subscriptions[sub_id] = seen
        groups: list[list[tuple[int, Op]]] = []
        for index, op in enumerate(story.ops):
            if op.together and groups:
                groups[-1].append((index, op))
            else:
                groups.append([(index, op)])
        for group in groups:
            await asyncio.sleep(group[0][1].after)
            await asyncio.gather(
                *(self.subscription_step(api, seen, f"{what} op {i} {op.kind}", op)
                  for i, op in group)
            )  # fmt: skip

    async def subscription_step(
        self, api: httpx.AsyncClient, seen: SubscriptionSeen, what: str, op: Op
    ) -> None:
        url = f"/v1/subscriptions/{seen.subscription_id}"
        requests: dict[str, tuple[str, dict[str, Any]]] = {
            "price": (f"{url}/price", {"unit_amount": op.amount}),
            "pause": (f"{url}/pause", {}),
            "resume": (f"{url}/resume", {}),
            "cancel_end": (f"{url}/cancel", {"at_period_end": True}),
            "cancel_now": (f"{url}/cancel", {}),
            "method": (f"{url}/payment_method", {"payment_method": "pm_card_visa"}),
        }
        if op.kind == "sub_get":
            got = await self.send(what, lambda: api.get(url))
            if got is not None and got.status_code != 200:
                self.unexpected(what, got)
            return
        path, change = requests[op.kind]
        got = await self.send(what, lambda: api.post(path, json=change))
        if got is None:
            return
        if got.status_code == 200:
            seen.accepted.append(op.kind)
        elif got.status_code != 409 or error_code(got) is None:
            self.unexpected(what, got)

    async def settle_subscriptions(self) -> dict[str, dict[str, Any] | None]:
        """Each subscription's final answer once no renewal of it is being charged or dunned."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.rig.settle_seconds
        finals: dict[str, dict[str, Any] | None] = {}
        for sub_id, seen in self.subscriptions.items():
            finals[sub_id] = await self._final_answer(
                f"/v1/subscriptions/{sub_id}",
                deadline,
                _subscription_under_way,
                f"{sub_id} ({seen.story})",
                _status,
            )
        return finals

    async def renewal_money(self, renewals: list[str]) -> dict[str, RenewalMoney]:
        async with self.rig.engine.connect() as conn:
            captured = {
                r.payment_id: int(r.captured)
                for r in await conn.execute(
                    text("SELECT payment_id, captured FROM payments WHERE payment_id = ANY(:ids)"),
                    {"ids": renewals},
                )
            }
            nets = await _customer_nets(conn, renewals)
        return {pid: RenewalMoney(captured.get(pid, 0), nets.get(pid, 0)) for pid in renewals}

    # ── the end ──────────────────────────────────────────────────────────────────────────
    async def settle(self) -> dict[str, dict[str, Any] | None]:
        """Each payment's final answer, once nothing it accepted is still under way."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.rig.settle_seconds
        finals: dict[str, dict[str, Any] | None] = {}
        for pid in self.seen:
            finals[pid] = await self._final_answer(
                f"/v1/payments/{pid}",
                deadline,
                _under_way,
                f"{pid} ({self.seen[pid].story})",
                _brief,
            )
        return finals

    async def _final_answer(
        self,
        url: str,
        deadline: float,
        under_way: Callable[[dict[str, Any]], bool],
        name: str,
        brief: Callable[[dict[str, Any] | None], str],
    ) -> dict[str, Any] | None:
        """The answer at `url` once it is no longer under way; past the deadline, the last
        answer (None if there was none) and a problem that names it."""
        loop = asyncio.get_running_loop()
        while True:
            got = await self.send("final get", lambda: self.rig.api.get(url))
            final: dict[str, Any] | None = (
                got.json() if got is not None and got.status_code == 200 else None
            )
            if final is not None and not under_way(final):
                return final
            if loop.time() > deadline:
                self.problems.append(f"{name}: still under way after settling: {brief(final)}")
                return final
            await asyncio.sleep(0.2)

    async def ledger_views(self, finals: dict[str, dict[str, Any] | None]) -> dict[str, FinalView]:
        pids = list(self.seen)
        async with self.rig.engine.connect() as conn:
            registers = {
                r.payment_id: Money(int(r.captured), int(r.refunded), int(r.dispute_lost))
                for r in await conn.execute(
                    text(
                        "SELECT payment_id, captured, refunded, dispute_lost FROM payments "
                        "WHERE payment_id = ANY(:ids)"
                    ),
                    {"ids": pids},
                )
            }
            nets = await _customer_nets(conn, pids)
            holds = {
                r.payment_id: Holds(int(r.placed), int(r.captured), int(r.voided), int(r.held))
                for r in await conn.execute(
                    text(
                        "SELECT t.payment_id, "
                        "count(DISTINCT t.id) FILTER (WHERE t.kind = 'authorization_hold') "
                        "AS placed, "
                        "count(DISTINCT t.id) FILTER (WHERE t.kind = 'hold_captured') AS captured, "
                        "count(DISTINCT t.id) FILTER (WHERE t.kind = 'hold_voided') AS voided, "
                        "coalesce(sum(e.amount) FILTER (WHERE a.type = 'authorization_hold'), 0) "
                        "AS held "
                        "FROM ledger_transactions t "
                        "JOIN ledger_entries e ON e.transaction_id = t.id "
                        "JOIN accounts a ON a.id = e.account_id "
                        "WHERE t.payment_id = ANY(:ids) GROUP BY t.payment_id"
                    ),
                    {"ids": pids},
                )
            }
        return {
            pid: FinalView(
                finals.get(pid), registers.get(pid), nets.get(pid, 0), holds.get(pid, Holds())
            )
            for pid in pids
        }

    async def judge(self) -> list[str]:
        """Every problem found, in words; empty when the run reconciles and the checker passes."""
        began = time.monotonic()
        finals = await self.settle()
        views = await self.ledger_views(finals)
        subscription_finals = await self.settle_subscriptions()
        renewals = sorted(
            {pid for f in subscription_finals.values() if f for p in f["periods"]
             for pid in p["attempts"]}
        )  # fmt: skip
        money = await self.renewal_money(renewals)
        for final in subscription_finals.values():
            if final is not None:
                self.subscription_ends[final["status"]] += 1
                periods = final["periods"]
                self.subscription_ends["paid periods"] += sum(
                    p["paid_by"] is not None for p in periods
                )
                self.subscription_ends["declined renewals"] += sum(
                    len(p["attempts"]) - (p["paid_by"] is not None) for p in periods
                )
        self.timings["settle"] = time.monotonic() - began
        self.timings["renewals"] = len(renewals)
        found = [*self.problems]
        for pid, problems in verdict(self.seen, views).items():
            story = self.seen[pid].story
            found.extend(f"{pid} ({story}): {p}" for p in problems)
        for sub_id, problems in subscription_verdict(
            self.subscriptions, subscription_finals, money
        ).items():
            story = self.subscriptions[sub_id].story
            found.extend(f"{sub_id} ({story}): {p}" for p in problems)
        report = await run_checks(
            self.rig.settings,
            scope=CheckScope(payment_ids=frozenset(self.seen) | frozenset(renewals)),
            engine=self.rig.engine,
            temporal=self.rig.temporal,
            settle_seconds=30,
            kafka_timeout_seconds=30,
        )
        self.timings["check"] = report.elapsed_seconds
        self.timings["check_attempts"] = report.attempts
        for result in report.results:
            if not result.passed:
                found.append(
                    f"paysaga check: {result.name} failed: {result.error or ''} "
                    f"{[v.model_dump() for v in result.examples]}"
                )
        return found

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for story in self.script.stories:
            counts[story.kind] = counts.get(story.kind, 0) + 1
        for sub in self.script.subscriptions:
            counts[sub.kind] = counts.get(sub.kind, 0) + 1
        return (
            f"seed {self.script.seed}: {len(self.script.stories)} payments, "
            f"{len(self.script.subscriptions)} subscriptions {counts}, "
            f"{sum(len(s.ops) for s in self.script.stories)} follow-ups, {self.requests} requests, "
            f"subscriptions ended {dict(sorted(self.subscription_ends.items()))}, "
            f"timings {self.timings}, answers {dict(sorted(self.answers.items()))}"
        )


async def _customer_nets(conn: AsyncConnection, ids: list[str]) -> dict[str, int]:
    """What each payment's ledger transactions moved on its customer's account, all told
    (absent: a payment with no entry there)."""
    rows = await conn.execute(
        text(
            "SELECT t.payment_id, sum(e.amount) AS net FROM ledger_transactions t "
            "JOIN ledger_entries e ON e.transaction_id = t.id "
            "JOIN accounts a ON a.id = e.account_id "
            "WHERE t.payment_id = ANY(:ids) AND a.code LIKE 'customer:%' "
            "GROUP BY t.payment_id"
        ),
        {"ids": ids},
    )
    return {r.payment_id: int(r.net) for r in rows}


def _status(subscription: dict[str, Any] | None) -> str:
    return f"{subscription and subscription['status']}"


def _brief(payment: dict[str, Any] | None) -> str:
    if payment is None:
        return "no answer"
    keys = ("status", "crm_sync", "waiting_for", "amount_captured", "amount_refunded")
    follow_ups = [(r["id"], r["status"]) for r in payment["refunds"] + payment["disputes"]]
    return f"{ {k: payment[k] for k in keys} } follow-ups {follow_ups}"


def _subscription_under_way(subscription: dict[str, Any]) -> bool:
    """Dunning still retrying, a renewal due and not started yet (its workflow on its way to
    the boundary: a subscription without a trial sends `subscription.created` first), or a
    charge started and not yet answered."""
    if subscription["status"] == "past_due":
        return True
    due = subscription["next_renewal_at"]
    renewing = subscription["status"] in ("active", "trialing") and due is not None
    if renewing and datetime.fromisoformat(due) <= datetime.now(UTC):
        return True
    return any(p["status"] == "pending" and p["attempts"] for p in subscription["periods"])


def _under_way(payment: dict[str, Any]) -> bool:
    if payment["status"] in MOVING_STATUSES or payment["status"] == "requires_capture":
        return True  # (a manual capture's story captures, voids or lets it expire in seconds)
    if payment["status"] == "succeeded" and payment["crm_sync"] == "pending":
        return True
    return any(r["status"] == "pending" for r in payment["refunds"]) or any(
        d["status"] == "pending" for d in payment["disputes"]
    )
