"""Migrations: up, down, up again on both backends, no drift between models and migrations, and an
upgrade with a row in every table from each earlier revision (generic over migrations/versions)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from controller import db as dbmod
from models import Base, Event, metadata
from tests.conftest import create_pg_database, drop_pg_database


@pytest.fixture(params=["sqlite", "postgres"])
def fresh_url(request: pytest.FixtureRequest, tmp_path) -> Iterator[str]:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
    else:
        url = create_pg_database("leasectl_mig")
        yield url
        drop_pg_database(url)


def _tables(database: dbmod.Database) -> set[str]:
    return set(sa.inspect(database.engine).get_table_names()) - {"alembic_version"}


def _views(database: dbmod.Database) -> set[str]:
    return set(sa.inspect(database.engine).get_view_names())


def test_upgrade_downgrade_upgrade(fresh_url: str) -> None:
    database = dbmod.connect(fresh_url)
    try:
        dbmod.upgrade(database)
        assert _tables(database) == set(metadata.tables)
        assert _views(database) == {"lease_overview"}
        assert dbmod.schema_is_current(database)

        dbmod.downgrade(database, "base")
        assert _tables(database) == set()
        assert _views(database) == set()
        assert dbmod.current_revision(database) is None

        dbmod.upgrade(database)
        dbmod.upgrade(database)  # idempotent
        assert _tables(database) == set(metadata.tables)
        assert dbmod.current_revision(database) == dbmod.head_revision()
    finally:
        database.dispose()


def test_models_match_migrations(fresh_url: str) -> None:
    """The equivalent of `alembic check`: autogenerate finds nothing to do."""
    database = dbmod.connect(fresh_url)
    try:
        dbmod.upgrade(database)
        with database.engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            diff = compare_metadata(ctx, metadata)
        assert diff == []
    finally:
        database.dispose()


# -- upgrading a database with data from every earlier revision ------------------------------------

AT = datetime(2026, 11, 20, 12, 30, tzinfo=UTC)

# One row per table with a value in every column (ids are left to the database), chosen to be
# valid at every revision. A table a new migration adds needs its row here (the test says so); a
# column it adds is simply absent from the rows written at older revisions. A migration that
# rewrites values on purpose lists the (table, column) pairs it changes in REWRITTEN, so the
# round-trip check skips them.
SAMPLE_ROWS: dict[str, dict[str, Any]] = {
    "pools": {
        "name": "agents",
        "template": {"image": "python:3.12-slim", "env": {"A": "1"}},
        "min_ready": 2,
        "max_size": 5,
        "claim_ttl_seconds": 3600,
        "schedule": {"timezone": "Europe/Berlin", "entries": [{"cron": "0 9 * * 1-5", "min_ready": 2}]},
        "created_at": AT,
        "updated_at": AT,
    },
    "change_counter": {"id": 1, "counter": 7},
    "leases": {
        "name": "alpha",
        "desired_state": "running",
        "snapshot": None,
        "image": "python:3.12-slim",
        "target": "us",
        "language": "python",
        "cpu": 2,
        "memory": 4,
        "disk": 10,
        "gpu": None,
        "env": {"GREETING": "hello"},
        "labels": {"team": "a"},
        "auto_stop_interval": 15,
        "auto_archive_interval": 60,
        "auto_delete_interval": -1,
        "expires_at": AT + timedelta(days=30),
        "paused": False,
        "rollout_requested_at": AT + timedelta(hours=1),
        "schedule": {"timezone": "UTC", "entries": [{"cron": "0 18 * * *", "state": "stopped"}]},
        "created_at": AT,
        "updated_at": AT,
        # 0006: the whole sandbox (inserted only at revisions that have the columns)
        "os_user": "agent",
        "public": True,
        "network_block_all": False,
        "network_allow_list": ["10.0.0.0/8"],
        "domain_allow_list": ["pypi.org"],
        "gpu_type": None,
        "spot": None,
        "auto_pause_interval": 0,
        "ephemeral": None,
        "secrets": {"API_KEY": "prod-api-key"},
        "volumes": [{"volume": "datasets", "mount_path": "/data"}],
        "build": {"dockerfile": "FROM python:3.12-slim\n"},
    },
    "volumes": {"name": "datasets", "desired_state": "present", "created_at": AT, "updated_at": AT},
    "quotas": {
        "label": "team",
        "value": "a",
        "sandboxes": 3,
        "cpu": 8,
        "memory": 16,
        "disk": 100,
        "gpu": 0,
        "created_at": AT,
        "updated_at": AT,
    },
    "usage": {
        "lease_name": "alpha",
        "sandbox_id": "sb-1",
        "state": "started",
        "labels": {"team": "a"},
        "cpu": 2,
        "memory": 4,
        "disk": 10,
        "gpu": 0,
        "started_at": AT,
        "ended_at": AT + timedelta(hours=1),
        "closed": False,
    },
    "lease_status": {
        "lease_name": "alpha",
        "sandbox_id": "sb-1",
        "sandbox_name": "leasectl-default-alpha-1234",
        "observed_state": "started",
        "phase": "Ready",
        "spec_hash": "a" * 64,
        "failed_spec_hash": None,
        "message": "ready",
        "last_error": None,
        "failures": 0,
        "next_attempt_at": None,
        "ready_at": AT,
        "workspace_path": "/home/daytona/alpha",
        "create_attempt_name": "leasectl-default-alpha-1234",
        "create_attempt_at": AT,
        "last_reconciled_at": AT,
        "updated_at": AT,
        "spec_fields": {"image": "0123abcd", "labels": "89abcdef"},
    },
    "executions": {
        "lease_name": "alpha",
        "command": "echo hi",
        "cwd": None,
        "env": None,
        "stdin": b"input",
        "timeout_seconds": 60,
        "state": "succeeded",
        "exit_code": 0,
        "output": "hi\n",
        "output_truncated": False,
        "error": None,
        "claimed_by": "host-1",
        "sandbox_id": "sb-1",
        "created_at": AT,
        "started_at": AT,
        "finished_at": AT + timedelta(seconds=1),
    },
    "events": {
        "at": AT,
        "lease_name": "alpha",
        "sandbox_id": "sb-1",
        "action": "create",
        "outcome": "ok",
        "message": "created",
        "controller_id": "host-1",
        "pass_id": "p1",
    },
    "orphan_sightings": {
        "sandbox_id": "sb-orphan",
        "sandbox_name": "leasectl-default-gone-1",
        "lease_label": "gone",
        "reason": "no lease",
        "first_seen_at": AT,
        "last_seen_at": AT,
    },
    "leader_election": {
        "instance": "default",
        "holder": "host-1",
        "term": 3,
        "acquired_at": AT,
        "renewed_at": AT,
        "expires_at": AT + timedelta(seconds=15),
    },
}
# change_counter.counter: from 0005 on, SQLite triggers bump it when the sample rows of leases and
# pools are written after it, so its stored value is not the one inserted (nothing rewrites it).
REWRITTEN: set[tuple[str, str]] = {("change_counter", "counter")}
EARLIER_REVISIONS = dbmod.known_revisions()[:-1]


def _table_as_of(name: str, reflected: sa.MetaData) -> sa.Table:
    """The table's columns at the old revision, typed as the models type them where they still exist."""
    head = metadata.tables.get(name)
    columns = []
    for column in reflected.tables[name].columns:
        kind = head.c[column.name].type if head is not None and column.name in head.c else column.type
        columns.append(sa.Column(column.name, kind))
    return sa.Table(name, sa.MetaData(), *columns)


