"""Idempotency-Key on every create, as API.md (Idempotency) fixes it.

Same key + same body replays the first response (status, body bytes, header
``Idempotent-Replayed: true``) and creates nothing; same key + different body is
409 ``idempotency_key_reused``; keys are scoped to the caller; a concurrent
request with a key in flight waits for the first and replays it (API.md also
allows 409 ``idempotency_key_in_progress``; this server does not need it). A key
is 1-255 printable ASCII characters, anything else is 400.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from tellback_server.db.models import AdminToken, IdempotencyKey
from tellback_server.security import ADMIN_TOKEN_PREFIX, hash_token, new_token
from tests.server.conftest import Api
from tests.server.test_attachments_flow import uploaded

PROBLEM_JSON = "application/problem+json"
REPLAYED = "idempotent-replayed"

Headers = dict[str, str]


# ----- helpers ------------------------------------------------------------------------------


def media_type(r: httpx.Response) -> str:
    return r.headers["content-type"].split(";")[0].strip()


def assert_problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, f"{r.status_code} {r.text}"
    assert media_type(r) == PROBLEM_JSON
    problem = r.json()
    assert problem["status"] == status
    assert problem["code"] == code


def assert_original(r: httpx.Response) -> None:
    assert r.status_code == 201, r.text
    assert media_type(r) == "application/json"
    assert REPLAYED not in r.headers


def assert_replay_of(r: httpx.Response, first: httpx.Response) -> None:
    assert r.status_code == first.status_code, r.text
    assert r.content == first.content
    assert r.headers.get(REPLAYED) == "true"
    assert media_type(r) == "application/json"


async def items(api: Api, path: str, headers: Headers) -> list[dict[str, Any]]:
    r = await api.http.get(path, params={"limit": 100}, headers=headers)
    assert r.status_code == 200, r.text
    page = r.json()
    assert page["next_cursor"] is None
    result: list[dict[str, Any]] = page["items"]
    return result


async def post(
    api: Api, path: str, body: dict[str, Any], headers: Headers, key: str | bytes | None
) -> httpx.Response:
    raw = [(name.encode(), value.encode()) for name, value in headers.items()]
    if key is not None:
        raw.append((b"Idempotency-Key", key if isinstance(key, bytes) else key.encode("ascii")))
    return await api.http.post(path, json=body, headers=raw)


# ----- one case per create endpoint ---------------------------------------------------------


@dataclass
class CreateCase:
    path: str
    headers: Headers
    body: dict[str, Any]
    other_body: dict[str, Any]
    count: Callable[[], Awaitable[int]]


CREATE_KINDS = ["client_conversation", "client_message", "agent_reply", "admin_app", "admin_agent"]


async def make_case(api: Api, kind: str) -> CreateCase:
    app = await api.create_app("Idempotency")
    user = await api.user_headers(app)

    if kind == "client_conversation":

        async def count_conversations() -> int:
            return len(await items(api, "/v1/client/conversations", user))

        return CreateCase(
            path="/v1/client/conversations",
            headers=user,
            body={"body": "The app crashes on launch", "subject": "Crash"},
            other_body={"body": "The app crashes on launch", "subject": "Different"},
            count=count_conversations,
        )

    conv = await api.feedback(user)
    messages_path = f"/v1/client/conversations/{conv['id']}/messages"
    if kind == "client_message":

        async def count_messages() -> int:
            return len(await items(api, messages_path, user))

        return CreateCase(
            path=messages_path,
            headers=user,
            body={"body": "More details: it happens on iOS 18"},
            other_body={"body": "More details: it happens on iOS 17"},
            count=count_messages,
        )

    _, agent = await api.create_agent(app)
    if kind == "agent_reply":
        agent_path = f"/v1/agent/conversations/{conv['id']}/messages"

        async def count_agent_messages() -> int:
            return len(await items(api, agent_path, agent))

        return CreateCase(
            path=agent_path,
            headers=agent,
            body={"body": "Thanks, we are on it"},
            other_body={"body": "Thanks, we are on it", "internal": True},
            count=count_agent_messages,
        )

    if kind == "admin_app":

        async def count_apps() -> int:
            return len(await items(api, "/v1/admin/apps", api.admin))

        return CreateCase(
            path="/v1/admin/apps",
            headers=api.admin,
            body={"name": "Shop", "bundle_id": "com.example.shop"},
            other_body={"name": "Shop", "bundle_id": "com.example.other"},
            count=count_apps,
        )

    assert kind == "admin_agent"

    async def count_agents() -> int:
        return len(await items(api, "/v1/admin/agents", api.admin))

    return CreateCase(
        path="/v1/admin/agents",
        headers=api.admin,
        body={"name": "Grace", "email": "grace@example.com", "app_ids": [app.id]},
        other_body={"name": "Grace", "email": "grace@example.com", "app_ids": []},
        count=count_agents,
    )


# ----- replay, conflict ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", CREATE_KINDS)
async def test_same_key_same_body_replays_and_creates_nothing(api: Api, kind: str) -> None:
    case = await make_case(api, kind)
    before = await case.count()

    first = await post(api, case.path, case.body, case.headers, "key-0001")
    assert_original(first)
    assert await case.count() == before + 1

    for _ in range(3):
        again = await post(api, case.path, case.body, case.headers, "key-0001")
        assert_replay_of(again, first)
    assert await case.count() == before + 1


@pytest.mark.parametrize("kind", CREATE_KINDS)
async def test_same_key_different_body_is_rejected(api: Api, kind: str) -> None:
    case = await make_case(api, kind)
    before = await case.count()
    first = await post(api, case.path, case.body, case.headers, "key-0002")
    assert_original(first)

    r = await post(api, case.path, case.other_body, case.headers, "key-0002")
    assert_problem(r, 409, "idempotency_key_reused")
    assert REPLAYED not in r.headers
    assert await case.count() == before + 1

    # The first request's replay is unaffected by the rejected one.
    assert_replay_of(await post(api, case.path, case.body, case.headers, "key-0002"), first)
    # And the other body goes through under a fresh key.
    assert_original(await post(api, case.path, case.other_body, case.headers, "key-0003"))
    assert await case.count() == before + 2


@pytest.mark.parametrize("kind", CREATE_KINDS)
async def test_without_key_every_request_creates(api: Api, kind: str) -> None:
    case = await make_case(api, kind)
    before = await case.count()
    first = await post(api, case.path, case.body, case.headers, None)
    second = await post(api, case.path, case.body, case.headers, None)
    assert_original(first)
    assert_original(second)
    assert first.json()["id"] != second.json()["id"]
    assert await case.count() == before + 2


async def test_replay_is_the_first_response_even_after_changes(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    _, agent = await api.create_agent(app)
    body = {"body": "It crashes"}
    first = await post(api, "/v1/client/conversations", body, user, "create-1")
    assert_original(first)
    conv_id = first.json()["id"]
    r = await api.http.post(
        f"/v1/agent/conversations/{conv_id}/messages", json={"body": "Fixed"}, headers=agent
    )
    assert r.status_code == 201, r.text
    r = await api.http.get(f"/v1/client/conversations/{conv_id}", headers=user)
    assert r.json()["status"] == "pending"

    again = await post(api, "/v1/client/conversations", body, user, "create-1")
    assert_replay_of(again, first)
    assert again.json()["status"] == "open"
    assert len(await items(api, "/v1/client/conversations", user)) == 1


async def test_expired_key_is_fresh_again(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    body = {"body": "It crashes"}
    first = await post(api, "/v1/client/conversations", body, user, "old-key")
    assert_original(first)
    async with api.state.db.session(write=True) as db:
        result = await db.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.key == "old-key")
            .values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
        assert getattr(result, "rowcount", None) == 1

    second = await post(api, "/v1/client/conversations", body, user, "old-key")
    assert_original(second)
    assert second.json()["id"] != first.json()["id"]
    assert len(await items(api, "/v1/client/conversations", user)) == 2
    assert_replay_of(await post(api, "/v1/client/conversations", body, user, "old-key"), second)


# ----- scope: the caller --------------------------------------------------------------------


async def test_key_scope_is_per_end_user(api: Api) -> None:
    app = await api.create_app("A")
    other_app = await api.create_app("B")
    alice = await api.user_headers(app)
    bob = await api.user_headers(app)
    carol = await api.user_headers(other_app)
    body = {"body": "Same words, same key"}

    responses = [
        await post(api, "/v1/client/conversations", body, who, "shared-key")
        for who in (alice, bob, carol)
    ]
    for r in responses:
        assert_original(r)
    assert len({r.json()["id"] for r in responses}) == 3
    for who, r in zip((alice, bob, carol), responses, strict=True):
        assert [c["id"] for c in await items(api, "/v1/client/conversations", who)] == [
            r.json()["id"]
        ]
        # Each caller's own replay is its own first response.
        assert_replay_of(await post(api, "/v1/client/conversations", body, who, "shared-key"), r)

    # A different body under another caller's key is not a reuse.
    r = await post(api, "/v1/client/conversations", {"body": "other"}, alice, "bob-only")
    assert_original(r)
    r = await post(api, "/v1/client/conversations", {"body": "different"}, bob, "bob-only")
    assert_original(r)


async def test_key_scope_is_per_agent(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    conv = await api.feedback(user)
    _, ada = await api.create_agent(app, name="Ada")
    _, bea = await api.create_agent(app, name="Bea")
    path = f"/v1/agent/conversations/{conv['id']}/messages"
    body = {"body": "Looking into it"}

    r1 = await post(api, path, body, ada, "reply-key")
    r2 = await post(api, path, body, bea, "reply-key")
    assert_original(r1)
    assert_original(r2)
    assert r1.json()["id"] != r2.json()["id"]
    assert r1.json()["author"]["name"] == "Ada"
    assert r2.json()["author"]["name"] == "Bea"
    assert len(await items(api, path, ada)) == 3


async def test_key_scope_is_per_admin_token(api: Api) -> None:
    second_token = new_token(ADMIN_TOKEN_PREFIX)
    async with api.state.db.session(write=True) as db:
        db.add(AdminToken(name="second", token_hash=hash_token(second_token)))
    second = api.bearer(second_token)
    body = {"name": "Same app name"}

    r1 = await post(api, "/v1/admin/apps", body, api.admin, "app-key-1")
    r2 = await post(api, "/v1/admin/apps", body, second, "app-key-1")
    assert_original(r1)
    assert_original(r2)
    assert r1.json()["id"] != r2.json()["id"]
    assert len(await items(api, "/v1/admin/apps", api.admin)) == 2
    assert_replay_of(await post(api, "/v1/admin/apps", body, second, "app-key-1"), r2)


# ----- key syntax ---------------------------------------------------------------------------

INVALID_KEYS: list[tuple[str, str | bytes]] = [
    ("empty", ""),
    ("256_chars", "k" * 256),
    ("non_ascii_utf8", "schlüssel-1".encode()),
    ("non_ascii_latin1", "clé".encode("latin-1")),
    ("tab", "key\twith-tab"),
    ("delete_char", "key\x7f"),
]


@pytest.mark.parametrize(("name", "key"), INVALID_KEYS, ids=[n for n, _ in INVALID_KEYS])
async def test_invalid_key_is_bad_request(api: Api, name: str, key: str | bytes) -> None:
    case = await make_case(api, "client_conversation")
    r = await post(api, case.path, case.body, case.headers, key)
    assert_problem(r, 400, "bad_request")
    assert await case.count() == 0


@pytest.mark.parametrize("kind", CREATE_KINDS)
async def test_too_long_key_is_bad_request_on_every_create(api: Api, kind: str) -> None:
    case = await make_case(api, kind)
    before = await case.count()
    r = await post(api, case.path, case.body, case.headers, "x" * 256)
    assert_problem(r, 400, "bad_request")
    assert await case.count() == before


VALID_KEYS = [
    ("one_char", "k"),
    ("255_chars", "k" * 255),
    ("printable_punctuation", " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ "),
    ("uuid", "3f1c9a3e-6a55-4c1b-9a3e-0d3c4f7b2a11"),
]


@pytest.mark.parametrize(("name", "key"), VALID_KEYS, ids=[n for n, _ in VALID_KEYS])
async def test_valid_key_boundaries(api: Api, name: str, key: str) -> None:
    case = await make_case(api, "client_conversation")
    first = await post(api, case.path, case.body, case.headers, key)
    assert_original(first)
    assert_replay_of(await post(api, case.path, case.body, case.headers, key), first)
    assert await case.count() == 1


# ----- failed requests do not burn the key -------------------------------------------------


async def test_schema_validation_failure_does_not_burn_key(api: Api) -> None:
    case = await make_case(api, "client_conversation")
    r = await post(api, case.path, {"body": ""}, case.headers, "retry-me")
    assert_problem(r, 422, "validation_failed")
    r = await post(api, case.path, {"body": ""}, case.headers, "retry-me")
    assert_problem(r, 422, "validation_failed")
    assert await case.count() == 0

    first = await post(api, case.path, case.body, case.headers, "retry-me")
    assert_original(first)
    assert_replay_of(await post(api, case.path, case.body, case.headers, "retry-me"), first)
    assert await case.count() == 1


@pytest.mark.parametrize("kind", ["client_conversation", "client_message", "agent_reply"])
async def test_service_validation_failure_does_not_burn_key(api: Api, kind: str) -> None:
    """A blank body passes the schema but is refused by the service, after the key is claimed."""
    case = await make_case(api, kind)
    before = await case.count()
    r = await post(api, case.path, {"body": "   "}, case.headers, "retry-me")
    assert_problem(r, 422, "validation_failed")
    assert await case.count() == before

    first = await post(api, case.path, case.body, case.headers, "retry-me")
    assert_original(first)
    assert_replay_of(await post(api, case.path, case.body, case.headers, "retry-me"), first)
    assert await case.count() == before + 1


async def test_custom_field_failure_does_not_burn_key(api: Api) -> None:
    app = await api.create_app(
        custom_fields=[{"key": "order_id", "type": "string", "required": True}]
    )
    user = await api.user_headers(app)
    r = await post(api, "/v1/client/conversations", {"body": "Where is it?"}, user, "order-1")
    assert_problem(r, 422, "validation_failed")
    assert await items(api, "/v1/client/conversations", user) == []

    good = {"body": "Where is it?", "custom_fields": {"order_id": "A-17"}}
    first = await post(api, "/v1/client/conversations", good, user, "order-1")
    assert_original(first)
    assert first.json()["custom_fields"] == {"order_id": "A-17"}
    assert_replay_of(await post(api, "/v1/client/conversations", good, user, "order-1"), first)


async def test_not_found_does_not_burn_key(api: Api) -> None:
    app = await api.create_app()
    owner = await api.user_headers(app)
    other = await api.user_headers(app)
    own = await api.feedback(owner)
    foreign = await api.feedback(other)
    body = {"body": "a follow-up"}

    r = await post(
        api, f"/v1/client/conversations/{foreign['id']}/messages", body, owner, "follow-1"
    )
    assert_problem(r, 404, "not_found")
    r = await post(
        api, f"/v1/client/conversations/{foreign['id']}/messages", body, owner, "follow-1"
    )
    assert_problem(r, 404, "not_found")

    path = f"/v1/client/conversations/{own['id']}/messages"
    first = await post(api, path, body, owner, "follow-1")
    assert_original(first)
    assert_replay_of(await post(api, path, body, owner, "follow-1"), first)
    assert len(await items(api, path, owner)) == 2
    msgs = await items(api, f"/v1/client/conversations/{foreign['id']}/messages", other)
    assert len(msgs) == 1


# ----- stored replays and secrets -----------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "secret_field"), [("admin_agent", "token"), ("admin_app", "identity_secret")]
)
async def test_stored_replay_does_not_keep_secret_in_plaintext(
    api: Api, kind: str, secret_field: str
) -> None:
    """API.md (Roles and credentials): agent tokens and identity secrets are stored hashed
    or encrypted. The stored response of a create that returns one (kept for replays)
    must not hold it readable either; encrypting it still replays the same bytes.
    """
    case = await make_case(api, kind)
    first = await post(api, case.path, case.body, case.headers, "secret-key")
    assert_original(first)
    secret: str = first.json()[secret_field]
    async with api.state.db.session(write=False) as db:
        stored = list(await db.scalars(select(IdempotencyKey.response_body)))
    assert stored, "the key's response is stored for replay"
    plaintext = [body for body in stored if secret.encode() in (body or b"")]
    assert len(plaintext) == 0, (
        f"idempotency_keys.response_body holds the {secret_field} in plaintext"
    )


# ----- concurrency --------------------------------------------------------------------------

N = 10


def _check_concurrent_same_key(responses: list[httpx.Response]) -> httpx.Response:
    """Exactly one original 201; the rest wait for it and replay it. Returns it."""
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {201}, [(r.status_code, r.text) for r in responses]
    created = [r for r in responses if r.status_code == 201]
    originals = [r for r in created if REPLAYED not in r.headers]
    assert len(originals) == 1, [(r.status_code, dict(r.headers)) for r in responses]
    original = originals[0]
    for r in created:
        if r is not original:
            assert_replay_of(r, original)
    assert len({r.json()["id"] for r in created}) == 1
    return original


async def test_concurrent_conversation_creates_with_one_key(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    body = {"body": "Tapped send ten times on a bad network"}

    responses = await asyncio.gather(
        *(post(api, "/v1/client/conversations", body, user, "tap-tap") for _ in range(N))
    )
    original = _check_concurrent_same_key(list(responses))

    convs = await items(api, "/v1/client/conversations", user)
    assert [c["id"] for c in convs] == [original.json()["id"]]
    msgs = await items(api, f"/v1/client/conversations/{original.json()['id']}/messages", user)
    assert [m["body"] for m in msgs] == [body["body"]]
    # Afterwards the key simply replays.
    assert_replay_of(await post(api, "/v1/client/conversations", body, user, "tap-tap"), original)


@pytest.mark.parametrize("kind", CREATE_KINDS)
async def test_concurrent_creates_with_one_key_on_every_create(api: Api, kind: str) -> None:
    case = await make_case(api, kind)
    before = await case.count()
    responses = await asyncio.gather(
        *(post(api, case.path, case.body, case.headers, "burst") for _ in range(N))
    )
    _check_concurrent_same_key(list(responses))
    assert await case.count() == before + 1


async def test_concurrent_different_bodies_with_one_key(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    bodies = [{"body": f"variant {i}"} for i in range(N)]
    responses = list(
        await asyncio.gather(
            *(post(api, "/v1/client/conversations", b, user, "contested") for b in bodies)
        )
    )
    created = [(b, r) for b, r in zip(bodies, responses, strict=True) if r.status_code == 201]
    assert len(created) == 1, [r.status_code for r in responses]
    winner_body, winner = created[0]
    assert REPLAYED not in winner.headers
    assert winner.json()["last_message"]["body"] == winner_body["body"]
    for r in responses:
        if r is not winner:
            assert r.status_code == 409, r.text
            assert media_type(r) == PROBLEM_JSON
            assert r.json()["code"] == "idempotency_key_reused"
    assert [c["id"] for c in await items(api, "/v1/client/conversations", user)] == [
        winner.json()["id"]
    ]


async def test_concurrent_creates_with_distinct_keys_all_create(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    responses = await asyncio.gather(
        *(
            post(api, "/v1/client/conversations", {"body": f"report {i}"}, user, f"key-{i}")
            for i in range(N)
        )
    )
    for r in responses:
        assert_original(r)
    assert len({r.json()["id"] for r in responses}) == N
    assert len(await items(api, "/v1/client/conversations", user)) == N


async def test_a_retry_with_attachments_replays_instead_of_failing_its_own_checks(
    storage_api: Api,
) -> None:
    """A create or a follow-up that carried attachments, committed, and lost its answer:
    its retry finds the attachments on the message it made ("already attached") before
    the key is looked at. The stored answer comes first, so the retry replays it (it was
    a 422, and an SDK's outbox gave up the feedback the server had)."""
    api = storage_api
    app = await api.create_app()
    user = await api.user_headers(app)
    first_file = await uploaded(api, user, b"boot ok\n", "log", "text/plain")
    body = {"body": "It froze", "attachment_ids": [first_file]}
    first = await post(api, "/v1/client/conversations", body, user, "with-a-log")
    assert_original(first)
    assert_replay_of(await post(api, "/v1/client/conversations", body, user, "with-a-log"), first)
    path = f"/v1/client/conversations/{first.json()['id']}/messages"
    second_file = await uploaded(api, user, b"again\n", "log", "text/plain")
    follow_up = {"body": "and again", "attachment_ids": [second_file]}
    sent = await post(api, path, follow_up, user, "follow-up")
    assert sent.status_code == 201, sent.text
    assert_replay_of(await post(api, path, follow_up, user, "follow-up"), sent)
    # Another request under the key is still refused as such, not replayed.
    other = {"body": "something else", "attachment_ids": [second_file]}
    assert_problem(await post(api, path, other, user, "follow-up"), 409, "idempotency_key_reused")
    # Without a key the check stands.
    r = await api.http.post(path, json=follow_up, headers=user)
    assert_problem(r, 422, "validation_failed")
    assert len(await items(api, path, user)) == 2
