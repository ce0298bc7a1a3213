"""``leasectl get`` reads through the driver itself (controller/dbapi.py) and must see exactly what a
SQLAlchemy connection sees, value for value, on SQLite and PostgreSQL: leases in every phase, a
paused one, one with a schedule, one expiring, timestamps and labels."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from controller import db as dbmod
from controller import dbapi
from controller.overview import overview_rows, sqlalchemy_reader
from controller.providers.memory import MemoryProvider
from tests.unit.test_bad_rows import insert_raw, run_passes

NOW = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
SCHEDULE = {
    "timezone": "Europe/Berlin",
    "entries": [{"cron": "0 9 * * 1-5", "state": "running"}, {"cron": "0 18 * * 1-5", "state": "stopped"}],
}
SCHEDULE_JSON = json.dumps(SCHEDULE)


def _fleet(db: dbmod.Database) -> None:
    insert_raw(db, name="web", desired_state="running", env="{}", labels='{"team": "x", "tier": "1"}')
    insert_raw(db, name="idle", desired_state="stopped", env="{}", labels="{}", paused=True)
    insert_raw(db, name="office", desired_state="stopped", env="{}", labels="{}", schedule=SCHEDULE_JSON)
    expires = "2026-12-01 00:00:00+00:00"
    insert_raw(db, name="brief", desired_state="running", env="{}", labels="{}", expires_at=expires)
    insert_raw(db, name="broken", desired_state="running", env='"oops"', labels="{}")


def test_the_driver_reads_what_sqlalchemy_reads(db: dbmod.Database, database_url: str) -> None:
    _fleet(db)
    run_passes(db, MemoryProvider(), passes=2)
    opened = dbapi.open_reader(database_url)
    assert opened is not None, f"{database_url} is a plain URL: get must not need SQLAlchemy for it"
    read, close = opened
    try:
        with db.read() as conn:
            for names in ((), ("web", "office", "nope"), ("idle",)):
                ours = overview_rows(read, names, now=NOW)
                theirs = overview_rows(sqlalchemy_reader(conn), names, now=NOW)
                assert ours == theirs
                assert [r["name"] for r in ours] == sorted(set(names or [r["name"] for r in ours]) - {"nope"})
    finally:
        close()
    by_name = {r["name"]: r for r in overview_rows(read_all(database_url), (), now=NOW)}
    assert by_name["idle"]["paused"] is True and by_name["web"]["paused"] is False
    assert by_name["web"]["phase"] == "Ready" and isinstance(by_name["web"]["ready_at"], datetime)
    assert by_name["broken"]["phase"] == "Failed"
    assert by_name["office"]["scheduled_state"] == "running"  # Friday 10:30 in Berlin
    assert by_name["office"]["next_change"] == datetime(2026, 11, 27, 17, tzinfo=UTC)
    assert by_name["brief"]["expires_at"] == datetime(2026, 12, 1, tzinfo=UTC)


def read_all(url: str) -> dbapi.Reader:
    opened = dbapi.open_reader(url)
    assert opened is not None
    return opened[0]


def test_the_cli_reader_sees_each_commit_through_sqlalchemy_too(tmp_path: Path) -> None:
    """``get -w`` and ``events -f`` keep one reader and look again and again. On a URL the driver
    does not open (a query string) the reader is a SQLAlchemy connection: each statement must run
    on its own, or SQLite would answer every look from the snapshot of the first."""
    from controller.cli.base import CliContext

    url = f"sqlite:///{tmp_path / 'leasectl.db'}"
    database = dbmod.connect(url)
    dbmod.upgrade(database)
    cli = CliContext(config=None, overrides={"database_url": url + "?timeout=30"})
    count = "SELECT count(*) FROM leases"
    try:
        with cli.reader() as read:
            assert dbapi.open_reader(cli.database_url) is None  # it is SQLAlchemy's to read
            assert read(count)[1] == [(0,)]
            insert_raw(database, name="web", desired_state="running", env="{}", labels="{}")
            assert read(count)[1] == [(1,)]
    finally:
        database.dispose()
