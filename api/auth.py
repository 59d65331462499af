"""API-key authentication (`Authorization: Bearer <key>`) and per-route scopes.

Only SHA-256 hashes of keys are configured. A presented key is hashed and compared with every
configured hash in constant time, without stopping at a match, so response time says nothing
about which client (if any) a key belongs to. The key itself is never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import ApiError
from settings import ApiKey, Scope, Settings

# Keys we issue are ~47 characters; anything far longer is not a key and is not hashed.
_MAX_KEY_LENGTH = 512
_CHALLENGE = {"WWW-Authenticate": "Bearer"}

# Declares the scheme in OpenAPI only: the header is parsed below so that "missing" and
# "malformed" can be told apart in the error code.
_bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="Send `Authorization: Bearer <API key>`.",
)


@dataclass(frozen=True)
class ApiClient:
    client_id: str
    scopes: frozenset[str]

    def allows(self, scope: Scope) -> bool:
        """`admin` is a superset of every other scope."""
        return scope in self.scopes or "admin" in self.scopes


def generate_api_key() -> str:
    """A new 256-bit random key; store only `ApiKey.hash(key)`."""
    return "psk_" + secrets.token_urlsafe(32)


def _unauthenticated(code: str, message: str) -> ApiError:
    return ApiError(401, "authentication_error", code, message, headers=_CHALLENGE)


def presented_key(authorization: str | None) -> str:
    """The key from an `Authorization: Bearer <key>` header, or a 401."""
    if authorization is None or not authorization.strip():
        raise _unauthenticated(
            "api_key_missing",
            "No API key provided; send it as `Authorization: Bearer <API key>`.",
        )
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if (
        scheme.lower() != "bearer"
        or not key
        or len(key) > _MAX_KEY_LENGTH
        or any(ch.isspace() for ch in key)
    ):
        raise _unauthenticated(
            "api_key_invalid",
            "Malformed Authorization header; expected `Authorization: Bearer <API key>`.",
        )
    return key


def client_for_key(key: str, configured: Sequence[ApiKey]) -> ApiClient | None:
    """The client owning `key`. Every configured hash is compared, match or not."""
    presented = hashlib.sha256(key.encode()).hexdigest().encode()
    owner: ApiKey | None = None
    for candidate in configured:
        matches = hmac.compare_digest(presented, candidate.key_sha256.strip().lower().encode())
        if matches and owner is None:
            owner = candidate
    if owner is None:
        return None
    return ApiClient(client_id=owner.client_id, scopes=frozenset(owner.scopes))


def authenticate(authorization: str | None, configured: Sequence[ApiKey]) -> ApiClient:
    client = client_for_key(presented_key(authorization), configured)
    if client is None:
        raise _unauthenticated("api_key_invalid", "Invalid API key provided.")
    return client


def _app_settings(request: Request) -> Settings:
    settings = getattr(request.app.state, "settings", None)
    if not isinstance(settings, Settings):
        # Failing closed: never fall back to ambient environment keys.
        raise RuntimeError("app.state.settings is not set; the app factory must store it")
    return settings


def require_scope(scope: Scope) -> Callable[..., Awaitable[ApiClient]]:
    """Dependency: `client: ApiClient = Depends(require_scope("payments:write"))`."""

    async def authorized_client(
        request: Request,
        _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer_scheme)],
    ) -> ApiClient:
        client = authenticate(
            request.headers.get("authorization"), _app_settings(request).all_api_keys()
        )
        if not client.allows(scope):
            raise ApiError(
                403,
                "permission_error",
                "insufficient_scope",
                f"This API key does not have the '{scope}' scope.",
            )
        request.state.api_client = client
        return client

    authorized_client.__name__ = f"require_{scope.replace(':', '_')}"
    return authorized_client


__all__ = [
    "ApiClient",
    "authenticate",
    "client_for_key",
    "generate_api_key",
    "presented_key",
    "require_scope",
]
