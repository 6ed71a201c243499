"""Sessions and identity: anonymous and signed sessions, key rotation, merge and logout."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import gc
import hashlib
import hmac
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.pool import QueuePool
from structlog.testing import capture_logs

from tellback_server.db.models import ClientSession, Event
from tellback_server.http.auth_cache import PrincipalCache
from tellback_server.http.deps import ClientPrincipal
from tellback_server.security import hash_token
from tests.server.conftest import (
    Api,
    AppInfo,
    identity_token,
    listening_backends,
    listening_pids,
    processes,
)

PROBLEM_JSON = "application/problem+json"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft_jwt(
    header: dict[str, Any], payload: dict[str, Any], secret: str | None, digest: str = "sha256"
) -> str:
    """A JWT assembled by hand, signed with HMAC-``digest`` (or unsigned when no secret)."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    if secret is None:
        return f"{signing_input}."
    sig = hmac.new(secret.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(sig)}"


def claims(sub: str = "user-1", exp_in: int = 600, **extra: Any) -> dict[str, Any]:
    return {"sub": sub, "exp": int(time.time()) + exp_in, **extra}


def assert_problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM_JSON), r.headers["content-type"]
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["code"] == code, body
    return body


async def post_session(
    api: Api, app_key: str, installation_id: str | None = None, user_token: str | None = None
) -> httpx.Response:
    body: dict[str, Any] = {
        "app_key": app_key,
        "installation_id": installation_id or uuid.uuid4().hex,
        "device": {"platform": "android", "model": "Pixel 8", "os_version": "15"},
    }
    if user_token is not None:
        body["user_token"] = user_token
    return await api.http.post("/v1/client/sessions", json=body)


async def conversation_ids(api: Api, headers: dict[str, str]) -> list[str]:
    r = await api.http.get("/v1/client/conversations", headers=headers)
    assert r.status_code == 200, r.text
    return [c["id"] for c in r.json()["items"]]


async def rotate(api: Api, app: AppInfo, **body: bool) -> dict[str, Any]:
    r = await api.http.post(f"/v1/admin/apps/{app.id}/rotate-keys", json=body, headers=api.admin)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def patch_settings(api: Api, app: AppInfo, **settings: Any) -> dict[str, Any]:
    r = await api.http.patch(
        f"/v1/admin/apps/{app.id}", json={"settings": settings}, headers=api.admin
    )
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


# --- anonymous sessions -------------------------------------------------------------------


async def test_anonymous_session(api: Api) -> None:
    app = await api.create_app()
    before = dt.datetime.now(dt.UTC)
    r = await post_session(api, app.app_key)
    assert r.status_code == 201, r.text
    data = r.json()
    assert data["user"]["external_id"] is None
    assert data["user"]["name"] is None
    assert data["user"]["email"] is None
    assert isinstance(data["session_token"], str)
    assert data["session_token"]
    expires_at = dt.datetime.fromisoformat(data["expires_at"])
    assert expires_at.tzinfo is not None
    assert expires_at > before + dt.timedelta(minutes=1)
    # The token works on the client API and names the same user.
    r = await api.http.get("/v1/client/me", headers=api.bearer(data["session_token"]))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == data["user"]["id"]
    assert r.json()["external_id"] is None


async def test_same_installation_gets_same_anonymous_user(api: Api) -> None:
    app = await api.create_app()
    installation = uuid.uuid4().hex
    first = await api.session(app, installation_id=installation)
    second = await api.session(app, installation_id=installation)
    other = await api.session(app)
    assert second["user"]["id"] == first["user"]["id"]
    assert second["session_token"] != first["session_token"]
    assert other["user"]["id"] != first["user"]["id"]
    # Both sessions of the same user stay usable.
    for data in (first, second):
        r = await api.http.get("/v1/client/me", headers=api.bearer(data["session_token"]))
        assert r.status_code == 200, r.text


async def test_unknown_app_key_is_unauthenticated(api: Api) -> None:
    await api.create_app()
    r = await post_session(api, "tbk_not-a-real-app-key")
    assert_problem(r, 401, "unauthenticated")


async def test_client_api_without_session_is_unauthenticated(api: Api) -> None:
    app = await api.create_app()
    assert_problem(await api.http.get("/v1/client/me"), 401, "unauthenticated")
    r = await api.http.get("/v1/client/me", headers=api.bearer("tbs_forged-session-token"))
    assert_problem(r, 401, "unauthenticated")
    # The app key is not a session token.
    r = await api.http.get("/v1/client/me", headers=api.bearer(app.app_key))
    assert_problem(r, 401, "unauthenticated")


# --- identified sessions ------------------------------------------------------------------


async def test_identified_session(api: Api) -> None:
    app = await api.create_app()
    token = identity_token(
        app.identity_secret,
        "user-42",
        kid=app.identity_kid,
        name="Grace Hopper",
        email="grace@example.com",
    )
    data = await api.session(app, user_token=token)
    user = data["user"]
    assert user["external_id"] == "user-42"
    assert user["name"] == "Grace Hopper"
    assert user["email"] == "grace@example.com"
    r = await api.http.get("/v1/client/me", headers=api.bearer(data["session_token"]))
    assert r.status_code == 200, r.text
    assert r.json()["external_id"] == "user-42"
    assert r.json()["id"] == user["id"]
    # The same sub on another installation is the same end user.
    again = await api.session(
        app, user_token=identity_token(app.identity_secret, "user-42", kid=app.identity_kid)
    )
    assert again["user"]["id"] == user["id"]
    assert again["user"]["name"] == "Grace Hopper"


async def test_token_within_leeway_is_accepted(api: Api) -> None:
    app = await api.create_app()
    token = identity_token(app.identity_secret, "late", kid=app.identity_kid, exp_in=-20)
    data = await api.session(app, user_token=token)
    assert data["user"]["external_id"] == "late"


