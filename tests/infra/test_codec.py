"""Temporal payload encryption: AES-GCM with key ids, rotation, tamper-evidence, a real payment
whose history holds no customer data in clear, and the codec endpoint the Temporal UI calls."""

from __future__ import annotations

import base64
import json
import stat
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.message import Message
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client

from activities.crm import sign_webhook, verify_webhook
from api.app import create_app
from domain.payment import PaymentRequest
from infra.codec import (
    ENCODING,
    KEY_ID_METADATA,
    EncryptionCodec,
    InvalidEncryptionKeyError,
    PayloadDecryptionError,
    UnknownEncryptionKeyError,
    generate_key,
    load_or_create_dev_key,
)
from infra.embedded.stack import Stack
from infra.temporal_client import connect_client, data_converter
from settings import ApiKey, EncryptionKey, Settings
from tests.conftest import READONLY_API_KEY, TEST_API_KEY, WEBHOOK_SECRET
from tests.helpers.api_client import api_client
from tests.helpers.paths import REPO
from tests.helpers.saga import create_payment, payment_body, wait_for_payment
from worker import payment_worker

OLD_KEY = generate_key()
NEW_KEY = generate_key()
CODEC_ONLY_KEY = "psk_test_codec_only_0123456789abcdefghij"
ADMIN_KEY = "psk_test_codec_admin_0123456789abcdefghi"
UI_ORIGIN = "http://127.0.0.1:8233"
OTHER_ORIGIN = "http://evil.example"


def _key(key_id: str, key_b64: str) -> EncryptionKey:
    return EncryptionKey(key_id=key_id, key_b64=SecretStr(key_b64))


def _codec(*keys: tuple[str, str]) -> EncryptionCodec:
    return EncryptionCodec.from_keys([_key(i, k) for i, k in keys])


def _json_payload(value: dict[str, Any]) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(value).encode())


def _request(**overrides: Any) -> PaymentRequest:
    return PaymentRequest.model_validate(payment_body(**overrides))


# ── the codec ────────────────────────────────────────────────────────────────────────────


async def test_payments_round_trip_through_the_encrypting_data_converter() -> None:
    settings = Settings(encryption_keys=[_key("k1", NEW_KEY)])
    converter = data_converter(settings)
    request = _request(description="Anniversary flowers for Ada Lovelace")

    [encoded] = await converter.encode([request])
    assert encoded.metadata["encoding"] == ENCODING
    assert encoded.metadata[KEY_ID_METADATA] == b"k1"
    assert b"Lovelace" not in encoded.SerializeToString()

    [decoded] = await converter.decode([encoded], [PaymentRequest])
    assert decoded == request


async def test_every_payload_gets_a_fresh_nonce() -> None:
    codec = _codec(("k1", NEW_KEY))
    payload = _json_payload({"customer_id": "cus_same"})
    first, second = await codec.encode([payload, payload])
    # Equal plaintexts must not give equal ciphertexts, or history would leak repeats.
    assert first.data[:12] != second.data[:12]
    assert first.data != second.data


async def test_rotation_decrypts_old_payloads_and_encrypts_with_the_new_key() -> None:
    before = _codec(("k1", OLD_KEY))
    after = _codec(("k2", NEW_KEY), ("k1", OLD_KEY))
    original = _json_payload({"description": "written before the rotation"})

    [sealed_by_k1] = await before.encode([original])
    assert sealed_by_k1.metadata[KEY_ID_METADATA] == b"k1"
    assert await after.decode([sealed_by_k1]) == [original]

    [sealed_by_k2] = await after.encode([original])
    assert sealed_by_k2.metadata[KEY_ID_METADATA] == b"k2"
    assert await after.decode([sealed_by_k2]) == [original]
    # A process still on the old key ring cannot read what the new key wrote.
    with pytest.raises(UnknownEncryptionKeyError):
        await before.decode([sealed_by_k2])


async def test_a_payload_naming_an_unknown_key_fails_naming_the_key_id_only() -> None:
    [sealed] = await _codec(("k-retired", OLD_KEY)).encode([_json_payload({"a": 1})])

    with pytest.raises(UnknownEncryptionKeyError) as raised:
        await _codec(("k2", NEW_KEY)).decode([sealed])

    message = str(raised.value)
    assert "'k-retired'" in message and "k2" in message
    assert raised.value.key_id == "k-retired"
    assert OLD_KEY not in message and NEW_KEY not in message


