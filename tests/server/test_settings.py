"""Settings read from TELLBACK_* variables: what is refused before anything starts, the
variables nothing reads, and the data dir's permissions."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from tellback_server.settings import (
    CLIENT_VARIABLES,
    SERVER_VARIABLES,
    Settings,
    SettingsError,
    ensure_data_dir,
    load_settings,
    resolve_secret_key,
    unknown_variables,
)

S3 = {
    "TELLBACK_S3_ENDPOINT": "s3.example.com:9000",
    "TELLBACK_S3_ACCESS_KEY": "a",
    "TELLBACK_S3_SECRET_KEY": "b",
}


@pytest.mark.parametrize(
    "bucket",
    [
        "Bad_Bucket!",
        "UPPER",
        "ab",
        "a" * 64,
        "-leading-hyphen",
        "trailing-hyphen-",
        ".leading-dot",
        "two..dots",
        "under_score",
        "192.168.1.10",
    ],
)
def test_a_bucket_name_s3_would_refuse_is_refused_naming_the_variable(bucket: str) -> None:
    """Accepted, it let the server log serve.listening and then die of the storage's
    refusal (an ExceptionGroup traceback)."""
    with pytest.raises(SettingsError, match=r"^TELLBACK_S3_BUCKET: ") as info:
        load_settings({**S3, "TELLBACK_S3_BUCKET": bucket})
    assert "\n" not in str(info.value)


def test_upload_urls_sign_their_length_unless_turned_off() -> None:
    signed = load_settings(S3).s3
    assert signed is not None
    assert signed.sign_content_length
    host_only = load_settings({**S3, "TELLBACK_S3_SIGN_CONTENT_LENGTH": "false"}).s3
    assert host_only is not None
    assert not host_only.sign_content_length
    with pytest.raises(SettingsError, match=r"^TELLBACK_S3_SIGN_CONTENT_LENGTH: "):
        load_settings({**S3, "TELLBACK_S3_SIGN_CONTENT_LENGTH": "maybe"})


@pytest.mark.parametrize("bucket", ["tellback", "abc", "a" * 63, "my.bucket-2", "0-feedback"])
def test_valid_bucket_names_are_kept(bucket: str) -> None:
    s3 = load_settings({**S3, "TELLBACK_S3_BUCKET": bucket}).s3
    assert s3 is not None
    assert s3.bucket == bucket


def test_unknown_variables_are_named_with_the_closest_setting() -> None:
    env = {
        "TELLBACK_S3_ENDPIONT": "minio:9000",
        "TELLBACK_STORAGE_URL": "s3://bucket",
        "TELLBACK_DATABASE_URL": "sqlite+aiosqlite:///x.db",
        "TELLBACK_LOGLEVEL": "debug",
        "PATH": "/usr/bin",
    }
    assert unknown_variables(env) == [
        ("TELLBACK_LOGLEVEL", "TELLBACK_LOG_LEVEL"),
        ("TELLBACK_S3_ENDPIONT", "TELLBACK_S3_ENDPOINT"),
        ("TELLBACK_STORAGE_URL", None),
    ]


def test_the_test_suites_and_the_sdks_variables_are_not_unknown() -> None:
    """Variables of the test suite (TELLBACK_TEST_*) and of the SDK and the examples
    (which a developer's shell exports next to the server's) are someone else's."""
    env = {f"TELLBACK_{name}": "x" for name in CLIENT_VARIABLES | SERVER_VARIABLES}
    env |= {"TELLBACK_TEST_DATABASE_URL": "x", "TELLBACK_TEST_ARTIFACTS": "x"}
    assert unknown_variables(env) == []
    assert unknown_variables(dict(os.environ)) == []


class _Recording(Mapping[str, str]):
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.asked: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        return self.env[key]

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return self.env.get(key, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self.env)

    def __len__(self) -> int:
        return len(self.env)


def test_every_variable_settings_read_is_a_known_one() -> None:
    """A setting added to load_settings but not to SERVER_VARIABLES would be warned of
    as unknown while it is being used."""
    env = _Recording(dict(S3))
    load_settings(env)
    read = {name.removeprefix("TELLBACK_") for name in env.asked}
    assert read == SERVER_VARIABLES


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_data_dir_tellback_creates_is_its_owners_only(tmp_path: Path) -> None:
    """The SQLite file, its WAL and users' photos are created 0644: the directory
    keeps other users out."""
    old = os.umask(0o022)
    try:
        settings, _ = resolve_secret_key(Settings(data_dir=tmp_path / "srv" / "tellback-data"))
    finally:
        os.umask(old)
    assert _mode(settings.data_dir) == 0o700
    assert _mode(settings.data_dir / "secret_key") == 0o600


