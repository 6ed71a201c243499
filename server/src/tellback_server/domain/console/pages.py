"""Rendering for the console: the Jinja environment, security headers, error pages.

Every console response carries a Content-Security-Policy without inline script
or style (the one script and stylesheet are files under ``/console/static``),
images and media only from this server and the storage origin, no framing, and
``Referrer-Policy: no-referrer`` so signed storage URLs never leak through a
Referer header. Pages are ``no-store``: they hold private feedback and signed URLs.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit

from jinja2 import Environment, PackageLoader, PrefixLoader, StrictUndefined
from litestar import Request, Response
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.template.config import TemplateConfig
from litestar.types import ExceptionHandlersMap

from tellback_server.domain.console import session, views
from tellback_server.domain.console.session import csrf_token
from tellback_server.http.deps import app_state
from tellback_server.http.errors import AppError, exception_handlers
from tellback_server.settings import Settings

LOGIN_PATH = "/console/login"
FRAGMENT_HEADER = "x-console-fragment"
_HOST = re.compile(r"^[A-Za-z0-9.\-\[\]:]+$")


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    env = Environment(
        loader=PrefixLoader({"console": PackageLoader("tellback_server.domain.console")}),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        filesize=views.filesize, when=views.when, short_id=views.short_id, scalar=views.scalar
    )
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(env))


def _origin(url: str) -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in {"http", "https"} or not _HOST.match(parts.netloc or "-"):
        return None
    return f"{parts.scheme}://{parts.netloc}"


def storage_origin(settings: Settings) -> str | None:
    """Where signed attachment URLs point: this server's public URL, or the S3 endpoint."""
    if settings.s3 is not None:
        scheme = "https" if settings.s3.secure else "http"
        return _origin(f"{scheme}://{settings.s3.endpoint}")
    return _origin(settings.base_url())


def security_headers(settings: Settings) -> dict[str, str]:
    media = " ".join(o for o in ("'self'", storage_origin(settings)) if o)
    policy = "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            f"img-src {media}",
            f"media-src {media}",
            "connect-src 'self'",
            "form-action 'self'",
            "base-uri 'none'",
            "object-src 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return {
        "Content-Security-Policy": policy,
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def secret_key(request: Request[Any, Any, Any]) -> str:
    key = app_state(request).settings.secret_key
    assert key is not None  # resolved before the app is built
    return key


def is_secure(connection: ASGIConnection[Any, Any, Any, Any]) -> bool:
    """Cookies get ``Secure`` when this request came over HTTPS or the public URL is HTTPS.
    (The scheme from the scope: ``connection.url`` raises for a Host header whose port is
    no port, and the request never got an answer.)"""
    scheme = str(connection.scope.get("scheme", "http"))
    return session.is_secure(scheme, app_state(connection).settings.public_url)


def session_cookie(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The session cookie's name for this connection (``__Host-`` when Secure)."""
    return session.cookie_name(is_secure(connection))


def render(
    request: Request[Any, Any, Any], name: str, *, status: int = 200, **context: Any
) -> Template:
    cookie = request.cookies.get(session_cookie(request))
    principal = getattr(request.state, "principal", None)
    base = {
        "agent": principal,
        "csrf": csrf_token(secret_key(request), cookie) if cookie and principal else "",
        "request_id": request.scope.get("state", {}).get("request_id", ""),
    }
    return Template(
        template_name=f"console/{name}",
        context={**base, **context},
        status_code=status,
        headers=security_headers(app_state(request).settings),
        media_type="text/html",
    )


def safe_next(value: str | None) -> str | None:
    """A console path to return to after sign-in; anything else (another site) is dropped.

    The path is checked as a browser resolves it: percent-decoded (``%2e`` is a dot to a
    browser), with no ``.`` or ``..`` segment, which would climb out of ``/console``
    (``/console/../healthz``)."""
    if not value or len(value) > 1000 or not value.startswith("/console"):
        return None
    if value != "/console" and not value.startswith(("/console/", "/console?")):
        return None
    path = re.split(r"[?#]", value, maxsplit=1)[0]
    for _ in range(3):  # (decoded until it stops changing: %252e is %2e after one round)
        path, decoded = unquote(path), path
        if path == decoded:
            break
    else:
        return None
    if "%" in path or any(segment in {".", ".."} for segment in path.split("/")):
        return None
    if any("//" in v or "\\" in v or any(ord(c) < 0x21 for c in v) for v in (value, path)):
        return None
    return value


def redirect(request: Request[Any, Any, Any], path: str) -> Redirect:
    return Redirect(path, status_code=303, headers=security_headers(app_state(request).settings))


def error_page(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Errors as HTML. A GET page without a session goes to the sign-in page."""
    if isinstance(exc, AppError):
        status, detail = exc.status_code, exc.detail or exc.code.replace("_", " ")
    elif isinstance(exc, HTTPException):
        status, detail = exc.status_code, (exc.detail if exc.status_code < 500 else "")
    else:
        # The API's handler logs it and tells an outage (503) from a bug (500).
        status = exception_handlers()[Exception](request, exc).status_code or 500
        detail = ""
    fragment = request.headers.get(FRAGMENT_HEADER) == "1"
    if status == 401 and request.method == "GET" and not fragment:
        query = request.scope.get("query_string", b"").decode("latin-1")
        target = safe_next(request.scope["path"] + (f"?{query}" if query else ""))
        return redirect(
            request, f"{LOGIN_PATH}?{urlencode({'next': target})}" if target else LOGIN_PATH
        )
    if status >= 500:
        detail = "Something went wrong on the server. Try again shortly."
    page = render(request, "error.html", status=status, status_code=status, detail=detail)
    if isinstance(exc, AppError) and exc.retry_after is not None:
        page.headers["Retry-After"] = str(exc.retry_after)
    if isinstance(exc, HTTPException) and exc.headers:
        page.headers.update(exc.headers)  # a 405's Allow
    return page


ERROR_HANDLERS = {AppError: error_page, HTTPException: error_page, Exception: error_page}


def is_console_path(path: str) -> bool:
    return path == "/console" or path.startswith("/console/")


def with_console_errors(handlers: ExceptionHandlersMap) -> ExceptionHandlersMap:
    """The app's exception handlers, answering the console's error page under /console.

    The router's own errors (404: no such route, or a path parameter that does not
    parse; 405: not that method) come before any controller, so only the app's
    handlers see them, and the controllers' ``ERROR_HANDLERS`` never do: without this,
    a mistyped console URL got the API's problem+json, without the console's headers.
    Everywhere else the API's handler answers as before."""

    def console_or(api_handler: Any) -> Any:
        def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
            if is_console_path(request.scope["path"]):
                return error_page(request, exc)
            response: Response[Any] = api_handler(request, exc)
            return response

        return handle

    return {key: console_or(handler) for key, handler in handlers.items()}
