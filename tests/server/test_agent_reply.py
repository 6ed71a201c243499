"""An agent's reply, on both databases: the conversation's new state, the answer, the
unread events, and who may reply where."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from tellback_server.db.models import Event
from tests.server.conftest import Api


async def _unread_events(api: Api) -> list[dict[str, Any]]:
    async with api.state.db.session(write=False) as db:
        rows = await db.scalars(
            select(Event).where(Event.type == "unread.changed").order_by(Event.id)
        )
        return [dict(e.client_data or {}) for e in rows]


async def test_replies_count_unread_over_the_users_conversations(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    _, agent = await api.create_agent(app, name="Ada")
    first, second = (await api.feedback(user, "A"))["id"], (await api.feedback(user, "B"))["id"]

    async def reply(conv: str, **body: Any) -> dict[str, Any]:
        r = await api.http.post(
            f"/v1/agent/conversations/{conv}/messages",
            json={"body": "On it", **body},
            headers=agent,
        )
        assert r.status_code == 201, r.text
        answer: dict[str, Any] = r.json()
        return answer

    answers = [await reply(first), await reply(first), await reply(second)]
    note = await reply(first, body="check the logs", internal=True)
    assert [
        (e["unread_count"], e["conversation_unread_count"]) for e in await _unread_events(api)
    ] == [
        (1, 1),
        (2, 2),
        (3, 1),
    ]  # an internal note changes nobody's unread count
    r = await api.http.get("/v1/client/unread", headers=user)
    assert r.json()["unread_count"] == 3
    # Each answer is the message as the agent's own page shows it (another query path).
    r = await api.http.get(f"/v1/agent/conversations/{first}/messages", headers=agent)
    page = {m["id"]: m for m in r.json()["items"]}
    for answer in [*answers[:2], note]:
        assert page[answer["id"]] == answer
    assert note["internal"] is True
    assert answers[0]["author"] == {
        "type": "agent",
        "id": answers[0]["author"]["id"],
        "name": "Ada",
    }
    # The conversation: answered once (open -> pending), the note not public activity.
    r = await api.http.get(f"/v1/agent/conversations/{first}", headers=agent)
    conv = r.json()
    assert conv["status"] == "pending"
    assert conv["message_count"] == 4
    assert conv["unread_count"] == 0  # the agents' count: they answered
    assert conv["last_message"]["id"] == note["id"]
    listed = (await api.http.get("/v1/client/conversations", headers=user)).json()["items"]
    mine = {c["id"]: c for c in listed}
    assert mine[first]["last_message"]["id"] == answers[1]["id"]
    assert mine[first]["unread_count"] == 2


async def test_an_agent_replies_only_where_they_serve(api: Api) -> None:
    app, other = await api.create_app(), await api.create_app("Other")
    user = await api.user_headers(app)
    _, outsider = await api.create_agent(other, name="Eve")
    conv = await api.feedback(user)
    for conv_id in (conv["id"], app.id):
        r = await api.http.post(
            f"/v1/agent/conversations/{conv_id}/messages", json={"body": "hi"}, headers=outsider
        )
        assert r.status_code == 404, r.text
    async with api.state.db.session(write=False) as db:
        assert (await db.scalars(select(Event).where(Event.type == "message.created"))).all() == []