def forged_tokens(secret: str, kid: str) -> dict[str, str]:
    """Tokens the server must refuse, each for one reason, for an app with ``secret``/``kid``."""
    now = int(time.time())
    return {
        "bad_signature": identity_token("tbi_" + "x" * 43, "mallory", kid=kid),
        "expired": identity_token(secret, "mallory", kid=kid, exp_in=-120),
        "missing_sub": jwt.encode(
            {"exp": now + 600, "name": "No Sub"}, secret, algorithm="HS256", headers={"kid": kid}
        ),
        "missing_exp": jwt.encode(
            {"sub": "mallory"}, secret, algorithm="HS256", headers={"kid": kid}
        ),
        "empty_sub": identity_token(secret, "", kid=kid),
        "numeric_sub": craft_jwt(
            {"alg": "HS256", "typ": "JWT", "kid": kid}, {"sub": 1234, "exp": now + 600}, secret
        ),
        "alg_none": craft_jwt({"alg": "none", "typ": "JWT", "kid": kid}, claims("mallory"), None),
        "alg_none_no_kid": craft_jwt({"alg": "none", "typ": "JWT"}, claims("mallory"), None),
        "hs512": craft_jwt(
            {"alg": "HS512", "typ": "JWT", "kid": kid}, claims("mallory"), secret, "sha512"
        ),
        # Algorithm confusion: an HMAC made with the secret, under an RS256 header.
        "rs256_header": craft_jwt(
            {"alg": "RS256", "typ": "JWT", "kid": kid}, claims("mallory"), secret
        ),
        "lowercase_alg": craft_jwt(
            {"alg": "hs256", "typ": "JWT", "kid": kid}, claims("mallory"), secret
        ),
        "unknown_kid": identity_token(secret, "mallory", kid="k_doesnotexist"),
        "future_nbf": identity_token(secret, "mallory", kid=kid, nbf=now + 3600),
        "garbage": "this-is-not-a-jwt",
        "garbage_three_parts": "aaa.bbb.ccc",
    }


# The cases' names (the tokens are made per test, for its app's secret; a secret of a
# valid length here keeps PyJWT from warning about a short HMAC key).
INVALID_TOKENS = [*forged_tokens("s" * 32, "k"), "revoked_kid", "other_apps_secret"]


@pytest.mark.parametrize("case", INVALID_TOKENS)
async def test_invalid_identity_token_is_unauthenticated(api: Api, case: str) -> None:
    app = await api.create_app()
    if case == "revoked_kid":
        rotated = await rotate(api, app)
        assert rotated["identity_kid"] != app.identity_kid
        r = await api.http.delete(
            f"/v1/admin/apps/{app.id}/identity-secrets/{app.identity_kid}", headers=api.admin
        )
        assert r.status_code == 204, r.text
        token = identity_token(app.identity_secret, "mallory", kid=app.identity_kid)
    elif case == "other_apps_secret":
        other = await api.create_app("Other")
        token = identity_token(other.identity_secret, "mallory", kid=other.identity_kid)
    else:
        token = forged_tokens(app.identity_secret, app.identity_kid)[case]
    installation = uuid.uuid4().hex
    anon = await api.session(app, installation_id=installation)
    anon_headers = api.bearer(anon["session_token"])
    conv = await api.feedback(anon_headers)
    r = await post_session(api, app.app_key, installation_id=installation, user_token=token)
    assert_problem(r, 401, "unauthenticated")
    # The refused identity changed nothing: no merge, no logout of the anonymous user.
    assert await conversation_ids(api, anon_headers) == [conv["id"]]
    again = await api.session(app, installation_id=installation)
    assert again["user"]["id"] == anon["user"]["id"]
    assert again["user"]["external_id"] is None


async def test_hand_crafted_hs256_token_is_accepted(api: Api) -> None:
    """Control for the hand-crafted invalid tokens: the same construction with HS256 works."""
    app = await api.create_app()
    token = craft_jwt(
        {"alg": "HS256", "typ": "JWT", "kid": app.identity_kid},
        claims("crafted"),
        app.identity_secret,
    )
    data = await api.session(app, user_token=token)
    assert data["user"]["external_id"] == "crafted"


async def test_token_without_kid_uses_newest_secret(api: Api) -> None:
    app = await api.create_app()
    data = await api.session(app, user_token=identity_token(app.identity_secret, "a", kid=None))
    assert data["user"]["external_id"] == "a"
    rotated = await rotate(api, app)
    new_secret = rotated["identity_secret"]
    assert isinstance(new_secret, str)
    assert new_secret != app.identity_secret
    data = await api.session(app, user_token=identity_token(new_secret, "b", kid=None))
    assert data["user"]["external_id"] == "b"
    # The old secret still works with its kid, but not without one.
    r = await post_session(
        api, app.app_key, user_token=identity_token(app.identity_secret, "c", kid=None)
    )
    assert_problem(r, 401, "unauthenticated")
    data = await api.session(
        app, user_token=identity_token(app.identity_secret, "c", kid=app.identity_kid)
    )
    assert data["user"]["external_id"] == "c"


