"""controller/dbapi.py: which URLs ``get`` reads through the driver itself, and that it reads them
as SQLAlchemy would (the connection keywords of SQLAlchemy's own psycopg dialect are the reference)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from controller import dbapi

PG_URLS = [
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgres://postgres@127.0.0.1/test",
    "postgresql+psycopg://u:p%40ss%2Fx@db.example:5433/d%20b?sslmode=require&application_name=x",
    "postgresql+psycopg://u@/db?host=/var/run/postgresql",
    "postgresql+psycopg:///db",
]


@pytest.mark.parametrize("url", PG_URLS)
def test_postgres_keywords_are_those_sqlalchemy_passes_to_psycopg(url: str) -> None:
    from controller.db import normalize_url

    parsed = sa.make_url(normalize_url(url))
    engine = sa.create_engine(parsed)
    _, expected = engine.dialect.create_connect_args(parsed)
    expected.pop("context", None)  # SQLAlchemy's adapters map: the driver's defaults unless configured
    assert dbapi.postgres_params(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg2://u@h/db",  # another driver: SQLAlchemy decides
        "postgresql://u@h1,h2/db",  # several hosts
        "mysql://u@h/db",
        "sqlite:///leasectl.db",
    ],
)
def test_other_postgres_forms_are_left_to_sqlalchemy(url: str) -> None:
    assert dbapi.postgres_params(url) is None


def test_sqlite_paths_of_plain_urls_only() -> None:
    assert dbapi.sqlite_path("sqlite:///leasectl.db") == "leasectl.db"
    assert dbapi.sqlite_path("sqlite:////var/lib/leasectl/l.db") == "/var/lib/leasectl/l.db"
    assert dbapi.sqlite_path("sqlite+pysqlite:///a/b.db") == "a/b.db"
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///x.db?mode=ro", "sqlite:///a%20b.db", "x"):
        assert dbapi.sqlite_path(url) is None, url
    for url in ("sqlite:///leasectl.db", "sqlite:////var/lib/leasectl/l.db"):
        assert sa.make_url(url).database == dbapi.sqlite_path(url)


def test_named_parameters_become_the_drivers_and_casts_stay() -> None:
    sql = "SELECT a::text FROM t WHERE name IN (:name0, :name1) AND x = :x_1"
    assert dbapi._PARAM.sub(r"%(\1)s", sql) == (
        "SELECT a::text FROM t WHERE name IN (%(name0)s, %(name1)s) AND x = %(x_1)s"
    )


def test_in_list_and_a_sqlite_read(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (name TEXT, n INTEGER)")
        conn.executemany("INSERT INTO t VALUES (?, ?)", [("a", 1), ("b", 2), ("c", 3)])
    opened = dbapi.open_reader(f"sqlite:///{path}")
    assert opened is not None
    read, close = opened
    try:
        placeholders, params = dbapi.in_list("name", ["a", "c"])
        assert placeholders == "(:name0, :name1)" and params == {"name0": "a", "name1": "c"}
        columns, rows = read(f"SELECT name, n FROM t WHERE name IN {placeholders} ORDER BY name", params)
        assert columns == ["name", "n"] and rows == [("a", 1), ("c", 3)]
    finally:
        close()
    assert dbapi.open_reader("sqlite://") is None


def test_the_writer_sets_up_a_sqlite_connection_as_the_engine_does(tmp_path: Path) -> None:
    """``exec`` writes through :func:`dbapi.open_writer`: the same pragmas as the engine's
    connections (WAL, busy timeout, synchronous, foreign keys) and transactions that take the write
    lock at their start."""
    from controller import db as dbmod

    url = f"sqlite:///{tmp_path / 'w.db'}"
    pragmas = ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")
    engine = dbmod.create_db_engine(url)
    with engine.connect() as conn:
        expected = {p: conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in pragmas}
    engine.dispose()
    writer = dbapi.open_writer(url)
    assert writer is not None and writer.dialect == "sqlite"
    try:
        assert {p: writer.execute(f"PRAGMA {p}").fetchone()[0] for p in pragmas} == expected
        writer.execute("CREATE TABLE t (x INTEGER)")
        with writer.transaction():
            other = sqlite3.connect(tmp_path / "w.db", timeout=0)
            with pytest.raises(sqlite3.OperationalError, match="locked"):  # held from BEGIN IMMEDIATE
                other.execute("BEGIN IMMEDIATE")
            other.close()
            writer.execute("INSERT INTO t VALUES (:x)", {"x": 1})
        with pytest.raises(RuntimeError), writer.transaction():
            writer.execute("INSERT INTO t VALUES (:x)", {"x": 2})
            raise RuntimeError("rolled back")
        assert writer.execute("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        writer.close()
    assert dbapi.open_writer("sqlite:///w.db?mode=ro") is None  # not plain: SQLAlchemy's to open


def test_the_writer_connects_at_its_first_statement(tmp_path: Path) -> None:
    """As an engine: opening reaches nothing (exec reports a missing API key before an unreachable
    database, as before), the first statement does."""
    writer = dbapi.open_writer("postgresql://nobody@127.0.0.1:1/nowhere")
    assert writer is not None
    import psycopg

    with pytest.raises(psycopg.OperationalError):
        writer.execute("SELECT 1")
    writer.close()
    sqlite_writer = dbapi.open_writer(f"sqlite:///{tmp_path / 'later.db'}")
    assert sqlite_writer is not None and not (tmp_path / "later.db").exists()
    sqlite_writer.close()
