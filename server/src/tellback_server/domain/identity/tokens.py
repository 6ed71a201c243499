"""End-user identity tokens: HS256 JWTs signed by the app developer's backend."""

from __future__ import annotations

from dataclasses import dataclass

import jwt

LEEWAY_SECONDS = 60


class InvalidIdentityToken(Exception):
    """The token must be refused; ``reason`` is safe to show to the caller."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class IdentityClaims:
    sub: str
    name: str | None
    email: str | None
    kid: str


def verify_identity_token(token: str, secrets_by_kid: dict[str, bytes]) -> IdentityClaims:
    """Verify ``token`` against the app's active secrets.

    The header's ``kid`` picks the secret; a token without ``kid`` is tried
    against the newest secret only. Only HS256 is accepted (``alg: none`` and
    every asymmetric algorithm are refused before any key is used). PyJWT
    compares signatures with ``hmac.compare_digest``.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise InvalidIdentityToken("user_token is not a well-formed JWT") from None
    if header.get("alg") != "HS256":
        raise InvalidIdentityToken("user_token must be signed with HS256")
    kid = header.get("kid")
    if kid is None:
        if not secrets_by_kid:
            raise InvalidIdentityToken("the app has no identity secret")
        kid = list(secrets_by_kid)[-1]
    if not isinstance(kid, str) or kid not in secrets_by_kid:
        raise InvalidIdentityToken("user_token names an unknown or revoked kid")
    try:
        claims = jwt.decode(
            token,
            secrets_by_kid[kid],
            algorithms=["HS256"],
            options={"require": ["exp", "sub"], "verify_aud": False},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.ExpiredSignatureError:
        raise InvalidIdentityToken("user_token has expired") from None
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidIdentityToken(f"user_token lacks the {exc.claim!r} claim") from None
    except jwt.PyJWTError:
        raise InvalidIdentityToken("user_token signature or claims are not valid") from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 1 <= len(sub) <= 255:
        raise InvalidIdentityToken("user_token 'sub' must be a string of 1-255 characters")
    # (Claims arrive base64-encoded: the request's own check for U+0000 cannot see them,
    # and PostgreSQL cannot store it.)
    if "\x00" in sub:
        raise InvalidIdentityToken("user_token 'sub' must not contain the NUL character")
    name, email = claims.get("name"), claims.get("email")
    return IdentityClaims(
        sub=sub,
        name=name.replace("\x00", "")[:200] if isinstance(name, str) else None,
        email=email.replace("\x00", "")[:320] if isinstance(email, str) else None,
        kid=kid,
    )
