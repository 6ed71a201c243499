"""The console's browser session: a sealed cookie, and CSRF tokens bound to it.

The cookie never holds the agent token. It holds the token's SHA-256 (what the
database stores and what an agent lookup needs) and the sign-in time, sealed
with AES-GCM under ``TELLBACK_SECRET_KEY``: unreadable and unforgeable without
the key, and useless as a bearer token on the API even to someone who has the
key. It expires after ``SESSION_TTL``; disabling the agent or rotating its
token ends every console session at once (the hash no longer matches).

CSRF tokens are an HMAC of the cookie value (synchronizer token without server
state): a page embeds one in every form, every console POST checks it. Before
sign-in, a random per-browser login cookie plays the same part, so a foreign
site cannot sign a browser in with the attacker's token (login CSRF).

This module imports nothing from the web layer: ``http/deps.py`` uses it to
accept the cookie on the agent event stream.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from tellback_server.security import Sealer, b64url, b64url_decode, signing_key

COOKIE = "tb_console"
LOGIN_COOKIE = "tb_console_login"
SESSION_TTL_S = 12 * 3600
LOGIN_TTL_S = 3600
CSRF_FIELD = "_csrf"
CSRF_HEADER = "x-csrf-token"
_PURPOSE = "console-session"
_HASH = re.compile(r"^[0-9a-f]{64}$")
_CLOCK_SKEW_S = 60


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    token_hash: str
    issued_at: int


def seal_session(sealer: Sealer, token_hash: str, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    return b64url(sealer.seal(f"v1:{issued}:{token_hash}".encode(), _PURPOSE))


def open_session(sealer: Sealer, value: str, now: float | None = None) -> ConsoleSession | None:
    """The session in a cookie value, or None if it is tampered with, foreign or expired."""
    if not value or len(value) > 512:
        return None
    try:
        raw = sealer.open(b64url_decode(value), _PURPOSE).decode()
    except (ValueError, InvalidTag):
        return None
    version, _, rest = raw.partition(":")
    issued_text, _, token_hash = rest.partition(":")
    if version != "v1" or not issued_text.isdigit() or not _HASH.match(token_hash):
        return None
    issued = int(issued_text)
    current = time.time() if now is None else now
    if issued > current + _CLOCK_SKEW_S or current - issued >= SESSION_TTL_S:
        return None
    return ConsoleSession(token_hash=token_hash, issued_at=issued)


def new_login_nonce() -> str:
    return secrets.token_urlsafe(24)


def csrf_token(secret_key: str, bound_to: str) -> str:
    """The CSRF token for a session cookie value (or ``login:<nonce>`` before sign-in)."""
    key = signing_key(secret_key, "console-csrf")
    return b64url(hmac.new(key, bound_to.encode(), hashlib.sha256).digest())


def csrf_matches(secret_key: str, bound_to: str | None, given: str | None) -> bool:
    if not bound_to or not given:
        return False
    return hmac.compare_digest(csrf_token(secret_key, bound_to), given)
