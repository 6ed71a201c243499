"""``tellback dev``: developer tools. ``push-sink`` runs local fakes of APNs and FCM.

The sink prints the environment a Tellback server needs to send to it, writes the
credentials to upload (an APNs ``.p8`` key and an FCM service-account JSON, kept in
``--state-dir`` so they survive restarts), then prints every push it receives --
exactly what would have reached a phone -- until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from tellback_server.dev.apns_fake import ApnsFake, ApnsNotification
    from tellback_server.dev.fcm_fake import FcmFake, FcmMessage

DEFAULT_TOPIC = "com.example.tellback"
APNS_META = "apns-credentials.json"
FCM_ACCOUNT = "fcm-service-account.json"

APNS_HINTS = {
    "InvalidProviderToken": "the provider token is not signed by the sink's key: upload the "
    "key printed at start-up (or restart the sink with --any-apns-key)",
    "ExpiredProviderToken": "the provider token's iat is older than an hour",
    "MissingProviderToken": "no authorization header: the sink only does token-based auth",
    "DeviceTokenNotForTopic": "apns-topic is not one of --topic (or lacks the push type's suffix)",
    "BadDeviceToken": "device tokens are 64+ hex digits",
}
FCM_HINTS = {
    "UNAUTHENTICATED": "the access token was not issued by this sink: upload its service account",
    "PERMISSION_DENIED": "the URL's project id is not the service account's project_id",
    "INVALID_ARGUMENT": "FCM would reject this message for the reason above",
}


@click.group()
def dev() -> None:
    """Developer tools: local fakes of the services Tellback talks to."""


@dev.command("push-sink")
@click.option("--apns-port", type=click.IntRange(0, 65535), default=2197, show_default=True)
@click.option("--fcm-port", type=click.IntRange(0, 65535), default=4010, show_default=True)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the TLS CA, APNs key and service account are kept and reused "
    "[default: <user config dir>/tellback/push-sink].",
)
@click.option(
    "--topic",
    "topics",
    multiple=True,
    help="Accept only this apns-topic (bundle id); repeatable. Default: any topic.",
)
@click.option("--project-id", default="tellback-dev", show_default=True, help="FCM project id.")
@click.option(
    "--any-apns-key",
    is_flag=True,
    help="Accept APNs provider tokens signed by any ES256 key (e.g. your real .p8).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per push.")
@click.option("--quiet", is_flag=True, help="Print one count line per second instead of each push.")
def push_sink(
    apns_port: int,
    fcm_port: int,
    state_dir: Path | None,
    topics: tuple[str, ...],
    project_id: str,
    any_apns_key: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Run fake APNs and FCM on 127.0.0.1 and print every push they receive."""
    state = state_dir or Path(click.get_app_dir("tellback")) / "push-sink"
    state.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _run_sink(
                apns_port=apns_port,
                fcm_port=fcm_port,
                state=state,
                topics=topics,
                project_id=project_id,
                any_apns_key=any_apns_key,
                as_json=as_json,
                quiet=quiet,
            )
        )
    click.echo("push sink stopped")


async def _run_sink(
    *,
    apns_port: int,
    fcm_port: int,
    state: Path,
    topics: tuple[str, ...],
    project_id: str,
    any_apns_key: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    from tellback_server.dev.apns_fake import ApnsFake
    from tellback_server.dev.fcm_fake import FcmFake

    printer = _Printer(as_json=as_json, quiet=quiet)
    apns = ApnsFake(
        port=apns_port,
        topics=topics or None,
        cert_dir=state / "apns-tls",
        verify_signatures=not any_apns_key,
        max_records=1000,
        on_request=printer.apns,
    )
    fcm = FcmFake(port=fcm_port, max_records=1000, on_request=printer.fcm)
    try:
        await apns.start()
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on 127.0.0.1:{apns_port} (--apns-port): {exc}"
        ) from None
    try:
        try:
            await fcm.start()
        except OSError as exc:
            raise click.ClickException(
                f"cannot listen on 127.0.0.1:{fcm_port} (--fcm-port): {exc}"
            ) from None
        apns_creds = _apns_credentials(apns, state, topics)
        account_file = _fcm_account(fcm, state, project_id)
        _print_setup(apns, fcm, apns_creds, account_file, topics, any_apns_key)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        ticker = asyncio.create_task(printer.tick(apns, fcm)) if quiet else None
        await stop.wait()
        if ticker is not None:
            ticker.cancel()
    finally:
        await fcm.stop()
        await apns.stop()


