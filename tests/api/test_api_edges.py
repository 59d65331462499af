"""The API's edges: Stripe-style errors, API-key auth with scopes, and the body size limit.

A small FastAPI app is assembled here from the real pieces (`domain.payment.PaymentRequest`,
`api.errors`, `api.auth`, `api.limits`) and driven in-process over ASGI; no stack needed.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Header, Query

from api.app import create_app
from api.auth import ApiClient, client_for_key, generate_api_key, require_scope
from api.errors import ApiError, error_responses, install_error_handlers
from api.limits import install_body_limit
from domain.payment import PaymentRequest
from infra.database import TooMuchContention
from settings import DEFAULT_SCOPES, ApiKey, Settings

WRITE_KEY = generate_api_key()
READ_KEY = generate_api_key()
ADMIN_KEY = generate_api_key()
MAX_BODY = 64 * 1024
PAN = "4242424242424242"  # Luhn-valid test card number
PAN_DIGITS = (PAN, "5555555555554444")


def _settings(api_key_file: Path | None = None) -> Settings:
    return Settings(
        api_keys=[
            ApiKey(
                client_id="writer",
                key_sha256=ApiKey.hash(WRITE_KEY),
                scopes=["payments:write", "payments:read"],
            ),
            ApiKey(client_id="reader", key_sha256=ApiKey.hash(READ_KEY), scopes=["payments:read"]),
            ApiKey(client_id="ops", key_sha256=ApiKey.hash(ADMIN_KEY), scopes=["admin"]),
        ],
        api_key_file=api_key_file,
        max_body_bytes=MAX_BODY,
    )


def build_app(settings: Settings) -> FastAPI:
    app = FastAPI()
    app.state.settings = settings
    install_error_handlers(app)
    install_body_limit(app, settings.max_body_bytes)

    @app.post(
        "/v1/payments", status_code=201, responses=error_responses(400, 401, 403, 409, 413, 422)
    )
    async def create_payment(
        body: PaymentRequest,
        client: Annotated[ApiClient, Depends(require_scope("payments:write"))],
        idempotency_key: Annotated[
            str, Header(alias="Idempotency-Key", pattern=r"^[A-Za-z0-9_\-:.]{8,255}$")
        ],
        wait: Annotated[float, Query(ge=0, le=30)] = 0.0,
    ) -> dict[str, Any]:
        if idempotency_key == "reused-key-1":
            raise ApiError(
                409,
                "idempotency_error",
                "idempotency_key_in_use",
                "Keys can only be reused with the same parameters.",
                param="Idempotency-Key",
            )
        return {"client_id": client.client_id, "amount": body.amount, "wait": wait}

    @app.get("/v1/payments/{payment_id}", responses=error_responses(401, 403, 404))
    async def get_payment(
        payment_id: str,
        client: Annotated[ApiClient, Depends(require_scope("payments:read"))],
    ) -> dict[str, str]:
        return {"id": payment_id, "client_id": client.client_id}

    @app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError(f"db password hunter2 while charging {PAN}")

    @app.get("/v1/contended")
    async def contended() -> None:
        raise TooMuchContention("ledger transaction still conflicting after 8 attempts")

    return app


@pytest.fixture
def app() -> FastAPI:
    return build_app(_settings())


@pytest.fixture
async def api(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    # raise_app_exceptions=False: Starlette re-raises after answering a 500; we check the answer.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://paysaga.test") as client:
        yield client


def _payment(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "amount": 1999,
        "currency": "USD",
        "customer_id": "cus_123",
        "merchant_id": "acct_1",
        "payment_method": "pm_card_visa_1234",
        "metadata": {"order": "o-1"},
    }
    body.update(changes)
    return body


def _headers(key: str = WRITE_KEY, idempotency_key: str | None = "idem-key-0001") -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if idempotency_key is not None:
        headers["Idempotency-Key"] = idempotency_key
    return headers


def _error(response: httpx.Response) -> dict[str, Any]:
    """The body must be exactly the Stripe shape; returns its `error` object."""
    payload = response.json()
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"type", "code", "message", "param"}
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


async def _post(api: httpx.AsyncClient, body: Any, **kwargs: Any) -> httpx.Response:
    headers = kwargs.pop("headers", _headers())
    return await api.post("/v1/payments", json=body, headers=headers, **kwargs)


# --- Happy paths ------------------------------------------------------------------------


async def test_valid_payment_with_write_key_is_accepted(api: httpx.AsyncClient) -> None:
    response = await _post(api, _payment(), params={"wait": "2.5"})
    assert response.status_code == 201, response.text
    assert response.json() == {"client_id": "writer", "amount": 1999, "wait": 2.5}


async def test_read_key_can_read(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/payments/pay_1", headers=_headers(READ_KEY))
    assert response.status_code == 200
    assert response.json() == {"id": "pay_1", "client_id": "reader"}


async def test_admin_scope_covers_every_scope(api: httpx.AsyncClient) -> None:
    response = await _post(api, _payment(), headers=_headers(ADMIN_KEY))
    assert response.status_code == 201
    assert response.json()["client_id"] == "ops"


async def test_body_exactly_at_the_limit_is_accepted(api: httpx.AsyncClient) -> None:
    raw = json.dumps(_payment()).encode()
    raw += b" " * (MAX_BODY - len(raw))  # trailing whitespace is valid JSON
    assert len(raw) == MAX_BODY
    headers = {**_headers(), "Content-Type": "application/json"}
    response = await api.post("/v1/payments", content=raw, headers=headers)
    assert response.status_code == 201, response.text


# --- Field validation: status, code, param ---------------------------------------------

FIELD_CASES = [
    pytest.param({"amount": 0}, "amount_too_small", "amount", id="amount-zero"),
    pytest.param({"amount": -1}, "amount_too_small", "amount", id="amount-negative"),
    pytest.param({"amount": 2**63}, "amount_too_large", "amount", id="amount-over-int64"),
    pytest.param({"amount": 10**12}, "amount_too_large", "amount", id="amount-over-usd-limit"),
    pytest.param({"amount": "100"}, "parameter_invalid_integer", "amount", id="amount-string"),
    pytest.param({"amount": 1.5}, "parameter_invalid_integer", "amount", id="amount-float"),
    pytest.param({"amount": True}, "parameter_invalid_integer", "amount", id="amount-bool"),
    pytest.param({"currency": "XXX"}, "currency_unsupported", "currency", id="currency-unknown"),
    pytest.param({"currency": "usd"}, "currency_unsupported", "currency", id="currency-lower"),
    pytest.param({"currency": 840}, "parameter_invalid_string", "currency", id="currency-number"),
    pytest.param({"customer_id": None}, "parameter_invalid_string", "customer_id", id="null-id"),
    pytest.param({"surprise": 1}, "parameter_unknown", "surprise", id="unknown-field"),
    pytest.param(
        {"description": "x" * 501}, "parameter_too_long", "description", id="description-long"
    ),
    pytest.param(
        {"description": "ok\x07bell"}, "control_characters", "description", id="control-char"
    ),
    pytest.param(
        {"metadata": {f"k{i}": "v" for i in range(21)}},
        "metadata_too_large",
        "metadata",
        id="metadata-21-keys",
    ),
    pytest.param(
        {"metadata": {"note": "n" * 501}}, "parameter_too_long", "metadata[note]", id="meta-long"
    ),
    pytest.param(
        {"metadata": {"bad key!": "v"}}, "parameter_invalid_format", "metadata[*]", id="meta-key"
    ),
    pytest.param(
        {"metadata": {"n": 5}}, "parameter_invalid_string", "metadata[n]", id="meta-value-type"
    ),
    pytest.param({"metadata": []}, "parameter_invalid_type", "metadata", id="metadata-not-object"),
    pytest.param(
        {"customer_id": "has space"},
        "parameter_invalid_format",
        "customer_id",
        id="customer-id-format",
    ),
    pytest.param({"customer_id": ""}, "parameter_too_short", "customer_id", id="empty-id"),
    pytest.param(
        {"payment_method": "tok_visa"},
        "parameter_too_short",
        "payment_method",
        id="payment-method-short",
    ),
]


@pytest.mark.parametrize(("change", "code", "param"), FIELD_CASES)
async def test_invalid_field_is_named_in_the_error(
    api: httpx.AsyncClient, change: dict[str, Any], code: str, param: str
) -> None:
    response = await _post(api, _payment(**change))
    assert response.status_code == 422, response.text
    error = _error(response)
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", code, param)


async def test_missing_field_is_parameter_missing(api: httpx.AsyncClient) -> None:
    body = _payment()
    del body["customer_id"]
    error = _error(response := await _post(api, body))
    assert response.status_code == 422
    assert (error["code"], error["param"]) == ("parameter_missing", "customer_id")


async def test_messages_never_echo_the_submitted_value(api: httpx.AsyncClient) -> None:
    secretish = "Zq9-not-a-currency"
    for change in (
        {"currency": secretish},
        {"customer_id": secretish + " !"},
        {"amount": secretish},
        {"description": secretish + "\x01"},
        {"metadata": {"k": secretish * 40}},
    ):
        response = await _post(api, _payment(**change))
        assert response.status_code == 422
        assert secretish not in response.text, change


async def test_amount_limit_message_states_the_limit(api: httpx.AsyncClient) -> None:
    error = _error(await _post(api, _payment(amount=10**12, currency="JPY")))
    assert "150000000" in error["message"] and "JPY" in error["message"]


# --- Card numbers -----------------------------------------------------------------------

PAN_CASES = [
    pytest.param({"payment_method": PAN}, "payment_method", id="pan-as-payment-method"),
    pytest.param({"description": "card 4242 4242 4242 4242 pls"}, "description", id="spaces"),
    pytest.param({"description": "4242-4242-4242-4242"}, "description", id="dashes"),
    pytest.param({"description": "ref 12 5555 5555 5555 4444"}, "description", id="after-number"),
    pytest.param({"metadata": {"card": "5555-5555-5555-4444"}}, "metadata[card]", id="meta-value"),
    pytest.param({"metadata": {PAN: "v"}}, "metadata[*]", id="pan-as-metadata-key"),
    pytest.param({PAN: 1}, "*", id="pan-as-field-name"),
]


@pytest.mark.parametrize(("change", "param"), PAN_CASES)
async def test_card_numbers_are_refused_and_never_echoed(
    api: httpx.AsyncClient, change: dict[str, Any], param: str
) -> None:
    response = await _post(api, _payment(**change))
    assert response.status_code == 422, response.text
    error = _error(response)
    assert (error["code"], error["param"]) == ("card_data_not_allowed", param)
    text = response.text.replace(" ", "").replace("-", "")
    assert not any(pan in text for pan in PAN_DIGITS)
    assert "4242" not in response.text and "4444" not in response.text


# --- Body shape, JSON, nesting, size ----------------------------------------------------


@pytest.mark.parametrize(
    "raw", [b'{"amount": 1999,', b"{'amount': 1}", b"\xff\xfe{", b"NaN-ish"], ids=str
)
async def test_malformed_json_is_invalid_json(api: httpx.AsyncClient, raw: bytes) -> None:
    headers = {**_headers(), "Content-Type": "application/json"}
    response = await api.post("/v1/payments", content=raw, headers=headers)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_json",
        None,
    )


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b"[1, 2]", "application/json"),
        (b'"a string"', "application/json"),
        (b"null", "application/json"),
        (b"", "application/json"),
        (b"amount=1999", "application/x-www-form-urlencoded"),
        (json.dumps(_payment()).encode(), "text/plain"),
    ],
    ids=["array", "string", "null", "empty", "form", "text-plain"],
)
async def test_body_that_is_not_a_json_object(
    api: httpx.AsyncClient, raw: bytes, content_type: str
) -> None:
    headers = {**_headers(), "Content-Type": content_type}
    response = await api.post("/v1/payments", content=raw, headers=headers)
    assert response.status_code == 400, response.text
    assert _error(response)["code"] == "invalid_request_body"


# Every depth around the interpreter's recursion limit (1000): some bodies are too deep for
# json.loads, some parse but are too deep for the recursive card-number scan, depending on
# how deep the stack already is. Each kind must be a client error, never a 500.
NESTING_DEPTHS = [1, 50, 600, *range(850, 1_001), 1_200, 5_000, 30_000]


@pytest.mark.parametrize("where", ["body", "description", "metadata"])
async def test_deeply_nested_json_is_a_client_error(api: httpx.AsyncClient, where: str) -> None:
    headers = {**_headers(), "Content-Type": "application/json"}
    for depth in NESTING_DEPTHS:
        nested = "[" * depth + "]" * depth
        raw = {
            "body": nested,
            "description": json.dumps(_payment())[:-1] + f', "description": {nested}}}',
            "metadata": json.dumps(_payment())[:-1] + f', "extra": {{"a": {nested}}}}}',
        }[where]
        response = await api.post("/v1/payments", content=raw.encode(), headers=headers)
        assert 400 <= response.status_code < 500, (depth, response.text)
        assert _error(response)["type"] == "invalid_request_error"


async def test_oversized_body_with_content_length_is_413(api: httpx.AsyncClient) -> None:
    body = _payment(description="x" * 400, metadata={f"k{i}": "v" * 500 for i in range(200)})
    response = await _post(api, body)
    assert response.status_code == 413
    error = _error(response)
    assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")


async def test_oversized_chunked_body_is_413(app: FastAPI, api: httpx.AsyncClient) -> None:
    chunks_sent = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal chunks_sent
        for _ in range(1_000):  # 8 MB if it were all read
            chunks_sent += 1
            yield b" " * 8192

    headers = {**_headers(), "Content-Type": "application/json"}
    response = await api.post("/v1/payments", content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert _error(response)["code"] == "request_too_large"
    # Refused as soon as the count passed the limit, not after reading everything.
    assert chunks_sent <= MAX_BODY // 8192 + 2


async def test_small_chunked_body_is_accepted(api: httpx.AsyncClient) -> None:
    raw = json.dumps(_payment()).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 7):
            yield raw[i : i + 7]

    headers = {**_headers(), "Content-Type": "application/json"}
    response = await api.post("/v1/payments", content=chunks(), headers=headers)
    assert response.status_code == 201, response.text


# --- Headers and query ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("idempotency_key", "code"),
    [
        (None, "parameter_missing"),
        ("short", "parameter_invalid_format"),
        ("has spaces in it", "parameter_invalid_format"),
        ("k" * 256, "parameter_invalid_format"),
    ],
    ids=["missing", "short", "spaces", "long"],
)
async def test_bad_idempotency_key_names_the_header(
    api: httpx.AsyncClient, idempotency_key: str | None, code: str
) -> None:
    response = await _post(api, _payment(), headers=_headers(idempotency_key=idempotency_key))
    assert response.status_code in (400, 422)
    error = _error(response)
    assert (error["code"], error["param"]) == (code, "Idempotency-Key")


@pytest.mark.parametrize(
    ("wait", "code"),
    [
        ("31", "parameter_out_of_range"),
        ("-1", "parameter_out_of_range"),
        ("nan", "parameter_out_of_range"),
        ("soon", "parameter_invalid_type"),
    ],
)
async def test_bad_wait_names_the_query_parameter(
    api: httpx.AsyncClient, wait: str, code: str
) -> None:
    response = await _post(api, _payment(), params={"wait": wait})
    assert response.status_code == 422
    error = _error(response)
    assert (error["code"], error["param"]) == (code, "wait")
    assert "soon" not in error["message"]


async def test_api_error_from_a_route_keeps_its_type(api: httpx.AsyncClient) -> None:
    response = await _post(api, _payment(), headers=_headers(idempotency_key="reused-key-1"))
    assert response.status_code == 409
    error = _error(response)
    assert (error["type"], error["code"], error["param"]) == (
        "idempotency_error",
        "idempotency_key_in_use",
        "Idempotency-Key",
    )


# --- Authentication and scopes ----------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "api_key_missing"),
        ("", "api_key_missing"),
        ("Bearer", "api_key_invalid"),
        (f"Basic {WRITE_KEY}", "api_key_invalid"),
        ("Bearer psk_wrongwrongwrongwrongwrongwrongwrongwrong", "api_key_invalid"),
        (f"Bearer {WRITE_KEY}x", "api_key_invalid"),
        (f"Bearer {ApiKey.hash(WRITE_KEY)}", "api_key_invalid"),  # the hash is not the key
        ("Bearer " + "k" * 5000, "api_key_invalid"),
    ],
    ids=["absent", "empty", "no-key", "basic", "wrong", "suffix", "hash", "huge"],
)
async def test_unauthenticated_requests_are_401(
    api: httpx.AsyncClient, authorization: str | None, code: str
) -> None:
    headers = {"Idempotency-Key": "idem-key-0001"}
    if authorization is not None:
        headers["Authorization"] = authorization
    response = await _post(api, _payment(), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = _error(response)
    assert (error["type"], error["code"]) == ("authentication_error", code)
    assert WRITE_KEY not in response.text and "wrongwrong" not in response.text


async def test_authentication_comes_before_validation(api: httpx.AsyncClient) -> None:
    # Unauthenticated callers learn nothing about what the endpoint would accept.
    response = await _post(api, {"amount": "x"}, headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401


async def test_read_only_key_cannot_write(api: httpx.AsyncClient) -> None:
    response = await _post(api, _payment(), headers=_headers(READ_KEY))
    assert response.status_code == 403
    error = _error(response)
    assert (error["type"], error["code"]) == ("permission_error", "insufficient_scope")
    assert "payments:write" in error["message"] and READ_KEY not in response.text


async def test_dev_key_file_authenticates(tmp_path: Path) -> None:
    dev_key = generate_api_key()
    (tmp_path / "api_key").write_text(dev_key + "\n")
    app = build_app(_settings(api_key_file=tmp_path / "api_key"))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://paysaga.test"
    ) as client:
        response = await client.get("/v1/payments/p", headers=_headers(dev_key))
    assert response.json() == {"id": "p", "client_id": "dev"}


async def test_a_new_dev_key_file_replaces_the_old_key_at_once(tmp_path: Path) -> None:
    """The file is read again only when it changes (it is consulted on every request), and a
    change is seen by the next request: the old key stops working, a removed file admits none."""
    key_file = tmp_path / "api_key"
    old_key, new_key = generate_api_key(), generate_api_key()
    key_file.write_text(old_key + "\n")
    app = build_app(_settings(api_key_file=key_file))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://paysaga.test"
    ) as client:

        async def status_with(key: str) -> int:
            return (await client.get("/v1/payments/p", headers=_headers(key))).status_code

        assert await status_with(old_key) == 200
        key_file.write_text(new_key + "\n")
        assert (await status_with(old_key), await status_with(new_key)) == (401, 200)
        key_file.unlink()
        assert (await status_with(old_key), await status_with(new_key)) == (401, 401)


# --- Least privilege -----------------------------------------------------------------------


def _real_app(settings: Settings) -> httpx.AsyncClient:
    """paysaga's own app (api.app.create_app), lifespan not run: authorization happens before
    any route touches Temporal or the database, so no stack is needed to test it."""
    app = create_app(settings, temporal=None)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://paysaga.test")


def test_a_key_configured_without_scopes_reads_and_writes_payments_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    configured = json.dumps([{"client_id": "shop", "key_sha256": ApiKey.hash(WRITE_KEY)}])
    monkeypatch.setenv("PAYSAGA_API_KEYS", configured)
    [key] = Settings().api_keys
    assert key.scopes == ["payments:read", "payments:write"]
    assert ApiKey(client_id="shop", key_sha256="x").scopes == list(DEFAULT_SCOPES)


async def test_without_scopes_a_key_cannot_refund_dispute_or_decrypt() -> None:
    settings = Settings(
        api_keys=[ApiKey(client_id="shop", key_sha256=ApiKey.hash(WRITE_KEY))],
        encryption_keys=[],
        api_metrics_port=0,
    )
    payment = "/v1/payments/pay_0123456789abcdef01234567"
    refused = {
        "refunds:write": ("POST", f"{payment}/refunds", {"amount": 1}),
        "disputes:write": (
            "POST",
            f"{payment}/disputes",
            {"reason_code": "fraud", "network_reference": "NW-1"},
        ),
        "codec": ("POST", "/codec/decode", {"payloads": []}),
    }
    async with _real_app(settings) as client:
        for scope, (method, path, body) in refused.items():
            response = await client.request(
                method,
                path,
                json=body,
                headers={**_headers(WRITE_KEY), "Idempotency-Key": "refund-0001"},
            )
            assert response.status_code == 403, (scope, response.text)
            assert _error(response)["code"] == "insufficient_scope"
            assert scope in _error(response)["message"]


def test_the_dev_key_names_every_scope_the_readme_uses_but_not_admin(tmp_path: Path) -> None:
    (tmp_path / "dev-api-key").write_text(generate_api_key() + "\n")
    [dev] = Settings(api_key_file=tmp_path / "dev-api-key").all_api_keys()
    assert dev.client_id == "dev"
    assert set(dev.scopes) == {
        "payments:read",
        "payments:write",
        "refunds:write",
        "disputes:write",
        "events:read",
        "webhooks:read",
        "webhooks:write",
        "codec",
        # The README's finance routine (`paysaga recon …`, the exception queue's API).
        "reconciliation:read",
        "reconciliation:write",
    }


async def test_the_docs_pages_can_be_turned_off_and_the_contract_stays() -> None:
    on = Settings(api_metrics_port=0)
    off = Settings(api_metrics_port=0, api_docs_enabled=False)
    async with _real_app(on) as client:
        assert (await client.get("/docs")).status_code == 200
        assert (await client.get("/redoc")).status_code == 200
    async with _real_app(off) as client:
        for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            response = await client.get(page)
            assert response.status_code == 404, page
            assert _error(response)["code"] == "resource_missing"
        contract = await client.get("/openapi.json")
        assert contract.status_code == 200
        assert "/v1/payments" in contract.json()["paths"]
        # Metrics are never a route of the public app, docs or not.
        assert (await client.get("/metrics")).status_code == 404


def test_every_configured_hash_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: the first client's key costs as many comparisons as an unknown key."""
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = _settings().api_keys
    assert client_for_key(WRITE_KEY, keys) == ApiClient(
        "writer", frozenset({"payments:write", "payments:read"})
    )
    assert len(calls) == len(keys)
    calls.clear()
    assert client_for_key("psk_unknown", keys) is None
    assert len(calls) == len(keys)


