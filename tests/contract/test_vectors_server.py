"""The server agrees with every shared test vector in sdk-spec/vectors/.

The committed files are exactly what sdk-spec/vectors/generate.py produces from the
server's code (so they cannot drift), each file matches its JSON Schema, and the
behaviours that only a running server shows (limits on upload create, pagination
walks with writes between pages) are checked through the public API of an
in-process app.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest

from tellback_server.domain.attachments.services import plan
from tellback_server.domain.push.payloads import apns_payload, fcm_message
from tellback_server.domain.webhooks.signing import signature_header
from tellback_server.jobs.registry import JobRegistry
from tests.server.conftest import Api, AppInfo, make_settings, serve_app

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "sdk-spec" / "vectors"
NO_LIMITS = {"app_per_minute": 0, "user_per_minute": 0}


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "tellback_vectors_generate", VECTORS / "generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def load(family: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{family}.json").read_text(encoding="utf-8"))
    return data


def cases(family: str, key: str = "vectors") -> list[Any]:
    return [pytest.param(v, id=v["name"]) for v in load(family)[key]]


# ----- the files themselves ------------------------------------------------------------------


def test_committed_vectors_match_the_generator() -> None:
    generated: dict[str, str] = gen.build_all()
    assert sorted(generated) == sorted(p.stem for p in VECTORS.glob("*.json"))
    stale = [
        family
        for family, text in generated.items()
        if (VECTORS / f"{family}.json").read_text(encoding="utf-8") != text
    ]
    assert not stale, (
        f"sdk-spec/vectors is stale for {stale}: run `uv run python sdk-spec/vectors/generate.py`"
    )


@pytest.mark.parametrize("family", gen.FAMILIES)
def test_vector_file_matches_its_schema(family: str) -> None:
    schema = json.loads((VECTORS / "schema" / f"{family}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(load(family))]
    assert not errors, "\n".join(errors[:10])


@pytest.mark.parametrize("family", gen.FAMILIES)
def test_vector_names_are_unique(family: str) -> None:
    doc = load(family)
    for key, value in doc.items():
        if isinstance(value, list):
            names = [v["name"] for v in value]
            assert len(names) == len(set(names)), f"{family}.{key} repeats a name"


# ----- pure server code ----------------------------------------------------------------------


@pytest.mark.parametrize("vector", cases("identity_tokens"))
def test_identity_token(vector: dict[str, Any]) -> None:
    inp = vector["inputs"]
    assert (
        gen.verify_token_with_server(inp["token"], inp["secrets"], inp["now"])
        == (vector["expected"])
    )


@pytest.mark.parametrize("vector", cases("webhook_signatures", "signing"))
def test_webhook_signing(vector: dict[str, Any]) -> None:
    inp = vector["inputs"]
    header = signature_header(
        inp["secrets"], inp["msg_id"], inp["timestamp"], inp["body"].encode("utf-8")
    )
    assert header == vector["expected"]["webhook-signature"]


@pytest.mark.parametrize("vector", cases("push_payloads", "payloads"))
def test_push_payload(vector: dict[str, Any]) -> None:
    inp, expected = vector["inputs"], vector["expected"]
    n = gen._server_notification(inp)
    assert apns_payload(n) == expected["apns"]["payload"]
    assert fcm_message(inp["push_token"], n) == expected["fcm"]["message"]
    assert len(json.dumps(apns_payload(n)).encode()) <= 4096


SERVER_ERRORS = [c for c in cases("error_bodies") if c.values[0]["source"] == "server"]


@pytest.mark.parametrize("vector", SERVER_ERRORS)
def test_error_body(vector: dict[str, Any]) -> None:
    rendered = {name: (handler, exc) for name, handler, exc in gen.server_error_cases()}
    handler, exc = rendered[vector["name"]]
    status, headers, content = gen._render(handler, exc)
    assert status == vector["response"]["status"]
    assert headers == vector["response"]["headers"]
    assert json.loads(content) == vector["response"]["body"]
    assert headers["Content-Type"] == "application/problem+json"
    assert "secret SQL" not in content.decode()


@pytest.mark.parametrize("vector", cases("upload_plans"))
def test_upload_plan(vector: dict[str, Any]) -> None:
    expected = vector["expected"]
    if expected["outcome"] != "planned":
        return  # refusals depend on the app's limits: checked over HTTP below
    method, part_size, part_count = plan(vector["inputs"]["size"])
    assert method == expected["method"]
    if method == "multipart":
        assert (part_size, part_count) == (expected["part_size"], expected["part_count"])


# ----- through the public API ----------------------------------------------------------------


@pytest.fixture
async def sqlite_api(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[Api]:
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    settings = make_settings(f"sqlite+aiosqlite:///{db}", tmp_path / "data", port=8080)
    async with serve_app(settings, JobRegistry(), base_url="http://127.0.0.1:8080") as api:
        yield api


async def test_upload_create_follows_every_plan(sqlite_api: Api) -> None:
    api = sqlite_api
    app = await api.create_app("Vectors", rate_limits=NO_LIMITS)
    user = await api.user_headers(app)
    for vector in load("upload_plans")["vectors"]:
        inp, expected = vector["inputs"], vector["expected"]
        if inp["limits"] is None:
            continue  # beyond the default limits
        body = {
            "filename": "vector.bin",
            "content_type": inp["content_type"],
            "size": inp["size"],
            "kind": inp["kind"],
        }
        r = await api.http.post(
            "/v1/client/uploads",
            json=body,
            headers={**user, "Idempotency-Key": str(uuid.uuid4())},
        )
        name = vector["name"]
        if expected["outcome"] == "refused":
            assert r.status_code == expected["status"], (name, r.text)
            assert r.json()["code"] == expected["code"], name
            continue
        assert r.status_code == 201, (name, r.text)
        data = r.json()
        assert data["method"] == expected["method"], name
        if expected["method"] == "multipart":
            mp = data["multipart"]
            assert (mp["part_size"], mp["part_count"]) == (
                expected["part_size"],
                expected["part_count"],
            ), name
            assert [p["part_number"] for p in mp["parts"]] == list(
                range(1, expected["part_count"] + 1)
            )
    r = await api.http.get("/v1/client/config", headers=user)
    limits = {k: v for k, v in r.json()["attachments"].items() if isinstance(v, dict)}
    assert limits == gen.default_limits()


class Walker:
    """Runs one pagination walk vector against the client API."""

    def __init__(self, api: Api, app: AppInfo, user: dict[str, str]) -> None:
        self.api, self.app, self.user = api, app, user
        self.conversation_ids: dict[str, str] = {}
        self.thread: str | None = None

    async def add(self, kind: str, label: str) -> None:
        http, headers = self.api.http, {**self.user, "Idempotency-Key": str(uuid.uuid4())}
        if kind == "messages" and self.thread is not None:
            r = await http.post(
                f"/v1/client/conversations/{self.thread}/messages",
                json={"body": label},
                headers=headers,
            )
        else:
            r = await http.post(
                "/v1/client/conversations",
                json={"body": label, "subject": label},
                headers=headers,
            )
            self.conversation_ids[label] = r.json()["id"]
            if kind == "messages":
                self.thread = r.json()["id"]
        assert r.status_code == 201, r.text

    async def touch(self, label: str) -> None:
        r = await self.api.http.post(
            f"/v1/client/conversations/{self.conversation_ids[label]}/messages",
            json={"body": f"reply in {label}"},
            headers={**self.user, "Idempotency-Key": str(uuid.uuid4())},
        )
        assert r.status_code == 201, r.text

    def path(self, kind: str) -> str:
        if kind == "messages":
            return f"/v1/client/conversations/{self.thread}/messages"
        return "/v1/client/conversations"

    @staticmethod
    def label(kind: str, item: dict[str, Any]) -> str:
        return str(item["body"] if kind == "messages" else item["subject"])


@pytest.mark.parametrize("vector", cases("pagination_walks"))
async def test_pagination_walk(sqlite_api: Api, vector: dict[str, Any]) -> None:
    api, kind = sqlite_api, vector["list"]
    app = await api.create_app("Walks", rate_limits=NO_LIMITS)
    walker = Walker(api, app, await api.user_headers(app))
    for label in vector["initial"]:
        await walker.add(kind, label)
    cursor: str | None = None
    pages: list[dict[str, Any]] = []
    for step in vector["pages"]:
        for label in step.get("insert_before", []):
            await walker.add(kind, label)
        for label in step.get("touch_before", []):
            await walker.touch(label)
        params: dict[str, str | int] = {"limit": vector["limit"]}
        if cursor is not None:
            params["cursor"] = cursor
        r = await api.http.get(walker.path(kind), params=params, headers=walker.user)
        assert r.status_code == 200, r.text
        page = r.json()
        items = [walker.label(kind, item) for item in page["items"]]
        pages.append({"items": items, "has_next": page["next_cursor"] is not None})
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == vector["expected"]["pages"]


@pytest.mark.parametrize("vector", cases("pagination_walks", "invalid_requests"))
async def test_pagination_refuses(sqlite_api: Api, vector: dict[str, Any]) -> None:
    api = sqlite_api
    app = await api.create_app("Walks", rate_limits=NO_LIMITS)
    user = await api.user_headers(app)
    r = await api.http.get("/v1/client/conversations", params=vector["query"], headers=user)
    expected = vector["expected"]
    assert r.headers["content-type"].startswith("application/problem+json")
    if "status" in expected:
        assert r.status_code == expected["status"]
        assert r.json()["code"] == expected["code"]
    else:
        assert 400 <= r.status_code < 500
