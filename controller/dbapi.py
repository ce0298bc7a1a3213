"""The database without SQLAlchemy: read-only SQL straight through the driver, for the commands an
operator runs most and expects at once (``leasectl get``, ``get -w``, ``events``, ``events -f``,
``executions``).

Importing SQLAlchemy costs a CLI command more than everything else it does (issue 14: ``get`` took
17x ``python -c pass``, SQLAlchemy alone about a third of it). :func:`open_reader` turns the plain
forms of the two database URLs leasectl supports into a driver connection (``sqlite3`` from the
standard library; ``psycopg``, the driver SQLAlchemy uses for PostgreSQL here) and answers
:class:`Reader` calls with the same raw values a SQLAlchemy ``text()`` query returns. Anything it
does not recognise as plain (a query string on a SQLite URL, an in-memory database, another driver,
percent-escapes in a path) returns None and the caller goes through SQLAlchemy as every other
command does: this module only shortens the common way, it never decides what a URL means.

SQL given to a reader is written once for both databases, with ``:name`` parameters and no ``%``;
the PostgreSQL reader rewrites the parameters to the driver's ``%(name)s``. Reads only: a reader
never opens a write transaction, runs no migration and creates no file (a SQLite path that does not
exist is the caller's error to report before it asks). Each statement runs on its own (autocommit):
``get -w`` and ``events -f`` keep their connection for as long as they watch, and an open
transaction would hold table locks that a migration waits for.

:func:`open_writer` is the one way this module writes: ``leasectl exec`` records its row (insert,
fenced updates, result and event) through it (:mod:`controller.exec_rows`), on a connection set up
as :mod:`controller.db` sets up the engine's (SQLite: WAL, busy timeout, ``synchronous=NORMAL``,
foreign keys, and a writing transaction takes the write lock at its first statement with ``BEGIN
IMMEDIATE``). Outside :meth:`Writer.transaction` each statement commits on its own.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
_PLAIN_SQLITE = re.compile(r"^sqlite(?:\+pysqlite)?:///(?P<path>[^?%#]+)$")
_PG_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


Rows = tuple[list[str], list[tuple[Any, ...]]]  # column names, rows


class Reader(Protocol):
    """Runs one read-only statement: its column names and rows."""

    def __call__(self, sql: str, params: Mapping[str, Any] | None = None) -> Rows: ...


def sqlite_path(url: str) -> str | None:
    """The file of a plain ``sqlite:///PATH`` URL (relative to the working directory, or absolute
    with four slashes); None for any other form."""
    found = _PLAIN_SQLITE.match(url)
    if found is None or found["path"] == ":memory:":
        return None
    return found["path"]


def postgres_params(url: str) -> dict[str, Any] | None:
    """psycopg ``connect()`` keywords of a plain PostgreSQL URL, as SQLAlchemy's psycopg dialect
    passes them (user and password unquoted, the database name as written, query keys as libpq
    keywords; tests/unit/test_dbapi.py compares the two); None for any other form."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if scheme not in _PG_SCHEMES or parts.fragment or "," in parts.netloc:
        return None
    params: dict[str, Any] = {}
    if parts.username:
        params["user"] = unquote(parts.username)
    if parts.password is not None:
        params["password"] = unquote(parts.password)
    if host:
        params["host"] = host
    if port is not None:
        params["port"] = port
    dbname = parts.path.lstrip("/")  # as SQLAlchemy reads it: not unquoted
    if dbname:
        params["dbname"] = dbname
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        params[key] = value
    return params


def open_reader(url: str) -> tuple[Reader, Callable[[], None]] | None:
    """A reader of the database at ``url`` and the function that closes it, or None when ``url`` is
    not one of the plain forms (then use :mod:`controller.db`). Connection errors propagate as the
    driver raises them (``sqlite3.Error``, ``psycopg.Error``)."""
    path = sqlite_path(url)
    if path is not None:
        import sqlite3

        conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_SECONDS, isolation_level=None)

        def read_sqlite(sql: str, params: Mapping[str, Any] | None = None) -> Rows:
            cursor = conn.execute(sql, dict(params or {}))
            columns = [d[0] for d in cursor.description or ()]
            return columns, cursor.fetchall()

        return read_sqlite, conn.close
    params = postgres_params(url)
    if params is None:
        return None
    import psycopg

    pg = psycopg.connect(**params, autocommit=True)

    def read_postgres(sql: str, params: Mapping[str, Any] | None = None) -> Rows:
        with pg.cursor() as cursor:
            cursor.execute(_PARAM.sub(r"%(\1)s", sql), dict(params or {}))
            columns = [d.name for d in cursor.description or ()]
            return columns, cursor.fetchall()

    return read_postgres, pg.close


class Writer:
    """A connection that reads and writes through the driver (:func:`open_writer`). SQL is written
    as for a :class:`Reader` (``:name`` parameters, no ``%``); :meth:`execute` returns the driver's
    cursor (``rowcount``, ``fetchone()``; ``lastrowid`` on SQLite).

    It connects at its first statement, as an engine does: a database that cannot be reached
    fails the first read, not the opening. One statement or transaction runs at a time, whichever
    thread asks: ``exec`` writes from the thread that runs the command while its main thread may
    close the connection (Ctrl-C)."""

    def __init__(self, connect: Callable[[], Any], dialect: str) -> None:
        self._connect = connect
        self._conn: Any = None
        self._lock = threading.RLock()
        self.dialect = dialect  # "sqlite" or "postgresql", as SQLAlchemy names them

    def _connection(self) -> Any:
        if self._conn is None:
            self._conn = self._connect()
        return self._conn

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> Any:
        if self.dialect == "postgresql":
            sql = _PARAM.sub(r"%(\1)s", sql)
        with self._lock:
            return self._connection().execute(sql, dict(params or {}))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A writing transaction: committed on success, rolled back on any exception."""
        with self._lock:
            conn = self._connection()
            if self.dialect == "postgresql":
                with conn.transaction():
                    yield
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
            self._connect = _closed


def _closed() -> Any:
    raise RuntimeError("the writer is closed")


def _connect_sqlite(path: str) -> Any:
    import sqlite3

    conn = sqlite3.connect(
        path, timeout=SQLITE_BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
    )
    try:  # controller.db's _install_sqlite_hooks, for the same reasons
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def _connect_postgres(params: dict[str, Any]) -> Any:
    import psycopg

    return psycopg.connect(**params, autocommit=True)


def open_writer(url: str) -> Writer | None:
    """A read-write connection to the database at ``url`` (made at its first statement), or None
    when ``url`` is not one of the plain forms (then use :mod:`controller.db`). The SQLite
    connection may be used by another thread than the one that opened it (one at a time), as the
    engine's are. Connection errors propagate as the driver raises them."""
    path = sqlite_path(url)
    if path is not None:
        return Writer(lambda: _connect_sqlite(path), "sqlite")
    params = postgres_params(url)
    if params is None:
        return None
    return Writer(lambda: _connect_postgres(params), "postgresql")


def in_list(name: str, values: Sequence[Any]) -> tuple[str, dict[str, Any]]:
    """``(:name0, :name1, ...)`` and its parameters, for ``column IN`` a list of values."""
    keys = [f"{name}{i}" for i in range(len(values))]
    return "(" + ", ".join(f":{k}" for k in keys) + ")", dict(zip(keys, values, strict=True))
