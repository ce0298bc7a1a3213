"""Security pass (issue 17): a database password is never printed in full, and the Daytona API key
appears in no CLI output, doctor report, log line, metric, event or row."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from controller import db as dbmod
from controller.cli import app
from models import metadata
from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.test_daemon import apply, phases, query, wait_for
from tests.support.daemon import DaemonProcess
from tests.support.emulator import EmulatorProcess


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    text = result.stdout + result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += repr(result.exception)
    return text


def everything_in(url: str) -> str:
    """Every row of every table, as text."""
    database = dbmod.connect(url)
    try:
        with database.engine.connect() as conn:
            return "\n".join(
                repr(tuple(row)) for table in metadata.sorted_tables for row in conn.execute(sa.select(table))
            )
    finally:
        database.dispose()


def test_database_password_is_never_printed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    password = f"PwSecret{uuid.uuid4().hex[:10]}"
    url = create_pg_database("leasectl_secret")
    try:
        # trust authentication ignores the password: the URL still carries it everywhere
        with_password = sa.make_url(url).set(password=password).render_as_string(hide_password=False)
        in_query = (
            sa.make_url(url).update_query_dict({"password": password}).render_as_string(hide_password=False)
        )
        unreachable = sa.make_url(with_password).set(port=9).render_as_string(hide_password=False)
        monkeypatch.setenv("LEASECTL_LOGGING__LEVEL", "DEBUG")
        monkeypatch.setenv("DAYTONA_API_KEY", "k")
        monkeypatch.setenv("DAYTONA_API_URL", "http://127.0.0.1:9/api")
        monkeypatch.setenv("LEASECTL_DAYTONA__REQUEST_TIMEOUT_SECONDS", "1")
        bad = tmp_path / "bad.yaml"
        bad.write_text("leases:\n  - name: Bad\n")
        good = tmp_path / "good.yaml"
        good.write_text("leases:\n  - name: good\n")
        outputs = []
        for target in (with_password, in_query):
            outputs += [
                cli("--database-url", target, "db", "upgrade"),
                cli("--database-url", target, "db", "current"),
                cli("--database-url", target, "apply", "-f", str(good)),
                cli("--database-url", target, "apply", "-f", str(bad)),
                cli("--database-url", target, "get"),
                cli("--database-url", target, "doctor"),
                cli("--database-url", target, "plan"),
            ]
        outputs += [
            cli("--database-url", unreachable, "get"),
            cli("--database-url", unreachable, "db", "current"),
            cli("--database-url", unreachable, "doctor"),
        ]
        assert any("***" in o or "=redacted" in o for o in outputs)  # the URL is shown, masked
        for text in outputs:
            assert password not in text, text
        assert "good" in query(url, "SELECT name FROM leases")[0].name
    finally:
        drop_pg_database(url)


def test_api_key_appears_nowhere(tmp_path: Path) -> None:
    key = f"KeySecret{uuid.uuid4().hex}"
    emulator = EmulatorProcess(tmp_path / "daytona", api_key=key).start()
    url = f"sqlite:///{tmp_path / 'k.db'}"
    database = dbmod.connect(url)
    dbmod.upgrade(database)
    database.dispose()
    daemon = DaemonProcess(
        tmp_path / "daemon.log",
        {
            "DAYTONA_API_URL": emulator.api_url,
            "DAYTONA_API_KEY": key,
            "LEASECTL_DATABASE_URL": url,
            "LEASECTL_LOGGING__LEVEL": "DEBUG",
        },
    )
    try:
        apply(url, tmp_path, "leases:\n  - name: one\n    env: {TOKEN: not-the-key}\n  - name: two\n")
        daemon.start()
        wait_for(lambda: set(phases(url).values()) == {"Ready"} or None, what="convergence")
        query(url, "INSERT INTO executions (lease_name, command) VALUES ('one', 'env')")
        # failures leave messages in events and rows: make some
        emulator.set_faults(fail_rate={"stop": {"500": 1.0}, "execute": {"503": 1.0}})
        query(url, "UPDATE leases SET desired_state = 'stopped' WHERE name = 'two'")
        query(url, "INSERT INTO executions (lease_name, command) VALUES ('one', 'true')")
        wait_for(
            lambda: query(url, "SELECT 1 FROM events WHERE lease_name = 'two' AND outcome <> 'ok'"),
            timeout=20,
            what="a failed stop",
        )
        wait_for(
            lambda: not query(url, "SELECT 1 FROM executions WHERE state IN ('queued', 'running')"),
            timeout=30,
            what="executions done",
        )
        emulator.reset_faults()
        metrics = daemon.http("/metrics")[1]
        readyz = daemon.http("/readyz")[1]
        result = CliRunner().invoke(
            app,
            ["--database-url", url, "doctor"],
            env={"DAYTONA_API_URL": emulator.api_url, "DAYTONA_API_KEY": key},
        )
        doctor = result.stdout + result.stderr
        assert "ok   Daytona API" in doctor
        events = cli("--database-url", url, "events", "-n", "500")
        executions = cli("--database-url", url, "executions")
        daemon.terminate(timeout=20)
        log = daemon.log_path.read_text(errors="replace")
        assert "env" in everything_in(url)  # the rows are there to be searched
        for where, text in {
            "daemon log": log,
            "doctor": doctor,
            "metrics": metrics,
            "readyz": readyz,
            "events": events,
            "executions": executions,
            "rows": everything_in(url),
        }.items():
            assert key not in text, where
    finally:
        daemon.kill()
        emulator.kill()


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://u:s3cr3t-pw@h:5432/db",
        "postgresql+psycopg://u@h/db?password=s3cr3t-pw",
        "postgresql+psycopg://u@h/db?sslmode=require&PASSWORD=s3cr3t-pw",
        "postgresql+psycopg://u:s3cr3t-pw@h/db?sslpassword=s3cr3t-pw",
    ],
)
def test_redact_url_masks_every_password(url: str) -> None:
    from controller.config import load_settings, redacted

    shown = dbmod.redact_url(url)
    assert "s3cr3t-pw" not in shown and ("***" in shown or "=redacted" in shown)
    assert "s3cr3t-pw" not in repr(redacted(load_settings(None, {"database_url": url})))
