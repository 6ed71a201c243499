"""The agent inbox's tag filter, on both databases."""

from __future__ import annotations

from tests.server.conftest import Api


async def test_tag_filter_is_case_insensitive_and_pages(api: Api) -> None:
    app = await api.create_app()
    user = await api.user_headers(app)
    _, agent = await api.create_agent(app)
    tagged = [
        (await api.feedback(user, f"Billing {i}", tags=["Billing", "ios"]))["id"] for i in range(3)
    ]
    await api.feedback(user, "Untagged")
    await api.feedback(user, "Other tag", tags=["billing-old"])
    await api.feedback(user, 'Quote "tag', tags=["it's"])
    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"tag": "billing", "limit": 2}
        if cursor:
            params["cursor"] = cursor
        r = await api.http.get("/v1/agent/conversations", params=params, headers=agent)
        assert r.status_code == 200, r.text
        seen += [c["id"] for c in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(tagged)
    r = await api.http.get("/v1/agent/conversations", params={"tag": "it's"}, headers=agent)
    assert [c["tags"] for c in r.json()["items"]] == [["it's"]]
    r = await api.http.get("/v1/agent/conversations", params={"tag": "nope"}, headers=agent)
    assert r.json()["items"] == []