def _flip(data: bytes, index: int) -> bytes:
    index %= len(data)
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def _with_data(payload: Payload, data: bytes) -> Payload:
    return Payload(metadata=payload.metadata, data=data)


TAMPERINGS = {
    "ciphertext": lambda p: _with_data(p, _flip(p.data, 20)),
    "nonce": lambda p: _with_data(p, _flip(p.data, 0)),
    "tag": lambda p: _with_data(p, _flip(p.data, -1)),
    "truncated": lambda p: _with_data(p, p.data[:20]),
    # Another configured key's id: the right ciphertext under the wrong key must not open.
    "relabelled-key-id": lambda p: Payload(
        metadata={"encoding": ENCODING, KEY_ID_METADATA: b"k1"}, data=p.data
    ),
}


@pytest.mark.parametrize("tamper", list(TAMPERINGS.values()), ids=list(TAMPERINGS))
async def test_a_tampered_payload_is_refused(tamper: Any) -> None:
    codec = _codec(("k2", NEW_KEY), ("k1", OLD_KEY))
    [sealed] = await codec.encode([_json_payload({"amount": 4250})])
    with pytest.raises(PayloadDecryptionError):
        await codec.decode([tamper(sealed)])


async def test_payloads_written_before_encryption_stay_readable() -> None:
    plain = _json_payload({"written": "before encryption was switched on"})
    assert await _codec(("k1", NEW_KEY)).decode([plain]) == [plain]


@pytest.mark.parametrize(
    ("key_b64", "why"),
    [
        (base64.b64encode(b"x" * 16).decode(), "must be 32 bytes"),
        ("not base64 at all!", "not valid base64"),
    ],
    ids=["short", "not-base64"],
)
def test_a_malformed_key_is_refused_naming_the_key_id_not_the_key(key_b64: str, why: str) -> None:
    with pytest.raises(InvalidEncryptionKeyError) as raised:
        EncryptionCodec.from_keys([_key("k-bad", key_b64)])
    assert why in str(raised.value) and "'k-bad'" in str(raised.value)
    assert key_b64 not in str(raised.value)
    # No chained exception either: a traceback must not quote the key through its cause.
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None or raised.value.__suppress_context__


def test_a_key_id_configured_twice_is_refused() -> None:
    with pytest.raises(InvalidEncryptionKeyError, match="twice"):
        _codec(("k1", NEW_KEY), ("k1", OLD_KEY))


def test_keys_come_from_the_environment_newest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    document = [{"key_id": "k2", "key_b64": NEW_KEY}, {"key_id": "k1", "key_b64": OLD_KEY}]
    monkeypatch.setenv("PAYSAGA_ENCRYPTION_KEYS", json.dumps(document))
    codec = EncryptionCodec.from_settings(Settings())
    assert codec.encrypting_key_id == "k2" and codec.key_ids == ["k2", "k1"]
    assert NEW_KEY not in repr(codec) and NEW_KEY not in repr(Settings().encryption_keys)


def test_generated_keys_are_distinct_aes_256_keys() -> None:
    keys = {generate_key() for _ in range(20)}
    assert len(keys) == 20
    assert {len(base64.b64decode(k, validate=True)) for k in keys} == {32}


def test_the_dev_key_is_created_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "home" / "encryption.key"
    first = load_or_create_dev_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_or_create_dev_key(path)
    assert first.key_b64.get_secret_value() == again.key_b64.get_secret_value()
    EncryptionCodec.from_keys([first])


# ── a real payment: nothing readable in Temporal's history without the key ─────────────────


# What temporalio records about a local activity in its marker, besides the encrypted result.
PATCH_MARKER_FIELDS = {"id", "deprecated"}
LOCAL_ACTIVITY_MARKER_FIELDS = {
    "seq",
    "activation_index",
    "attempt",
    "activity_id",
    "activity_type",
    "complete_time",
    "backoff",
    "original_schedule_time",
}


