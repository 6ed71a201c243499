"""A seeded world for the reliability suite: two apps with every kind of object in each.

``seed(api)`` creates, through the public API only, for app A (the caller's)
and app B (the other app): an end user with a conversation (user message,
agent reply), a completed upload (an attachment), a push device, a webhook with
a delivery, an identity-secret kid; plus agents with tokens. The ids and
credentials are what the fuzzer and the isolation matrix substitute into every
operation of the OpenAPI document.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from tellback_server.dev.apns_fake import ApnsFake
from tellback_server.jobs.worker import Worker
from tellback_server.plugins import build_registry
from tests.server.conftest import Api, AppInfo

# Rate limits high enough that a fuzzer's few thousand requests never hit them.
NO_LIMITS = {"rate_limits": {"app_per_minute": 10_000_000, "user_per_minute": 100_000}}
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x06\x00\x00\x00\x1f"
    b"\x15\xc4\x89\x00\x00\x00\rIDATx\x9cc\xf8\xff\xff?\x00\x05\xfe\x02\xfe\xa7\x35\x81\x84\x00"
    b"\x00\x00\x00IEND\xaeB`\x82"
)


@dataclass
class Side:
    """Everything one app holds, and the credentials that reach it."""

    app: AppInfo
    user: dict[str, str]
    user_id: str
    session_token: str
    conversation_id: str
    message_ids: list[str]
    upload_id: str
    agent_id: str
    agent: dict[str, str]
    agent_token: str
    webhook_id: str
    delivery_id: str
    webhook_secret: str
    push_token: str

    @property
    def ids(self) -> dict[str, str]:
        """Path parameter name -> a real id of this side."""
        return {
            "app_id": self.app.id,
            "user_id": self.user_id,
            "conversation_id": self.conversation_id,
            "attachment_id": self.upload_id,
            "upload_id": self.upload_id,
            "agent_id": self.agent_id,
            "webhook_id": self.webhook_id,
            "delivery_id": self.delivery_id,
            "kid": self.app.identity_kid,
        }


@dataclass
class World:
    a: Side
    b: Side
    secrets: list[str] = field(default_factory=list)


async def _upload(api: Api, user: dict[str, str]) -> str:
    r = await api.http.post(
        "/v1/client/uploads",
        json={
            "filename": "dot.png",
            "content_type": "image/png",
            "size": len(PNG),
            "kind": "photo",
        },
        headers=user,
    )
    assert r.status_code == 201, r.text
    up: dict[str, Any] = r.json()
    r = await api.http.put(up["single"]["url"], content=PNG, headers=up["single"]["headers"])
    assert r.status_code in (200, 201, 204), r.text
    r = await api.http.post(f"/v1/client/uploads/{up['upload_id']}/complete", json={}, headers=user)
    assert r.status_code == 200, r.text
    upload_id: str = up["upload_id"]
    return upload_id


async def _side(api: Api, name: str) -> Side:
    app = await api.create_app(f"App {name}", **NO_LIMITS)
    session = await api.session(app)
    user = api.bearer(session["session_token"])
    r = await api.http.post(
        "/v1/admin/agents",
        json={"name": f"Agent {name}", "email": f"agent-{name}@example.com", "app_ids": [app.id]},
        headers=api.admin,
    )
    assert r.status_code == 201, r.text
    agent_id, agent_token = r.json()["id"], r.json()["token"]
    agent = api.bearer(agent_token)
    upload_id = await _upload(api, user)
    conv = await api.feedback(
        user, body=f"feedback from {name}", subject=f"subject {name}", attachment_ids=[upload_id]
    )
    r = await api.http.post(
        f"/v1/agent/conversations/{conv['id']}/messages",
        json={"body": f"agent reply {name}"},
        headers=agent,
    )
    assert r.status_code == 201, r.text
    r = await api.http.get(f"/v1/client/conversations/{conv['id']}/messages", headers=user)
    message_ids = [m["id"] for m in r.json()["items"]]
    push_token = ApnsFake.make_token()
    r = await api.http.put(
        "/v1/client/devices/current",
        json={
            "platform": "ios",
            "push_provider": "apns",
            "push_token": push_token,
            "apns_environment": "sandbox",
        },
        headers=user,
    )
    assert r.status_code == 200, r.text
    # A receiver nobody listens on (port 9 on loopback: discard, closed here).
    r = await api.http.post(
        f"/v1/admin/apps/{app.id}/webhooks",
        json={"url": "http://127.0.0.1:9/hook", "events": ["message.created"]},
        headers=api.admin,
    )
    assert r.status_code == 201, r.text
    webhook_id, webhook_secret = r.json()["id"], r.json()["secret"]
    r = await api.http.post(
        f"/v1/client/conversations/{conv['id']}/messages",
        json={"body": f"user follow-up {name}"},
        headers=user,
    )
    assert r.status_code == 201, r.text
    await Worker(api.state, build_registry()).run_until_idle()
    r = await api.http.get(f"/v1/admin/apps/{app.id}/webhook-deliveries", headers=api.admin)
    assert r.status_code == 200, r.text
    assert r.json()["items"], "a webhook delivery was recorded"
    delivery_id = r.json()["items"][0]["id"]
    return Side(
        app=app,
        user=user,
        user_id=session["user"]["id"],
        session_token=session["session_token"],
        conversation_id=conv["id"],
        message_ids=message_ids,
        upload_id=upload_id,
        agent_id=agent_id,
        agent=agent,
        agent_token=agent_token,
        webhook_id=webhook_id,
        delivery_id=delivery_id,
        webhook_secret=webhook_secret,
        push_token=push_token,
    )


async def seed(api: Api) -> World:
    a = await _side(api, "A")
    b = await _side(api, "B")
    world = World(a=a, b=b)
    for side in (a, b):
        world.secrets += [
            side.session_token,
            side.agent_token,
            side.webhook_secret,
            side.app.identity_secret,
            side.push_token,
        ]
    world.secrets.append(api.admin_token)
    return world


def random_id() -> str:
    return str(uuid.uuid4())
