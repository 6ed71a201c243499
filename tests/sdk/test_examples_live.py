"""quickstart.py, webhook_receiver.py and `tellback-sdk watch` against a live
`tellback serve`, run the way their docstrings say."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tellback_sdk import Client, ConversationCreated
from tellback_sdk.cli import main
from tests.sdk.conftest import FAST, Live, _free_port
from tests.sdk.test_examples import ROOT, run


def test_quickstart(live: Live) -> None:
    done = run("quickstart.py", TELLBACK_URL=live.url, TELLBACK_ADMIN_TOKEN=live.admin_token)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("feedback sent: ")
    assert lines[0].endswith(" with screenshot.png")
    assert lines[1].startswith("agent replied (live, event ")
    assert lines[1].endswith("Thanks! Fixed in 2.3.2.")
    assert lines[2] == "badge: 1"
    missing = run("quickstart.py", TELLBACK_URL=live.url, TELLBACK_ADMIN_TOKEN="")
    assert missing.returncode == 2


def test_webhook_receiver(live_worker: Live, tmp_path: Path) -> None:
    live = live_worker
    app = live.create_app()
    agent = live.create_agent(app["id"])
    port = _free_port()
    r = httpx.post(
        f"{live.url}/v1/admin/apps/{app['id']}/webhooks",
        json={"url": f"http://127.0.0.1:{port}/webhooks"},
        headers=live.admin(),
    )
    assert r.status_code == 201, r.text
    env = {**os.environ, "TELLBACK_WEBHOOK_SECRET": r.json()["secret"]}
    script = str(ROOT / "examples" / "webhook_receiver.py")
    receiver = subprocess.Popen(
        [sys.executable, script, "--port", str(port), "--count", "3"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().startswith(f"listening on http://127.0.0.1:{port}")
        forged = httpx.post(
            f"http://127.0.0.1:{port}/webhooks",
            content=b'{"type":"message.created"}',
            headers={
                "webhook-id": "1",
                "webhook-timestamp": str(int(time.time())),
                "webhook-signature": "v1,AAAA",
            },
        )
        assert forged.status_code == 400
        with Client(live.url, app["app_key"], data_dir=tmp_path, retry_policy=FAST) as tb:
            conv = tb.conversations.create("Hooked on webhooks")
        r = httpx.post(
            f"{live.url}/v1/agent/conversations/{conv.id}/messages",
            json={"body": "Got it"},
            headers=agent,
        )
        assert r.status_code == 201, r.text
        out, err = receiver.communicate(timeout=30)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    assert receiver.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("rejected: ")
    by_type = {line.split()[0]: line for line in lines[1:]}
    assert set(by_type) == {"conversation.created", "message.created", "conversation.updated"}
    assert f"conversation={conv.id}" in by_type["conversation.created"]
    assert "user: 'Hooked on webhooks'" in by_type["conversation.created"]
    assert "agent: 'Got it'" in by_type["message.created"]
    assert "status=pending" in by_type["conversation.updated"]


def test_watch_resumes_where_the_app_stopped(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = live.create_app()
    agent = live.create_agent(app["id"])
    data_dir = tmp_path / "d"
    with Client(live.url, app["app_key"], data_dir=data_dir, retry_policy=FAST) as tb:
        with tb.events.stream() as events:
            events.connect()
            conv = tb.conversations.create("Watch me")
            first = next(events)
        assert isinstance(first, ConversationCreated)
        assert first.conversation.id == conv.id
    r = httpx.post(
        f"{live.url}/v1/agent/conversations/{conv.id}/messages",
        json={"body": "While you were away"},
        headers=agent,
    )
    assert r.status_code == 201, r.text
    # Another process, same data_dir: resumes after the saved id, so it replays the reply.
    common = ["--url", live.url, "--app-key", app["app_key"], "--data-dir", str(data_dir)]
    assert main([*common, "watch", "--count", "3"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich may wrap long lines
    assert text.startswith("message.created #")
    assert f"conversation={conv.id} Ada: While you were away" in text
    assert text.index("message.created") < text.index("conversation.updated #")
    assert text.index("conversation.updated #") < text.index("unread.changed #")
    assert "status=pending" in text
    assert f"unread=1 conversation={conv.id}" in text
