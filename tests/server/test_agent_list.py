"""The agents' inbox, on both databases: order, pages, filters, what each item says."""

from __future__ import annotations

from typing import Any

from tests.server.conftest import Api, AppInfo, identity_token

# What the inbox item shares with the conversation's own GET (which adds the rest).
SUMMARY = (
    "id",
    "app_id",
    "status",
    "priority",
    "subject",
    "category",
    "tags",
    "assignee_id",
    "end_user",
    "last_message",
    "message_count",
    "unread_count",
    "created_at",
    "updated_at",
    "last_activity_at",
)


async def _inbox(
    api: Api, agent: dict[str, str], limit: int = 100, **filters: str
) -> list[dict[str, Any]]:
    """Every page of the inbox, in order (pages of ``limit``)."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": limit, **filters}
        if cursor is not None:
            params["cursor"] = cursor
        r = await api.http.get("/v1/agent/conversations", params=params, headers=agent)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= limit
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


async def _identified(api: Api, app: AppInfo, sub: str, **claims: Any) -> dict[str, str]:
    token = identity_token(app.identity_secret, sub, kid=app.identity_kid, **claims)
    return await api.user_headers(app, user_token=token)


async def _post(api: Api, path: str, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    r = await api.http.post(path, json=body, headers=headers)
    assert r.status_code == 201, r.text
    data: dict[str, Any] = r.json()
    return data


async def test_newest_activity_first_each_item_as_its_own_get(api: Api) -> None:
    app = await api.create_app()
    other_app = await api.create_app("Other")
    grace = await _identified(api, app, "user-1", name="Grace", email="grace@example.com")
    me = await api.http.patch(
        "/v1/client/me", json={"attributes": {"plan": "pro", "seats": 3}}, headers=grace
    )
    assert me.status_code == 200, me.text
    anon = await api.user_headers(app)
    stranger = await api.user_headers(other_app)
    ada_id, ada = await api.create_agent(app, name="Ada")
    bo_id, _ = await api.create_agent(app, name="Bo")
    convs = [
        await api.feedback(
            grace if i % 2 else anon,
            f"Problem {i}",
            subject=f"S{i}",
            tags=["ios", f"t{i}"],
            location={"latitude": 52.5, "longitude": 13.4, "accuracy_m": 10.0},
        )
        for i in range(6)
    ]
    await api.feedback(stranger, "Another app's")
    ids = [c["id"] for c in convs]
    base = "/v1/agent/conversations"
    await _post(api, f"{base}/{ids[1]}/messages", ada, body="On it")
    # An internal note is activity for agents: it is the last message they see.
    await _post(api, f"{base}/{ids[3]}/messages", ada, body="on v4.12", internal=True)
    await _post(api, f"/v1/client/conversations/{ids[0]}/messages", anon, body="Any news?")
    r = await api.http.patch(
        f"{base}/{ids[2]}",
        json={"assignee_id": bo_id, "status": "pending", "priority": "high"},
        headers=ada,
    )
    assert r.status_code == 200, r.text

    items = await _inbox(api, ada, limit=2)
    # Changing status or assignee is not activity; messages are.
    assert [c["id"] for c in items] == [ids[0], ids[3], ids[1], ids[5], ids[4], ids[2]]
    by_id = {c["id"]: c for c in items}
    assert by_id[ids[1]]["last_message"]["author"] == {"type": "agent", "id": ada_id, "name": "Ada"}
    assert by_id[ids[3]]["last_message"]["internal"] is True
    assert by_id[ids[0]]["last_message"]["body"] == "Any news?"
    assert by_id[ids[0]]["unread_count"] == 2
    assert by_id[ids[2]]["assignee_id"] == bo_id
    assert by_id[ids[5]]["end_user"]["name"] == "Grace"
    assert by_id[ids[5]]["end_user"]["attributes"] == {"plan": "pro", "seats": 3}
    # Each item is what the conversation's own GET says (a different query path).
    for item in items:
        one = await api.http.get(f"{base}/{item['id']}", headers=ada)
        assert one.status_code == 200, one.text
        assert {k: one.json()[k] for k in SUMMARY} == item
    # One page with everything: the same items, and no cursor.
    r = await api.http.get(base, params={"limit": 100}, headers=ada)
    assert r.json() == {"items": items, "next_cursor": None}


async def test_filters_alone_and_together(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    ada_id, ada = await api.create_agent(app, name="Ada")
    base = "/v1/agent/conversations"
    checkout = await api.feedback(user, "The checkout button does nothing", tags=["Billing"])
    refund = await api.feedback(user, "Refund please", subject="Checkout refund")
    crash = await api.feedback(user, "It crashes", tags=["billing"])
    # A match only in a later message (not the last one) still finds the conversation.
    await _post(api, f"{base}/{crash['id']}/messages", ada, body="see the checkout logs")
    await _post(api, f"{base}/{crash['id']}/messages", ada, body="fixed")
    r = await api.http.patch(
        f"{base}/{refund['id']}", json={"assignee_id": ada_id, "status": "pending"}, headers=ada
    )
    assert r.status_code == 200, r.text

    def ids(items: list[dict[str, Any]]) -> set[str]:
        return {c["id"] for c in items}

    assert ids(await _inbox(api, ada, q="CHECKOUT")) == {
        checkout["id"],
        refund["id"],
        crash["id"],
    }
    assert ids(await _inbox(api, ada, q="100%")) == set()  # LIKE's wildcards are literal
    # An agent's reply leaves a conversation pending.
    assert ids(await _inbox(api, ada, status="pending")) == {refund["id"], crash["id"]}
    assert ids(await _inbox(api, ada, status="open")) == {checkout["id"]}
    assert ids(await _inbox(api, ada, assignee_id=ada_id)) == {refund["id"]}
    assert ids(await _inbox(api, ada, tag="billing")) == {checkout["id"], crash["id"]}
    assert ids(await _inbox(api, ada, tag="billing", q="crash", status="pending")) == {crash["id"]}
    assert ids(await _inbox(api, ada, app_id=app.id, q="refund")) == {refund["id"]}
    # Paged one by one through a filter, in activity order.
    assert [c["id"] for c in await _inbox(api, ada, limit=1, q="checkout")] == [
        crash["id"],
        refund["id"],
        checkout["id"],
    ]


async def test_an_agent_sees_only_the_apps_it_works_on(api: Api) -> None:
    one, two, three = [await api.create_app(n) for n in ("One", "Two", "Three")]
    _, both = await api.create_agent(one, two, name="Both")
    _, none = await api.create_agent(name="None")
    convs = {a.id: (await api.feedback(await api.user_headers(a)))["id"] for a in (one, two, three)}
    assert {c["id"] for c in await _inbox(api, both)} == {convs[one.id], convs[two.id]}
    assert [c["id"] for c in await _inbox(api, both, app_id=two.id)] == [convs[two.id]]
    assert await _inbox(api, both, app_id=three.id) == []
    assert await _inbox(api, none) == []


async def test_detail_and_message_pages_show_every_message_notes_too(api: Api) -> None:
    app = await api.create_app()
    other = await api.create_app("Other")
    user = await api.user_headers(app)
    ada_id, ada = await api.create_agent(app, name="Ada")
    _, outsider = await api.create_agent(other, name="Out")
    conv = await api.feedback(user, "First", custom_fields={}, tags=["ios"])
    base = f"/v1/agent/conversations/{conv['id']}"
    await _post(api, f"{base}/messages", ada, body="Reply")
    await _post(api, f"{base}/messages", ada, body="A note", internal=True)
    await _post(api, f"/v1/client/conversations/{conv['id']}/messages", user, body="Thanks")

    r = await api.http.get(base, headers=ada)
    assert r.status_code == 200, r.text
    detail = r.json()
    assert [(m["body"], m["internal"]) for m in detail["messages"]] == [
        ("First", False),
        ("Reply", False),
        ("A note", True),
        ("Thanks", False),
    ]
    assert detail["messages"][1]["author"] == {"type": "agent", "id": ada_id, "name": "Ada"}
    assert detail["messages_next_cursor"] is None
    assert detail["last_message"] == detail["messages"][-1]
    assert detail["context"] == {}
    [item] = await _inbox(api, ada)
    assert {k: detail[k] for k in SUMMARY} == item
    # The pages hold the same messages, in the same order.
    paged: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor is not None:
            params["cursor"] = cursor
        r = await api.http.get(f"{base}/messages", params=params, headers=ada)
        assert r.status_code == 200, r.text
        paged += r.json()["items"]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert paged == detail["messages"]
    # Someone else's conversation is a 404 either way, not an empty page.
    for path in (base, f"{base}/messages"):
        r = await api.http.get(path, headers=outsider)
        assert r.status_code == 404, r.text


async def test_detail_shows_the_first_hundred_messages_and_a_cursor_to_the_rest(api: Api) -> None:
    app = await api.create_app(rate_limits={"app_per_minute": 0, "user_per_minute": 0})
    user = await api.user_headers(app)
    _, ada = await api.create_agent(app)
    conv = await api.feedback(user, "0")
    for i in range(1, 102):
        await _post(api, f"/v1/client/conversations/{conv['id']}/messages", user, body=str(i))
    base = f"/v1/agent/conversations/{conv['id']}"
    detail = (await api.http.get(base, headers=ada)).json()
    assert [m["body"] for m in detail["messages"]] == [str(i) for i in range(100)]
    assert detail["last_message"]["body"] == "101"
    rest = await api.http.get(
        f"{base}/messages", params={"cursor": detail["messages_next_cursor"]}, headers=ada
    )
    assert [m["body"] for m in rest.json()["items"]] == ["100", "101"]
    assert rest.json()["next_cursor"] is None