async def test_identity_key_rotation(api: Api) -> None:
    app = await api.create_app()
    first = await rotate(api, app)
    kid2, secret2 = first["identity_kid"], first["identity_secret"]
    assert kid2 != app.identity_kid
    assert first["identity_kids"] == [app.identity_kid, kid2]
    assert first["app_key"] == app.app_key  # only the identity secret rotated
    # Both generations are accepted during the rollover.
    old = await api.session(
        app, user_token=identity_token(app.identity_secret, "old", kid=app.identity_kid)
    )
    assert old["user"]["external_id"] == "old"
    new = await api.session(app, user_token=identity_token(secret2, "new", kid=kid2))
    assert new["user"]["external_id"] == "new"
    # A secret is bound to its own kid.
    r = await post_session(
        api, app.app_key, user_token=identity_token(secret2, "mixed", kid=app.identity_kid)
    )
    assert_problem(r, 401, "unauthenticated")

    second = await rotate(api, app, revoke_previous=True)
    kid3, secret3 = second["identity_kid"], second["identity_secret"]
    assert second["identity_kids"] == [kid3]
    for secret, kid in ((app.identity_secret, app.identity_kid), (secret2, kid2)):
        r = await post_session(api, app.app_key, user_token=identity_token(secret, "x", kid=kid))
        assert_problem(r, 401, "unauthenticated")
    latest = await api.session(app, user_token=identity_token(secret3, "latest", kid=kid3))
    assert latest["user"]["external_id"] == "latest"
    r = await api.http.get(f"/v1/admin/apps/{app.id}", headers=api.admin)
    assert r.json()["identity_kids"] == [kid3]


async def test_required_identity_mode(api: Api) -> None:
    app = await api.create_app()
    installation = uuid.uuid4().hex
    await api.session(app, installation_id=installation)
    await patch_settings(api, app, identity_mode="required")
    r = await post_session(api, app.app_key)
    assert_problem(r, 401, "unauthenticated")
    r = await post_session(api, app.app_key, installation_id=installation)
    assert_problem(r, 401, "unauthenticated")
    token = identity_token(app.identity_secret, "signed", kid=app.identity_kid)
    data = await api.session(app, installation_id=installation, user_token=token)
    assert data["user"]["external_id"] == "signed"
    await patch_settings(api, app, identity_mode="optional")
    data = await api.session(app)
    assert data["user"]["external_id"] is None


async def test_required_mode_at_creation(api: Api) -> None:
    app = await api.create_app(identity_mode="required")
    assert_problem(await post_session(api, app.app_key), 401, "unauthenticated")
    token = identity_token(app.identity_secret, "signed", kid=app.identity_kid)
    assert (await api.session(app, user_token=token))["user"]["external_id"] == "signed"


# --- merge and logout ---------------------------------------------------------------------


async def test_anonymous_conversations_merge_on_identify(api: Api) -> None:
    app = await api.create_app()
    installation = uuid.uuid4().hex
    anon = await api.session(app, installation_id=installation)
    anon_headers = api.bearer(anon["session_token"])
    conv = await api.feedback(anon_headers, body="Before login")
    token = identity_token(app.identity_secret, "merge-me", kid=app.identity_kid)
    ident = await api.session(app, installation_id=installation, user_token=token)
    assert ident["user"]["id"] != anon["user"]["id"]
    ident_headers = api.bearer(ident["session_token"])
    assert await conversation_ids(api, ident_headers) == [conv["id"]]
    r = await api.http.get(f"/v1/client/conversations/{conv['id']}", headers=ident_headers)
    assert r.status_code == 200, r.text
    r = await api.http.get(f"/v1/client/conversations/{conv['id']}/messages", headers=ident_headers)
    assert r.status_code == 200, r.text
    assert [m["body"] for m in r.json()["items"]] == ["Before login"]
    # The message moved with its conversation: written by the identified user now.
    assert r.json()["items"][0]["author"]["id"] == ident["user"]["id"]
    # The anonymous user's old session ended with the identification.
    assert_problem(
        await api.http.get("/v1/client/me", headers=anon_headers), 401, "unauthenticated"
    )


async def test_anonymous_name_and_email_carry_over_on_merge(api: Api) -> None:
    app = await api.create_app()
    installation = uuid.uuid4().hex
    anon = await api.user_headers(app, installation_id=installation)
    r = await api.http.patch(
        "/v1/client/me", json={"name": "Anon Name", "email": "anon@example.com"}, headers=anon
    )
    assert r.status_code == 200, r.text
    token = identity_token(app.identity_secret, "carry", kid=app.identity_kid)
    ident = await api.session(app, installation_id=installation, user_token=token)
    assert ident["user"]["external_id"] == "carry"
    r = await api.http.get("/v1/client/me", headers=api.bearer(ident["session_token"]))
    assert r.json()["name"] == "Anon Name"
    assert r.json()["email"] == "anon@example.com"


async def test_logout_isolation(api: Api) -> None:
    app = await api.create_app()
    installation = uuid.uuid4().hex
    anon = await api.user_headers(app, installation_id=installation)
    merged = await api.feedback(anon, body="Anonymous then merged")
    token = identity_token(app.identity_secret, "leaver", kid=app.identity_kid)
    ident = await api.session(app, installation_id=installation, user_token=token)
    ident_headers = api.bearer(ident["session_token"])
    own = await api.feedback(ident_headers, body="While logged in")
    assert sorted(await conversation_ids(api, ident_headers)) == sorted([merged["id"], own["id"]])

    # Logout: a new anonymous session on the same installation.
    fresh = await api.session(app, installation_id=installation)
    assert fresh["user"]["external_id"] is None
    assert fresh["user"]["id"] != ident["user"]["id"]
    fresh_headers = api.bearer(fresh["session_token"])
    assert await conversation_ids(api, fresh_headers) == []
    for conv_id in (merged["id"], own["id"]):
        r = await api.http.get(f"/v1/client/conversations/{conv_id}", headers=fresh_headers)
        assert_problem(r, 404, "not_found")
    r = await api.http.get("/v1/client/unread", headers=fresh_headers)
    assert r.json() == {"unread_count": 0}
    r = await api.http.get("/v1/client/me", headers=fresh_headers)
    assert r.json()["name"] is None
    assert r.json()["email"] is None
    # The identified user's session on this installation is over.
    for path in ("/v1/client/me", "/v1/client/conversations"):
        r = await api.http.get(path, headers=ident_headers)
        assert_problem(r, 401, "unauthenticated")
    # Logging in again brings the conversations back, without the new anonymous ones leaking.
    again = await api.session(app, installation_id=installation, user_token=token)
    assert again["user"]["id"] == ident["user"]["id"]
    assert sorted(await conversation_ids(api, api.bearer(again["session_token"]))) == sorted(
        [merged["id"], own["id"]]
    )


