"""No NUL character (U+0000) in what a request asks us to store or look up.

JSON allows ``"\\u0000"`` in a string, and a URL ``%00``, but PostgreSQL's text and
JSONB cannot hold the character: such a request failed there with a 500 while SQLite
stored it. Every database now answers it the same way, before anything is written: a
JSON body with the character anywhere (keys included) is a 422 ``validation_failed``
naming the field; a URL with it, a 400 ``bad_request``. A form (the console's) has it
removed.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.datastructures import FormMultiDict

from tellback_server.http.errors import BadRequest, ValidationFailed

NUL_MESSAGE = "must not contain the NUL character (U+0000)"


def nul_at(value: Any, path: str = "") -> str | None:
    """The path (``a.b[2]``) of the first string in ``value`` with a NUL, if any."""
    if isinstance(value, str):
        return (path or "body") if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            name = str(key).replace("\x00", "\\u0000")  # (as JSON escapes it)
            here = f"{path}.{name}" if path else name
            if name != key:
                return here
            found = nul_at(item, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = nul_at(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


async def refuse_nul_in_url(request: Request[Any, Any, Any]) -> None:
    """The app's ``before_request``: path and query string, before any parameter is read."""
    if b"%00" in request.scope["query_string"] or "\x00" in request.scope["path"]:
        raise BadRequest(f"the URL {NUL_MESSAGE}")


class TellbackRequest(Request[Any, Any, Any]):
    """Litestar's request: a JSON body holding a NUL is refused, a form loses it."""

    async def json(self) -> Any:
        value = await super().json()
        # The character can only come from the escape: JSON forbids it raw in a string.
        # (The search is over the bytes, fast; the walk only when it may be there.)
        if b"\\u0000" in await self.body():
            found = nul_at(value)
            if found is not None:
                raise ValidationFailed.field(found, NUL_MESSAGE)
        return value

    async def form(self) -> FormMultiDict:
        """The form, without U+0000 in its keys and text: forms come from the console's
        own pages, where an agent may paste it unseen (from a log, say), and a reply
        refused for a character nobody can see would lose the draft.

        A multipart part that is not valid in its charset (or names an unknown one) is a
        400: Litestar's parser decodes strictly, and the error was a 500."""
        try:
            form = await super().form()
        except (UnicodeDecodeError, LookupError) as exc:
            raise BadRequest("the form's text is not valid in its character set") from exc
        items = list(form.multi_items())
        for k, v in items:  # (UTF-7 and unicode_escape can decode to lone surrogates)
            try:
                k.encode()
                if isinstance(v, str):
                    v.encode()
            except UnicodeEncodeError as exc:
                raise BadRequest("the form's text is not valid in its character set") from exc
        if not any("\x00" in k or (isinstance(v, str) and "\x00" in v) for k, v in items):
            return form
        return FormMultiDict(
            [
                (k.replace("\x00", ""), v.replace("\x00", "") if isinstance(v, str) else v)
                for k, v in items
            ]
        )