@pytest.mark.parametrize("revision", EARLIER_REVISIONS)
def test_upgrade_with_rows_from_every_earlier_revision(fresh_url: str, revision: str) -> None:
    """A database left at ``revision`` with a row in every table upgrades to head, rows intact."""
    database = dbmod.connect(fresh_url, check_schema=False)
    try:
        dbmod.upgrade(database, revision)
        old = sa.MetaData()
        old.reflect(database.engine)
        names = set(old.tables) - {"alembic_version"}
        missing = names - set(SAMPLE_ROWS)
        assert not missing, f"add a row for {sorted(missing)} to SAMPLE_ROWS (table at {revision})"
        written: dict[str, dict[str, Any]] = {}
        with database.engine.begin() as conn:
            for table in old.sorted_tables:
                if table.name not in names:
                    continue
                row = {k: v for k, v in SAMPLE_ROWS[table.name].items() if k in table.c}
                unfilled = [
                    c.name
                    for c in table.columns
                    if c.name not in row
                    and not c.nullable
                    and c.server_default is None
                    and not (c.primary_key and isinstance(c.type, sa.Integer))  # autoincrement id
                ]
                assert not unfilled, f"SAMPLE_ROWS[{table.name!r}] lacks {unfilled} (at {revision})"
                conn.execute(_table_as_of(table.name, old).insert().values(**row))
                written[table.name] = row

        dbmod.upgrade(database)
        assert dbmod.current_revision(database) == dbmod.head_revision()
        assert dbmod.schema_state(database).problem() is None

        with database.engine.connect() as conn:
            for name, row in written.items():
                if name not in metadata.tables:
                    continue  # dropped by a later revision
                head = metadata.tables[name]
                stored = conn.execute(sa.select(head)).mappings().all()
                assert len(stored) == 1, name
                for column, value in row.items():
                    if column in head.c and (name, column) not in REWRITTEN:
                        assert stored[0][column] == value, f"{name}.{column} after upgrade from {revision}"
            overview = conn.execute(sa.text("SELECT name, phase FROM lease_overview")).all()
            assert [tuple(r) for r in overview] == [("alpha", "Ready")]

        # The controller's own readers and writers work on the upgraded rows.
        database = dbmod.connect(fresh_url)
        with database.session() as session:
            for mapper in Base.registry.mappers:
                if mapper.local_table.name not in written:  # created empty by a later revision
                    continue
                assert session.scalars(sa.select(mapper.class_)).all(), mapper.class_.__name__
            session.add(Event(lease_name="alpha", action="upgrade-check", outcome="ok"))
    finally:
        database.dispose()
