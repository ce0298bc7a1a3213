"""Shared fixtures: databases on SQLite and PostgreSQL, migrated to head.

``db`` is parametrized over both backends, so every database behaviour runs on both. PostgreSQL
comes from ``LEASECTL_TEST_PG_URL`` (default: postgres@127.0.0.1:5432, database ``test``, used only to
create and drop our own databases). Without a reachable server the PostgreSQL cases skip, except
with ``CI=true``, where they fail: CI must prove both backends.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from controller import db as dbmod

PG_ADMIN_URL = os.environ.get("LEASECTL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

_pg_error: str | None = None
_pg_checked = False


def _pg_reachable() -> str | None:
    global _pg_checked, _pg_error
    if not _pg_checked:
        _pg_checked = True
        try:
            engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 5})
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            engine.dispose()
        except Exception as exc:
            _pg_error = f"PostgreSQL not reachable at {dbmod.redact_url(PG_ADMIN_URL)}: {exc}"
    return _pg_error


def require_postgres() -> None:
    problem = _pg_reachable()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI=true and {problem}")
        pytest.skip(problem)


def _admin_exec(statement: str) -> None:
    engine = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(statement))
    engine.dispose()


def create_pg_database(prefix: str = "leasectl_test") -> str:
    """Create a fresh PostgreSQL database; return its URL. Drop it with drop_pg_database."""
    require_postgres()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    _admin_exec(f'CREATE DATABASE "{name}"')
    return sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    name = sa.make_url(url).database
    _admin_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """One migrated PostgreSQL database for the session (tables emptied per test by `db`)."""
    url = create_pg_database()
    database = dbmod.connect(url)
    dbmod.upgrade(database)
    database.dispose()
    yield url
    drop_pg_database(url)


def truncate_all(database: dbmod.Database) -> None:
    from models import metadata

    names = ", ".join(t.name for t in metadata.sorted_tables)
    with database.engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A migrated, empty database URL on each backend."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("sqlite") / "leasectl.db"
        url = f"sqlite:///{path}"
        database = dbmod.connect(url)
        dbmod.upgrade(database)
        database.dispose()
        yield url
    else:
        require_postgres()
        url = request.getfixturevalue("pg_url")
        database = dbmod.connect(url)
        truncate_all(database)
        database.dispose()
        yield url


@pytest.fixture
def db(database_url: str) -> Iterator[dbmod.Database]:
    database = dbmod.connect(database_url)
    yield database
    database.dispose()


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never pick up the developer's LEASECTL_* / DAYTONA_* variables or ./leasectl.yaml."""
    for key in list(os.environ):
        if key.startswith(("LEASECTL_", "DAYTONA_")) and key != "LEASECTL_TEST_PG_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("LEASECTL_CONFIG", os.devnull)