@pytest.fixture(
    scope="module", params=[False, True], ids=["regular-activities", "local-activities"]
)
def keyed_settings(app_settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """Both modes of the forward steps: a local activity's result lands in a marker event."""
    return app_settings.model_copy(
        update={
            "local_activities": request.param,
            "task_queue": f"codec-{uuid.uuid4().hex[:8]}",
            "encryption_keys": [_key("k-new", NEW_KEY), _key("k-old", OLD_KEY)],
            "codec_cors_origins": [UI_ORIGIN],
            "api_keys": [
                *app_settings.api_keys,
                ApiKey(client_id="ops", key_sha256=ApiKey.hash(CODEC_ONLY_KEY), scopes=["codec"]),
                ApiKey(client_id="ops", key_sha256=ApiKey.hash(ADMIN_KEY), scopes=["admin"]),
            ],
        }
    )


@pytest.fixture(scope="module")
async def keyed_client(keyed_settings: Settings) -> Client:
    return await connect_client(keyed_settings)


@pytest.fixture(scope="module")
async def keyed_api(
    keyed_settings: Settings, keyed_client: Client
) -> AsyncIterator[httpx.AsyncClient]:
    async with (
        payment_worker(keyed_settings, keyed_client),
        api_client(keyed_settings, keyed_client, TEST_API_KEY) as client,
    ):
        yield client


def _is_map(field: Any) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _children(message: Message) -> Iterator[tuple[str, Message]]:
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        if _is_map(field):
            for key, item in value.items():
                if isinstance(item, Message):
                    yield f"{field.name}[{key}]", item
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield f"{field.name}[{index}]", item
        else:
            yield field.name, value


def _payloads(message: Message, path: str = "") -> Iterator[tuple[str, Payload]]:
    if isinstance(message, Payload):
        yield path, message
        return
    for name, child in _children(message):
        yield from _payloads(child, f"{path}.{name}" if path else name)


def _without_search_attributes(message: Message) -> None:
    """Search attributes are indexed by the server in clear, by design; everything else must
    be ciphertext."""
    for field, _ in message.ListFields():
        if field.name == "search_attributes":
            message.ClearField(field.name)
    for _, child in _children(message):
        _without_search_attributes(child)


async def test_customer_data_in_history_is_ciphertext_without_the_key(
    keyed_api: httpx.AsyncClient, keyed_client: Client, stack: Stack, keyed_settings: Settings
) -> None:
    marker = f"SECRETMARK{uuid.uuid4().hex[:12]}"
    customer_marker = f"CUSTMARK{uuid.uuid4().hex[:12]}"
    body = payment_body(
        customer_id=f"cus_{customer_marker}",
        description=f"Birthday present for {marker}",
        metadata={"note": marker},
    )
    created = await create_payment(keyed_api, body)
    assert created.status_code == 201, created.text
    pid = created.json()["id"]
    # Read back through the API: the encrypting client decodes state and queries fine.
    payment = await wait_for_payment(keyed_api, pid, lambda p: p["crm_sync"] == "synced")
    assert payment["status"] == "succeeded"
    assert payment["description"] == body["description"]

    keyless = await Client.connect(
        stack.temporal_address, namespace=keyed_settings.temporal_namespace
    )
    events = list((await keyless.get_workflow_handle(pid).fetch_history()).events)
    assert len(events) > 10  # the whole saga ran: activities, signals of its own, CRM

    encrypted = marker_results = 0
    for event in events:
        raw = event.SerializeToString()
        assert marker.encode() not in raw, f"event {event.event_id} holds customer data"
        stripped = HistoryEvent()
        stripped.CopyFrom(event)
        _without_search_attributes(stripped)
        assert customer_marker.encode() not in stripped.SerializeToString()
        for path, payload in _payloads(event):
            if "search_attributes" in path or "header" in path:
                continue  # indexed by the server / SDK context: never passed to codecs
            if path == "marker_recorded_event_attributes.details[data].payloads[0]":
                # A local activity's marker: the SDK's own bookkeeping, never user data (its
                # result, under details[result], goes through the codec like any other).
                assert set(json.loads(payload.data)) <= LOCAL_ACTIVITY_MARKER_FIELDS
                continue
            if path == "marker_recorded_event_attributes.details[patch-data].payloads[0]":
                # A `workflow.patched()` marker: the SDK writes the patch's id, never user data.
                assert set(json.loads(payload.data)) <= PATCH_MARKER_FIELDS
                continue
            assert payload.metadata["encoding"] == ENCODING, f"{event.event_type} {path}"
            assert payload.metadata[KEY_ID_METADATA] == b"k-new"
            encrypted += 1
            marker_results += path.startswith("marker_recorded_event_attributes.details[result]")
    assert encrypted >= 8  # workflow input, activity inputs and results, memo
    # Fraud, payments.raw, ledger, payments.confirmed, and the CRM's notice (its first attempt
    # is local too, workflows/local_first.py): each result sealed in its marker.
    assert marker_results == (5 if keyed_settings.local_activities else 0)

    # The customer id is a search attribute, searchable in clear by design (see infra/codec.py).
    started = events[0].workflow_execution_started_event_attributes
    assert customer_marker.encode() in started.search_attributes.SerializeToString()

    # With the key, the same history bytes read back as the request.
    [decoded] = await EncryptionCodec.from_settings(keyed_settings).decode(
        list(started.input.payloads)
    )
    assert marker in decoded.data.decode()

    # And the codec endpoint, as the Temporal UI calls it, decodes them too.
    response = await keyed_api.post(
        "/codec/decode",
        content=json_format.MessageToJson(started.input),
        headers={"X-Namespace": keyed_settings.temporal_namespace, **_bearer(CODEC_ONLY_KEY)},
    )
    assert response.status_code == 200, response.text
    [shown] = response.json()["payloads"]
    assert marker in base64.b64decode(shown["data"]).decode()


# ── the codec endpoint ───────────────────────────────────────────────────────────────────


def _codec_http(
    settings: Settings, *, peer: str = "127.0.0.1", headers: dict[str, str] | None = None
) -> httpx.AsyncClient:
    # No lifespan: the codec routes need only the settings (and never the Temporal client).
    app = create_app(settings, temporal=None)
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(peer, 50123)),
        base_url="http://127.0.0.1:8000",
        headers=headers or {},
    )


