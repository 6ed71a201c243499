"""The CLI against a live server (plain-text output when rich is not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tellback_sdk.cli import main
from tests.sdk.conftest import Live
from tests.sdk.test_uploads import png


def test_send_list_show(live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    app = live.create_app()
    photo = tmp_path / "p.png"
    photo.write_bytes(png())
    common = ["--url", live.url, "--app-key", app["app_key"], "--data-dir", str(tmp_path / "d")]
    assert (
        main([*common, "send", "Broken login", "--photo", str(photo), "--lat", "1", "--lon", "2"])
        == 0
    )
    conv_id = capsys.readouterr().out.split()[-1]
    assert main([*common, "list"]) == 0
    assert conv_id in capsys.readouterr().out
    assert main([*common, "show", conv_id]) == 0
    out = capsys.readouterr().out
    assert "Broken login" in out
    assert "[1 attachment(s)]" in out
    assert main([*common, "send", "later", "--queue"]) == 0
    assert "queued" in capsys.readouterr().out
    assert main([*common, "flush"]) == 0
    assert "sent 1" in capsys.readouterr().out
    assert main(["--url", live.url, "--app-key", "", "list"]) == 2


def test_send_prints_only_its_result(
    live: Live, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Upload progress stays off stdout: `id=$(tellback-sdk send ...)` gets the line alone
    (rich's bar, stopped where it cannot redraw, wrote an empty line first)."""
    app = live.create_app()
    photo = tmp_path / "p.png"
    photo.write_bytes(png())
    common = ["--url", live.url, "--app-key", app["app_key"], "--data-dir", str(tmp_path / "d")]
    assert main([*common, "send", "With a photo", "--photo", str(photo)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("sent "), repr(captured.out)
    assert captured.out.count("\n") == 1
    assert captured.err.strip() == ""
