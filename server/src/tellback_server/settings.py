"""Typed, frozen settings read from ``TELLBACK_*`` environment variables.

Nothing here runs at import time: :func:`load_settings` is called by the CLI
(or a test) and its result is passed to ``create_app``. A bad value stops the
start with a :class:`SettingsError` naming the variable.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import secrets
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """A configuration value is missing or malformed; the message names the variable."""


# Every TELLBACK_* variable the server reads (load_settings), by suffix.
SERVER_VARIABLES = frozenset(
    {
        "DATA_DIR", "DATABASE_URL", "DATABASE_POOL_SIZE", "SECRET_KEY", "HOST", "PORT",
        "PUBLIC_URL", "S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_BUCKET",
        "S3_SECURE", "S3_REGION", "S3_SIGN_CONTENT_LENGTH", "APNS_HOST", "APNS_PORT",
        "APNS_CA_FILE", "FCM_ENDPOINT",
        "WEBHOOK_ALLOW_PRIVATE", "LOG_FORMAT", "LOG_LEVEL", "SESSION_TTL_SECONDS",
        "MAX_REQUEST_BODY_BYTES", "WORKER_CONCURRENCY", "WORKER_POLL_SECONDS",
        "JOB_LEASE_SECONDS", "SSE_HEARTBEAT_SECONDS", "SESSIONS_PER_IP_PER_MINUTE",
        "RATE_LIMIT_SYNC_SECONDS", "WEBHOOK_TIMEOUT_SECONDS", "AUTH_CACHE_SECONDS",
    }
)  # fmt: skip
# TELLBACK_* variables that are someone else's, and share a shell with the server's:
# the SDK's command line and the examples (README), the SDK's own settings.
CLIENT_VARIABLES = frozenset(
    {"URL", "ADMIN_TOKEN", "APP_KEY", "AGENT_TOKEN", "WEBHOOK_SECRET", "SDK_DIR"}
)
# The test suite's own (TELLBACK_TEST_DATABASE_URL, TELLBACK_TEST_ARTIFACTS, ...).
_IGNORED_PREFIXES = ("TEST_",)


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """The ``TELLBACK_*`` names in the environment that nothing of Tellback reads
    (a misspelled setting is otherwise ignored in silence), each with the closest
    setting's name, or None. Names only: the caller never sees a value."""
    env = os.environ if environ is None else environ
    found: list[tuple[str, str | None]] = []
    for name in sorted(env):
        if not name.startswith("TELLBACK_"):
            continue
        suffix = name.removeprefix("TELLBACK_")
        if suffix in SERVER_VARIABLES or suffix in CLIENT_VARIABLES:
            continue
        if suffix.startswith(_IGNORED_PREFIXES):
            continue
        close = difflib.get_close_matches(suffix, sorted(SERVER_VARIABLES), n=1, cutoff=0.6)
        found.append((name, f"TELLBACK_{close[0]}" if close else None))
    return found


@dataclass(frozen=True, slots=True)
class S3Settings:
    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)  # never in a log line or a traceback's locals
    bucket: str
    secure: bool
    region: str | None
    # Upload URLs sign the body's length (S3 refuses any other). Off only for a proxy
    # in front of storage that re-frames request bodies (sends them chunked).
    sign_content_length: bool = True


