"""An end user's follow-up message, on both databases: reopening, counts, events, refusals."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from tellback_server.db.models import Event
from tests.server.conftest import Api


async def _event_types(api: Api) -> list[str]:
    async with api.state.db.session(write=False) as db:
        return list(await db.scalars(select(Event.type).order_by(Event.id)))


async def test_follow_ups_reopen_count_for_agents_and_answer_as_the_page_shows(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    _, agent = await api.create_agent(app)
    conv = (await api.feedback(user, "It crashes"))["id"]
    path = f"/v1/client/conversations/{conv}/messages"
    agent_path = f"/v1/agent/conversations/{conv}"
    r = await api.http.post(
        f"{agent_path}/messages", json={"body": "Which version?"}, headers=agent
    )
    assert r.status_code == 201, r.text

    async def follow_up(**body: Any) -> dict[str, Any]:
        r = await api.http.post(path, json=body, headers=user)
        assert r.status_code == 201, r.text
        answer: dict[str, Any] = r.json()
        return answer

    before = len(await _event_types(api))
    where = {"latitude": 52.52, "longitude": 13.405, "accuracy_m": 20.0}
    first = await follow_up(body="4.12, on an iPhone", location=where)
    assert first["author"]["type"] == "user"
    assert first["location"] == where
    # pending (answered) -> open again, and the agents have one unread message
    assert (await _event_types(api))[before:] == ["message.created", "conversation.updated"]
    detail = (await api.http.get(agent_path, headers=agent)).json()
    assert (detail["status"], detail["unread_count"], detail["message_count"]) == ("open", 1, 3)
    # an open conversation stays open: no conversation.updated
    before = len(await _event_types(api))
    second = await follow_up(location=where)  # a location alone is a message
    assert (await _event_types(api))[before:] == ["message.created"]
    detail = (await api.http.get(agent_path, headers=agent)).json()
    assert (detail["status"], detail["unread_count"], detail["message_count"]) == ("open", 2, 4)
    # solved -> open
    r = await api.http.patch(agent_path, json={"status": "solved"}, headers=agent)
    assert r.status_code == 200, r.text
    await follow_up(body="Happened again")
    assert (await api.http.get(agent_path, headers=agent)).json()["status"] == "open"
    # Each answer is the message as the user's page shows it, and the list shows the last.
    page = {m["id"]: m for m in (await api.http.get(path, headers=user)).json()["items"]}
    assert page[first["id"]] == first
    assert page[second["id"]] == second
    listed = (await api.http.get("/v1/client/conversations", headers=user)).json()["items"]
    assert listed[0]["last_message"]["body"] == "Happened again"


async def test_follow_ups_are_refused_where_they_do_not_belong(api: Api) -> None:
    app = await api.create_app()
    alice, bob = await api.user_headers(app), await api.user_headers(app)
    _, agent = await api.create_agent(app)
    conv = (await api.feedback(alice))["id"]
    path = f"/v1/client/conversations/{conv}/messages"
    r = await api.http.post(path, json={}, headers=alice)
    assert r.status_code == 422, r.text
    for headers, target in ((bob, path), (alice, f"/v1/client/conversations/{app.id}/messages")):
        r = await api.http.post(target, json={"body": "hello?"}, headers=headers)
        assert r.status_code == 404, r.text
    r = await api.http.patch(
        f"/v1/agent/conversations/{conv}", json={"status": "closed"}, headers=agent
    )
    assert r.status_code == 200, r.text
    before = await _event_types(api)
    r = await api.http.post(path, json={"body": "one more thing"}, headers=alice)
    assert r.status_code == 409, r.text
    assert r.json()["code"] == "conversation_closed"
    assert await _event_types(api) == before
    detail = (await api.http.get(f"/v1/agent/conversations/{conv}", headers=agent)).json()
    assert (detail["status"], detail["message_count"]) == ("closed", 1)