async def test_identified_user_on_second_installation(api: Api) -> None:
    app = await api.create_app()
    token = identity_token(app.identity_secret, "roamer", kid=app.identity_kid)
    phone = await api.session(app, installation_id=uuid.uuid4().hex, user_token=token)
    phone_headers = api.bearer(phone["session_token"])
    conv = await api.feedback(phone_headers, body="From the phone")
    tablet = await api.session(app, installation_id=uuid.uuid4().hex, user_token=token)
    assert tablet["user"]["id"] == phone["user"]["id"]
    tablet_headers = api.bearer(tablet["session_token"])
    assert await conversation_ids(api, tablet_headers) == [conv["id"]]
    # A session of the same user elsewhere does not end the phone's session.
    r = await api.http.get("/v1/client/me", headers=phone_headers)
    assert r.status_code == 200, r.text


async def test_identified_users_never_see_each_other(api: Api) -> None:
    app = await api.create_app()
    installation = uuid.uuid4().hex
    alice_token = identity_token(app.identity_secret, "alice", kid=app.identity_kid)
    bob_token = identity_token(app.identity_secret, "bob", kid=app.identity_kid)
    alice = await api.session(app, installation_id=installation, user_token=alice_token)
    alice_headers = api.bearer(alice["session_token"])
    alice_conv = await api.feedback(alice_headers, body="Alice's problem")
    # Bob signs in on the same device, and on a device of his own.
    bob_shared = await api.session(app, installation_id=installation, user_token=bob_token)
    bob_own = await api.session(app, installation_id=uuid.uuid4().hex, user_token=bob_token)
    assert bob_shared["user"]["id"] == bob_own["user"]["id"] != alice["user"]["id"]
    bob_headers = api.bearer(bob_own["session_token"])
    bob_conv = await api.feedback(bob_headers, body="Bob's problem")
    for headers in (api.bearer(bob_shared["session_token"]), bob_headers):
        assert await conversation_ids(api, headers) == [bob_conv["id"]]
        r = await api.http.get(f"/v1/client/conversations/{alice_conv['id']}", headers=headers)
        assert_problem(r, 404, "not_found")
    # Alice's session on the shared device ended when Bob signed in there.
    assert_problem(
        await api.http.get("/v1/client/conversations", headers=alice_headers),
        401,
        "unauthenticated",
    )
    alice_elsewhere = await api.session(app, user_token=alice_token)
    alice_headers = api.bearer(alice_elsewhere["session_token"])
    assert await conversation_ids(api, alice_headers) == [alice_conv["id"]]
    r = await api.http.get(f"/v1/client/conversations/{bob_conv['id']}", headers=alice_headers)
    assert_problem(r, 404, "not_found")
    r = await api.http.post(
        f"/v1/client/conversations/{bob_conv['id']}/messages",
        json={"body": "Not mine"},
        headers=alice_headers,
    )
    assert_problem(r, 404, "not_found")


async def test_same_sub_in_another_app_is_another_user(api: Api) -> None:
    app_a = await api.create_app("A")
    app_b = await api.create_app("B")
    installation = uuid.uuid4().hex  # the same device id in both apps, too
    anon_a = await api.session(app_a, installation_id=installation)
    anon_b = await api.session(app_b, installation_id=installation)
    assert anon_a["user"]["id"] != anon_b["user"]["id"]
    a = await api.session(
        app_a,
        installation_id=installation,
        user_token=identity_token(app_a.identity_secret, "same", kid=app_a.identity_kid),
    )
    conv = await api.feedback(api.bearer(a["session_token"]))
    b = await api.session(
        app_b,
        installation_id=installation,
        user_token=identity_token(app_b.identity_secret, "same", kid=app_b.identity_kid),
    )
    assert b["user"]["id"] != a["user"]["id"]
    # Signing in to app B did not end the session in app A.
    r = await api.http.get("/v1/client/me", headers=api.bearer(a["session_token"]))
    assert r.status_code == 200, r.text
    assert await conversation_ids(api, api.bearer(b["session_token"])) == []
    r = await api.http.get(
        f"/v1/client/conversations/{conv['id']}", headers=api.bearer(b["session_token"])
    )
    assert_problem(r, 404, "not_found")


# --- the end user -------------------------------------------------------------------------


