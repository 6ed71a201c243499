"""No secret reaches the logs: a real `tellback serve` through a full scenario.

The server logs as operators run it (JSON lines; and the console renderer); every token,
secret, key, identity token, push token and message body created during the scenario is
then searched for in everything the process wrote (stdout minus the admin token it prints
once by design, and stderr). Error paths are included: a bad identity token, an unknown
bearer token, a refused request whose body carries a secret, failing webhook attempts; and
webhook deliveries to a URL that carries its receiver's credential in its path and query,
as Slack's and Zapier's do. (A 500's traceback is the console test below, and
test_validation's 500 tests.)
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tellback_server.dev.apns_fake import ApnsFake
from tellback_server.dev.fcm_fake import FcmFake
from tests.reliability.world import PNG
from tests.server.live import free_port
from tests.server.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
TOPIC = "com.example.secrets"
TEAM = "TEAMSECRET"


def _pieces(secret: str) -> list[str]:
    """The secret, and for multi-line or long ones a distinctive inner piece of each line."""
    out = [secret]
    for raw in secret.splitlines():
        line = raw.strip()
        if len(line) >= 24 and not line.startswith("-----"):
            out.append(line[4:24])
    return out


async def _wait_token(out: Path, proc: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in out.read_text(errors="replace").splitlines():  # noqa: ASYNC240
            if line.strip().startswith("tba_"):
                return line.strip()
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        await asyncio.sleep(0.1)
    raise AssertionError("no admin token printed")


@pytest.mark.parametrize("fmt", ["json", "console"])
async def test_no_secret_in_the_logs_of_a_full_scenario(tmp_path: Path, fmt: str) -> None:
    secrets: dict[str, str] = {}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server_key = f"sk-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    secrets["TELLBACK_SECRET_KEY"] = server_key
    async with ApnsFake(topics=[TOPIC]) as apns, FcmFake() as fcm, WebhookReceiver() as receiver:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELLBACK_")}
        env.update(
            TELLBACK_DATA_DIR=str(tmp_path / "data"),
            TELLBACK_SECRET_KEY=server_key,
            TELLBACK_LOG_FORMAT=fmt,
            TELLBACK_APNS_HOST="127.0.0.1",
            TELLBACK_APNS_PORT=str(apns.port),
            TELLBACK_APNS_CA_FILE=str(apns.ca_file),
            TELLBACK_FCM_ENDPOINT=fcm.base_url,
            TELLBACK_WEBHOOK_ALLOW_PRIVATE="true",
            TELLBACK_WORKER_POLL_SECONDS="0.5",
            TELLBACK_PUBLIC_URL=base,
        )
        out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
        with out.open("wb") as out_fh, err.open("wb") as err_fh:
            proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-m", "tellback_server", "serve", "--port", str(port)],
                cwd=tmp_path,
                env=env,
                stdout=out_fh,
                stderr=err_fh,
            )
        try:
            admin_token = await _wait_token(out, proc)
            secrets["admin token"] = admin_token
            async with httpx.AsyncClient(base_url=base, timeout=15) as http:
                for _ in range(100):
                    try:
                        if (await http.get("/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
                await _scenario(
                    http, admin_token, apns, fcm, receiver, secrets, crash=fmt == "json"
                )
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    stdout = out.read_text(errors="replace").replace(admin_token, "<printed once>")
    logs = stdout + err.read_text(errors="replace")
    assert "http.request" in logs, logs[-2000:]
    leaks = [
        f"{name}: {piece[:12]}…"
        for name, secret in secrets.items()
        for piece in _pieces(secret)
        if piece in logs
    ]
    assert leaks == [], f"secrets in the {fmt} logs: {leaks}"


async def _scenario(
    http: httpx.AsyncClient,
    admin_token: str,
    apns: ApnsFake,
    fcm: FcmFake,
    receiver: WebhookReceiver,
    secrets: dict[str, str],
    *,
    crash: bool,
) -> None:
    admin = {"Authorization": f"Bearer {admin_token}"}

    async def call(method: str, path: str, expect: int, **kw: Any) -> Any:
        r = await http.request(method, path, **kw)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r.json() if r.content else None

    app = await call("POST", "/v1/admin/apps", 201, json={"name": "Secrets"}, headers=admin)
    secrets["identity secret"] = app["identity_secret"]
    agent = await call(
        "POST",
        "/v1/admin/agents",
        201,
        json={"name": "Ada", "email": "ada@example.com", "app_ids": [app["id"]]},
        headers=admin,
    )
    secrets["agent token"] = agent["token"]
    agent_h = {"Authorization": f"Bearer {agent['token']}"}

    private_pem, public_pem = ApnsFake.generate_key()
    key_id = ApnsFake.generate_key_id()
    apns.add_key(TEAM, key_id, public_pem)
    secrets["APNs p8 key"] = private_pem
    await call(
        "PUT",
        f"/v1/admin/apps/{app['id']}/push/apns",
        200,
        json={"team_id": TEAM, "key_id": key_id, "private_key": private_pem, "topic": TOPIC},
        headers=admin,
    )
    account = fcm.service_account("tellback-secrets")
    secrets["FCM service-account key"] = account["private_key"]
    await call(
        "PUT",
        f"/v1/admin/apps/{app['id']}/push/fcm",
        200,
        json={"service_account": account},
        headers=admin,
    )
    hook = await call(
        "POST",
        f"/v1/admin/apps/{app['id']}/webhooks",
        201,
        json={"url": "http://127.0.0.1:9/hook"},
        headers=admin,
    )
    secrets["webhook secret"] = hook["secret"]
    in_path, in_query = f"T0-{uuid.uuid4().hex}", f"q{uuid.uuid4().hex}"
    secrets["credential in a webhook URL's path"] = in_path
    secrets["credential in a webhook URL's query"] = in_query
    live_hook = await call(
        "POST",
        f"/v1/admin/apps/{app['id']}/webhooks",
        201,
        json={"url": f"{receiver.url(f'/services/{in_path}')}?token={in_query}"},
        headers=admin,
    )
    secrets["live webhook secret"] = live_hook["secret"]
    rotated = await call(
        "POST",
        f"/v1/admin/apps/{app['id']}/webhooks/{hook['id']}/rotate-secret",
        200,
        json={"overlap_seconds": 3600},
        headers=admin,
    )
    secrets["rotated webhook secret"] = rotated["secret"]

    user_jwt = jwt.encode(
        {"sub": "user-42", "exp": int(time.time()) + 600, "email": "grace@example.com"},
        app["identity_secret"],
        algorithm="HS256",
        headers={"kid": app["identity_kid"]},
    )
    secrets["identity token"] = user_jwt
    session = await call(
        "POST",
        "/v1/client/sessions",
        201,
        json={
            "app_key": app["app_key"],
            "installation_id": str(uuid.uuid4()),
            "user_token": user_jwt,
        },
    )
    secrets["session token"] = session["session_token"]
    user = {"Authorization": f"Bearer {session['session_token']}"}
    bad_jwt = jwt.encode(
        {"sub": "user-43", "exp": int(time.time()) + 600}, "wrong-secret-" + "z" * 40
    )
    secrets["rejected identity token"] = bad_jwt
    await call(
        "POST",
        "/v1/client/sessions",
        401,
        json={
            "app_key": app["app_key"],
            "installation_id": str(uuid.uuid4()),
            "user_token": bad_jwt,
        },
    )
    fake_bearer = f"tbs_{uuid.uuid4().hex}{uuid.uuid4().hex}"
    secrets["unknown bearer token"] = fake_bearer
    await call("GET", "/v1/client/me", 401, headers={"Authorization": f"Bearer {fake_bearer}"})

    apns_token = ApnsFake.make_token()
    secrets["APNs device token"] = apns_token
    await call(
        "PUT",
        "/v1/client/devices/current",
        200,
        json={"platform": "ios", "push_provider": "apns", "push_token": apns_token},
        headers=user,
    )
    other = await call(
        "POST",
        "/v1/client/sessions",
        201,
        json={"app_key": app["app_key"], "installation_id": str(uuid.uuid4())},
    )
    other_h = {"Authorization": f"Bearer {other['session_token']}"}
    secrets["anonymous session token"] = other["session_token"]
    fcm_token = FcmFake.make_token()
    secrets["FCM device token"] = fcm_token
    await call(
        "PUT",
        "/v1/client/devices/current",
        200,
        json={"platform": "android", "push_provider": "fcm", "push_token": fcm_token},
        headers=other_h,
    )

    up = await call(
        "POST",
        "/v1/client/uploads",
        201,
        json={"filename": "a.png", "content_type": "image/png", "size": len(PNG), "kind": "photo"},
        headers=user,
    )
    signed = httpx.URL(up["single"]["url"])
    for name, value in signed.params.items():
        if len(value) >= 16:
            secrets[f"upload URL {name}"] = value
    r = await http.put(up["single"]["url"], content=PNG, headers=up["single"]["headers"])
    assert r.status_code == 200, r.text
    await call("POST", f"/v1/client/uploads/{up['upload_id']}/complete", 200, json={}, headers=user)

    bodies = {
        "user message": f"my card is 4111-{uuid.uuid4().hex[:12]}",
        "agent reply": f"your reset code is {uuid.uuid4().hex[:12]}",
        "agent note": f"internal note {uuid.uuid4().hex[:12]}",
        "anonymous message": f"anon says {uuid.uuid4().hex[:12]}",
    }
    secrets.update({f"{k} body": v for k, v in bodies.items()})
    conv = await call(
        "POST",
        "/v1/client/conversations",
        201,
        json={"body": bodies["user message"], "attachment_ids": [up["upload_id"]]},
        headers=user,
    )
    await call(
        "POST",
        f"/v1/agent/conversations/{conv['id']}/messages",
        201,
        json={"body": bodies["agent reply"]},
        headers=agent_h,
    )
    await call(
        "POST",
        f"/v1/agent/conversations/{conv['id']}/messages",
        201,
        json={"body": bodies["agent note"], "internal": True},
        headers=agent_h,
    )
    conv2 = await call(
        "POST",
        "/v1/client/conversations",
        201,
        json={"body": bodies["anonymous message"]},
        headers=other_h,
    )
    await call(
        "POST",
        f"/v1/agent/conversations/{conv2['id']}/messages",
        201,
        json={"body": bodies["agent reply"]},
        headers=agent_h,
    )
    if crash:
        # A request refused deep in decoding (a 500 until the nesting was bounded), its
        # body carrying a secret. Only in JSON mode: the console renderer's leak of locals
        # is test_console_tracebacks_do_not_show_locals below.
        crash_marker = f"crash-{uuid.uuid4().hex}"
        secrets["body of a failing request"] = crash_marker
        nested = "[" * 2000 + "]" * 2000
        r = await http.post(
            "/v1/client/conversations",
            content=f'{{"body": "{crash_marker}", "context": {{"extra": {nested}}}}}',
            headers={**user, "Content-Type": "application/json"},
        )
        assert r.status_code == 400, r.text
    rotated_agent = await call(
        "POST", f"/v1/admin/agents/{agent['id']}/rotate-token", 200, json={}, headers=admin
    )
    secrets["rotated agent token"] = rotated_agent["token"]

    await apns.wait_for(1, timeout=20)
    await fcm.wait_for(1, timeout=20)
    for _ in range(200):  # the live receiver's deliveries (whose requests httpx logs)
        if len(receiver.requests) >= 2:
            break
        await asyncio.sleep(0.1)
    assert len(receiver.requests) >= 2, receiver.requests
    await asyncio.sleep(1.5)  # the webhook's first attempts (to a closed port) are logged


# Console mode once printed traceback locals (tokens, request bodies): fixed in logging.py.


def test_console_tracebacks_do_not_show_locals() -> None:
    secret = f"tbs_{uuid.uuid4().hex}"
    code = f"""