def _as_json(*payloads: Payload) -> str:
    return json_format.MessageToJson(Payloads(payloads=list(payloads)))


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _from_json(document: dict[str, Any]) -> list[Payload]:
    return list(json_format.ParseDict(document, Payloads()).payloads)


@pytest.mark.parametrize("key", [ADMIN_KEY, CODEC_ONLY_KEY])
async def test_the_endpoint_encodes_and_decodes_for_a_codec_scoped_key(
    keyed_settings: Settings, key: str
) -> None:
    originals = [_json_payload({"customer_id": "cus_42"}), _json_payload({"amount": 100})]
    async with _codec_http(keyed_settings, headers=_bearer(key)) as http:
        encoded = await http.post("/codec/encode", content=_as_json(*originals))
        assert encoded.status_code == 200, encoded.text
        sealed = _from_json(encoded.json())
        assert [p.metadata[KEY_ID_METADATA] for p in sealed] == [b"k-new", b"k-new"]
        assert all(b"cus_42" not in p.data for p in sealed)

        decoded = await http.post(
            "/codec/decode", content=_as_json(*sealed), headers={"X-Namespace": "default"}
        )
        assert decoded.status_code == 200, decoded.text
        assert _from_json(decoded.json()) == originals


async def test_the_endpoint_decodes_what_the_worker_encrypted_with_a_retired_key(
    keyed_settings: Settings,
) -> None:
    [sealed] = await _codec(("k-old", OLD_KEY)).encode([_json_payload({"ok": True})])
    [unknown] = await _codec(("k-gone", generate_key())).encode([_json_payload({"ok": False})])
    async with _codec_http(keyed_settings, headers=_bearer(CODEC_ONLY_KEY)) as http:
        response = await http.post("/codec/decode", content=_as_json(sealed))
        assert _from_json(response.json()) == [_json_payload({"ok": True})]

        refused = await http.post("/codec/decode", content=_as_json(unknown))
        assert refused.status_code == 400
        assert refused.json()["error"]["code"] == "unknown_encryption_key"
        assert "'k-gone'" in refused.json()["error"]["message"]