@dataclass(frozen=True, slots=True)
class Settings:
    data_dir: Path = Path("tellback-data")
    # Never in a repr (a log line, a traceback's locals): the URL may carry a password.
    database_url: str = field(default="", repr=False)
    database_pool_size: int = 20
    secret_key: str | None = field(default=None, repr=False)
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None
    s3: S3Settings | None = None
    apns_host: str | None = None
    apns_port: int | None = None
    apns_ca_file: Path | None = None
    fcm_endpoint: str | None = None
    webhook_allow_private: bool = False
    log_format: str = "auto"  # auto | json | console
    log_level: str = "info"
    session_ttl_seconds: int = 30 * 24 * 3600
    max_request_body_bytes: int = 1024 * 1024
    worker_concurrency: int = 4
    worker_poll_seconds: float = 5.0
    job_lease_seconds: int = 60
    sse_heartbeat_seconds: float = 15.0
    sessions_per_ip_per_minute: int = 300
    rate_limit_sync_seconds: float = 0.5
    webhook_timeout_seconds: float = 10.0
    auth_cache_seconds: float = 5.0

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def is_embedded_default(self) -> bool:
        """True when the database is the SQLite file inside the data dir."""
        return self.is_sqlite

    @property
    def sqlite_path(self) -> Path | None:
        if not self.is_sqlite:
            return None
        _, _, rest = self.database_url.partition(":///")
        if not rest or rest.startswith(":memory:"):
            return None
        return Path(rest.split("?", 1)[0])

    def with_secret_key(self, key: str) -> Settings:
        return replace(self, secret_key=key)

    def base_url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"


def _bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SettingsError(f"{name}: expected true or false, got {raw!r}")


def _int_in(lo: int, hi: int) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{name}: expected an integer from {lo} to {hi}, got {value}")
        return value

    return parse


def _number(name: str, raw: str) -> float:
    try:
        return float(raw.strip())
    except ValueError:
        raise SettingsError(f"{name}: expected a number, got {raw!r}") from None


def _positive_float(name: str, raw: str) -> float:
    value = _number(name, raw)
    if value <= 0:
        raise SettingsError(f"{name}: expected a positive number, got {value}")
    return value


