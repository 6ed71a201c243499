"""The console names an agent's apps (it showed 8 characters of their ids)."""

from __future__ import annotations

import html
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tellback_server.plugins import build_registry
from tests.console.conftest import BASE, open_console
from tests.server.conftest import Api, make_settings, serve_app


@pytest.fixture
async def api(sqlite_template: Path, tmp_path: Path) -> AsyncIterator[Api]:
    db = tmp_path / "tellback.db"
    shutil.copyfile(sqlite_template, db)
    settings = make_settings(f"sqlite+aiosqlite:///{db}", tmp_path / "data")
    async with serve_app(settings, build_registry(), base_url=BASE) as served:
        yield served


async def test_inbox_filter_rows_and_side_panel_show_the_apps_name(api: Api) -> None:
    shop = await api.create_app("Shop <b>& Co</b>")
    twin_a = await api.create_app("Twin")
    twin_b = await api.create_app("Twin")
    other = await api.create_app("Not hers")
    r = await api.http.post(
        "/v1/admin/agents",
        json={"name": "Ada", "app_ids": [shop.id, twin_a.id, twin_b.id]},
        headers=api.admin,
    )
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    conv = await api.feedback(await api.user_headers(shop), body="Checkout does nothing")

    async with open_console(api) as console:
        assert (await console.sign_in(token)).status_code == 303
        inbox = (await console.http.get("/console/")).text
        rows = (await console.http.get("/console/inbox/rows")).text
        page = (await console.http.get(f"/console/c/{conv['id']}")).text

    escaped = html.escape("Shop <b>& Co</b>", quote=False)
    # The filter: every app by name (twins told apart by their ids), the id as a tooltip.
    options = dict(re.findall(r'<option value="([0-9a-f-]{36})"[^>]*>([^<]*)</option>', inbox))
    assert options == {
        shop.id: escaped,
        twin_a.id: f"Twin ({twin_a.id[:8]})",
        twin_b.id: f"Twin ({twin_b.id[:8]})",
    }
    assert f'title="{shop.id}"' in inbox
    assert other.id not in inbox
    assert "Not hers" not in inbox
    # The row and the side panel.
    for shown in (rows, page):
        assert f'<span class="app" title="{shop.id}">{escaped}</span>' in shown
    assert "<b>& Co</b>" not in inbox + rows + page  # escaped, never markup
