"""Apps: creation with keys, settings, and key rotation."""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
from typing import Any
from uuid import UUID

import msgspec
from cryptography.exceptions import InvalidTag
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tellback_server.db.engine import Database
from tellback_server.db.models import App, AppIdentitySecret, secret_key_checks
from tellback_server.domain.apps.schemas import (
    FILE_TYPES,
    IMAGE_TYPES,
    VIDEO_TYPES,
    AppCreate,
    AppCreated,
    AppOut,
    AppSettings,
    AppUpdate,
    KeysRotated,
    RotateKeys,
)
from tellback_server.http.auth_cache import auth_changed
from tellback_server.http.errors import NotFound, ValidationFailed
from tellback_server.http.pagination import Page, keyset_page
from tellback_server.security import (
    APP_KEY_PREFIX,
    IDENTITY_SECRET_PREFIX,
    Sealer,
    new_token,
)
from tellback_server.settings import SettingsError

IDENTITY_PURPOSE = "identity-secret"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def parse_settings(raw: dict[str, Any] | None) -> AppSettings:
    return msgspec.convert(raw or {}, AppSettings)


def check_settings(settings: AppSettings) -> None:
    keys = [f.key for f in settings.custom_fields]
    if len(keys) != len(set(keys)):
        raise ValidationFailed.field("settings.custom_fields", "field keys must be unique")
    for i, f in enumerate(settings.custom_fields):
        if f.type in {"select", "multiselect"} and not f.options:
            raise ValidationFailed.field(
                f"settings.custom_fields[{i}].options", f"a {f.type} field needs options"
            )
    allowed = {
        "photo": set(IMAGE_TYPES),
        "video": set(VIDEO_TYPES),
        "file": set(FILE_TYPES),
        "log": set(FILE_TYPES),
    }
    for kind, types in allowed.items():
        limits = getattr(settings.attachments, kind)
        for ct in limits.content_types:
            if ct not in types:
                raise ValidationFailed.field(
                    f"settings.attachments.{kind}.content_types",
                    f"{ct} is not supported for {kind}s (supported: {', '.join(sorted(types))})",
                )
    if len(settings.categories) != len(set(settings.categories)):
        raise ValidationFailed.field("settings.categories", "categories must be unique")


async def require_app(db: AsyncSession, app_id: UUID) -> None:
    """404 unless the app exists (admin endpoints under /v1/admin/apps/{id}/...)."""
    if await db.scalar(select(App.id).where(App.id == app_id)) is None:
        raise NotFound("no such app")


class AppService:
    def __init__(self, db: AsyncSession, sealer: Sealer) -> None:
        self.db = db
        self.sealer = sealer

    async def _kids(self, app_id: UUID) -> list[str]:
        rows = await self.db.scalars(
            select(AppIdentitySecret.kid)
            .where(AppIdentitySecret.app_id == app_id, AppIdentitySecret.revoked_at.is_(None))
            .order_by(AppIdentitySecret.created_at)
        )
        return list(rows)

    async def _out(self, app: App) -> AppOut:
        return AppOut(
            id=app.id,
            name=app.name,
            bundle_id=app.bundle_id,
            android_package=app.android_package,
            app_key=app.app_key,
            previous_app_key=app.previous_app_key,
            identity_kids=await self._kids(app.id),
            settings=parse_settings(app.settings),
            created_at=app.created_at,
            updated_at=app.updated_at,
        )

    async def _get(self, app_id: UUID) -> App:
        app = await self.db.get(App, app_id)
        if app is None:
            raise NotFound("no such app")
        return app

    async def _new_identity_secret(self, app_id: UUID) -> tuple[str, str]:
        secret = new_token(IDENTITY_SECRET_PREFIX)
        kid = new_token("k_", 6)
        self.db.add(
            AppIdentitySecret(
                app_id=app_id,
                kid=kid,
                secret_sealed=self.sealer.seal(secret.encode(), f"{IDENTITY_PURPOSE}:{app_id}"),
            )
        )
        await self.db.flush()
        return kid, secret

    async def create(self, data: AppCreate) -> AppCreated:
        settings = data.settings or AppSettings()
        check_settings(settings)
        app = App(
            name=data.name,
            bundle_id=data.bundle_id,
            android_package=data.android_package,
            app_key=new_token(APP_KEY_PREFIX, 18),
            settings=msgspec.to_builtins(settings),
        )
        self.db.add(app)
        await self.db.flush()
        kid, secret = await self._new_identity_secret(app.id)
        out = await self._out(app)
        return AppCreated(**msgspec.structs.asdict(out), identity_secret=secret, identity_kid=kid)

    async def get(self, app_id: UUID) -> AppOut:
        return await self._out(await self._get(app_id))

    async def list(self, cursor: str | None, limit: int) -> Page[AppOut]:
        apps, nxt = await keyset_page(self.db, select(App), App.created_at, App.id, cursor, limit)
        return Page(items=[await self._out(a) for a in apps], next_cursor=nxt)

    async def update(self, app_id: UUID, data: AppUpdate) -> AppOut:
        app = await self._get(app_id)
        for name in ("name", "bundle_id", "android_package"):
            value = getattr(data, name)
            if value is not msgspec.UNSET:
                setattr(app, name, value)
        if data.settings is not msgspec.UNSET:
            merged = msgspec.to_builtins(parse_settings(app.settings))
            merged.update(msgspec.to_builtins(data.settings))
            settings = parse_settings(merged)
            check_settings(settings)
            app.settings = msgspec.to_builtins(settings)
            auth_changed(self.db.sync_session)  # sessions carry the app's settings
        app.updated_at = _now()
        await self.db.flush()
        return await self._out(app)

    async def rotate_keys(self, app_id: UUID, data: RotateKeys) -> KeysRotated:
        app = await self._get(app_id)
        kid = secret = None
        if data.app_key:
            app.previous_app_key = None if data.revoke_previous else app.app_key
            app.app_key = new_token(APP_KEY_PREFIX, 18)
        elif data.revoke_previous:
            app.previous_app_key = None
        if data.identity_secret:
            if data.revoke_previous:
                await self._revoke_kids(app_id)
            kid, secret = await self._new_identity_secret(app_id)
        app.updated_at = _now()
        await self.db.flush()
        return KeysRotated(
            app_key=app.app_key,
            previous_app_key=app.previous_app_key,
            identity_kids=await self._kids(app_id),
            identity_secret=secret,
            identity_kid=kid,
        )

    async def _revoke_kids(self, app_id: UUID, kid: str | None = None) -> int:
        stmt = update(AppIdentitySecret).where(
            AppIdentitySecret.app_id == app_id, AppIdentitySecret.revoked_at.is_(None)
        )
        if kid is not None:
            stmt = stmt.where(AppIdentitySecret.kid == kid)
        result = await self.db.execute(stmt.values(revoked_at=_now()))
        return int(getattr(result, "rowcount", 0) or 0)

    async def revoke_identity_secret(self, app_id: UUID, kid: str) -> None:
        await self._get(app_id)
        if kid not in await self._kids(app_id):
            raise NotFound("no such active identity secret")
        if len(await self._kids(app_id)) == 1:
            raise ValidationFailed.field(
                "kid", "the last identity secret cannot be revoked; rotate first"
            )
        await self._revoke_kids(app_id, kid)


