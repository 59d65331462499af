"""AES-256-GCM encryption of every Temporal payload, with key ids so keys can rotate.

Temporal stores workflow inputs, activity arguments and results, signals, queries, memos and
their results in its history. With this codec on the client (the API and the worker both connect
through `infra.temporal_client.connect_client`), the server only ever sees ciphertext: customer
data in history is unreadable without the key.

Wire format of an encrypted payload:
  metadata  encoding          = b"binary/encrypted"
            encryption-key-id = the id of the key that encrypted it
  data      12-byte random nonce || AES-GCM(the original Payload, serialized)

The whole original payload (its metadata too) is inside the ciphertext, so GCM authenticates
it. The outer metadata only picks the key: altering the key id selects another key, and
authentication then fails. So no associated data is bound; that keeps the format the one
Temporal's samples use, readable by any codec server that knows the keys.

Rotation: `PAYSAGA_ENCRYPTION_KEYS` is a list; the first key encrypts, every key decrypts. Put a
new key first and keep the old ones until no open workflow (nor any history you still need to
read) carries them. A payload naming a key that is not configured fails with an error naming the
key id (never key material); the worker retries its workflow task, so adding the key back lets
the payment carry on.

Payloads without `binary/encrypted` are decoded as they are: histories written before encryption
was switched on stay readable.

Search attributes are not payloads of the data converter: the server indexes them in plain text.
`CustomerId`, `MerchantId`, amount and currency are therefore visible to anyone who can list
workflows; keep customer data out of identifiers.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from settings import EncryptionKey, Settings

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's standard nonce; random per payload (2^32 payloads per key is far off)
_TAG_BYTES = 16
# A secret sealed at rest: `sealed:v1:<key id>:<base64url(nonce + ciphertext)>`.
SEALED_PREFIX = "sealed:v1:"
# Key ids travel in clear in every payload and in error messages: plain names only.
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class PayloadDecryptionError(ValueError):
    """A payload that claims to be encrypted could not be decrypted."""


class UnknownEncryptionKeyError(PayloadDecryptionError):
    """The payload names a key id that is not configured."""

    def __init__(self, key_id: str, known: Sequence[str]) -> None:
        self.key_id = key_id
        super().__init__(
            f"payload was encrypted with key id {key_id!r}, which is not configured "
            f"(configured: {', '.join(known)}); add that key to PAYSAGA_ENCRYPTION_KEYS "
            "to decrypt it"
        )


class InvalidEncryptionKeyError(ValueError):
    """A configured key is malformed. The message names the key id, never the key."""


def generate_key() -> str:
    """A new random AES-256 key, base64-encoded, for `PAYSAGA_ENCRYPTION_KEYS`."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def _key_bytes(key_id: str, key_b64: str) -> bytes:
    try:
        key = base64.b64decode(key_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidEncryptionKeyError(
            f"encryption key {key_id!r} is not valid base64"
        ) from None  # the cause would quote the key
    if len(key) != KEY_BYTES:
        raise InvalidEncryptionKeyError(
            f"encryption key {key_id!r} must be {KEY_BYTES} bytes (AES-256) once base64-decoded; "
            f"it is {len(key)}. Generate one with: "
            "python -c 'from infra.codec import generate_key; print(generate_key())'"
        )
    return key


def _printable_key_id(raw: bytes) -> str:
    """A key id read from a payload, safe to put in an error message."""
    text = raw.decode("utf-8", errors="replace")
    return text if _KEY_ID.fullmatch(text) else "<malformed key id>"


class EncryptionCodec(PayloadCodec):
    """Encrypts with the first key; decrypts with whichever configured key a payload names."""

    def __init__(self, keys: Sequence[tuple[str, bytes]]) -> None:
        if not keys:
            raise InvalidEncryptionKeyError("at least one encryption key is needed")
        self._ciphers: dict[str, AESGCM] = {}
        for key_id, key in keys:
            if not _KEY_ID.fullmatch(key_id):
                raise InvalidEncryptionKeyError(
                    "encryption key ids are 1-64 letters, digits, '.', '_' or '-'"
                )
            if key_id in self._ciphers:
                raise InvalidEncryptionKeyError(f"encryption key id {key_id!r} is configured twice")
            if len(key) != KEY_BYTES:
                raise InvalidEncryptionKeyError(
                    f"encryption key {key_id!r} must be {KEY_BYTES} bytes (AES-256)"
                )
            self._ciphers[key_id] = AESGCM(key)
        self.encrypting_key_id = keys[0][0]

    @classmethod
    def from_keys(cls, keys: Sequence[EncryptionKey]) -> EncryptionCodec:
        return cls([(k.key_id, _key_bytes(k.key_id, k.key_b64.get_secret_value())) for k in keys])

    @classmethod
    def from_settings(cls, settings: Settings) -> EncryptionCodec:
        return cls.from_keys(settings.encryption_keys)

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    def __repr__(self) -> str:
        return f"EncryptionCodec(key_ids={self.key_ids!r})"

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.encrypting_key_id].encrypt(
            nonce, payload.SerializeToString(), None
        )
        return Payload(
            metadata={
                "encoding": ENCODING,
                KEY_ID_METADATA: self.encrypting_key_id.encode(),
            },
            data=nonce + sealed,
        )

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        raw_key_id = payload.metadata.get(KEY_ID_METADATA, b"")
        cipher = self._ciphers.get(raw_key_id.decode("utf-8", errors="replace"))
        if cipher is None:
            raise UnknownEncryptionKeyError(_printable_key_id(raw_key_id), self.key_ids)
        if len(payload.data) < NONCE_BYTES + _TAG_BYTES:
            raise PayloadDecryptionError("encrypted payload is too short to be genuine")
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = cipher.decrypt(nonce, sealed, None)
        except InvalidTag:
            raise PayloadDecryptionError(
                f"encrypted payload failed authentication with key id "
                f"{_printable_key_id(raw_key_id)!r}: it was altered or not sealed by this key"
            ) from None
        return Payload.FromString(plain)

    # ── short secrets at rest (a webhook endpoint's signing secret) ────────────────────────
    def seal_text(self, text: str, context: str) -> str:
        """`text` encrypted with the first key, bound to `context` (the row's id, as associated
        data: a sealed value copied to another row does not open there)."""
        nonce = os.urandom(NONCE_BYTES)
        key_id = self.encrypting_key_id
        sealed = self._ciphers[key_id].encrypt(nonce, text.encode(), context.encode())
        return f"{SEALED_PREFIX}{key_id}:{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open_text(self, sealed: str, context: str) -> str:
        """The text `seal_text` sealed for `context`. Raises UnknownEncryptionKeyError for a
        retired key, PayloadDecryptionError for anything altered or sealed for another row."""
        key_id, _, data = sealed.removeprefix(SEALED_PREFIX).partition(":")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise UnknownEncryptionKeyError(sealed_key_id(sealed), self.key_ids)
        try:
            raw = base64.urlsafe_b64decode(data)
            return cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode()).decode()
        except (InvalidTag, ValueError):
            raise PayloadDecryptionError(
                f"a sealed secret failed authentication with key id {key_id!r}: altered, or "
                "sealed for another record"
            ) from None