def test_an_existing_open_data_dir_is_reported_not_changed(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    assert ensure_data_dir(tmp_path) is False
    assert _mode(tmp_path) == 0o755
    tmp_path.chmod(0o700)
    assert ensure_data_dir(tmp_path) is True


# ----- TELLBACK_DATABASE_URL ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "postgresql+asyncpg://tellback:pw@127.0.0.1:notaport/tellback",
            "TELLBACK_DATABASE_URL: the port is not a number",
        ),
        (  # libpq's form, as psql and pg_dump take it
            "postgresql://tellback:pw@db:5432/tellback",
            "TELLBACK_DATABASE_URL: expected a sqlite+aiosqlite:///path or "
            "postgresql+asyncpg://... URL, got 'postgresql'://... "
            "(write postgresql+asyncpg://..., the driver Tellback uses)",
        ),
        (
            "postgres+psycopg://tellback:pw@db/tellback",
            "TELLBACK_DATABASE_URL: expected a sqlite+aiosqlite:///path or "
            "postgresql+asyncpg://... URL, got 'postgres+psycopg'://... "
            "(write postgresql+asyncpg://..., the driver Tellback uses)",
        ),
        (
            "sqlite:///tellback.db",
            "TELLBACK_DATABASE_URL: expected a sqlite+aiosqlite:///path or "
            "postgresql+asyncpg://... URL, got 'sqlite'://... "
            "(write sqlite+aiosqlite://..., the driver Tellback uses)",
        ),
        (
            "postgresql+asyncpg://tellback:pw@127.0.0.1:70000/tellback",
            "TELLBACK_DATABASE_URL: the port must be from 1 to 65535, got 70000",
        ),
        (
            "sqlite+aiosqlite://relative.db",
            "TELLBACK_DATABASE_URL: a SQLite URL is sqlite+aiosqlite:/// and the file's path",
        ),
        (
            "postgresql+asyncpg://tellback:pw@127.0.0.1:5432/tellback?sslmode=require",
            "TELLBACK_DATABASE_URL: asyncpg takes ssl=require, not sslmode=require",
        ),
        (
            "postgresql+asyncpg://tellback:pw@db/tellback?ssl=require&application_name=tb",
            "TELLBACK_DATABASE_URL: asyncpg takes no 'application_name' parameter",
        ),
        (
            "postgresql+asyncpg://tellback:p@ss#word@127.0.0.1:55432/tellback",
            "TELLBACK_DATABASE_URL: more than one '@' before the host: percent-encode the "
            "password (an '@' in it as %40",
        ),
    ],
)
def test_a_malformed_database_url_is_one_line_naming_the_variable(url: str, expected: str) -> None:
    """Each of these was a driver's traceback (or, for an '@' in the password, an
    error naming the rest of the password as the host)."""
    with pytest.raises(SettingsError) as caught:
        load_settings({"TELLBACK_DATABASE_URL": url})
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message
    for fragment in ("pw", "ss#word", "p@ss"):  # (no part of any password)
        assert fragment not in message


@pytest.mark.parametrize(
    "url",
    [
        "sqlite+aiosqlite:///tellback.db",
        "sqlite+aiosqlite:////var/lib/tellback/tellback.db",
        "sqlite+aiosqlite:///:memory:",
        "sqlite+aiosqlite://",
        "postgresql+asyncpg://tellback:p%40ss%23word@127.0.0.1:55432/tellback",
        "postgresql+asyncpg://tellback:pass#w/rd:x@db/tellback",
        "postgresql+asyncpg://tellback@/tellback?host=/run/postgresql",
        "postgresql+asyncpg://tellback:pw@db/tellback?ssl=require&prepared_statement_cache_size=0",
    ],
)
def test_database_urls_the_engine_opens_are_kept(url: str) -> None:
    assert load_settings({"TELLBACK_DATABASE_URL": url}).database_url == url


def test_the_query_parameters_allowed_are_asyncpgs() -> None:
    import inspect

    import asyncpg

    from tellback_server.settings import ASYNCPG_QUERY

    takes = set(inspect.signature(asyncpg.connect).parameters) - {"dsn", "loop"}
    adapter = {"async_fallback", "prepared_statement_cache_size", "prepared_statement_name_func"}
    assert takes | adapter == ASYNCPG_QUERY