def test_generated_keys_are_long_and_distinct() -> None:
    keys = {generate_api_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(k.startswith("psk_") and len(k) >= 40 for k in keys)


async def test_missing_settings_fail_closed() -> None:
    app = build_app(_settings())
    del app.state.settings
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://paysaga.test") as client:
        response = await client.get("/v1/payments/p", headers=_headers(READ_KEY))
    assert response.status_code == 500
    assert _error(response)["type"] == "api_error"


# --- Routing and unexpected failures ----------------------------------------------------


async def test_unknown_route_is_resource_missing(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/nothing/here", headers=_headers())
    assert response.status_code == 404
    error = _error(response)
    assert (error["type"], error["code"]) == ("invalid_request_error", "resource_missing")


async def test_wrong_method_is_method_not_allowed(api: httpx.AsyncClient) -> None:
    response = await api.delete("/v1/payments", headers=_headers())
    assert response.status_code == 405
    assert _error(response)["code"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]


@pytest.fixture
def captured_errors(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.ERROR, logger="api.errors"):
        yield caplog


async def test_unexpected_exception_is_a_generic_500(
    api: httpx.AsyncClient, captured_errors: pytest.LogCaptureFixture
) -> None:
    response = await api.get("/v1/boom")
    assert response.status_code == 500
    error = _error(response)
    assert (error["type"], error["code"], error["param"]) == ("api_error", "api_error", None)
    assert "hunter2" not in response.text and PAN not in response.text
    assert "RuntimeError" not in response.text
    assert any(r.exc_info for r in captured_errors.records), "the failure must be logged"


async def test_a_transaction_that_kept_conflicting_is_a_503_to_retry(
    api: httpx.AsyncClient,
) -> None:
    """Found by the simulation under load: 25 payments at once on a busy box exhausted the
    idempotency register's serialization retries, and the API answered 500."""
    response = await api.get("/v1/contended")
    assert response.status_code == 503
    assert _error(response)["code"] == "database_busy"
    assert response.headers["Retry-After"] == "1"
    assert "conflicting" not in response.text


def test_openapi_documents_error_bodies_and_bearer_auth(app: FastAPI) -> None:
    schema = app.openapi()
    assert "ErrorResponse" in schema["components"]["schemas"]
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "Send `Authorization: Bearer <API key>`.",
    }
    post = schema["paths"]["/v1/payments"]["post"]
    for status in ("400", "401", "403", "409", "413", "422"):
        ref = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