def _float_in(lo: float, hi: float) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        value = _number(name, raw)
        if not lo <= value <= hi:
            raise SettingsError(f"{name}: expected a number from {lo:g} to {hi:g}, got {value}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in options:
            raise SettingsError(f"{name}: expected one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


# The scheme Tellback's driver needs, by the database a URL's scheme names.
_DRIVER_SCHEMES = {
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def _database_url(name: str, raw: str) -> str:
    """A URL the engine can open, checked here so that a mistake is one line naming
    the variable, never a driver's traceback, and never shows any of the password."""
    value = raw.strip()
    if not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        scheme = value.split("://", 1)[0]
        # A libpq-style URL (psql's, pg_dump's, psycopg's) names another driver or none.
        hint = _DRIVER_SCHEMES.get(scheme.split("+", 1)[0].lower())
        raise SettingsError(
            f"{name}: expected a sqlite+aiosqlite:///path or postgresql+asyncpg://... URL, "
            f"got {scheme!r}://..."
            + (f" (write {hint}://..., the driver Tellback uses)" if hint else "")
        )
    if value.split("?", 1)[0].count("@") > 1:  # the first '@' ends the password
        raise SettingsError(
            f"{name}: more than one '@' before the host: percent-encode the password "
            "(an '@' in it as %40, a '%' as %25: Python's urllib.parse.quote(password, "
            "safe=''))"
        )
    try:
        url = make_url(value)
    except ValueError:  # (its text would show the port's place, which may hold a secret)
        raise SettingsError(f"{name}: the port is not a number") from None
    except ArgumentError:
        raise SettingsError(
            f"{name}: not a URL of the form scheme://user:password@host:port/name"
        ) from None
    if value.startswith("sqlite"):
        if url.host or url.port or url.username or url.password:
            raise SettingsError(
                f"{name}: a SQLite URL is sqlite+aiosqlite:/// and the file's path "
                "(sqlite+aiosqlite:///tellback.db, relative to the working directory, or "
                "sqlite+aiosqlite:////var/lib/tellback/tellback.db): with two slashes the "
                "file name is read as a host"
            )
        return value
    if url.port is not None and not 1 <= url.port <= 65535:
        raise SettingsError(f"{name}: the port must be from 1 to 65535, got {url.port}")
    _asyncpg_query(name, url.query)
    return value


# What a PostgreSQL URL's query may hold: SQLAlchemy passes it to ``asyncpg.connect``
# as keywords (these are its keywords; test_settings checks them against asyncpg's),
# but for the three its asyncpg adapter takes itself.
ASYNCPG_QUERY = frozenset(
    {
        "host", "port", "user", "password", "passfile", "service", "servicefile",
        "database", "timeout", "statement_cache_size", "max_cached_statement_lifetime",
        "max_cacheable_statement_size", "command_timeout", "ssl", "direct_tls",
        "connection_class", "record_class", "server_settings", "target_session_attrs",
        "krbsrvname", "gsslib",
        "async_fallback", "prepared_statement_cache_size", "prepared_statement_name_func",
    }
)  # fmt: skip


def _asyncpg_query(name: str, query: Mapping[str, object]) -> None:
    """libpq's parameter names (from a psql or psycopg URL) failed in asyncpg with a
    TypeError traceback."""
    for key, val in query.items():
        if key == "sslmode":
            raise SettingsError(f"{name}: asyncpg takes ssl={val}, not sslmode={val}")
        if key not in ASYNCPG_QUERY:
            raise SettingsError(
                f"{name}: asyncpg takes no {key!r} parameter (the query holds "
                "asyncpg.connect's keywords: ssl, target_session_attrs, passfile, ...)"
            )


def _http_url(name: str, raw: str) -> str:
    value = raw.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise SettingsError(f"{name}: expected an http(s):// URL, got {raw!r}")
    return value


def _secret_key(name: str, raw: str) -> str:
    value = raw.strip()
    if len(value) < 32:
        raise SettingsError(f"{name}: must be at least 32 characters (use `openssl rand -hex 32`)")
    return value


class _Env:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def get(self, suffix: str, parse: Callable[[str, str], T], default: T) -> T:
        name = f"TELLBACK_{suffix}"
        raw = self.environ.get(name)
        if raw is None or (raw.strip() == "" and parse is not _bool):
            return default
        return parse(name, raw)

    def text(self, suffix: str) -> str | None:
        raw = self.environ.get(f"TELLBACK_{suffix}")
        return raw.strip() if raw is not None and raw.strip() else None


def _s3(env: _Env) -> S3Settings | None:
    endpoint = env.text("S3_ENDPOINT")
    if endpoint is None:
        return None
    if "://" in endpoint or "/" in endpoint:
        raise SettingsError(
            "TELLBACK_S3_ENDPOINT: expected host:port (set TELLBACK_S3_SECURE for https), "
            f"got {endpoint!r}"
        )
    missing = [f"TELLBACK_S3_{k}" for k in ("ACCESS_KEY", "SECRET_KEY") if not env.text(f"S3_{k}")]
    if missing:
        raise SettingsError(f"{missing[0]}: required when TELLBACK_S3_ENDPOINT is set")
    return S3Settings(
        endpoint=endpoint,
        access_key=env.environ["TELLBACK_S3_ACCESS_KEY"].strip(),
        secret_key=env.environ["TELLBACK_S3_SECRET_KEY"].strip(),
        bucket=_bucket("TELLBACK_S3_BUCKET", env.text("S3_BUCKET") or "tellback"),
        secure=env.get("S3_SECURE", _bool, True),
        region=env.text("S3_REGION"),
        sign_content_length=env.get("S3_SIGN_CONTENT_LENGTH", _bool, True),
    )


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def _bucket(name: str, value: str) -> str:
    """S3's bucket naming rules (which MinIO and SeaweedFS apply too): a bad name is
    otherwise refused by the storage only once the server is up."""
    rules = (
        "3-63 characters: lowercase letters, digits, dots and hyphens, "
        "starting and ending with a letter or digit"
    )
    if not _BUCKET.fullmatch(value):
        raise SettingsError(f"{name}: not a valid S3 bucket name ({rules}), got {value!r}")
    if ".." in value:
        raise SettingsError(f"{name}: a bucket name has no two dots in a row, got {value!r}")
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return value
    raise SettingsError(f"{name}: a bucket name is not an IP address, got {value!r}")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from the environment, raising :class:`SettingsError`."""
    env = _Env(os.environ if environ is None else environ)
    data_dir = Path(env.text("DATA_DIR") or "tellback-data").expanduser()
    default_db = f"sqlite+aiosqlite:///{(data_dir / 'tellback.db').absolute()}"
    apns_ca = env.text("APNS_CA_FILE")
    if apns_ca is not None and not Path(apns_ca).is_file():
        raise SettingsError(f"TELLBACK_APNS_CA_FILE: no such file {apns_ca!r}")
    return Settings(
        data_dir=data_dir,
        database_url=env.get("DATABASE_URL", _database_url, default_db),
        database_pool_size=env.get("DATABASE_POOL_SIZE", _int_in(1, 1000), 20),
        secret_key=env.get("SECRET_KEY", _secret_key, None),
        host=env.text("HOST") or "127.0.0.1",
        port=env.get("PORT", _int_in(1, 65535), 8080),
        public_url=env.get("PUBLIC_URL", _http_url, None),
        s3=_s3(env),
        apns_host=env.text("APNS_HOST"),
        apns_port=env.get("APNS_PORT", _int_in(1, 65535), None),
        apns_ca_file=Path(apns_ca) if apns_ca else None,
        fcm_endpoint=env.get("FCM_ENDPOINT", _http_url, None),
        webhook_allow_private=env.get("WEBHOOK_ALLOW_PRIVATE", _bool, False),
        log_format=env.get("LOG_FORMAT", _choice("auto", "json", "console"), "auto"),
        log_level=env.get("LOG_LEVEL", _choice("debug", "info", "warning", "error"), "info"),
        session_ttl_seconds=env.get("SESSION_TTL_SECONDS", _int_in(60, 365 * 24 * 3600), 2592000),
        max_request_body_bytes=env.get("MAX_REQUEST_BODY_BYTES", _int_in(1024, 1 << 30), 1 << 20),
        worker_concurrency=env.get("WORKER_CONCURRENCY", _int_in(1, 256), 4),
        worker_poll_seconds=env.get("WORKER_POLL_SECONDS", _positive_float, 5.0),
        job_lease_seconds=env.get("JOB_LEASE_SECONDS", _int_in(5, 3600), 60),
        # At most 20 s (API.md): clients count a longer silence as a dead connection.
        sse_heartbeat_seconds=env.get("SSE_HEARTBEAT_SECONDS", _float_in(0.05, 20), 15.0),
        sessions_per_ip_per_minute=env.get(
            "SESSIONS_PER_IP_PER_MINUTE", _int_in(0, 1_000_000), 300
        ),
        rate_limit_sync_seconds=env.get("RATE_LIMIT_SYNC_SECONDS", _float_in(0, 60), 0.5),
        webhook_timeout_seconds=env.get("WEBHOOK_TIMEOUT_SECONDS", _positive_float, 10.0),
        auth_cache_seconds=env.get("AUTH_CACHE_SECONDS", _float_in(0, 300), 5.0),
    )


def resolve_secret_key(settings: Settings) -> tuple[Settings, bool]:
    """Return settings with a secret key, generating one into the data dir if unset.

    The second value is True when the key came from the data dir file rather than the
    environment (the caller warns when that happens outside the embedded default,
    because several nodes must share one key).
    """
    if settings.secret_key is not None:
        return settings, False
    path = settings.data_dir / "secret_key"
    if path.exists():
        key = path.read_text().strip()
        if len(key) < 32:
            raise SettingsError(f"TELLBACK_SECRET_KEY: the generated key file {path} is damaged")
        return settings.with_secret_key(key), True
    ensure_data_dir(settings.data_dir)
    key = secrets.token_hex(32)
    # O_EXCL: two processes starting at once must agree on one key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return resolve_secret_key(settings)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return settings.with_secret_key(key), True


def ensure_data_dir(data_dir: Path) -> bool:
    """Create the data dir (the SQLite file, its WAL, users' files, the generated key)
    readable by its owner only; return False when it already existed and other users
    may enter or read it (the caller warns: an operator's directory is not changed)."""
    if not data_dir.exists():
        # mkdir's mode is masked by the umask, and the parents' are not ours to choose.
        data_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        data_dir.chmod(0o700)
        return True
    return not stat.S_IMODE(data_dir.stat().st_mode) & 0o077