import structlog
from tellback_server.logging import configure_logging
configure_logging("info", "console")
log = structlog.get_logger("t")
def handler(token):
    authorization = "Bearer " + token
    raise RuntimeError("boom")
try:
    handler({secret!r})
except RuntimeError:
    log.exception("http.unhandled_error")
"""
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert "http.unhandled_error" in run.stderr, run.stderr[-2000:]
    assert secret not in run.stderr


# ----- the whole suite's captured output (tests/secret_scan.py) ------------------------------


def test_the_suite_scan_finds_each_kind_of_secret() -> None:
    """What ``tests/secret_scan.py`` searches every test's captured output for."""
    from tellback_server.domain.webhooks.signing import new_secret
    from tellback_server.security import new_token
    from tests.conftest import S3_SECRET_KEY
    from tests.secret_scan import find_secrets
    from tests.server.conftest import SECRET, identity_token

    jwt_ = identity_token("tbi_" + "x" * 43, "user-1", kid="k_abc")
    pem = "-----BEGIN PRIVATE KEY-----\nMIGTAgEAMBMG\n-----END PRIVATE KEY-----"
    leaked = {f"{prefix} token": new_token(prefix) for prefix in ("tba_", "tbg_", "tbs_", "tbi_")}
    leaked |= {"webhook": new_secret(), "jwt": jwt_, "pem": pem}
    leaked |= {"key": SECRET, "s3": S3_SECRET_KEY}
    # Push tokens by value: those the fakes made here (a 64-hex run that is not one of
    # them, such as a request id, is harmless).
    leaked |= {"APNs token": ApnsFake.make_token(), "FCM token": FcmFake.make_token()}
    for name, secret in leaked.items():
        line = f'2026-11-27 13:53:14 [info     ] http.request authorization="{secret}" x=1'
        assert len(find_secrets(line)) == 1, name
        assert len(find_secrets(f'{{"event": "x", "value": "{secret}"}}')) == 1, name
        coloured = f"\x1b[36mauthorization\x1b[0m=\x1b[35m{secret}\x1b[0m"
        assert len(find_secrets(coloured)) == 1, name
    harmless = [
        new_token("tbk_", 18),  # an app key is public: it ships in the app
        new_token("k_", 6),  # a key id
        uuid.uuid4().hex + uuid.uuid4().hex,  # request ids, hashes (64 hex digits too)
        "tbs_short",  # a made-up token a test sends to be refused
        "Authorization: Bearer <redacted>",
    ]
    assert find_secrets("\n".join(harmless)) == []
    # The CLI's one-time display of a new admin token is what it is for.
    shown = "First start: an admin token was created (shown once; store it now):\n"
    assert find_secrets(shown + new_token("tba_")) == []
    assert len(find_secrets(shown + "next line\n" + new_token("tba_"))) == 1


def test_settings_never_show_their_secrets_in_a_repr() -> None:
    """A traceback's locals or a log line may show the settings: not the key, the S3
    secret or the database URL (which may carry a password)."""
    from tellback_server.settings import load_settings

    settings = load_settings(
        {
            "TELLBACK_SECRET_KEY": "sk-" + "s" * 40,
            "TELLBACK_DATABASE_URL": "postgresql+asyncpg://tellback:pw-hunter2@db:5432/tellback",
            "TELLBACK_S3_ENDPOINT": "s3.example.com",
            "TELLBACK_S3_ACCESS_KEY": "AKIAEXAMPLE",
            "TELLBACK_S3_SECRET_KEY": "s3-secret-value-0123456789",
        }
    )
    shown = repr(settings)
    assert "AKIAEXAMPLE" in shown  # the repr still says what is configured
    for secret in ("s" * 40, "pw-hunter2", "s3-secret-value-0123456789"):
        assert secret not in shown
