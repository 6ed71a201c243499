"""Black-box conformance scenarios against any Tellback server.

    uv run python sdk-spec/conformance/run.py --base-url http://127.0.0.1:8080 --admin-token tba_...

Runs the flows every SDK depends on through the public HTTP API only (the admin API
sets up a fresh app and agent): sessions (anonymous and identified), feedback with
idempotent replay, uploads (single, multipart with resume), an agent reply, the read
marker and unread count, a live event over SSE, and problem+json errors. Prints a
pass/fail table; the exit code is 1 if any scenario failed, 2 if setup failed or the
command line is wrong (an ``--only`` that names no scenario).

Needs only the standard library and httpx. A native SDK team runs it in CI against
a local `tellback serve` to check the server their SDK is tested against, and reuses
its scenarios as the script for their SDK's own integration tests.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

MIB = 1024 * 1024


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def expect(r: httpx.Response, status: int, what: str) -> Any:
    if r.status_code != status:
        raise CheckFailed(f"{what}: expected {status}, got {r.status_code}: {r.text[:300]}")
    if not r.content:
        return None
    return r.json()


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def identity_token(secret: str, kid: str | None, claims: dict[str, Any]) -> str:
    """An HS256 JWT, as the app developer's backend signs it (sdk-spec/identity.md)."""
    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = (
        b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + b64url(json.dumps(claims, separators=(",", ":")).encode())
    )
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


@dataclass
class Context:
    http: httpx.Client
    admin_token: str
    app: dict[str, Any] = field(default_factory=dict)
    agent_token: str = ""
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def agent(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.agent_token}"}

    def session(self, installation_id: str | None = None, **extra: Any) -> dict[str, Any]:
        body = {
            "app_key": self.app["app_key"],
            "installation_id": installation_id or uuid.uuid4().hex,
            "device": {"platform": "ios", "model": "Conformance1,1", "sdk": "conformance/1"},
            **extra,
        }
        data: dict[str, Any] = expect(
            self.http.post("/v1/client/sessions", json=body), 201, "POST /v1/client/sessions"
        )
        return data

    def user(self, **extra: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.session(**extra)['session_token']}"}

    def feedback(self, user: dict[str, str], text: str) -> dict[str, Any]:
        r = self.http.post(
            "/v1/client/conversations",
            json={"body": text},
            headers={**user, "Idempotency-Key": str(uuid.uuid4())},
        )
        data: dict[str, Any] = expect(r, 201, "POST /v1/client/conversations")
        return data

    def reply(self, conversation_id: str, text: str) -> dict[str, Any]:
        r = self.http.post(
            f"/v1/agent/conversations/{conversation_id}/messages",
            json={"body": text},
            headers={**self.agent, "Idempotency-Key": str(uuid.uuid4())},
        )
        data: dict[str, Any] = expect(r, 201, "agent reply")
        return data


def setup(ctx: Context) -> None:
    name = f"Conformance {uuid.uuid4().hex[:8]}"
    body = {"name": name, "settings": {"rate_limits": {"app_per_minute": 0, "user_per_minute": 0}}}
    r = ctx.http.post(
        "/v1/admin/apps", json=body, headers={**ctx.admin, "Idempotency-Key": str(uuid.uuid4())}
    )
    ctx.app = expect(r, 201, "POST /v1/admin/apps")
    r = ctx.http.post(
        "/v1/admin/agents",
        json={
            "name": "Conformance Agent",
            "email": "agent@example.com",
            "app_ids": [ctx.app["id"]],
        },
        headers={**ctx.admin, "Idempotency-Key": str(uuid.uuid4())},
    )
    ctx.agent_token = expect(r, 201, "POST /v1/admin/agents")["token"]


# ----- scenarios -----------------------------------------------------------------------------


def session_anonymous(ctx: Context) -> str:
    installation = uuid.uuid4().hex
    first = ctx.session(installation)
    check(first["session_token"].startswith("tbs_") or bool(first["session_token"]), "token")
    check(first["user"]["external_id"] is None, "an anonymous user has no external_id")
    again = ctx.session(installation)
    check(again["user"]["id"] == first["user"]["id"], "same installation -> same anonymous user")
    me = ctx.http.get(
        "/v1/client/me", headers={"Authorization": f"Bearer {again['session_token']}"}
    )
    check(expect(me, 200, "GET /v1/client/me")["id"] == first["user"]["id"], "GET /me")
    return f"user {first['user']['id']}"


