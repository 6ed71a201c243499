"""The examples run as the README says, against a live `tellback serve`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tellback_sdk import Client
from tests.sdk.conftest import Live

ROOT = Path(__file__).resolve().parents[2]


def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_mobile_simulation_then_agent_bot(live: Live) -> None:
    app = live.create_app()
    sim = run("mobile_simulation.py", TELLBACK_URL=live.url, TELLBACK_APP_KEY=app["app_key"])
    assert sim.returncode == 0, sim.stderr
    assert "offline: sent 0, still queued 2" in sim.stdout
    assert "back online: sent 2, dead 0, queued 0" in sim.stdout
    agent = live.create_agent(app["id"])
    token = agent["Authorization"].removeprefix("Bearer ")
    for _ in range(2):  # a rerun must not answer twice
        bot = run("agent_bot.py", "--once", TELLBACK_URL=live.url, TELLBACK_AGENT_TOKEN=token)
        assert bot.returncode == 0, bot.stderr
    [conv] = live.conversations(app["id"], agent)
    r = httpx.get(f"{live.url}/v1/agent/conversations/{conv['id']}", headers=agent)
    authors = [m["author"]["type"] for m in r.json()["messages"]]
    assert authors == ["user", "user", "agent"]


def test_agent_bot_stops_quietly_on_ctrl_c(live: Live, tmp_path: Path) -> None:
    app = live.create_app()
    with Client(live.url, app["app_key"], data_dir=tmp_path) as tb:
        tb.conversations.create("It crashed on start")
    token = live.create_agent(app["id"])["Authorization"].removeprefix("Bearer ")
    bot = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "agent_bot.py"), "--interval", "0.2"],
        env={**os.environ, "TELLBACK_URL": live.url, "TELLBACK_AGENT_TOKEN": token},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert bot.stdout is not None
        assert bot.stdout.readline().startswith("answered ")  # it is in its loop
        bot.send_signal(signal.SIGINT)
        out, err = bot.communicate(timeout=30)
    finally:
        if bot.poll() is None:
            bot.kill()
            bot.wait()
    assert (bot.returncode, err) == (0, ""), err
    assert "Traceback" not in out