def _apns_credentials(apns: ApnsFake, state: Path, topics: tuple[str, ...]) -> dict[str, str]:
    """Load (or create) the sink's APNs signing key, register it, return its description."""
    meta_path = state / APNS_META
    meta: dict[str, str] | None = None
    if meta_path.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError):
            loaded = json.loads(meta_path.read_text())
            key_file = Path(loaded["key_file"])
            meta = {
                "key_id": str(loaded["key_id"]),
                "team_id": str(loaded["team_id"]),
                "key_file": str(key_file),
                "private_key": key_file.read_text(),
            }
    if meta is None:
        private_pem, _public = apns.generate_key()
        key_id = apns.generate_key_id()
        key_file = state / f"AuthKey_{key_id}.p8"
        key_file.touch(mode=0o600)
        key_file.write_text(private_pem)
        meta = {
            "key_id": key_id,
            "team_id": apns.generate_key_id(),
            "key_file": str(key_file),
            "private_key": private_pem,
        }
        meta_path.write_text(
            json.dumps({k: meta[k] for k in ("key_id", "team_id", "key_file")}, indent=2)
        )
    apns.add_key(meta["team_id"], meta["key_id"], meta["private_key"])
    meta["topic"] = topics[0] if topics else DEFAULT_TOPIC
    return meta


def _fcm_account(fcm: FcmFake, state: Path, project_id: str) -> Path:
    """Load (or create) the sink's service account; rewrite token_uri for this port."""
    path = state / FCM_ACCOUNT
    info: dict[str, str] | None = None
    if path.is_file():
        with contextlib.suppress(ValueError, KeyError, OSError, TypeError):
            loaded = json.loads(path.read_text())
            if loaded.get("project_id") == project_id:
                info = fcm.add_service_account(loaded)
    if info is None:
        info = fcm.service_account(project_id)
    path.touch(mode=0o600)
    path.write_text(json.dumps(info, indent=2) + "\n")
    return path


def _print_setup(
    apns: ApnsFake,
    fcm: FcmFake,
    creds: dict[str, str],
    account_file: Path,
    topics: tuple[str, ...],
    any_apns_key: bool,
) -> None:
    echo = click.echo
    echo(
        f"Tellback push sink: fake APNs on 127.0.0.1:{apns.port}, "
        f"fake FCM on 127.0.0.1:{fcm.port}. Ctrl-C to stop."
    )
    echo("")
    echo("Server environment (where `tellback serve` and the worker run):")
    echo("  export TELLBACK_APNS_HOST=127.0.0.1")
    echo(f"  export TELLBACK_APNS_PORT={apns.port}")
    echo(f"  export TELLBACK_APNS_CA_FILE={apns.ca_file}")
    echo(f"  export TELLBACK_FCM_ENDPOINT={fcm.base_url}")
    echo("")
    echo("APNs credentials to upload for your app (token-based, .p8):")
    echo(f"  key file: {creds['key_file']}")
    echo(f"  key id:   {creds['key_id']}")
    echo(f"  team id:  {creds['team_id']}")
    if topics:
        echo(f"  topic:    {creds['topic']}  (accepted topics: {', '.join(topics)})")
    else:
        echo(f"  topic:    {creds['topic']}  (any topic is accepted)")
    if any_apns_key:
        echo("  (--any-apns-key: provider tokens signed by any key are accepted)")
    echo("FCM credentials to upload for your app:")
    echo(f"  service account: {account_file}")
    echo(f"  project id:      {_fcm_project(account_file)}")
    echo("")
    echo("Waiting for pushes...")


def _fcm_project(account_file: Path) -> str:
    try:
        return str(json.loads(account_file.read_text()).get("project_id", "?"))
    except (OSError, ValueError):
        return "?"


class _Printer:
    def __init__(self, *, as_json: bool, quiet: bool) -> None:
        self.as_json = as_json
        self.quiet = quiet
        self.emit: Callable[[str], None] = click.echo

    def apns(self, record: ApnsNotification) -> None:
        if self.quiet:
            return
        if self.as_json:
            headers = {k: v for k, v in record.headers.items() if k != "authorization"}
            self.emit(
                json.dumps(
                    {
                        "provider": "apns",
                        "status": record.status,
                        "reason": record.reason,
                        "token": record.token,
                        "headers": headers,
                        "payload": record.payload,
                        "received_at": record.received_wall,
                    },
                    ensure_ascii=False,
                )
            )
            return
        for line in format_apns(record):
            self.emit(line)

    def fcm(self, record: FcmMessage) -> None:
        if self.quiet:
            return
        if self.as_json:
            self.emit(
                json.dumps(
                    {
                        "provider": "fcm",
                        "status": record.status,
                        "error": record.error_code,
                        "error_message": record.error_message,
                        "project_id": record.project_id,
                        "token": record.token,
                        "message": record.message,
                        "validate_only": record.validate_only,
                        "received_at": record.received_wall,
                    },
                    ensure_ascii=False,
                )
            )
            return
        for line in format_fcm(record):
            self.emit(line)

    async def tick(self, apns: ApnsFake, fcm: FcmFake) -> None:
        last = (-1, -1, -1, -1)
        while True:
            await asyncio.sleep(1.0)
            now = (apns.received_count, apns.attempt_count, fcm.received_count, fcm.attempt_count)
            if now != last:
                rate_a = now[0] - max(last[0], 0)
                rate_f = now[2] - max(last[2], 0)
                self.emit(
                    f"{_clock(time.time())}  APNs {now[0]} accepted / {now[1]} requests "
                    f"(+{rate_a}/s)   FCM {now[2]} accepted / {now[3]} requests (+{rate_f}/s)"
                )
                last = now


