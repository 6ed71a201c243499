"""Walk the whole feedback loop against a running server, using only the HTTP API.

Run `uv run tellback serve` in one terminal, then:

    TELLBACK_ADMIN_TOKEN=tba_... uv run python examples/quickstart.py

It creates an app and an agent, starts an end-user session, sends feedback
with a location, answers it as the agent and reads the unread badge count.
"""

from __future__ import annotations

import os
import sys
import uuid

import httpx


def main() -> int:
    base = os.environ.get("TELLBACK_URL", "http://127.0.0.1:8080")
    admin_token = os.environ.get("TELLBACK_ADMIN_TOKEN")
    if not admin_token:
        print("set TELLBACK_ADMIN_TOKEN to the token `tellback serve` printed", file=sys.stderr)
        return 2
    admin = {"Authorization": f"Bearer {admin_token}"}
    with httpx.Client(base_url=base, timeout=10) as http:
        app = http.post("/v1/admin/apps", json={"name": "Quickstart"}, headers=admin).json()
        agent = http.post(
            "/v1/admin/agents", json={"name": "Ada", "app_ids": [app["id"]]}, headers=admin
        ).json()
        session = http.post(
            "/v1/client/sessions",
            json={
                "app_key": app["app_key"],
                "installation_id": uuid.uuid4().hex,
                "device": {"platform": "ios", "model": "iPhone16,1", "os_version": "18.2"},
            },
        ).json()
        user = {"Authorization": f"Bearer {session['session_token']}"}
        conv = http.post(
            "/v1/client/conversations",
            json={
                "body": "The checkout button does nothing",
                "location": {"latitude": 52.52, "longitude": 13.405, "accuracy_m": 15},
                "context": {"app": {"version": "2.3.1"}, "network": {"type": "wifi"}},
            },
            headers={**user, "Idempotency-Key": str(uuid.uuid4())},
        ).json()
        print("feedback sent:", conv["id"])
        reply = http.post(
            f"/v1/agent/conversations/{conv['id']}/messages",
            json={"body": "Thanks! Fixed in 2.3.2."},
            headers={"Authorization": f"Bearer {agent['token']}"},
        ).json()
        print("agent replied:", reply["body"])
        print("badge:", http.get("/v1/client/unread", headers=user).json()["unread_count"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
