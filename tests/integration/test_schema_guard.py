"""The schema guard: the daemon and the commands that write refuse a schema older or newer than this
leasectl knows, naming the command to run; a running replica whose schema moves steps down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from controller import db as dbmod
from controller import exitcodes
from controller.cli import app
from controller.config import load_settings
from controller.daemon import Daemon
from controller.errors import SchemaError
from controller.providers.memory import MemoryProvider
from models import LeaderElection
from tests.conftest import create_pg_database, drop_pg_database

UNKNOWN_REVISION = "ffffffffffff"  # what a newer leasectl's migration would have left behind
OLDER = "older: run `leasectl db upgrade`"
NEWER = "upgrade leasectl"


@pytest.fixture(params=["sqlite", "postgres"])
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no schema at all."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'guard.db'}"
    else:
        url = create_pg_database("leasectl_guard")
        yield url
        drop_pg_database(url)


def _migrate(url: str, state: str) -> str:
    """Bring an empty database to ``state``; return the text the refusal must contain."""
    database = dbmod.connect(url, check_schema=False)
    try:
        if state == "empty":
            return "no leasectl schema yet: run `leasectl db upgrade`"
        if state == "older":
            revisions = dbmod.known_revisions()
            assert len(revisions) >= 2, "needs two revisions to have an older one"
            dbmod.upgrade(database, revisions[-2])
            return f"revision {revisions[-2]}) is older"
        dbmod.upgrade(database)
        with database.engine.begin() as conn:
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": UNKNOWN_REVISION})
        return f"revision {UNKNOWN_REVISION}) is newer than leasectl"
    finally:
        database.dispose()


def _cli(url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--database-url", url, *args])
    return result.exit_code, result.stdout + result.stderr


@pytest.mark.parametrize("state", ["empty", "older", "newer"])
def test_daemon_and_writing_commands_refuse_an_unknown_schema(
    empty_url: str, state: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _migrate(empty_url, state)
    fix = NEWER if state == "newer" else "run `leasectl db upgrade`"

    database = dbmod.connect(empty_url)
    try:
        settings = load_settings(None, {"database_url": empty_url, "server": {"listen": "127.0.0.1:0"}})
        with pytest.raises(SchemaError) as refused:
            Daemon(settings, database, MemoryProvider()).run()
        assert expected in str(refused.value) and fix in str(refused.value)
        assert dbmod.schema_state(database).problem() == str(refused.value)
    finally:
        database.dispose()

    leases = tmp_path / "leases.yaml"
    leases.write_text("leases:\n  - name: alpha\n")
    monkeypatch.setenv("DAYTONA_API_KEY", "unused")  # exec makes its provider before it writes
    monkeypatch.setenv("DAYTONA_API_URL", "http://127.0.0.1:9/api")  # and is refused before a request
    exec_true = ["exec", "alpha", "--", "true"]  # its row goes through the driver (controller/exec_rows.py)
    for command in (["run"], ["apply", "-f", str(leases)], ["exec-worker", "--once"], exec_true):
        code, output = _cli(empty_url, *command)
        assert code == exitcodes.NO_DATABASE, (command, output)
        assert fix in output, (command, output)
    if state != "empty":  # nothing was written: the lease table holds no row
        probe = dbmod.connect(empty_url, check_schema=False)
        try:
            with probe.engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM leases")).scalar_one() == 0
        finally:
            probe.dispose()

    code, output = _cli(empty_url, "doctor")
    assert fix in output

    code, output = _cli(empty_url, "db", "upgrade")
    if state == "newer":
        assert code == exitcodes.NO_DATABASE and NEWER in output, output
    else:
        assert code == 0, output
        code, output = _cli(empty_url, "apply", "-f", str(leases))
        assert code == 0, output


def test_a_running_replica_steps_down_when_the_schema_moves_under_it(empty_url: str) -> None:
    database = dbmod.connect(empty_url, check_schema=False)
    dbmod.upgrade(database)
    database.dispose()

    database = dbmod.connect(empty_url)
    settings = load_settings(None, {"database_url": empty_url, "server": {"listen": "127.0.0.1:0"}})
    daemon = Daemon(settings, database, MemoryProvider())
    ran: list[str] = []
    reconcile = daemon._guard("reconcile", lambda: ran.append("reconcile"))

    def holder() -> str | None:
        with database.session(readonly=True) as session:
            row = session.get(LeaderElection, settings.controller.instance)
            return row.holder if row else None

    try:
        daemon.job_housekeeping()
        daemon.job_leader()
        assert holder() == daemon.elector.holder
        reconcile()
        assert ran == ["reconcile"]

        with database.engine.begin() as conn:  # a newer leasectl migrated the database
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": UNKNOWN_REVISION})
        daemon.job_housekeeping()
        assert holder() is None and not daemon.elector.is_leader()
        ready, body = daemon.readiness()
        assert not ready and body["schema_current"] is False
        assert NEWER in str(body["schema_problem"])
        reconcile()
        daemon._guard("leader", daemon.job_leader)()
        assert ran == ["reconcile"] and holder() is None

        with database.engine.begin() as conn:  # ... and was rolled back
            conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": dbmod.head_revision()})
        daemon.job_housekeeping()
        reconcile()
        assert ran == ["reconcile", "reconcile"] and daemon.readiness()[1]["schema_problem"] is None
    finally:
        daemon.elector.release()
        database.dispose()