def session_identified(ctx: Context) -> str:
    installation = uuid.uuid4().hex
    anon = ctx.session(installation)
    headers = {"Authorization": f"Bearer {anon['session_token']}"}
    conv = ctx.feedback(headers, "written before login")
    sub = f"conformance-{uuid.uuid4().hex[:8]}"
    claims = {"sub": sub, "exp": int(time.time()) + 600, "name": "Ada"}
    token = identity_token(ctx.app["identity_secret"], ctx.app.get("identity_kid"), claims)
    ident = ctx.session(installation, user_token=token)
    check(ident["user"]["external_id"] == sub, "external_id is the token's sub")
    check(ident["user"]["name"] == "Ada", "name comes from the token")
    r = ctx.http.get(
        f"/v1/client/conversations/{conv['id']}",
        headers={"Authorization": f"Bearer {ident['session_token']}"},
    )
    expect(r, 200, "the anonymous user's conversation moved to the identified user")
    bad = identity_token("tbi_not-the-secret", ctx.app.get("identity_kid"), claims)
    r = ctx.http.post(
        "/v1/client/sessions",
        json={"app_key": ctx.app["app_key"], "installation_id": installation, "user_token": bad},
    )
    problem = expect(r, 401, "a token with a bad signature")
    check(problem["code"] == "unauthenticated", "bad signature -> unauthenticated")
    expired = identity_token(
        ctx.app["identity_secret"], ctx.app.get("identity_kid"), {**claims, "exp": 1_000_000_000}
    )
    r = ctx.http.post(
        "/v1/client/sessions",
        json={
            "app_key": ctx.app["app_key"],
            "installation_id": installation,
            "user_token": expired,
        },
    )
    problem = expect(r, 401, "an expired token")
    check(problem["code"] == "unauthenticated", "expired token -> unauthenticated")
    return f"sub {sub}"


def feedback_idempotent(ctx: Context) -> str:
    user = ctx.user()
    key = str(uuid.uuid4())
    raw = json.dumps({"body": "Idempotent feedback", "tags": ["conformance"]}).encode()
    headers = {**user, "Idempotency-Key": key, "Content-Type": "application/json"}
    first = ctx.http.post("/v1/client/conversations", content=raw, headers=headers)
    created = expect(first, 201, "first create")
    check(first.headers.get("Idempotent-Replayed") is None, "the first answer is not a replay")
    replay = ctx.http.post("/v1/client/conversations", content=raw, headers=headers)
    check(replay.status_code == 201, f"replay status {replay.status_code}")
    check(replay.headers.get("Idempotent-Replayed") == "true", "Idempotent-Replayed: true")
    check(replay.json() == created, "the replay has the same body")
    listed = expect(ctx.http.get("/v1/client/conversations", headers=user), 200, "list")
    check(len(listed["items"]) == 1, "the replay created nothing")
    other = json.dumps({"body": "Different body"}).encode()
    reused = ctx.http.post("/v1/client/conversations", content=other, headers=headers)
    problem = expect(reused, 409, "same key, different body")
    check(problem["code"] == "idempotency_key_reused", "code idempotency_key_reused")
    ctx.state["conversation"] = created
    ctx.state["user"] = user
    return f"conversation {created['id']}"


