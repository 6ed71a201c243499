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
