"""The `tellback` command as an operator meets it: real processes, one-line errors
(never a traceback, never the database password), admin tokens listed and revoked,
and what is said at start."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import signal
import socket
import sqlite3
import stat
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tellback_server.security import hash_token
from tests.conftest import _admin_exec, _db_url, fresh_database, tellback
from tests.e2e.test_quickstart import Server, base_env, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

PASSWORD = "hunter2-not-in-any-output"
SECRET_KEY = "k" * 40


def assert_one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    """Exit non-zero, the error alone on stderr's last line, no traceback."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr[-3000:]
    assert expected in last, last


def env_for(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    return base_env(
        TELLBACK_DATABASE_URL=database_url,
        TELLBACK_DATA_DIR=str(tmp_path / "data"),
        TELLBACK_SECRET_KEY=SECRET_KEY,
        **extra,
    )


# ----- database connection mistakes -------------------------------------------------------------


@pytest.fixture
def refusing_postgres() -> Iterator[int]:
    """A PostgreSQL stand-in on 127.0.0.1 that refuses every login as a server with
    password authentication does (error 28P01), so a wrong password can be shown
    without a server configured for passwords."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.2)
    stop = threading.Event()

    def answer(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            while True:
                header = conn.recv(8, socket.MSG_WAITALL)
                if len(header) < 8:
                    return
                length, code = struct.unpack("!ii", header)
                if length > 8:
                    conn.recv(length - 8, socket.MSG_WAITALL)
                if code == 80877103:  # SSLRequest: no TLS here
                    conn.sendall(b"N")
                    continue
                fields = (
                    b"SFATAL\0VFATAL\0C28P01\0"
                    b'Mpassword authentication failed for user "tellback"\0\0'
                )
                conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)
                return

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            answer(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()


COMMANDS = {
    # A port nothing listens on: these commands fail before serve would bind it.
    "serve": ["serve", "--port", str(free_port())],
    "worker": ["worker"],
    "migrate": ["migrate"],
    "create-token": ["admin", "create-token"],
    "list-tokens": ["admin", "list-tokens"],
    "revoke-token": ["admin", "revoke-token", "cli"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_wrong_password_is_one_line_naming_the_variable(
    tmp_path: Path, refusing_postgres: int, command: str
) -> None:
    url = f"postgresql+asyncpg://tellback:{PASSWORD}@127.0.0.1:{refusing_postgres}/tellback"
    result = tellback(tmp_path, env_for(tmp_path, url), *COMMANDS[command])
    assert_one_line_error(
        result,
        f"TELLBACK_DATABASE_URL: cannot connect to 127.0.0.1:{refusing_postgres}/tellback: "
        'password authentication failed for user "tellback"',
    )
    assert PASSWORD not in result.stdout + result.stderr
    assert "serve.listening" not in result.stderr


@pytest.mark.parametrize("command", ["serve", "migrate", "create-token"])
def test_a_wrong_port_is_one_line_naming_the_variable(tmp_path: Path, command: str) -> None:
    port = free_port()  # nothing listens there
    url = f"postgresql+asyncpg://tellback:{PASSWORD}@127.0.0.1:{port}/tellback"
    result = tellback(tmp_path, env_for(tmp_path, url), *COMMANDS[command])
    assert_one_line_error(
        result, f"TELLBACK_DATABASE_URL: cannot connect to 127.0.0.1:{port}/tellback: connection"
    )
    assert PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["worker", "migrate", "create-token"])
def test_an_unknown_database_is_one_line_naming_the_variable(
    tmp_path: Path, pg_server_url: str, command: str
) -> None:
    name = f"missing_{uuid.uuid4().hex[:8]}"
    url = _db_url(pg_server_url, name)
    result = tellback(tmp_path, env_for(tmp_path, url), *COMMANDS[command])
    assert_one_line_error(result, "TELLBACK_DATABASE_URL: cannot connect to ")
    assert f'database "{name}" does not exist' in result.stderr
    password = make_url(url).password
    if password:
        assert str(password) not in result.stdout + result.stderr


def test_an_sqlite_file_that_cannot_be_opened_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    url = f"sqlite+aiosqlite:///{blocker}/tellback.db"
    result = tellback(tmp_path, env_for(tmp_path, url), "admin", "create-token")
    assert_one_line_error(result, f"TELLBACK_DATABASE_URL: cannot open {blocker}/tellback.db: ")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"postgresql+asyncpg://tellback:{PASSWORD}@127.0.0.1:notaport/tb", "port is not a number"),
        ("sqlite+aiosqlite://relative.db", "a SQLite URL is sqlite+aiosqlite:/// and"),
        (f"postgresql+asyncpg://tellback:{PASSWORD}@db/tb?sslmode=require", "takes ssl=require"),
        (f"postgresql+asyncpg://tellback:{PASSWORD}@x@127.0.0.1:5/tb", "percent-encode the pass"),
    ],
)
def test_a_malformed_database_url_is_one_line(tmp_path: Path, url: str, expected: str) -> None:
    """Tracebacks (ValueError, Invalid SQLite URL, TypeError from asyncpg) and, for an
    '@' in the password, an error that named what followed it as the host."""
    result = tellback(tmp_path, env_for(tmp_path, url), "migrate")
    assert_one_line_error(result, "TELLBACK_DATABASE_URL: ")
    assert expected in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert "@127.0.0.1" not in result.stderr


# ----- a database that is not at this release's schema ------------------------------------------


@pytest.fixture
def empty_pg_database(pg_server_url: str) -> Iterator[str]:
    name = f"cli_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin_exec(pg_server_url, f"CREATE DATABASE {name}"))
    yield _db_url(pg_server_url, name)
    asyncio.run(_admin_exec(pg_server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.mark.parametrize("command", ["create-token", "list-tokens", "revoke-token"])
def test_admin_commands_refuse_a_database_never_migrated(
    tmp_path: Path, empty_pg_database: str, command: str
) -> None:
    result = tellback(tmp_path, env_for(tmp_path, empty_pg_database), *COMMANDS[command])
    assert_one_line_error(result, "TELLBACK_DATABASE_URL: database is not migrated")
    assert "run `tellback migrate`" in result.stderr
    assert "tba_" not in result.stdout


@pytest.mark.parametrize("command", ["serve", "worker", "migrate", "create-token"])
def test_a_database_of_a_newer_release_says_so(
    tmp_path: Path, database_url: str, command: str
) -> None:
    """`serve` said to run `tellback migrate`, which then failed with a traceback."""
    asyncio.run(_admin_exec(database_url, "UPDATE alembic_version SET version_num = 'f00dcafe'"))
    result = tellback(tmp_path, env_for(tmp_path, database_url), *COMMANDS[command])
    assert_one_line_error(
        result, "TELLBACK_DATABASE_URL: the database was migrated by a newer Tellback release"
    )
    last = result.stderr.strip().splitlines()[-1]
    assert "f00dcafe" in last
    assert "do not downgrade" in last
    assert "run `tellback migrate`" not in last


# ----- admin tokens -----------------------------------------------------------------------------


def test_admin_tokens_are_listed_and_revoked_at_once_for_a_running_server(
    tmp_path: Path, database_url: str
) -> None:
    env = env_for(tmp_path, database_url)

    def create(name: str) -> str:
        result = tellback(tmp_path, env, "admin", "create-token", "--name", name)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    ops, backup = create("ops"), create("backup")
    server = Server(tmp_path, env, "--no-worker")
    try:
        server.wait_ready()

        def status(token: str) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            return httpx.get(f"{server.url}/v1/admin/apps", headers=headers).status_code

        assert (status(ops), status(backup)) == (200, 200)
        listed = tellback(tmp_path, env, "admin", "list-tokens")
        assert listed.returncode == 0, listed.stderr
        header, *rows = listed.stdout.strip().splitlines()
        assert header.split() == ["ID", "NAME", "CREATED", "LAST", "USED", "REVOKED"]
        assert [row.split()[1] for row in rows] == ["ops", "backup"]
        for token in (ops, backup):
            assert token not in listed.stdout
            assert hash_token(token) not in listed.stdout
        ops_id = rows[0].split()[0]

        revoked = tellback(tmp_path, env, "admin", "revoke-token", ops_id)
        assert revoked.returncode == 0, revoked.stderr
        assert ops_id in revoked.stdout
        # The running server refuses it on its next request; the other token still works.
        assert (status(ops), status(backup)) == (401, 200)

        by_name = tellback(tmp_path, env, "admin", "revoke-token", "backup")
        assert by_name.returncode == 0, by_name.stderr
        assert status(backup) == 401
        again = tellback(tmp_path, env, "admin", "revoke-token", ops_id)
        assert again.returncode == 0, again.stderr
        assert "already revoked" in again.stdout
        missing = tellback(tmp_path, env, "admin", "revoke-token", "nobody")
        assert_one_line_error(missing, "no admin token has the id or name 'nobody'")

        listed = tellback(tmp_path, env, "admin", "list-tokens", "--json")
        assert listed.returncode == 0, listed.stderr
        import json

        tokens = json.loads(listed.stdout)
        assert [t["name"] for t in tokens] == ["ops", "backup"]
        assert all(t["revoked"] for t in tokens)
        assert set(tokens[0]) == {"id", "name", "created", "last_used", "revoked"}
    finally:
        server.stop()


def test_revoking_by_a_name_several_tokens_share_is_refused(
    tmp_path: Path, database_url: str
) -> None:
    env = env_for(tmp_path, database_url)
    for _ in range(2):
        assert tellback(tmp_path, env, "admin", "create-token").returncode == 0
    result = tellback(tmp_path, env, "admin", "revoke-token", "cli")
    assert_one_line_error(result, "2 active admin tokens are named 'cli'")
    listed = tellback(tmp_path, env, "admin", "list-tokens", "--json")
    assert listed.returncode == 0, listed.stderr
    assert '"revoked": null' in listed.stdout


def test_serve_prints_no_first_start_token_on_postgresql(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A token printed to the stdout of a PostgreSQL deployment ends up in a log
    collector. The embedded default still prints one (tests/e2e/test_quickstart.py)."""
    with fresh_database(request, "postgres", tmp_path) as url:
        server = Server(tmp_path, env_for(tmp_path, url), "--no-worker")
        try:
            server.wait_ready()
        finally:
            code, out, err = server.stop()
        assert code == 0, err[-2000:]
        assert "tba_" not in out + err
        assert "serve.no_admin_token" in err
        assert "tellback admin create-token" in err


def test_serve_on_a_port_in_use_says_so_and_starts_nothing(tmp_path: Path) -> None:
    """`serve` announced `serve.listening`, printed the first-start token and started
    its worker before uvicorn found the port taken (exit 3)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = tellback(
            tmp_path,
            base_env(TELLBACK_DATA_DIR=str(tmp_path / "data")),
            "serve",
            "--port",
            str(port),
        )
    assert_one_line_error(result, f"TELLBACK_PORT (or --port): cannot listen on 127.0.0.1:{port}: ")
    assert result.returncode == 1
    assert "in use" in result.stderr
    for started in ("serve.listening", "jobs.worker_started", "First start"):
        assert started not in result.stderr
    assert "tba_" not in result.stdout


@pytest.mark.parametrize("port", ["0", "65536"])
def test_serve_refuses_a_port_out_of_range_as_tellback_port_does(tmp_path: Path, port: str) -> None:
    """`--port 0` served on 8080 (the default), where `TELLBACK_PORT=0` is refused."""
    result = tellback(
        tmp_path, base_env(TELLBACK_DATA_DIR=str(tmp_path / "data")), "serve", "--port", port
    )
    assert result.returncode == 2, result.stderr
    assert "Invalid value for '--port'" in result.stderr
    assert "serve.listening" not in result.stderr


def _readme_backup_command() -> list[str]:
    """The README's `VACUUM INTO` command (Backups), with this interpreter for `uv run
    python`, run in the directory that holds `tellback-data`."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Backups", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    [line] = [line for line in block.splitlines() if "VACUUM INTO" in line]
    words = shlex.split(line)
    assert words[:3] == ["uv", "run", "python"], words
    return [sys.executable, *words[3:]]


def test_the_readmes_sqlite_backup_is_consistent_while_the_server_writes(tmp_path: Path) -> None:
    """Copying the data dir with `cp -a` under load gave corrupt databases (a WAL
    checkpoint rewrites the file): the README's command must not."""
    command = _readme_backup_command()
    server = Server(tmp_path, base_env(TELLBACK_DATA_DIR=str(tmp_path / "tellback-data")))
    stop = threading.Event()
    written: list[int] = []
    try:
        server.wait_ready()
        token = server.proc.stdout.readline().strip() if server.proc.stdout else ""
        admin = {"Authorization": f"Bearer {token}"}

        def write() -> None:
            with httpx.Client(base_url=server.url, timeout=30) as http:
                while not stop.is_set():
                    r = http.post("/v1/admin/apps", json={"name": "load"}, headers=admin)
                    assert r.status_code == 201, r.text
                    written.append(1)

        writer = threading.Thread(target=write)
        writer.start()
        target = tmp_path / "backup" / "tellback.db"  # (what the README's line names)
        target.parent.mkdir()
        for _ in range(5):
            target.unlink(missing_ok=True)
            subprocess.run(command, cwd=tmp_path, check=True)
            with contextlib.closing(sqlite3.connect(target)) as copy:
                assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                assert copy.execute("SELECT count(*) FROM apps").fetchone()[0] >= 0
        stop.set()
        writer.join(30)
        assert written
    finally:
        stop.set()
        server.stop()


@pytest.fixture
def embedded_server(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    """A `tellback serve` on the embedded default, and its first-start admin token."""
    server = Server(tmp_path, base_env(TELLBACK_DATA_DIR=str(tmp_path / "tellback-data")))
    try:
        server.wait_ready()
        assert server.proc.stdout is not None
        yield server, server.proc.stdout.readline().strip()
    finally:
        server.stop()


def test_conformance_only_naming_no_scenario_is_a_usage_error(
    embedded_server: tuple[Server, str],
) -> None:
    """`--only typo` crashed with `max() arg is an empty sequence` and exit 1, which
    means "a scenario failed"."""
    server, token = embedded_server
    root = Path(__file__).parents[2]
    result = subprocess.run(
        [sys.executable, str(root / "sdk-spec" / "conformance" / "run.py"),
         "--base-url", server.url, "--admin-token", token, "--only", "no-such-scenario"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "--only 'no-such-scenario' names no scenario; they are: session: anonymous" in (
        result.stderr
    )


def test_the_mobile_example_counts_its_files_in_english(
    embedded_server: tuple[Server, str],
) -> None:
    server, token = embedded_server
    root = Path(__file__).parents[2]
    result = subprocess.run(
        [sys.executable, str(root / "examples" / "mobile_simulation.py")],
        env=base_env(TELLBACK_URL=server.url, TELLBACK_ADMIN_TOKEN=token),
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "(1 file)" in result.stdout, result.stdout
    assert "(0 files)" in result.stdout, result.stdout
    assert "(0 file)" not in result.stdout


# ----- what is said at start --------------------------------------------------------------------


@pytest.mark.parametrize("command", [["migrate"], ["worker", "--once"]])
def test_unknown_tellback_variables_are_warned_of_by_name(
    tmp_path: Path, command: list[str]
) -> None:
    env = base_env(
        TELLBACK_DATA_DIR=str(tmp_path / "data"),
        TELLBACK_S3_ENDPIONT="value-never-logged-1",
        TELLBACK_STORAGE_URL="value-never-logged-2",
        # Someone else's: the test suite's, the SDK's.
        TELLBACK_TEST_DATABASE_URL="x",
        TELLBACK_URL="http://127.0.0.1:1",
    )
    result = tellback(tmp_path, env, *command)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "settings.unknown_variables" in line]
    assert len(warnings) == 1, result.stderr
    assert "TELLBACK_S3_ENDPIONT (did you mean TELLBACK_S3_ENDPOINT?)" in warnings[0]
    assert "TELLBACK_STORAGE_URL" in warnings[0]
    assert "TELLBACK_TEST_DATABASE_URL" not in warnings[0]
    assert "TELLBACK_URL" not in warnings[0].replace("TELLBACK_STORAGE_URL", "")
    assert "value-never-logged" not in result.stdout + result.stderr


def test_no_warning_without_unknown_variables(tmp_path: Path) -> None:
    env = base_env(TELLBACK_DATA_DIR=str(tmp_path / "data"))
    result = tellback(tmp_path, env, "migrate")
    assert result.returncode == 0, result.stderr
    assert "settings.unknown_variables" not in result.stderr


def test_migrate_creates_the_data_dir_for_its_owner_only(tmp_path: Path) -> None:
    result = tellback(tmp_path, base_env(), "migrate")
    assert result.returncode == 0, result.stderr
    data = tmp_path / "tellback-data"
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert (data / "tellback.db").is_file()
    assert "settings.data_dir_not_private" not in result.stderr


def test_an_open_data_dir_is_warned_of_and_left_as_it_is(tmp_path: Path) -> None:
    data = tmp_path / "tellback-data"
    data.mkdir()
    data.chmod(0o755)
    result = tellback(tmp_path, base_env(), "worker", "--once")
    assert result.returncode == 0, result.stderr
    assert "settings.data_dir_not_private" in result.stderr
    assert stat.S_IMODE(data.stat().st_mode) == 0o755


@pytest.mark.parametrize("command", [("serve", "--no-worker"), ("worker", "--once")])
def test_a_secret_key_other_than_the_databases_is_refused_at_start(
    tmp_path: Path, database_url: str, command: tuple[str, ...]
) -> None:
    """A data dir restored without its `secret_key` file, or a process started without
    the shared key: the server started, generated or took the other key, and answered
    500 to every identified session (`InvalidTag`). Now it says which variable."""
    env = env_for(tmp_path, database_url)
    made = tellback(tmp_path, env, "admin", "create-token")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    server = Server(tmp_path, env, "--no-worker")
    try:
        server.wait_ready()
        r = httpx.post(
            f"{server.url}/v1/admin/apps",
            json={"name": "Sealed"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert r.status_code == 201, r.text
    finally:
        server.stop()
    other = {**env, "TELLBACK_SECRET_KEY": "o" * 40}
    refused = tellback(tmp_path, other, *command)
    assert_one_line_error(refused, "TELLBACK_SECRET_KEY: this database's secrets")
    assert "o" * 40 not in refused.stderr


def test_a_worker_serves_its_own_metrics_when_asked(tmp_path: Path, database_url: str) -> None:
    """`tellback worker` has no HTTP API, so the job attempts it ran never reached a
    scrape in the production layout. `--metrics-port` serves them (127.0.0.1 unless
    `--metrics-host` says otherwise), and stops with the worker. The backlog gauges,
    which only an API process fills, are not among them (they read 0.0)."""
    from tellback_server.db.engine import Database
    from tellback_server.jobs.queue import enqueue
    from tellback_server.settings import Settings

    async def queue_one() -> None:
        db = Database(Settings(database_url=database_url, data_dir=tmp_path / "data"))
        try:
            async with db.session(write=True) as session:
                await enqueue(session, "storage.delete", {"keys": []})
        finally:
            await db.dispose()

    asyncio.run(queue_one())
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tellback_server", "worker", "--metrics-port", str(port)],
        cwd=tmp_path,
        env=env_for(tmp_path, database_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        done = 'tellback_jobs_total{kind="storage.delete",outcome="done"} 1.0'
        text = ""
        for _ in range(300):
            try:
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
            except httpx.TransportError:
                text = ""
            if done in text:
                break
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            time.sleep(0.1)
        assert done in text, text[-2000:]
        # The backlog is read by API processes alone: a worker's 0 would hide it.
        for gauge in ("tellback_jobs_queued", "tellback_jobs_oldest_due_seconds"):
            assert gauge not in text, text  # (nor the time they were read: all three)
        assert "# TYPE tellback_webhook_attempts_total counter" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.communicate()[1][-2000:]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_a_metrics_port_in_use_is_one_line(tmp_path: Path, database_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = tellback(
            tmp_path, env_for(tmp_path, database_url), "worker", "--metrics-port", str(port)
        )
    assert_one_line_error(result, f"--metrics-port: cannot listen on 127.0.0.1:{port}")