async def test_patch_me(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    r = await api.http.patch(
        "/v1/client/me",
        json={
            "name": "Ada",
            "email": "ada@example.com",
            "attributes": {"plan": "pro", "seats": 3, "beta": True, "score": 1.5},
        },
        headers=user,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["name"] == "Ada"
    assert body["email"] == "ada@example.com"
    assert body["attributes"] == {"plan": "pro", "seats": 3, "beta": True, "score": 1.5}
    # Attributes merge; null removes a key; absent fields stay.
    r = await api.http.patch(
        "/v1/client/me",
        json={"attributes": {"plan": None, "seats": 4, "locale": "de"}},
        headers=user,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["attributes"] == {"seats": 4, "beta": True, "score": 1.5, "locale": "de"}
    assert body["name"] == "Ada"
    assert body["email"] == "ada@example.com"
    # Removing a key that does not exist is harmless; null name clears it.
    r = await api.http.patch(
        "/v1/client/me", json={"name": None, "attributes": {"missing": None}}, headers=user
    )
    assert r.status_code == 200, r.text
    assert r.json()["name"] is None
    assert r.json()["attributes"] == {"seats": 4, "beta": True, "score": 1.5, "locale": "de"}
    r = await api.http.get("/v1/client/me", headers=user)
    assert r.json()["name"] is None
    assert r.json()["email"] == "ada@example.com"
    assert r.json()["attributes"] == {"seats": 4, "beta": True, "score": 1.5, "locale": "de"}


async def _end_user_in_created_event(api: Api, conversation_id: str) -> Any:
    """The end user as the ``conversation.created`` event of a conversation shows them
    (what agents' streams and webhooks carry)."""
    async with api.state.db.session(write=False) as db:
        data = await db.scalar(
            select(Event.data).where(
                Event.conversation_id == uuid.UUID(conversation_id),
                Event.type == "conversation.created",
            )
        )
    assert data is not None
    return data["conversation"]["end_user"]


async def test_a_new_feedback_shows_its_end_user_as_they_are_now(api: Api) -> None:
    """The session's check is kept for a few seconds with the end user as it read them;
    on PostgreSQL a new feedback takes them from there rather than reading them again,
    in a statement that writes only if their row is unchanged since. A change made
    meanwhile (PATCH /v1/client/me keeps the check) sends the feedback the way that
    reads them: what the agents' event and webhooks carry is never an old name."""
    app = await api.create_app()
    user = await api.user_headers(app)

    async def shown(body: str, **headers: str) -> Any:
        conv = await api.feedback({**user, **headers}, body=body)
        return await _end_user_in_created_event(api, conv["id"])

    assert (await shown("first"))["name"] is None  # (the check is kept from here on)
    for name, headers in (("Ada", {}), ("Grace", {"Idempotency-Key": "after-rename"})):
        r = await api.http.patch(
            "/v1/client/me", json={"name": name, "attributes": {"plan": name}}, headers=user
        )
        assert r.status_code == 200, r.text
        end_user = await shown(f"as {name}", **headers)
        assert (end_user["name"], end_user["attributes"]) == (name, {"plan": name})
        assert (await shown(f"again as {name}"))["name"] == name


async def test_a_session_check_keeps_the_end_user_only_while_small(api: Api) -> None:
    """The cache holds up to 100,000 checks: an end user's attributes (up to 50 x 1,000
    characters) are kept with one only up to 2 KiB; beyond, a new feedback reads them."""
    app = await api.create_app()
    user = await api.user_headers(app)
    token_hash = hash_token(user["Authorization"].removeprefix("Bearer "))
    large = {k: k * 1000 for k in "abc"}
    for attributes, kept in (({"plan": "pro"}, True), (large, False)):
        r = await api.http.patch("/v1/client/me", json={"attributes": attributes}, headers=user)
        assert r.status_code == 200, r.text
        api.state.principals.clear()
        conv = await api.feedback(user, body="hello")
        principal = api.state.principals.get(token_hash)
        assert isinstance(principal, ClientPrincipal)
        assert (principal.user is not None) is kept
        shown = await _end_user_in_created_event(api, conv["id"])
        assert shown["attributes"] == r.json()["attributes"]


@pytest.mark.parametrize(
    "body",
    [
        {"email": "not-an-email"},
        {"email": "two@@example.com"},
        {"nickname": "Ada"},
        {"name": "Ada", "unknown": 1},
        {"attributes": {"nested": {"a": 1}}},
        {"attributes": ["plan"]},
        {"name": 42},
        {"name": "x" * 201},
        {"attributes": {"long": "x" * 1001}},
        {"attributes": {f"k{i}": i for i in range(51)}},
        {"attributes": {"k" * 65: 1}},
    ],
    ids=[
        "bad_email",
        "bad_email_double_at",
        "unknown_field",
        "unknown_field_with_valid",
        "nested_attribute",
        "attributes_not_object",
        "name_not_string",
        "name_too_long",
        "attribute_value_too_long",
        "too_many_attributes",
        "attribute_key_too_long",
    ],
)
async def test_patch_me_invalid(api: Api, body: dict[str, Any]) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    r = await api.http.patch("/v1/client/me", json={"name": "Kept"}, headers=user)
    assert r.status_code == 200, r.text
    r = await api.http.patch("/v1/client/me", json=body, headers=user)
    assert_problem(r, 422, "validation_failed")
    r = await api.http.get("/v1/client/me", headers=user)
    assert r.json()["name"] == "Kept"
    assert r.json()["email"] is None


async def test_external_id_is_not_changeable(api: Api) -> None:
    app = await api.create_app()
    token = identity_token(app.identity_secret, "real-id", kid=app.identity_kid)
    user = api.bearer((await api.session(app, user_token=token))["session_token"])
    for body in (
        {"external_id": "someone-else"},
        {"name": "Renamed", "external_id": "someone-else"},
        {"external_id": None},
    ):
        r = await api.http.patch("/v1/client/me", json=body, headers=user)
        assert_problem(r, 422, "validation_failed")
    r = await api.http.get("/v1/client/me", headers=user)
    assert r.json()["external_id"] == "real-id"
    assert r.json()["name"] is None
    # An anonymous user cannot claim an identity either.
    anon = await api.user_headers(app)
    r = await api.http.patch("/v1/client/me", json={"external_id": "real-id"}, headers=anon)
    assert_problem(r, 422, "validation_failed")
    r = await api.http.get("/v1/client/me", headers=anon)
    assert r.json()["external_id"] is None


# --- the SDK's configuration --------------------------------------------------------------


async def test_client_config(api: Api) -> None:
    app = await api.create_app(
        "Configured",
        categories=["Bug", "Idea"],
        custom_fields=[
            {"key": "order_id", "type": "string", "required": True, "label": "Order"},
            {"key": "plan", "type": "select", "options": ["free", "pro"]},
        ],
    )
    user = await api.user_headers(app)
    r = await api.http.get("/v1/client/config", headers=user)
    assert r.status_code == 200, r.text
    config = r.json()
    assert config["app"] == {"id": app.id, "name": "Configured"}
    assert config["identity_mode"] == "optional"
    assert config["categories"] == ["Bug", "Idea"]
    fields = config["custom_fields"]
    assert [(f["key"], f["type"], f["required"]) for f in fields] == [
        ("order_id", "string", True),
        ("plan", "select", False),
    ]
    assert fields[0]["label"] == "Order"
    assert fields[1]["options"] == ["free", "pro"]

    await patch_settings(api, app, identity_mode="required", categories=["Crash"], custom_fields=[])
    r = await api.http.get("/v1/client/config", headers=user)
    assert r.status_code == 200, r.text
    config = r.json()
    assert config["identity_mode"] == "required"
    assert config["categories"] == ["Crash"]
    assert config["custom_fields"] == []


async def test_client_config_defaults(api: Api) -> None:
    app = await api.create_app()
    token = identity_token(app.identity_secret, "cfg", kid=app.identity_kid)
    user = await api.user_headers(app, user_token=token)
    r = await api.http.get("/v1/client/config", headers=user)
    assert r.status_code == 200, r.text
    config = r.json()
    assert config["identity_mode"] == "optional"
    assert config["categories"] == []
    assert config["custom_fields"] == []


# --- session expiry -----------------------------------------------------------------------


async def test_expired_session_token(api: Api) -> None:
    app = await api.create_app()
    installation = uuid.uuid4().hex
    data = await api.session(app, installation_id=installation)
    token = data["session_token"]
    other = await api.user_headers(app)
    headers = api.bearer(token)
    r = await api.http.get("/v1/client/me", headers=headers)
    assert r.status_code == 200, r.text
    past = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    async with api.state.db.session(write=True) as db:
        result = await db.execute(
            update(ClientSession)
            .where(ClientSession.token_hash == hash_token(token))
            .values(expires_at=past)
        )
        assert getattr(result, "rowcount", None) == 1
    # This process checked the token a moment ago and trusts it for a few seconds
    # (TELLBACK_AUTH_CACHE_SECONDS); the clock jump faked here skips that wait.
    api.state.principals.clear()
    for path in ("/v1/client/me", "/v1/client/conversations", "/v1/client/config"):
        assert_problem(await api.http.get(path, headers=headers), 401, "unauthenticated")
    # Other sessions are untouched, and a new session for the installation works again.
    r = await api.http.get("/v1/client/me", headers=other)
    assert r.status_code == 200, r.text
    renewed = await api.session(app, installation_id=installation)
    assert renewed["user"]["id"] == data["user"]["id"]
    r = await api.http.get("/v1/client/me", headers=api.bearer(renewed["session_token"]))
    assert r.status_code == 200, r.text


async def test_session_token_hash_is_stored_not_token(api: Api) -> None:
    app = await api.create_app()
    token = (await api.session(app))["session_token"]
    digest = hashlib.sha256(token.encode()).hexdigest()
    async with api.state.db.session(write=False) as db:
        rows = list(await db.scalars(select(ClientSession.token_hash)))
    assert token not in rows
    assert digest in rows


# --- refused requests must not hold the database ------------------------------------------


def checked_out_connections(api: Api) -> int:
    pool = api.state.db.engine.pool
    assert isinstance(pool, QueuePool)
    return pool.checkedout()


async def assert_database_released(api: Api, what: str) -> None:
    """No connection is still checked out, and a write can start at once."""
    await asyncio.sleep(0.05)  # let finalizers that were already scheduled run
    held = checked_out_connections(api)
    assert held == 0, f"{held} database connection(s) still held after {what}"
    try:
        r = await asyncio.wait_for(
            api.http.post("/v1/admin/apps", json={"name": "probe"}, headers=api.admin), 10
        )
    except TimeoutError:
        pytest.fail(f"a write hangs after {what}: the refused request kept the write lock")
    assert r.status_code == 201, r.text


REFUSED_CLIENT_REQUESTS = {
    "get_me_forged": ("GET", "/v1/client/me", "forged"),
    "get_me_no_header": ("GET", "/v1/client/me", "none"),
    "patch_me_forged": ("PATCH", "/v1/client/me", "forged"),
    "patch_me_expired": ("PATCH", "/v1/client/me", "expired"),
    "config_forged": ("GET", "/v1/client/config", "forged"),
    "create_conversation_forged": ("POST", "/v1/client/conversations", "forged"),
    "list_conversations_forged": ("GET", "/v1/client/conversations", "forged"),
    "patch_me_rate_limited": ("PATCH", "/v1/client/me", "rate_limited"),
}


@pytest.mark.parametrize("case", list(REFUSED_CLIENT_REQUESTS))
async def test_refused_client_request_releases_the_database(api: Api, case: str) -> None:
    """A 401/429 must end the request's transaction when the response is sent.

    The garbage collector is paused so that cleanup which only happens when it
    collects a reference cycle (minutes later, or never under low load) shows.
    """
    method, path, kind = REFUSED_CLIENT_REQUESTS[case]
    app = await api.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 1})
    headers: dict[str, str] = {}
    expected = (401, "unauthenticated")
    if kind == "forged":
        headers = api.bearer("tbs_forged-session-token")
    elif kind == "expired":
        token = (await api.session(app))["session_token"]
        async with api.state.db.session(write=True) as db:
            await db.execute(
                update(ClientSession)
                .where(ClientSession.token_hash == hash_token(token))
                .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5))
            )
        headers = api.bearer(token)
    elif kind == "rate_limited":
        headers = await api.user_headers(app)
        statuses = []
        for _ in range(10):  # use up the allowance (and its small burst)
            r = await api.http.get("/v1/client/me", headers=headers)
            statuses.append(r.status_code)
            if r.status_code != 200:
                break
        assert statuses[-1] == 429, statuses
        expected = (429, "rate_limited")
    body = {"body": "hello"} if method == "POST" else {"name": "x"}
    gc.collect()
    await asyncio.sleep(0.05)
    assert checked_out_connections(api) == 0
    gc.disable()
    try:
        for attempt in range(2):
            try:
                r = await asyncio.wait_for(
                    api.http.request(
                        method, path, json=body if method != "GET" else None, headers=headers
                    ),
                    10,
                )
            except TimeoutError:
                pytest.fail(f"refused request #{attempt + 1} hangs: the first kept the write lock")
            assert_problem(r, *expected)
        await assert_database_released(api, f"{method} {path} -> {expected[0]}")
    finally:
        gc.enable()
        gc.collect()  # whatever leaked is finalized here, not in a later test
        await asyncio.sleep(0.1)