def _create_upload(ctx: Context, user: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
    r = ctx.http.post(
        "/v1/client/uploads", json=body, headers={**user, "Idempotency-Key": str(uuid.uuid4())}
    )
    data: dict[str, Any] = expect(r, 201, "POST /v1/client/uploads")
    return data


def _put(url: str, data: bytes, headers: dict[str, str] | None = None) -> str:
    r = httpx.put(url, content=data, headers=headers or {}, timeout=60)
    expect(r, 200, f"PUT {url.split('?', maxsplit=1)[0]}")
    return str(r.headers.get("ETag", ""))


def upload_single(ctx: Context) -> str:
    user = ctx.user()
    data = b"conformance log line\n" * 100
    plan = _create_upload(
        ctx,
        user,
        {"filename": "log.txt", "content_type": "text/plain", "size": len(data), "kind": "log"},
    )
    check(plan["method"] == "single", f"a small file is single, got {plan['method']}")
    _put(plan["single"]["url"], data, plan["single"].get("headers"))
    r = ctx.http.post(f"/v1/client/uploads/{plan['upload_id']}/complete", json={}, headers=user)
    att = expect(r, 200, "complete")
    check(att["status"] in {"processing", "ready"}, f"status {att['status']}")
    conv = ctx.http.post(
        "/v1/client/conversations",
        json={"body": "with a log", "attachment_ids": [att["id"]]},
        headers={**user, "Idempotency-Key": str(uuid.uuid4())},
    )
    created = expect(conv, 201, "feedback with the attachment")
    ids = [a["id"] for a in created["messages"][0]["attachments"]] if "messages" in created else []
    if not ids:
        ids = [a["id"] for a in (created.get("last_message") or {}).get("attachments", [])]
    check(att["id"] in ids, "the attachment is on the first message")
    return f"{len(data)} bytes"


def upload_multipart_resume(ctx: Context) -> str:
    user = ctx.user()
    size = 16 * MIB + 4096
    data = b"PK\x03\x04" + bytes(i % 251 for i in range(size - 4))
    plan = _create_upload(
        ctx,
        user,
        {"filename": "logs.zip", "content_type": "application/zip", "size": size, "kind": "file"},
    )
    check(plan["method"] == "multipart", "over 16 MiB is multipart")
    mp = plan["multipart"]
    part_size, count = mp["part_size"], mp["part_count"]
    check(count == -(-size // part_size), "part_count = ceil(size / part_size)")
    first = mp["parts"][0]
    _put(first["url"], data[:part_size])
    # The app "crashes" here; on restart it asks which parts the server holds.
    status = expect(
        ctx.http.get(f"/v1/client/uploads/{plan['upload_id']}", headers=user), 200, "resume"
    )
    held = {p["part_number"]: p for p in status["uploaded_parts"]}
    check(set(held) == {1}, f"the server holds part 1 only, got {sorted(held)}")
    missing = [p["part_number"] for p in status["multipart"]["parts"]]
    check(missing == list(range(2, count + 1)), f"fresh URLs for the missing parts: {missing}")
    etags = {1: held[1]["etag"]}
    for part in status["multipart"]["parts"]:
        n = part["part_number"]
        etags[n] = _put(part["url"], data[(n - 1) * part_size : n * part_size])
    parts = [{"part_number": n, "etag": etags[n]} for n in sorted(etags)]
    r = ctx.http.post(
        f"/v1/client/uploads/{plan['upload_id']}/complete", json={"parts": parts}, headers=user
    )
    att = expect(r, 200, "complete")
    check(att["size"] == size, "the attachment has the declared size")
    again = ctx.http.post(
        f"/v1/client/uploads/{plan['upload_id']}/complete", json={"parts": parts}, headers=user
    )
    check(expect(again, 200, "complete twice")["id"] == att["id"], "completing twice is safe")
    return f"{count} parts of {part_size}"


def _conversation(ctx: Context) -> tuple[dict[str, str], dict[str, Any]]:
    if "conversation" not in ctx.state:
        user = ctx.user()
        ctx.state["user"], ctx.state["conversation"] = user, ctx.feedback(user, "Needs a reply")
    return ctx.state["user"], ctx.state["conversation"]


def agent_reply(ctx: Context) -> str:
    user, conv = _conversation(ctx)
    reply = ctx.reply(conv["id"], "Thanks, we are on it")
    ctx.state["reply"] = reply
    r = ctx.http.get(f"/v1/client/conversations/{conv['id']}/messages", headers=user)
    page = expect(r, 200, "messages")
    bodies = [m["body"] for m in page["items"]]
    check(bodies[-1] == "Thanks, we are on it", f"the reply is the newest message: {bodies}")
    check(page["items"][-1]["author"]["type"] == "agent", "author.type agent")
    return f"message {reply['id']}"


def unread_count(ctx: Context) -> str:
    user, _ = _conversation(ctx)
    if "reply" not in ctx.state:
        agent_reply(ctx)
    unread = expect(ctx.http.get("/v1/client/unread", headers=user), 200, "GET /v1/client/unread")
    check(unread["unread_count"] == 1, f"unread_count 1 after one reply, got {unread}")
    return "1"


def read_marker(ctx: Context) -> str:
    user, conv = _conversation(ctx)
    if "reply" not in ctx.state:
        agent_reply(ctx)
    r = ctx.http.post(
        f"/v1/client/conversations/{conv['id']}/read",
        json={"up_to_message_id": ctx.state["reply"]["id"]},
        headers=user,
    )
    expect(r, 204, "POST .../read")
    unread = expect(ctx.http.get("/v1/client/unread", headers=user), 200, "GET /v1/client/unread")
    check(unread["unread_count"] == 0, f"unread_count 0 after reading, got {unread}")
    return "0"


def live_event(ctx: Context) -> str:
    user = ctx.user()
    conv = ctx.feedback(user, "Watching for a live reply")
    deadline = time.monotonic() + 15
    timeout = httpx.Timeout(10.0, read=15.0)
    headers = {**user, "Accept": "text/event-stream"}
    with ctx.http.stream("GET", "/v1/client/events", headers=headers, timeout=timeout) as r:
        check(r.status_code == 200, f"GET /v1/client/events: {r.status_code}")
        check(r.headers["content-type"].startswith("text/event-stream"), "text/event-stream")
        lines = r.iter_lines()
        for line in lines:
            if line.startswith(": connected"):
                break
            check(time.monotonic() < deadline, "no ': connected' comment")
        reply = ctx.reply(conv["id"], "Live reply")
        event: dict[str, str] = {}
        for line in lines:
            check(time.monotonic() < deadline, "no message.created event within 15 s")
            if line == "":
                if event.get("event") == "message.created":
                    data = json.loads(event["data"])
                    if data["data"]["message"]["id"] == reply["id"]:
                        check(data["id"] == event.get("id"), "data.id equals the SSE id")
                        return f"event id {event.get('id')}"
                event = {}
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            event[name] = value.removeprefix(" ")
    raise CheckFailed("the stream ended before the event arrived")


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    problem: dict[str, Any] = expect(r, status, f"{code} problem")
    ctype = r.headers.get("content-type", "")
    check(ctype.startswith("application/problem+json"), f"{status}: content type {ctype}")
    for key in ("type", "title", "status", "code"):
        check(key in problem, f"{status}: problem lacks {key!r}")
    check(problem["status"] == status, f"{status}: body status {problem['status']}")
    check(problem["code"] == code, f"{status}: code {problem['code']}, expected {code}")
    rid = r.headers.get("X-Request-Id")
    check(bool(rid), f"{status}: no X-Request-Id header")
    check(problem.get("request_id") == rid, f"{status}: request_id differs from X-Request-Id")
    return problem


def problem_json(ctx: Context) -> str:
    user = ctx.user()
    _problem(
        ctx.http.get("/v1/client/unread", headers={"Authorization": "Bearer tbs_nope"}),
        401,
        "unauthenticated",
    )
    _problem(
        ctx.http.get(f"/v1/client/conversations/{uuid.uuid4()}", headers=user), 404, "not_found"
    )
    bad = _problem(
        ctx.http.post(
            "/v1/client/conversations",
            json={"body": 42},
            headers={**user, "Idempotency-Key": str(uuid.uuid4())},
        ),
        422,
        "validation_failed",
    )
    check(bool(bad.get("errors")), "422 lists the offending fields in errors")
    check(all({"field", "message"} <= set(e) for e in bad["errors"]), "errors have field/message")
    _problem(
        ctx.http.get("/v1/client/conversations", params={"cursor": "garbage"}, headers=user),
        400,
        "bad_request",
    )
    _problem(
        ctx.http.post(
            "/v1/client/conversations",
            content=b"{not json",
            headers={**user, "Content-Type": "application/json"},
        ),
        400,
        "bad_request",
    )
    return "401 404 422 400 400"


SCENARIOS: list[tuple[str, Callable[[Context], str]]] = [
    ("session: anonymous", session_anonymous),
    ("session: identified (HS256 user_token), merge", session_identified),
    ("feedback: idempotent replay and key reuse", feedback_idempotent),
    ("upload: single", upload_single),
    ("upload: multipart with resume", upload_multipart_resume),
    ("reply: agent reply reaches the user", agent_reply),
    ("unread: count after a reply", unread_count),
    ("read: marker clears the unread count", read_marker),
    ("events: live message.created over SSE", live_event),
    ("errors: problem+json shapes", problem_json),
]


def run(base_url: str, admin_token: str, only: list[str] | None = None) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    with httpx.Client(base_url=base_url, timeout=30) as http:
        ctx = Context(http=http, admin_token=admin_token)
        setup(ctx)
        for name, scenario in SCENARIOS:
            if only and not any(o in name for o in only):
                continue
            started = time.monotonic()
            try:
                detail, ok = scenario(ctx), True
            except CheckFailed as exc:
                detail, ok = str(exc), False
            except Exception as exc:  # noqa: BLE001 (report and carry on with the next scenario)
                detail, ok = f"{type(exc).__name__}: {exc}", False
                traceback.print_exc(file=sys.stderr)
            ms = round((time.monotonic() - started) * 1000)
            results.append({"scenario": name, "passed": ok, "ms": ms, "detail": detail})
    return results


def table(results: list[dict[str, Any]]) -> str:
    width = max(len(r["scenario"]) for r in results)
    lines = [f"{'scenario':<{width}}  result  {'ms':>6}  detail", "-" * (width + 40)]
    for r in results:
        verdict = "PASS" if r["passed"] else "FAIL"
        lines.append(f"{r['scenario']:<{width}}  {verdict:<6}  {r['ms']:>6}  {r['detail']}")
    passed = sum(r["passed"] for r in results)
    lines.append(f"{passed} passed, {len(results) - passed} failed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Tellback black-box conformance scenarios")
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080")
    parser.add_argument("--admin-token", required=True, help="an admin token (tba_...)")
    parser.add_argument("--only", action="append", help="run scenarios whose name contains this")
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args(argv)
    unmatched = [o for o in args.only or [] if not any(o in name for name, _ in SCENARIOS)]
    if unmatched:  # (exits 2: 1 says a scenario failed)
        parser.error(
            f"--only {unmatched[0]!r} names no scenario; they are: "
            + "; ".join(name for name, _ in SCENARIOS)
        )
    try:
        results = run(args.base_url.rstrip("/"), args.admin_token, args.only)
    except (CheckFailed, httpx.HTTPError) as exc:
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0 if results and all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
