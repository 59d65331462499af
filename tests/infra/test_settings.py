"""Settings refuse what would only fail later, at start and naming the setting, never the value."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from settings import Settings

SERVICE_URLS = [
    "crm_webhook_url",
    "salesforce_base_url",
    "hubspot_base_url",
    "acquirer_url",
    "fraud_sidecar_url",
]


@pytest.mark.parametrize("name", SERVICE_URLS)
@pytest.mark.parametrize(
    "value", ["htp://user:s3cret@crm.example/hook", "crm.example/hook", "https://", "s3cret"]
)
def test_a_malformed_service_url_is_refused_at_start_naming_the_setting_not_the_value(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Not refused, each call of its step would fail and be retried for as long as the step's
    policy allows (a CRM notification: for days) before anyone saw why."""
    monkeypatch.setenv(f"PAYSAGA_{name.upper()}", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    [error] = refused.value.errors()
    assert error["loc"] == (name,) and "http:// or https:// URL" in error["msg"]
    assert "s3cret" not in str(refused.value)


@pytest.mark.parametrize("name", SERVICE_URLS)
def test_a_service_url_is_kept_and_blank_means_unset(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(f"PAYSAGA_{name.upper()}", " https://crm.example:8443/hooks/paysaga ")
    assert getattr(Settings(), name) == "https://crm.example:8443/hooks/paysaga"
    monkeypatch.setenv(f"PAYSAGA_{name.upper()}", "")
    assert getattr(Settings(), name) is None