async def test_a_create_resent_after_login_with_the_same_key_replays(api: Api) -> None:
    # The answer to an anonymous create was lost; the user logs in; the SDK resends the
    # create with the same Idempotency-Key, now as the identified user.
    app = await api.create_app()
    installation = uuid.uuid4().hex
    anon = await api.user_headers(app, installation_id=installation)
    key = {"Idempotency-Key": uuid.uuid4().hex}
    body = {"body": "Lost answer"}
    first = await api.http.post("/v1/client/conversations", json=body, headers={**anon, **key})
    assert first.status_code == 201, first.text
    token = identity_token(app.identity_secret, "resender", kid=app.identity_kid)
    ident = api.bearer(
        (await api.session(app, installation_id=installation, user_token=token))["session_token"]
    )
    again = await api.http.post("/v1/client/conversations", json=body, headers={**ident, **key})
    assert again.status_code == 201, again.text
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json()["id"] == first.json()["id"]
    assert await conversation_ids(api, ident) == [first.json()["id"]]


async def test_session_checks_are_cached_briefly_and_dropped_when_access_changes(
    api: Api,
) -> None:
    """A checked session token is trusted for TELLBACK_AUTH_CACHE_SECONDS in this process;
    a change that can end or alter it (here: the app's settings) drops the cache at commit."""
    app = await api.create_app()
    token = (await api.session(app))["session_token"]
    headers = api.bearer(token)
    assert (await api.http.get("/v1/client/me", headers=headers)).status_code == 200
    async with api.state.db.session(write=True) as db:
        await db.execute(
            update(ClientSession)
            .where(ClientSession.token_hash == hash_token(token))
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5))
        )
    # A change made behind the server's back is seen once the cached check runs out ...
    assert (await api.http.get("/v1/client/me", headers=headers)).status_code == 200
    # ... and at once after anything that changes access commits.
    r = await api.http.patch(
        f"/v1/admin/apps/{app.id}",
        json={"settings": {"categories": ["bug"]}},
        headers=api.admin,
    )
    assert r.status_code == 200, r.text
    assert_problem(await api.http.get("/v1/client/me", headers=headers), 401, "unauthenticated")


