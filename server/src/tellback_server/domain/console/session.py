"""The console's browser session: a sealed cookie, and CSRF tokens bound to it.

The cookie never holds the agent token. It holds the token's SHA-256 (what the
database stores and what an agent lookup needs), the sign-in time and a random
session id, sealed with AES-GCM under ``TELLBACK_SECRET_KEY``: unreadable and
unforgeable without the key, and useless as a bearer token on the API even to
someone who has the key. It expires after ``SESSION_TTL``; disabling the agent
or rotating its token ends every console session at once (the hash no longer
matches). Signing out ends the one session everywhere: its id goes into the
``console_signouts`` table, which every process reads wherever it opens the
cookie (:func:`signed_in`), until the cookie would have expired anyway.

CSRF tokens are an HMAC of the cookie value (synchronizer token without server
state): a page embeds one in every form, every console POST checks it. Before
sign-in, a random per-browser login cookie plays the same part, so a foreign
site cannot sign a browser in with the attacker's token (login CSRF).

This module imports nothing from the web layer: ``http/deps.py`` uses it to
accept the cookie on the agent event stream. Cookies sealed before session ids
(``v1``) are refused: their agents sign in again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite

from tellback_server.db.engine import Database
from tellback_server.db.models import console_signouts
from tellback_server.security import Sealer, b64url, b64url_decode, signing_key

COOKIE = "tb_console"
# The name when the cookie is Secure: a browser takes a ``__Host-`` cookie only from this
# host over HTTPS, with ``Path=/`` and no ``Domain``, so a neighbouring subdomain or a
# plain-http page cannot plant one (its own session, say) for the console to read.
SECURE_COOKIE = "__Host-tb_console"
LOGIN_COOKIE = "tb_console_login"
SESSION_TTL_S = 12 * 3600
LOGIN_TTL_S = 3600
CSRF_FIELD = "_csrf"
CSRF_HEADER = "x-csrf-token"
_PURPOSE = "console-session"
_HASH = re.compile(r"^[0-9a-f]{64}$")
_SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{22}$")  # secrets.token_urlsafe(16)
_CLOCK_SKEW_S = 60
# A sign-out is kept this long past its cookie's expiry: a process whose clock runs
# behind the one that prunes still finds it while it takes the cookie as unexpired.
_KEPT_AFTER_EXPIRY_S = 3600


def is_secure(scheme: str, public_url: str | None) -> bool:
    """Cookies get ``Secure`` when the request came over HTTPS or the public URL is HTTPS."""
    return scheme == "https" or (public_url or "").lower().startswith("https://")


def cookie_name(secure: bool) -> str:
    """The session cookie's name: only the ``__Host-`` one is read where cookies are Secure."""
    return SECURE_COOKIE if secure else COOKIE


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    session_id: str
    token_hash: str
    issued_at: int


def seal_session(sealer: Sealer, token_hash: str, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    session_id = secrets.token_urlsafe(16)
    return b64url(sealer.seal(f"v2:{issued}:{session_id}:{token_hash}".encode(), _PURPOSE))


def open_session(sealer: Sealer, value: str, now: float | None = None) -> ConsoleSession | None:
    """The session in a cookie value, or None if it is tampered with, foreign or expired
    (whether it was signed out of is :func:`signed_in`'s question: it needs the database)."""
    if not value or len(value) > 512:
        return None
    try:
        raw = sealer.open(b64url_decode(value), _PURPOSE).decode()
    except (ValueError, InvalidTag):
        return None
    parts = raw.split(":")
    if len(parts) != 4:
        return None
    version, issued_text, session_id, token_hash = parts
    if version != "v2" or not issued_text.isdigit():
        return None
    if not _SESSION_ID.match(session_id) or not _HASH.match(token_hash):
        return None
    issued = int(issued_text)
    current = time.time() if now is None else now
    if issued > current + _CLOCK_SKEW_S or current - issued >= SESSION_TTL_S:
        return None
    return ConsoleSession(session_id=session_id, token_hash=token_hash, issued_at=issued)


async def signed_in(
    db: Database, sealer: Sealer, value: str, now: float | None = None
) -> ConsoleSession | None:
    """The session in a cookie value if it is valid and not signed out of."""
    opened = open_session(sealer, value, now)
    if opened is None:
        return None
    async with db.session(write=False) as session:
        ended = await session.scalar(
            select(console_signouts.c.session_id).where(
                console_signouts.c.session_id == opened.session_id
            )
        )
    return opened if ended is None else None


async def sign_out(db: Database, opened: ConsoleSession, now: float | None = None) -> None:
    """End the session for every process; and forget the sign-outs past their time."""
    current = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    keep_until = dt.datetime.fromtimestamp(
        opened.issued_at + SESSION_TTL_S + _KEPT_AFTER_EXPIRY_S, dt.UTC
    )
    insert = sqlite.insert if db.is_sqlite else postgresql.insert
    async with db.session(write=True) as session:
        await session.execute(
            delete(console_signouts).where(console_signouts.c.expires_at < current)
        )
        await session.execute(
            insert(console_signouts)
            .values(session_id=opened.session_id, expires_at=keep_until)
            .on_conflict_do_nothing(index_elements=["session_id"])  # (signed out twice at once)
        )


def new_login_nonce() -> str:
    return secrets.token_urlsafe(24)


def csrf_token(secret_key: str, bound_to: str) -> str:
    """The CSRF token for a session cookie value (or ``login:<nonce>`` before sign-in)."""
    key = signing_key(secret_key, "console-csrf")
    return b64url(hmac.new(key, bound_to.encode(), hashlib.sha256).digest())


def csrf_matches(secret_key: str, bound_to: str | None, given: str | None) -> bool:
    if not bound_to or not given:
        return False
    # As bytes: compare_digest raises TypeError for a str that is not ASCII (a 500).
    expected = csrf_token(secret_key, bound_to).encode()
    return hmac.compare_digest(expected, given.encode("utf-8", "surrogatepass"))
