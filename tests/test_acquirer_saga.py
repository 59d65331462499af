"""The saga through the acquirer (issue 15): the session's sandbox acquirer, started by the same
`Stack` as `make run`, behind a worker of this module's own that the stack's settings point at it.

Each path is driven by a test payment method of the sandbox (docs/acquirer.md) and checked
where it matters: the payment's state, the sandbox's own record of our reference (its request
log says how many times each instruction really ran), the ledger and the events."""

from __future__ import annotations

import uuid

import httpx
import pytest
from pydantic import SecretStr

from activities.acquirer import HttpAcquirer
from domain.acquirer import AuthorizationRequest, AuthorizationState
from infra.stack import Stack


async def test_the_stack_starts_the_sandbox_acquirer_and_points_the_services_at_it(
    stack: Stack,
) -> None:
    settings = stack.service_settings()
    assert stack.acquirer_sandbox_url is not None
    assert settings.acquirer_url == stack.acquirer_sandbox_url
    key = settings.acquirer_api_key.get_secret_value()
    # A key of its own, kept under the home, never the documented public test key.
    assert key.startswith("sk_test_") and key != "sk_test_paysaga_sandbox"
    assert stack.service_env()["PAYSAGA_ACQUIRER_URL"] == stack.acquirer_sandbox_url
    async with httpx.AsyncClient() as http:
        health = await http.get(f"{stack.acquirer_sandbox_url}/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
    # The key the services got is the one the sandbox accepts, and only it.
    acquirer = HttpAcquirer.from_settings(settings)
    reference = f"pay_{uuid.uuid4().hex[:24]}"
    try:
        result = await acquirer.authorize(
            AuthorizationRequest(
                reference=reference, amount=1234, currency="USD", payment_method="pm_card_visa"
            )
        )
        assert result.approved and result.authorized_amount == 1234
        record = await acquirer.status(reference)
        assert record is not None and record.state is AuthorizationState.AUTHORIZED
    finally:
        await acquirer.aclose()
    stranger = HttpAcquirer(settings.acquirer_url or "", SecretStr("sk_test_paysaga_sandbox"))
    try:
        with pytest.raises(Exception, match="401"):
            await stranger.status(reference)
    finally:
        await stranger.aclose()