UNLIMITED = {"app_per_minute": 0, "user_per_minute": 0}


async def _until_refused(
    api: Api, headers: dict[str, str], within: float, path: str = "/v1/client/me"
) -> float:
    """Seconds until ``api`` refuses these credentials on ``path`` (401), polled every
    20 ms."""
    start = time.monotonic()
    while (r := await api.http.get(path, headers=headers)).status_code == 200:
        elapsed = time.monotonic() - start
        assert elapsed < within, f"still trusted after {elapsed:.1f}s"
        await asyncio.sleep(0.02)
    assert_problem(r, 401, "unauthenticated")
    return time.monotonic() - start


async def _listening(apis: list[Api]) -> None:
    """Until every process's LISTEN connection is up (a change before it would be missed)."""
    deadline = time.monotonic() + 20
    while await listening_backends(apis[0].state) < len(apis):
        assert time.monotonic() < deadline, "the processes' LISTEN connections"
        await asyncio.sleep(0.05)


async def _checked_through(a: Api, b: Api) -> tuple[str, dict[str, str]]:
    """Once both processes listen: a session created through ``a`` whose check ``b`` has
    cached (for the minute these tests set), and its headers."""
    await _listening([a, b])
    app = await a.create_app(rate_limits=UNLIMITED)  # (the tests poll)
    token = (await a.session(app))["session_token"]
    headers = b.bearer(token)
    assert (await b.http.get("/v1/client/me", headers=headers)).status_code == 200
    return token, headers


async def _revoke_behind_the_servers_back(api: Api, token: str) -> None:
    """End the session in the database directly: no commit hook, no notification."""
    async with api.state.db.session(write=True) as db:
        await db.execute(
            update(ClientSession)
            .where(ClientSession.token_hash == hash_token(token))
            .values(revoked_at=dt.datetime.now(dt.UTC))
        )


async def test_a_session_ended_in_one_process_is_refused_by_the_others_at_once(
    database_url: str, tmp_path: Path
) -> None:
    """Two API processes on PostgreSQL. Bob signs in on the phone Alice used, through
    one process; Alice's session ends there at commit, and NOTIFY tellback_auth empties
    the other process's cache of checked sessions too. The cache lifetime is a minute
    here: without the notification, the other process would keep trusting it that long."""
    async with processes(database_url, tmp_path, auth_cache_seconds=60) as (a, b):
        await _listening([a, b])
        app = await a.create_app(rate_limits=UNLIMITED)  # (the polling below)
        phone = uuid.uuid4().hex

        async def sign_in(sub: str) -> dict[str, str]:
            token = identity_token(app.identity_secret, sub, kid=app.identity_kid)
            session = await a.session(app, installation_id=phone, user_token=token)
            return a.bearer(session["session_token"])

        alice = await sign_in("alice")
        assert (await b.http.get("/v1/client/me", headers=alice)).status_code == 200  # cached
        bob = await sign_in("bob")
        assert_problem(await a.http.get("/v1/client/me", headers=alice), 401, "unauthenticated")
        assert await _until_refused(b, alice, within=3) < 3
        assert (await b.http.get("/v1/client/me", headers=bob)).status_code == 200


