"""The Temporal remote-codec endpoint: `/codec/decode` and `/codec/encode`, so the Temporal UI
and CLI show operators the plain payloads that `infra.codec` keeps encrypted in history.

Protocol (Temporal's): POST a protobuf-JSON `Payloads` (`{"payloads": [{"metadata": {k: b64},
"data": b64}]}`) and get the same shape back; `X-Namespace` is accepted and ignored (one key
ring per deployment). Not part of the public OpenAPI document: it is operators' tooling.

Who may call it. Decoding is reading every customer's data, so the endpoint is authenticated:

1. `Authorization: Bearer <API key>` with the `codec` (or `admin`) scope. This is how the
   Temporal CLI calls it (`temporal workflow show --codec-endpoint URL --codec-auth 'Bearer …'`)
   and how a production UI should reach it: the UI sits behind the operators' SSO proxy, and
   that proxy adds a codec-scoped key when it forwards to /codec.
2. The local Temporal UI of `paysaga run`, only with `codec_trust_local_ui` on. The UI's browser
   code cannot send our API key (it forwards its own OIDC token only, and only over https), so
   the dev stack trusts a request that (a) comes from a loopback peer, (b) carries no
   proxy-forwarding header, and (c) has an `Origin` in `codec_cors_origins`. A browser cannot
   lie about Origin, so no web page other than the UI can use the endpoint through the
   operator's browser, DNS rebinding included. The trade-off: a program running on the same
   machine can forge an Origin, so on the dev stack any local user can decrypt — the same
   users who could read the UI itself, which has no authentication either. Never turn it on for
   a shared host or behind a reverse proxy (the proxy's requests all come from loopback).

A request that sends an Authorization header is always judged by its key, never by (2).
CORS: only `codec_cors_origins` get `Access-Control-Allow-Origin`; preflights from any other
origin are refused, so a browser will not send the request at all.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Literal

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload, Payloads

from api.auth import authenticate
from api.errors import ApiError, error_response
from infra.codec import EncryptionCodec, PayloadDecryptionError, UnknownEncryptionKeyError
from settings import Settings

log = logging.getLogger("paysaga.codec")

router = APIRouter(prefix="/codec", tags=["codec"], include_in_schema=False)

Operation = Literal["encode", "decode"]

_ALLOWED_METHODS = "POST, OPTIONS"
_ALLOWED_HEADERS = "content-type, x-namespace, authorization"
_PREFLIGHT_MAX_AGE = "600"
# A request that went through a proxy did not start on this machine, whatever its peer says.
_FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
LOCAL_UI = "local-ui"


def _settings(request: Request) -> Settings:
    settings = getattr(request.app.state, "settings", None)
    if not isinstance(settings, Settings):
        raise RuntimeError("app.state.settings is not set; the app factory must store it")
    return settings


def _allowed_origin(request: Request, settings: Settings) -> str | None:
    origin = request.headers.get("origin")
    if origin is None:
        return None
    allowed = {o.rstrip("/") for o in settings.codec_cors_origins}
    return origin if origin in allowed else None


def _cors_headers(origin: str | None) -> dict[str, str]:
    # Vary even when refusing: a cache must not hand one origin's answer to another.
    headers = {"Vary": "Origin"}
    if origin is not None:
        headers["Access-Control-Allow-Origin"] = origin
    return headers


def _is_loopback_peer(request: Request) -> bool:
    if request.client is None:
        return False
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


def _from_local_ui(request: Request, settings: Settings) -> bool:
    return (
        settings.codec_trust_local_ui
        and _is_loopback_peer(request)
        and not any(h in request.headers for h in _FORWARDING_HEADERS)
        and _allowed_origin(request, settings) is not None
    )


def authorize_codec_caller(request: Request, settings: Settings) -> str:
    """Who is decrypting (for the audit log), or a 401/403."""
    authorization = request.headers.get("authorization")
    if authorization is None and _from_local_ui(request, settings):
        return LOCAL_UI
    client = authenticate(authorization, settings.all_api_keys())
    if not client.allows("codec"):
        raise ApiError(
            403,
            "permission_error",
            "insufficient_scope",
            "This API key does not have the 'codec' scope.",
        )
    return client.client_id


def _codec(request: Request, settings: Settings) -> EncryptionCodec:
    codec = getattr(request.app.state, "payload_codec", None)
    if isinstance(codec, EncryptionCodec):
        return codec
    if not settings.encryption_keys:
        raise ApiError(
            404,
            "invalid_request_error",
            "codec_not_configured",
            "Payload encryption is not configured (PAYSAGA_ENCRYPTION_KEYS is empty).",
        )
    codec = EncryptionCodec.from_settings(settings)
    request.app.state.payload_codec = codec
    return codec


def _parse_payloads(body: bytes) -> Payloads:
    try:
        # Unknown fields are ignored: newer UIs may send fields this protocol does not need.
        return json_format.Parse(body, Payloads(), ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, RecursionError):
        raise ApiError(
            400,
            "invalid_request_error",
            "invalid_request_body",
            'The body must be Temporal Payloads JSON: {"payloads": [{"metadata": {...}, '
            '"data": "<base64>"}]}.',
        ) from None


async def _convert(codec: EncryptionCodec, op: Operation, payloads: Sequence[Payload]) -> Payloads:
    try:
        converted = await (codec.encode(payloads) if op == "encode" else codec.decode(payloads))
    except UnknownEncryptionKeyError as exc:
        raise ApiError(400, "invalid_request_error", "unknown_encryption_key", str(exc)) from None
    except PayloadDecryptionError as exc:
        raise ApiError(400, "invalid_request_error", "payload_undecryptable", str(exc)) from None
    return Payloads(payloads=converted)


def _namespace(request: Request) -> str:
    """For the audit log only; a client-chosen value, so kept only if it is plainly a name."""
    value = request.headers.get("x-namespace", "")
    plain = value.replace("-", "").replace("_", "").replace(".", "")
    return value if len(value) <= 255 and plain.isascii() and plain.isalnum() else "-"


async def _answer(request: Request, op: Operation) -> Response:
    settings = _settings(request)
    cors = _cors_headers(_allowed_origin(request, settings))
    try:
        caller = authorize_codec_caller(request, settings)
        codec = _codec(request, settings)
        payloads = _parse_payloads(await request.body())
        converted = await _convert(codec, op, payloads.payloads)
    except ApiError as exc:
        # Errors carry the CORS headers too, so the UI can show why instead of a network error.
        headers = {**exc.headers, **cors}
        return error_response(exc.status, exc.type, exc.code, exc.message, exc.param, headers)
    log.info(
        "codec %s of %d payloads by %s (namespace %s)",
        op,
        len(converted.payloads),
        caller,
        _namespace(request),
    )
    body = json_format.MessageToDict(converted)
    return JSONResponse({"payloads": body.get("payloads", [])}, headers=cors)


def _preflight(request: Request) -> Response:
    origin = _allowed_origin(request, _settings(request))
    if origin is None:
        return error_response(
            403,
            "permission_error",
            "origin_not_allowed",
            "This origin may not call the codec endpoint; see PAYSAGA_CODEC_CORS_ORIGINS.",
            headers={"Vary": "Origin"},
        )
    headers = {
        **_cors_headers(origin),
        "Access-Control-Allow-Methods": _ALLOWED_METHODS,
        "Access-Control-Allow-Headers": _ALLOWED_HEADERS,
        "Access-Control-Max-Age": _PREFLIGHT_MAX_AGE,
    }
    return Response(status_code=204, headers=headers)


@router.post("/decode")
async def decode_payloads(request: Request) -> Response:
    return await _answer(request, "decode")


@router.post("/encode")
async def encode_payloads(request: Request) -> Response:
    return await _answer(request, "encode")


@router.options("/decode")
@router.options("/encode")
async def codec_preflight(request: Request) -> Response:
    return _preflight(request)


__all__ = ["LOCAL_UI", "authorize_codec_caller", "router"]
