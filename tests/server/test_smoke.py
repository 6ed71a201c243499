from __future__ import annotations

from tests.server.conftest import Api


async def test_feedback_round_trip(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    conv = await api.feedback(
        user, subject="Crash", location={"latitude": 48.1, "longitude": 11.5, "accuracy_m": 12}
    )
    assert conv["status"] == "open"
    assert conv["last_message"]["body"] == "The app crashes"
    _, agent = await api.create_agent(app)
    r = await api.http.post(
        f"/v1/agent/conversations/{conv['id']}/messages",
        json={"body": "Fixed in 1.2"},
        headers=agent,
    )
    assert r.status_code == 201, r.text
    r = await api.http.get("/v1/client/unread", headers=user)
    assert r.json() == {"unread_count": 1}
    r = await api.http.get(f"/v1/client/conversations/{conv['id']}/messages", headers=user)
    msgs = r.json()["items"]
    assert [m["author"]["type"] for m in msgs] == ["user", "agent"]
    r = await api.http.post(
        f"/v1/client/conversations/{conv['id']}/read",
        json={"up_to_message_id": msgs[-1]["id"]},
        headers=user,
    )
    assert r.status_code == 204
    r = await api.http.get("/v1/client/unread", headers=user)
    assert r.json() == {"unread_count": 0}
