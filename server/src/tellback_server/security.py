"""Token generation, hashing and at-rest encryption.

Bearer tokens are high-entropy random strings; only their SHA-256 is stored, so a
lookup by hash is safe without a constant-time compare (an attacker cannot
choose inputs that collide). Secrets that must be read back (identity secrets,
push credentials) are sealed with AES-256-GCM under a key derived from
``TELLBACK_SECRET_KEY``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ADMIN_TOKEN_PREFIX = "tba_"  # noqa: S105 (a prefix, not a secret)
AGENT_TOKEN_PREFIX = "tbg_"  # noqa: S105 (a prefix, not a secret)
SESSION_TOKEN_PREFIX = "tbs_"  # noqa: S105 (a prefix, not a secret)
APP_KEY_PREFIX = "tbk_"
IDENTITY_SECRET_PREFIX = "tbi_"  # noqa: S105 (a prefix, not a secret)


def new_token(prefix: str, nbytes: int = 32) -> str:
    return prefix + secrets.token_urlsafe(nbytes)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Sealer:
    """AES-GCM sealing of small secrets, with a purpose string bound as associated data."""

    _VERSION = b"\x01"

    def __init__(self, secret_key: str) -> None:
        derived = hmac.new(secret_key.encode(), b"tellback/seal/v1", hashlib.sha256).digest()
        self._aead = AESGCM(derived)

    def seal(self, plaintext: bytes, purpose: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return self._VERSION + nonce + self._aead.encrypt(nonce, plaintext, purpose.encode())

    def open(self, sealed: bytes, purpose: str) -> bytes:
        if sealed[:1] != self._VERSION:
            raise ValueError("unknown sealed-secret version")
        return self._aead.decrypt(sealed[1:13], sealed[13:], purpose.encode())


def signing_key(secret_key: str, purpose: str) -> bytes:
    """A sub-key for HMAC signatures (local storage URLs, cursors), one per purpose."""
    return hmac.new(secret_key.encode(), f"tellback/{purpose}".encode(), hashlib.sha256).digest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
