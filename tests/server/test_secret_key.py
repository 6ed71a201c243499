"""A process started with a TELLBACK_SECRET_KEY other than the database's is refused.

With the wrong key, every sealed secret fails to open: identified sessions, push and
webhook signatures answered 500 (`InvalidTag`), and new secrets were sealed with a key
the old ones do not share. Found by an operator review restoring a data directory
without its `secret_key` file, which made the server generate a new one silently.
"""

from __future__ import annotations

import pytest

from tellback_server.domain.apps.services import check_secret_key
from tellback_server.security import Sealer
from tellback_server.settings import SettingsError
from tests.server.conftest import Api


async def test_the_key_that_sealed_the_database_passes(api: Api) -> None:
    await check_secret_key(api.state.db, api.state.sealer)  # nothing sealed yet
    await api.create_app()
    await check_secret_key(api.state.db, api.state.sealer)


async def test_another_key_is_refused_naming_the_variable(api: Api) -> None:
    app = await api.create_app()
    other = Sealer("a-different-secret-key-of-enough-length-0123456789")
    with pytest.raises(SettingsError, match=r"^TELLBACK_SECRET_KEY: ") as refused:
        await check_secret_key(api.state.db, other)
    assert "secret_key" in str(refused.value)
    assert app.identity_secret not in str(refused.value)
