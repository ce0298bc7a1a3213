"""The health/metrics listener binds loopback by default and refuses the network unless allowed (issue 17)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller import db as dbmod
from controller.cli import app
from controller.config import load_settings
from controller.daemon import Daemon, is_loopback, listen_address
from controller.errors import ConfigError
from controller.providers.memory import MemoryProvider


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("10.1.2.3", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_default_is_loopback() -> None:
    assert listen_address(load_settings(None, {})) == ("127.0.0.1", 9464)


@pytest.mark.parametrize("listen", ["0.0.0.0:9464", "[::]:9464", "192.168.1.5:80", "example.com:80"])
def test_non_loopback_is_refused(listen: str) -> None:
    settings = load_settings(None, {"server": {"listen": listen}})
    with pytest.raises(ConfigError, match="allow_remote"):
        listen_address(settings)


def _daemon(tmp_path: Path, **server: object) -> Daemon:
    db = dbmod.connect(f"sqlite:///{tmp_path / 'd.db'}")
    dbmod.upgrade(db)
    settings = load_settings(None, {"server": server, "controller": {"instance": "listen"}})
    return Daemon(settings, db, MemoryProvider())


def test_listener_binds_loopback_by_default(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, listen="127.0.0.1:0")
    daemon._start_http()
    assert daemon._http is not None
    try:
        assert daemon._http.server_address[0] == "127.0.0.1"
    finally:
        daemon._http.shutdown()
        daemon._http.server_close()


def test_allowed_remote_listener_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    daemon = _daemon(tmp_path, listen="0.0.0.0:0", allow_remote=True)
    with caplog.at_level(logging.WARNING, logger="controller.daemon"):
        daemon._start_http()
    assert daemon._http is not None
    try:
        assert daemon._http.server_address[0] == "0.0.0.0"
        assert any("reachable from the network" in r.getMessage() for r in caplog.records)
    finally:
        daemon._http.shutdown()
        daemon._http.server_close()


def test_run_refuses_a_network_listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    db = dbmod.connect(url)
    dbmod.upgrade(db)
    db.dispose()
    monkeypatch.setenv("LEASECTL_SERVER__LISTEN", "0.0.0.0:0")
    monkeypatch.setenv("DAYTONA_API_KEY", "not-used")
    result = CliRunner().invoke(app, ["--database-url", url, "run"])
    assert result.exit_code == 2, result.output
    assert "not a loopback address" in result.stderr
    assert "allow_remote" in result.stderr
