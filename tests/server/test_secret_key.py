"""Every process on one database must share TELLBACK_SECRET_KEY: it seals the apps'
identity secrets, push credentials and webhook secrets. A process with another key is
refused at start, even on a database with no app yet."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import delete

from tellback_server.db.base import table_of
from tellback_server.db.engine import Database
from tellback_server.db.models import AppIdentitySecret, secret_key_checks
from tellback_server.domain.apps.services import check_secret_key
from tellback_server.plugins import build_registry
from tellback_server.security import Sealer
from tellback_server.settings import SettingsError
from tests.conftest import tellback
from tests.server.conftest import make_settings, serve_app
from tests.server.test_cli import assert_one_line_error, env_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_two_nodes_with_different_keys_on_a_new_database(tmp_path: Path, database_url: str) -> None:
    """The first node to start seals the witness; a second with its own key (as one
    started without the shared key takes its data dir's) is refused, before any app
    exists whose secret would have told. Until then both started, and each answered
    500 to the sessions the other had made."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    env = env_for(first, database_url)
    migrated = tellback(first, env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    started = tellback(first, env, "worker", "--once")
    assert started.returncode == 0, started.stderr
    other = {**env_for(second, database_url), "TELLBACK_SECRET_KEY": "o" * 40}
    refused = tellback(second, other, "worker", "--once")
    assert_one_line_error(refused, "TELLBACK_SECRET_KEY: this database's secrets")
    assert "o" * 40 not in refused.stderr
    again = tellback(first, env, "worker", "--once")  # the first key still starts
    assert again.returncode == 0, again.stderr


async def test_a_database_from_before_the_witness_is_checked_then_given_one(
    tmp_path: Path, database_url: str
) -> None:
    settings = make_settings(database_url, tmp_path / "data")
    async with serve_app(settings, build_registry()) as api:
        await api.create_app("Sealed before")
    assert settings.secret_key is not None
    right, wrong = Sealer(settings.secret_key), Sealer("w" * 40)
    db = Database(settings)
    try:
        async with db.session(write=True) as session:  # (as the upgrade finds it)
            await session.execute(delete(secret_key_checks))
        with pytest.raises(SettingsError):  # the newest identity secret tells
            await check_secret_key(db, wrong)
        await check_secret_key(db, right)  # and seals the witness
        async with db.session(write=True) as session:
            await session.execute(delete(table_of(AppIdentitySecret)))
        with pytest.raises(SettingsError):  # now the witness alone tells
            await check_secret_key(db, wrong)
    finally:
        await db.dispose()