@pytest.mark.parametrize("body", [b"{not json", b'{"payloads": 7}', b"[" * 100_000, b"\xff\xfe"])
async def test_a_malformed_body_is_a_400_not_a_crash(keyed_settings: Settings, body: bytes) -> None:
    settings = keyed_settings.model_copy(update={"max_body_bytes": 1_000_000})
    async with _codec_http(settings, headers=_bearer(CODEC_ONLY_KEY)) as http:
        response = await http.post("/codec/decode", content=body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_request_body"


async def test_decoding_needs_credentials(keyed_settings: Settings) -> None:
    sealed = await _codec(("k-new", NEW_KEY)).encode([_json_payload({"a": 1})])
    async with _codec_http(keyed_settings) as http:
        # Even the UI's origin on loopback: trusting the local UI is off unless configured.
        anonymous = await http.post(
            "/codec/decode", content=_as_json(*sealed), headers={"Origin": UI_ORIGIN}
        )
        assert anonymous.status_code == 401
        assert anonymous.json()["error"]["code"] == "api_key_missing"
        # The UI can read why (CORS headers on the error too), and nothing was decrypted.
        assert anonymous.headers["access-control-allow-origin"] == UI_ORIGIN
        assert "payloads" not in anonymous.json()

        wrong = await http.post("/codec/decode", content=_as_json(*sealed), headers=_bearer("x"))
        assert wrong.status_code == 401

        reader = await http.post(
            "/codec/decode", content=_as_json(*sealed), headers=_bearer(READONLY_API_KEY)
        )
        assert reader.status_code == 403
        assert reader.json()["error"]["code"] == "insufficient_scope"

        # A key that may move money (every payment scope, named) still may not decrypt:
        # `codec` is given only by name.
        merchant = await http.post(
            "/codec/decode", content=_as_json(*sealed), headers=_bearer(TEST_API_KEY)
        )
        assert merchant.status_code == 403
        assert merchant.json()["error"]["code"] == "insufficient_scope"


async def test_a_codec_key_cannot_move_money(keyed_api: httpx.AsyncClient) -> None:
    response = await keyed_api.post(
        "/v1/payments",
        json=payment_body(),
        headers={**_bearer(CODEC_ONLY_KEY), "Idempotency-Key": f"key-{uuid.uuid4().hex}"},
    )
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"


@pytest.mark.parametrize(
    ("peer", "headers", "status"),
    [
        ("127.0.0.1", {"Origin": UI_ORIGIN}, 200),
        ("::1", {"Origin": UI_ORIGIN}, 200),
        ("127.0.0.1", {"Origin": OTHER_ORIGIN}, 401),
        ("127.0.0.1", {}, 401),
        ("203.0.113.9", {"Origin": UI_ORIGIN}, 401),
        ("127.0.0.1", {"Origin": UI_ORIGIN, "X-Forwarded-For": "203.0.113.9"}, 401),
        ("127.0.0.1", {"Origin": UI_ORIGIN, "Authorization": "Bearer wrong"}, 401),
    ],
    ids=[
        "local-ui",
        "local-ui-ipv6",
        "other-origin",
        "no-origin",
        "remote-peer",
        "via-proxy",
        "bad-key-wins",
    ],
)
async def test_the_local_ui_is_trusted_only_from_loopback_with_its_origin(
    keyed_settings: Settings, peer: str, headers: dict[str, str], status: int
) -> None:
    settings = keyed_settings.model_copy(update={"codec_trust_local_ui": True})
    sealed = await _codec(("k-new", NEW_KEY)).encode([_json_payload({"a": 1})])
    async with _codec_http(settings, peer=peer, headers=headers) as http:
        response = await http.post("/codec/decode", content=_as_json(*sealed))
    assert response.status_code == status, response.text


async def test_cors_preflight_allows_only_the_ui_origin(keyed_settings: Settings) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-namespace",
    }
    async with _codec_http(keyed_settings) as http:
        allowed = await http.options("/codec/decode", headers={**preflight, "Origin": UI_ORIGIN})
        assert allowed.status_code == 204
        assert allowed.headers["access-control-allow-origin"] == UI_ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        allowed_headers = allowed.headers["access-control-allow-headers"].lower()
        for needed in ("content-type", "x-namespace", "authorization"):
            assert needed in allowed_headers
        assert "origin" in allowed.headers["vary"].lower()

        for path in ("/codec/decode", "/codec/encode"):
            refused = await http.options(path, headers={**preflight, "Origin": OTHER_ORIGIN})
            assert refused.status_code == 403
            assert "access-control-allow-origin" not in refused.headers
            assert "access-control-allow-methods" not in refused.headers

        # An actual request from another origin is answered without CORS headers, so a
        # browser would never hand the payloads to that page.
        answered = await http.post(
            "/codec/encode",
            content=_as_json(_json_payload({"a": 1})),
            headers={"Origin": OTHER_ORIGIN, **_bearer(CODEC_ONLY_KEY)},
        )
        assert answered.status_code == 200
        assert "access-control-allow-origin" not in answered.headers