async def identity_secrets(db: AsyncSession, sealer: Sealer, app_id: UUID) -> dict[str, bytes]:
    """Active identity secrets of an app by kid, newest last."""
    rows = await db.execute(
        select(AppIdentitySecret.kid, AppIdentitySecret.secret_sealed)
        .where(AppIdentitySecret.app_id == app_id, AppIdentitySecret.revoked_at.is_(None))
        .order_by(AppIdentitySecret.created_at)
    )
    purpose = f"{IDENTITY_PURPOSE}:{app_id}"
    return {kid: sealer.open(sealed, purpose) for kid, sealed in rows}


KEY_CHECK = "secret_key"
KEY_CHECK_PURPOSE = "tellback:secret-key-check"


async def check_secret_key(db: Database, sealer: Sealer) -> None:
    """Refuse a ``TELLBACK_SECRET_KEY`` other than the one this database was set up with:
    with it, every identified session, push and webhook signature would fail (a 500
    each), and new secrets would be sealed with a key the old ones do not share. A
    database restored without its key file, or a process started without the shared
    key, is refused at start instead.

    The witness is a value the first process sealed (``secret_key_checks``); a database
    from before it is checked with its newest identity secret, then given one. Two
    processes starting at once on a new database with different keys: one seals the
    witness, the other is refused."""
    witness = await _key_witness(db)
    if witness is None:
        async with db.session(write=False) as session:
            newest = (
                await session.execute(
                    select(AppIdentitySecret.app_id, AppIdentitySecret.secret_sealed)
                    .order_by(AppIdentitySecret.created_at.desc())
                    .limit(1)
                )
            ).first()
        if newest is not None:
            _must_open(sealer, newest.secret_sealed, f"{IDENTITY_PURPOSE}:{newest.app_id}")
        sealed = sealer.seal(secrets.token_bytes(32), KEY_CHECK_PURPOSE)
        with contextlib.suppress(IntegrityError):  # (another process sealed it first)
            async with db.session(write=True) as session:
                await session.execute(
                    insert(secret_key_checks).values(name=KEY_CHECK, sealed=sealed)
                )
        witness = await _key_witness(db)
        assert witness is not None
    _must_open(sealer, witness, KEY_CHECK_PURPOSE)


async def _key_witness(db: Database) -> bytes | None:
    async with db.session(write=False) as session:
        found = await session.scalar(
            select(secret_key_checks.c.sealed).where(secret_key_checks.c.name == KEY_CHECK)
        )
    return found


def _must_open(sealer: Sealer, sealed: bytes, purpose: str) -> None:
    try:
        sealer.open(sealed, purpose)
    except (InvalidTag, ValueError):
        raise SettingsError(
            "TELLBACK_SECRET_KEY: this database's secrets (apps' identity secrets, push "
            "credentials, webhook secrets) were sealed with another key; start with the "
            "key it was set up with (the embedded default keeps it in <data dir>/secret_key), "
            "the same on every node"
        ) from None