def is_sealed(value: str) -> bool:
    return value.startswith(SEALED_PREFIX)


def sealed_key_id(value: str) -> str:
    """The key id a sealed value names (printable: it goes into error messages)."""
    return _printable_key_id(value.removeprefix(SEALED_PREFIX).partition(":")[0].encode())


def secret_sealer(settings: Settings) -> EncryptionCodec | None:
    """What seals the webhook signing secrets at rest: the payload encryption keys. Without
    keys (payload encryption off) the secrets are stored as they are, and this says so."""
    if settings.encryption_keys:
        return EncryptionCodec.from_settings(settings)
    logging.getLogger("paysaga").warning(
        "PAYSAGA_ENCRYPTION_KEYS is not set: webhook signing secrets are stored unencrypted"
    )
    return None


# The file under `paysaga run`'s home that holds its development key.
DEV_ENCRYPTION_KEY_FILE = "encryption-key"


def load_or_create_dev_key(path: Path, key_id: str = "dev1") -> EncryptionKey:
    """The local development key that `paysaga run` keeps under its home (mode 0600), made on
    first use. Production keys come from the environment / a secret store instead."""
    if path.exists():
        key_b64 = path.read_text().strip()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        key_b64 = generate_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(key_b64 + "\n")
    _key_bytes(key_id, key_b64)  # a hand-edited file fails here, with a clear message
    return EncryptionKey.model_validate({"key_id": key_id, "key_b64": key_b64})


__all__ = [
    "DEV_ENCRYPTION_KEY_FILE",
    "ENCODING",
    "KEY_ID_METADATA",
    "SEALED_PREFIX",
    "EncryptionCodec",
    "InvalidEncryptionKeyError",
    "PayloadDecryptionError",
    "UnknownEncryptionKeyError",
    "generate_key",
    "is_sealed",
    "load_or_create_dev_key",
    "sealed_key_id",
    "secret_sealer",
]