async def test_without_keys_the_endpoint_says_encryption_is_off(app_settings: Settings) -> None:
    admin = ApiKey(client_id="ops", key_sha256=ApiKey.hash(ADMIN_KEY), scopes=["admin"])
    settings = app_settings.model_copy(update={"api_keys": [*app_settings.api_keys, admin]})
    async with _codec_http(settings, headers=_bearer(ADMIN_KEY)) as http:
        response = await http.post("/codec/decode", content=_as_json())
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "codec_not_configured"


# ── docs/security.md: the webhook receiver it shows really verifies paysaga's signatures ─────


def _receiver_example(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    document = (REPO / "docs" / "security.md").read_text()
    section = document.split("## Webhook signatures", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.setenv("PAYSAGA_WEBHOOK_SECRET", WEBHOOK_SECRET)
    namespace: dict[str, Any] = {"__name__": "receiver_example"}
    exec(compile(code, "docs/security.md", "exec"), namespace)  # noqa: S102 - our own docs
    return namespace


def test_the_documented_receiver_accepts_only_fresh_genuine_signatures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    verify = _receiver_example(monkeypatch)["verify_paysaga_signature"]
    body, now = b'{"payment_id": "pay_1"}', 1_767_225_600
    header = sign_webhook(WEBHOOK_SECRET, body, now)

    assert verify(WEBHOOK_SECRET, body, header, now=now)
    assert verify(WEBHOOK_SECRET, body, header, now=now + 300)
    assert not verify(WEBHOOK_SECRET, body, header, now=now + 301)  # replayed
    assert not verify(WEBHOOK_SECRET, body, header, now=now - 301)  # from the future
    assert not verify(WEBHOOK_SECRET, body + b" ", header, now=now)  # body altered
    assert not verify("whsec_other", body, header, now=now)
    assert not verify(WEBHOOK_SECRET, body, f"t={now + 1},{header.split(',')[1]}", now=now)
    assert not verify(WEBHOOK_SECRET, body, "", now=now)
    # It agrees with paysaga's own check.
    assert verify_webhook(WEBHOOK_SECRET, body, header, now=now)


async def test_the_documented_receiver_serves_signed_webhooks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handler = _receiver_example(monkeypatch)["PaysagaWebhook"]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    body = b'{"event_kind": "confirmed", "payment_id": "pay_1", "status": "succeeded"}'
    signed = {
        "Paysaga-Signature": sign_webhook(WEBHOOK_SECRET, body, int(time.time())),
        "Idempotency-Key": str(uuid.uuid4()),
    }
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.server_port}") as http:
            assert (await http.post("/hooks", content=body, headers=signed)).status_code == 204
            forged = {**signed, "Paysaga-Signature": sign_webhook("guess", body, int(time.time()))}
            assert (await http.post("/hooks", content=body, headers=forged)).status_code == 400
            stale = sign_webhook(WEBHOOK_SECRET, body, int(time.time()) - 600)
            replay = {**signed, "Paysaga-Signature": stale}
            assert (await http.post("/hooks", content=body, headers=replay)).status_code == 400
    finally:
        server.shutdown()
        server.server_close()
