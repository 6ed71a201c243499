"""The end user's conversation list, on both databases: order, pages, what each item says."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from uuid import UUID

from sqlalchemy import text

from tellback_server.db.base import table_of
from tellback_server.db.models import Conversation
from tellback_server.http.pagination import encode_cursor
from tests.server.conftest import Api, processes


async def _pages(api: Api, headers: dict[str, str], limit: int) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        r = await api.http.get("/v1/client/conversations", params=params, headers=headers)
        assert r.status_code == 200, r.text
        pages.append(r.json()["items"])
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return pages


async def test_pages_newest_public_activity_first_each_item_as_its_own_get(api: Api) -> None:
    app = await api.create_app()
    alice = await api.user_headers(app)
    bob = await api.user_headers(app)
    _, agent = await api.create_agent(app, name="Ada")
    convs = [
        await api.feedback(
            alice,
            f"Problem {i}",
            subject=f"S{i}",
            tags=["ios", f"t{i}"],
            location={"latitude": 52.5, "longitude": 13.4, "accuracy_m": 10.0},
        )
        for i in range(5)
    ]
    await api.feedback(bob, "Not Alice's")
    ids = [c["id"] for c in convs]
    reply = await api.http.post(
        f"/v1/agent/conversations/{ids[1]}/messages", json={"body": "On it"}, headers=agent
    )
    assert reply.status_code == 201, reply.text
    # An internal note is not public activity: neither the order nor the last message moves.
    note = await api.http.post(
        f"/v1/agent/conversations/{ids[3]}/messages",
        json={"body": "customer is on v4.12", "internal": True},
        headers=agent,
    )
    assert note.status_code == 201, note.text

    pages = await _pages(api, alice, limit=2)
    assert [len(p) for p in pages] == [2, 2, 1]
    items = [c for p in pages for c in p]
    assert [c["id"] for c in items] == [ids[1], ids[4], ids[3], ids[2], ids[0]]
    by_id = {c["id"]: c for c in items}
    replied = by_id[ids[1]]
    assert replied["last_message"]["body"] == "On it"
    assert replied["last_message"]["author"]["type"] == "agent"
    assert replied["last_message"]["author"]["name"] == "Ada"
    assert replied["unread_count"] == 1
    assert by_id[ids[3]]["last_message"]["body"] == "Problem 3"
    assert by_id[ids[3]]["last_message"]["author"]["type"] == "user"
    assert by_id[ids[2]]["tags"] == ["ios", "t2"]
    # Each item is what the conversation's own GET says (a different query path).
    for item in items:
        one = await api.http.get(f"/v1/client/conversations/{item['id']}", headers=alice)
        assert one.json() == item
    # One page with everything: the same items, and no cursor.
    r = await api.http.get("/v1/client/conversations", params={"limit": 100}, headers=alice)
    assert r.json() == {"items": items, "next_cursor": None}


async def test_an_exact_page_has_no_next_cursor_and_bad_paging_is_a_problem(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    r = await api.http.get("/v1/client/conversations", headers=user)
    assert r.json() == {"items": [], "next_cursor": None}
    for i in range(2):
        await api.feedback(user, f"Problem {i}")
    r = await api.http.get("/v1/client/conversations", params={"limit": 2}, headers=user)
    assert len(r.json()["items"]) == 2
    assert r.json()["next_cursor"] is None
    r = await api.http.get("/v1/client/conversations", params={"limit": 1}, headers=user)
    r = await api.http.get(
        "/v1/client/conversations",
        params={"limit": 1, "cursor": r.json()["next_cursor"]},
        headers=user,
    )
    assert [c["last_message"]["body"] for c in r.json()["items"]] == ["Problem 0"]
    assert r.json()["next_cursor"] is None
    for bad, status in (
        ({"cursor": "not-a-cursor"}, 400),
        ({"limit": 0}, 422),
        ({"limit": 101}, 422),
    ):
        r = await api.http.get("/v1/client/conversations", params=bad, headers=user)
        assert r.status_code == status, (bad, r.text)
        assert r.headers["content-type"].startswith("application/problem+json")


async def test_message_pages_leave_out_internal_notes_and_match_the_agents_view(api: Api) -> None:
    app = await api.create_app()
    alice = await api.user_headers(app)
    bob = await api.user_headers(app)
    _, agent = await api.create_agent(app, name="Ada")
    conv = await api.feedback(alice, "First")
    path = f"/v1/client/conversations/{conv['id']}/messages"
    agent_path = f"/v1/agent/conversations/{conv['id']}/messages"
    for who, body in (
        (agent, {"body": "Reply one"}),
        (agent, {"body": "only agents see this", "internal": True}),
        (alice, {"body": "Follow-up"}),
        (agent, {"body": "Reply two"}),
    ):
        r = await api.http.post(path if who is alice else agent_path, json=body, headers=who)
        assert r.status_code == 201, r.text

    items: list[dict[str, Any]] = []
    cursor: str | None = None
    sizes = []
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor is not None:
            params["cursor"] = cursor
        r = await api.http.get(path, params=params, headers=alice)
        assert r.status_code == 200, r.text
        sizes.append(len(r.json()["items"]))
        items += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert sizes == [3, 1]
    assert [m["body"] for m in items] == ["First", "Reply one", "Follow-up", "Reply two"]
    assert [m["author"]["name"] for m in items if m["author"]["type"] == "agent"] == ["Ada"] * 2
    # The agent's page (another query path) says the same of each public message.
    r = await api.http.get(agent_path, params={"limit": 100}, headers=agent)
    public = [
        {k: v for k, v in m.items() if k != "internal"}
        for m in r.json()["items"]
        if not m["internal"]
    ]
    assert public == items
    # Someone else's conversation, or none: 404, whatever the page.
    for headers, conv_path in ((bob, path), (alice, f"/v1/client/conversations/{app.id}/messages")):
        r = await api.http.get(conv_path, headers=headers)
        assert r.status_code == 404, r.text
    # An own conversation past its last message: an empty page, not a 404.
    last = items[-1]
    past = encode_cursor(dt.datetime.fromisoformat(last["created_at"]), UUID(last["id"]))
    r = await api.http.get(path, params={"cursor": past}, headers=alice)
    assert r.status_code == 200, r.text
    assert r.json() == {"items": [], "next_cursor": None}


_TIMES = {"created_at", "updated_at", "last_activity_at", "public_activity_at"}


async def test_pages_are_planned_once_not_at_every_request(
    database_url: str, tmp_path: Path
) -> None:
    """PostgreSQL plans a prepared statement once for all its runs only when that plan
    costs no more than the ones it makes for each run's parameters. A page's row count
    passed as a parameter (``LIMIT $n``) hid that the plan stops early, so the list and
    the agents' inbox were planned anew at every request (3-4 times the CPU of running
    them). One connection here, so that its prepared statements can be looked at:
    after 3,000 conversations and eight pages of each kind, each statement that ran six
    times or more has been run by its generic plan."""
    async with processes(database_url, tmp_path, n=1, database_pool_size=1) as [api]:
        app = await api.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
        user = await api.user_headers(app)
        _, agent = await api.create_agent(app)
        conv = await api.feedback(user, "The first of many")
        convs = table_of(Conversation)
        columns = [c.name for c in convs.columns]
        copied = [
            "gen_random_uuid()"
            if c == "id"
            else f"c.{c} - g * interval '1 second'"
            if c in _TIMES
            else f"c.{c}"
            for c in columns
        ]
        async with api.state.db.session(write=True) as db:
            await db.execute(
                text(
                    f"INSERT INTO conversations ({', '.join(columns)}) "  # noqa: S608 (our names)
                    f"SELECT {', '.join(copied)} FROM conversations c, "
                    "generate_series(1, 3000) g WHERE c.id = :id"
                ),
                {"id": UUID(conv["id"])},
            )
            await db.execute(text("ANALYZE"))
        pages = [
            ("/v1/client/conversations", user),
            (f"/v1/client/conversations/{conv['id']}/messages", user),
            ("/v1/agent/conversations", agent),
            (f"/v1/agent/conversations/{conv['id']}/messages", agent),
        ]
        for _ in range(8):
            for path, headers in pages:
                r = await api.http.get(path, params={"limit": 25}, headers=headers)
                assert r.status_code == 200, r.text
                assert len(r.json()["items"]) == (25 if path.endswith("conversations") else 1)
        async with api.state.db.session(write=False) as db:
            plans = (
                await db.execute(
                    text(
                        "SELECT statement, generic_plans, custom_plans "
                        "FROM pg_prepared_statements WHERE statement LIKE '%LIMIT%'"
                    )
                )
            ).all()
    ran = [(sql, generic) for sql, generic, custom in plans if generic + custom >= 6]
    assert len(ran) >= len(pages)
    assert [sql for sql, generic in ran if generic == 0] == []