def _clock(wall: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(wall))


def _short(token: str | None) -> str:
    if not token:
        return "-"
    return token if len(token) <= 12 else f"{token[:12]}…"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def format_apns(record: ApnsNotification) -> list[str]:
    """Readable lines for one APNs request (as a phone would show it, when accepted)."""
    outcome = "200" if record.status == 200 else f"{record.status or 'no answer'} {record.reason}"
    head = [f"{_clock(record.received_wall)}  APNs  {outcome}  token {_short(record.token)}"]
    for name, label in (
        ("apns-topic", "topic"),
        ("apns-push-type", "push-type"),
        ("apns-priority", "priority"),
        ("apns-collapse-id", "collapse-id"),
        ("apns-expiration", "expiration"),
    ):
        if name in record.headers:
            head.append(f"{label} {record.headers[name]}")
    lines = ["  ".join(head)]
    pad = " " * 10
    if record.status not in (200, 0) and record.reason in APNS_HINTS:
        lines.append(f"{pad}hint: {APNS_HINTS[record.reason or '']}")
    payload = record.payload
    if not isinstance(payload, dict):
        if record.body:
            lines.append(f"{pad}body (not a JSON object): {record.body[:200]!r}")
        return lines
    aps = payload.get("aps")
    aps = aps if isinstance(aps, dict) else {}
    alert = aps.get("alert")
    if isinstance(alert, str):
        lines.append(f"{pad}body:     {alert}")
    elif isinstance(alert, dict):
        lines.extend(
            f"{pad}{key + ':':<10}{alert[key]}"
            for key in ("title", "subtitle", "body")
            if key in alert
        )
        rest = {k: v for k, v in alert.items() if k not in {"title", "subtitle", "body"}}
        if rest:
            lines.append(f"{pad}alert:    {_compact(rest)}")
    extras = [
        f"{key} {_compact(aps[key])}"
        for key in (
            "badge",
            "sound",
            "thread-id",
            "category",
            "content-available",
            "mutable-content",
            "interruption-level",
            "relevance-score",
        )
        if key in aps
    ]
    if extras:
        lines.append(f"{pad}{'   '.join(extras)}")
    custom = {k: v for k, v in payload.items() if k != "aps"}
    if custom:
        lines.append(f"{pad}custom:   {_compact(custom)}")
    return lines


def format_fcm(record: FcmMessage) -> list[str]:
    """Readable lines for one FCM send (as a phone would show it, when accepted)."""
    if record.status == 200:
        outcome = "200 (validate_only)" if record.validate_only else "200"
    else:
        outcome = f"{record.status or 'no answer'} {record.error_code}"
    message = record.message or {}
    target = (
        f"token {_short(record.token)}"
        if record.token
        else f"topic {message.get('topic')}"
        if message.get("topic")
        else f"condition {message.get('condition')}"
    )
    lines = [
        f"{_clock(record.received_wall)}  FCM   {outcome}  {target}  project {record.project_id}"
    ]
    pad = " " * 10
    if record.status not in (200, 0) and record.error_message:
        lines.append(f"{pad}error:    {record.error_message}")
    if record.status not in (200, 0) and record.error_code in FCM_HINTS:
        lines.append(f"{pad}hint: {FCM_HINTS[record.error_code or '']}")
    notification = record.notification
    lines.extend(
        f"{pad}{key + ':':<10}{notification[key]}"
        for key in ("title", "body", "image")
        if key in notification
    )
    if record.data:
        lines.append(f"{pad}data:     {_compact(record.data)}")
    android = record.android
    if android:
        lines.append(f"{pad}android:  {_compact(android)}")
    apns = record.apns
    if apns:
        aps = apns.get("payload", {}).get("aps") if isinstance(apns.get("payload"), dict) else None
        if isinstance(aps, dict):
            extras = [
                f"{key} {_compact(aps[key])}"
                for key in ("badge", "sound", "thread-id", "category")
                if key in aps
            ]
            if extras:
                lines.append(f"{pad}apns:     {'   '.join(extras)}")
        rest = {k: v for k, v in apns.items() if k != "payload"}
        if rest:
            lines.append(f"{pad}apns:     {_compact(rest)}")
    return lines