async def test_an_agent_disabled_or_rotated_in_one_process_is_refused_by_the_others_at_once(
    database_url: str, tmp_path: Path
) -> None:
    """Agent tokens are cached like sessions. Disabling an agent, or rotating its token,
    through one process empties the other's cache too (NOTIFY tellback_auth): refused
    there at once, not after the minute-long lifetime set here."""
    async with processes(database_url, tmp_path, auth_cache_seconds=60) as (a, b):
        await _listening([a, b])
        app = await a.create_app()
        me = "/v1/agent/me"
        for change in ("disable", "rotate"):
            agent_id, agent = await a.create_agent(app)
            assert (await b.http.get(me, headers=agent)).status_code == 200  # cached
            if change == "disable":
                r = await a.http.patch(
                    f"/v1/admin/agents/{agent_id}", json={"disabled": True}, headers=a.admin
                )
            else:
                r = await a.http.post(f"/v1/admin/agents/{agent_id}/rotate-token", headers=a.admin)
            assert r.status_code == 200, r.text
            assert_problem(await a.http.get(me, headers=agent), 401, "unauthenticated")
            assert await _until_refused(b, agent, within=3, path=me) < 3


async def test_a_process_that_listens_again_forgets_the_checks_it_cached(
    database_url: str, tmp_path: Path
) -> None:
    """While a process's LISTEN connection is down it may miss a change of access, so
    when it listens again it drops every cached check. Here the change is made behind
    the server's back (no notification at all) and the connection is cut: the session
    is refused once the process has reconnected, not after the minute-long lifetime."""
    async with processes(database_url, tmp_path, auth_cache_seconds=60) as (a, b):
        token, headers = await _checked_through(a, b)
        await _revoke_behind_the_servers_back(a, token)
        await asyncio.sleep(0.3)
        # Control: nothing told the processes, so b still trusts its cached check.
        assert (await b.http.get("/v1/client/me", headers=headers)).status_code == 200
        with capture_logs() as logs:
            async with a.state.db.session(write=True) as db:
                for pid in await listening_pids(a.state):
                    await db.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            assert await _until_refused(b, headers, within=10) < 10
            # ... and each process says that it lost listening, and that it listens again.
            for _ in range(100):
                if sum(e["event"] == "db.listening" for e in logs) == 2:
                    break
                await asyncio.sleep(0.05)
        lost = [e["listener"] for e in logs if e["event"] == "db.listen_connection_lost"]
        back = [e["listener"] for e in logs if e["event"] == "db.listening"]
        assert len(lost) == 2, logs
        assert sorted(back) == sorted(lost)


async def test_a_listen_connection_that_stops_answering_is_replaced(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LISTEN connection can die without a word (a NAT timeout, a failover): nothing
    arrives and nothing says so. Here each process's LISTEN backend is frozen (SIGSTOP)
    and the session ended behind the servers' backs. The ping (every 0.2 s here, 30 s
    by default) goes unanswered, the process listens again on a new connection and
    forgets what it cached, where it would otherwise trust the session for a minute."""
    from tellback_server.db import listen

    monkeypatch.setattr(listen, "PING_SECONDS", 0.2)
    monkeypatch.setattr(listen, "PING_TIMEOUT", 0.5)
    async with processes(database_url, tmp_path, auth_cache_seconds=60) as (a, b):
        token, headers = await _checked_through(a, b)
        frozen = await listening_pids(a.state)
        assert len(frozen) == 2
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            await _revoke_behind_the_servers_back(a, token)
            assert await _until_refused(b, headers, within=15) < 15
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)


def test_a_check_read_before_the_cache_was_emptied_is_not_kept() -> None:
    """A request reads a session row, then (before it stores the answer) a change of
    access empties the cache, here or through another process's notification. The row
    it read may be the one just revoked: it is used for this request, never cached."""
    cache: PrincipalCache[str] = PrincipalCache(60)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    generation = cache.generation
    cache.clear()  # (access changed while the row was being read)
    cache.put("hash", "alice", later, generation)
    assert cache.get("hash") is None
    cache.put("hash", "alice", later, cache.generation)
    assert cache.get("hash") == "alice"


async def test_sessions_ended_a_week_ago_are_purged(api: Api) -> None:
    """Nothing deleted a session row: every new installation's first session added
    one for good (an address may create 300 a minute)."""
    from tellback_server.domain.identity.retention import purge_sessions

    app = await api.create_app()
    tokens = {
        name: (await api.session(app))["session_token"]
        for name in ("live", "old", "recent", "revoked")
    }
    now = dt.datetime.now(dt.UTC)
    async with api.state.db.session(write=True) as db:
        for name, values in {
            "old": {"expires_at": now - dt.timedelta(days=8)},
            "recent": {"expires_at": now - dt.timedelta(days=6)},
            "revoked": {"revoked_at": now - dt.timedelta(days=8)},
        }.items():
            await db.execute(
                update(ClientSession)
                .where(ClientSession.token_hash == hash_token(tokens[name]))
                .values(**values)
            )
    await purge_sessions(api.state)
    async with api.state.db.session(write=False) as db:
        kept = set(await db.scalars(select(ClientSession.token_hash)))
    assert {name for name, token in tokens.items() if hash_token(token) in kept} == {
        "live",
        "recent",
    }
