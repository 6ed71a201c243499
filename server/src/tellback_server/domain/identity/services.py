"""Sessions and identity: anonymous installations, signed identities, merge and logout.

Rules (see sdk-spec/identity.md):
- An installation without a user token gets its own anonymous end user.
- A verified user token maps to the identified end user (app, sub). The
  installation's anonymous user, if any, is merged into it (its
  conversations move) and retired, so a later logout (a new anonymous
  session) starts from a fresh anonymous user and never sees the identified
  user's conversations.
- A new session for another user on an installation revokes the
  installation's older sessions of other users.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Protocol
from uuid import UUID

import msgspec
from sqlalchemy import or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession
from uuid_utils.compat import uuid7

from tellback_server.db.models import (
    App,
    Attachment,
    ClientSession,
    Conversation,
    Device,
    EndUser,
    Event,
    IdempotencyKey,
    Installation,
    Message,
)
from tellback_server.domain.apps.services import identity_secrets, parse_settings
from tellback_server.domain.attachments.services import attachment_config
from tellback_server.domain.identity.schemas import (
    AppInfo,
    ClientConfig,
    EndUserOut,
    MeUpdate,
    SessionCreate,
    SessionCreated,
)
from tellback_server.domain.identity.tokens import InvalidIdentityToken, verify_identity_token
from tellback_server.http.auth_cache import auth_changed
from tellback_server.http.deps import ClientPrincipal
from tellback_server.http.errors import (
    NotFound,
    ServiceUnavailable,
    Unauthenticated,
    ValidationFailed,
)
from tellback_server.http.idempotency import idempotency_purpose
from tellback_server.security import SESSION_TOKEN_PREFIX, Sealer, hash_token, new_token

MAX_ATTRIBUTES = 50


async def lock_end_users(db: AsyncSession, ids: list[UUID]) -> None:
    """PostgreSQL: lock end users for a change of who they are (a merge, an erasure),
    with what their writes lock, in the order those writes lock them: conversations
    (a follow-up locks its conversation first), then attachments (a message claims its
    uploads next), then the end users (a write's own rows take ``FOR KEY SHARE`` on
    them last; a feedback's gate takes it under the same rule: see
    conversations/services.py ``_user_gate``). Writes already under way finish first;
    later ones wait, then find the user changed or gone and are refused (401). The
    statements after this one see every write that finished. SQLite's single writer
    already runs each alone."""
    if db.get_bind().dialect.name != "postgresql":
        return
    await db.execute(
        select(Conversation.id)
        .where(Conversation.end_user_id.in_(ids))
        .order_by(Conversation.id)
        .with_for_update()
    )
    theirs = select(Message.id).where(
        Message.conversation_id.in_(
            select(Conversation.id).where(Conversation.end_user_id.in_(ids))
        )
    )
    await db.execute(
        select(Attachment.id)
        .where(or_(Attachment.uploader_user_id.in_(ids), Attachment.message_id.in_(theirs)))
        .order_by(Attachment.id)
        .with_for_update()
    )
    await db.execute(
        select(EndUser.id).where(EndUser.id.in_(ids)).order_by(EndUser.id).with_for_update()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UserFields(Protocol):
    """What the wire view of an end user reads: an ``EndUser`` row, or just its columns."""

    @property
    def id(self) -> UUID: ...
    @property
    def external_id(self) -> str | None: ...
    @property
    def name(self) -> str | None: ...
    @property
    def email(self) -> str | None: ...
    @property
    def attributes(self) -> dict[str, Any] | None: ...


def user_out(user: UserFields) -> EndUserOut:
    return EndUserOut(
        id=user.id,
        external_id=user.external_id,
        name=user.name,
        email=user.email,
        attributes=dict(user.attributes or {}),
    )


class IdentityService:
    def __init__(self, db: AsyncSession, sealer: Sealer, session_ttl_seconds: int) -> None:
        self.db = db
        self.sealer = sealer
        self.session_ttl = dt.timedelta(seconds=session_ttl_seconds)

    def _insert(self) -> Any:
        return (
            postgresql.insert if self.db.get_bind().dialect.name == "postgresql" else sqlite.insert
        )

    async def find_app(self, app_key: str) -> App:
        app = await self.db.scalar(
            select(App).where((App.app_key == app_key) | (App.previous_app_key == app_key))
        )
        if app is None:
            raise Unauthenticated("unknown app_key")
        return app

    async def create_session(self, app: App, data: SessionCreate) -> SessionCreated:
        now = _now()
        device = msgspec.to_builtins(data.device) if data.device is not None else {}
        installation = await self._installation(app.id, data.installation_id, device, now)
        if data.user_token is not None:
            user = await self._identified_user(app.id, data.user_token)
            if installation.anonymous_user_id is not None:
                await self._merge(installation.anonymous_user_id, user)
                installation.anonymous_user_id = None
        else:
            if parse_settings(app.settings).identity_mode == "required":
                raise Unauthenticated("this app requires a signed user_token")
            user = await self._anonymous_user(app.id, installation)
        # Logout isolation: another user's sessions on this installation end here.
        ended = await self.db.execute(
            update(ClientSession)
            .where(
                ClientSession.installation_pk == installation.id,
                ClientSession.end_user_id != user.id,
                ClientSession.revoked_at.is_(None),
            )
            .values(revoked_at=now, updated_at=now)
        )
        if getattr(ended, "rowcount", 1):
            auth_changed(self.db.sync_session)
        installation.current_user_id = user.id
        # The installation's phone now belongs to this user (logout/login moves it).
        await self.db.execute(
            update(Device)
            .where(Device.installation_pk == installation.id)
            .values(end_user_id=user.id)
        )
        token = new_token(SESSION_TOKEN_PREFIX)
        expires_at = now + self.session_ttl
        self.db.add(
            ClientSession(
                app_id=app.id,
                end_user_id=user.id,
                installation_pk=installation.id,
                token_hash=hash_token(token),
                expires_at=expires_at,
            )
        )
        await self.db.flush()
        return SessionCreated(session_token=token, expires_at=expires_at, user=user_out(user))

    async def _installation(
        self, app_id: UUID, installation_id: str, device: dict[str, Any], now: dt.datetime
    ) -> Installation:
        await self.db.execute(
            self._insert()(Installation)
            .values(
                id=uuid7(),
                app_id=app_id,
                installation_id=installation_id,
                device=device,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["app_id", "installation_id"])
        )
        # Locked: two first sessions at once must agree on its anonymous user (each
        # made one, and revoked the other's session), and on who uses it now.
        inst = await self.db.scalar(
            select(Installation)
            .where(Installation.app_id == app_id, Installation.installation_id == installation_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        assert inst is not None
        if device:
            inst.device = device
        inst.updated_at = now
        return inst

    async def _identified_user(self, app_id: UUID, token: str) -> EndUser:
        try:
            claims = verify_identity_token(
                token, await identity_secrets(self.db, self.sealer, app_id)
            )
        except InvalidIdentityToken as exc:
            raise Unauthenticated(exc.reason) from None
        now = _now()
        await self.db.execute(
            self._insert()(EndUser)
            .values(
                id=uuid7(),
                app_id=app_id,
                external_id=claims.sub,
                attributes={},
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["app_id", "external_id"])
        )
        user = await self.db.scalar(
            select(EndUser)
            .where(EndUser.app_id == app_id, EndUser.external_id == claims.sub)
            .execution_options(populate_existing=True)
        )
        assert user is not None
        # The developer's backend is the source of truth for identified users.
        if claims.name is not None:
            user.name = claims.name
        if claims.email is not None:
            user.email = claims.email
        return user

    async def _anonymous_user(self, app_id: UUID, installation: Installation) -> EndUser:
        if installation.anonymous_user_id is not None:
            user = await self.db.get(EndUser, installation.anonymous_user_id)
            if user is not None:
                return user
        user = EndUser(app_id=app_id, attributes={})
        self.db.add(user)
        await self.db.flush()
        installation.anonymous_user_id = user.id
        return user

    async def _merge(self, anon_id: UUID, user: EndUser) -> None:
        if anon_id == user.id:
            return
        # Feedback the anonymous user is sending now is theirs before the merge, or
        # refused after it: never left behind with the retired user.
        await lock_end_users(self.db, [anon_id])
        anon = await self.db.get(EndUser, anon_id, populate_existing=True)
        if anon is None or anon.external_id is not None:
            return
        # The user signed in as, read before any lock, may have been erased since: the
        # conversations would move to no one (a foreign key's 500). Kept until commit.
        if self.db.get_bind().dialect.name == "postgresql" and not await self.db.scalar(
            select(EndUser.id)
            .where(EndUser.id == user.id)
            .with_for_update(read=True, key_share=True)
        ):
            raise ServiceUnavailable(
                "the user signing in was erased meanwhile; retry", retry_after=1
            )
        # A user writes only in their own conversations: their messages are found through
        # them (messages.author_user_id has no index), so before the conversations move.
        await self.db.execute(
            update(Message)
            .where(
                Message.conversation_id.in_(
                    select(Conversation.id).where(Conversation.end_user_id == anon_id)
                ),
                Message.author_user_id == anon_id,
            )
            .values(author_user_id=user.id)
        )
        await self.db.execute(
            update(Conversation)
            .where(Conversation.end_user_id == anon_id)
            .values(end_user_id=user.id)
        )
        # Uploads made before login can still be attached after it.
        await self.db.execute(
            update(Attachment)
            .where(Attachment.uploader_user_id == anon_id)
            .values(uploader_user_id=user.id)
        )
        await self.db.execute(
            update(Event).where(Event.end_user_id == anon_id).values(end_user_id=user.id)
        )
        # A create whose answer was lost just before login is resent under the identified
        # user with the same Idempotency-Key: it must replay, not create a duplicate.
        await self._move_idempotency_keys(f"user:{anon_id}", f"user:{user.id}")
        user.name = user.name or anon.name
        user.email = user.email or anon.email
        user.attributes = {**(anon.attributes or {}), **(user.attributes or {})}
        anon.merged_into_id = user.id

    async def _move_idempotency_keys(self, old_scope: str, new_scope: str) -> None:
        taken = select(IdempotencyKey.key).where(IdempotencyKey.scope == new_scope)
        rows = await self.db.scalars(
            select(IdempotencyKey).where(
                IdempotencyKey.scope == old_scope, IdempotencyKey.key.not_in(taken)
            )
        )
        for row in rows:
            if row.response_body is not None:  # sealed to its scope: seal it to the new one
                plain = self.sealer.open(row.response_body, idempotency_purpose(old_scope, row.key))
                row.response_body = self.sealer.seal(plain, idempotency_purpose(new_scope, row.key))
            row.scope = new_scope

    async def me(self, principal: ClientPrincipal) -> EndUserOut:
        user = await self.db.get(EndUser, principal.end_user_id)
        if user is None:
            raise NotFound("no such user")
        return user_out(user)

    async def update_me(self, principal: ClientPrincipal, data: MeUpdate) -> EndUserOut:
        user = await self.db.get(EndUser, principal.end_user_id)
        if user is None:
            raise NotFound("no such user")
        if data.name is not msgspec.UNSET:
            user.name = data.name
        if data.email is not msgspec.UNSET:
            user.email = data.email
        if data.attributes is not msgspec.UNSET:
            attrs = dict(user.attributes or {})
            for key, value in data.attributes.items():
                if value is None:
                    attrs.pop(key, None)
                elif isinstance(value, str) and len(value) > 1000:
                    raise ValidationFailed.field(f"attributes.{key}", "at most 1000 characters")
                else:
                    attrs[key] = value
            if len(attrs) > MAX_ATTRIBUTES:
                raise ValidationFailed.field("attributes", f"at most {MAX_ATTRIBUTES} attributes")
            user.attributes = attrs
        user.updated_at = _now()
        await self.db.flush()
        return user_out(user)

    async def config(self, principal: ClientPrincipal) -> ClientConfig:
        app = await self.db.get(App, principal.app_id)
        if app is None:
            raise NotFound("no such app")
        settings = parse_settings(app.settings)
        return ClientConfig(
            app=AppInfo(id=app.id, name=app.name),
            attachments=attachment_config(settings),
            identity_mode=settings.identity_mode,
            categories=settings.categories,
            custom_fields=settings.custom_fields,
        )
