"""Database access: engine and session factories, SQLite pragmas, schema migration, and the
small repositories the rest of the controller uses to read and write its tables.

Callers get a ``Database`` from :func:`connect` (CLI, daemon, tests) and open short transactions with
``db.session()``. SQLite runs in WAL mode with a busy timeout, and a transaction that may write
takes the write lock at its start (``BEGIN IMMEDIATE``): a transaction that read first and wrote
later would otherwise fail at once with "database is locked" whenever another connection wrote in
between, without waiting for the busy timeout. Pure reads say ``db.session(readonly=True)`` and
run concurrently with a writer. On PostgreSQL both are plain transactions.

Alembic is imported only to migrate (``upgrade``, ``downgrade``): the schema guard, which every
writing command runs, reads ``alembic_version`` with one plain ``SELECT`` and the revisions this
build ships from the ``revision`` / ``down_revision`` lines of migrations/versions (falling back to
Alembic's own reading for anything but a plain chain), so a command starts without importing it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from controller.errors import SchemaError
from controller.schema_guard import (  # the guard's revisions, read here as before
    SchemaState as SchemaState,
)
from controller.schema_guard import alembic_chain as _alembic_chain  # noqa: F401
from controller.schema_guard import alembic_config as alembic_config
from controller.schema_guard import alembic_script as _script  # noqa: F401
from controller.schema_guard import head_revision as head_revision
from controller.schema_guard import known_revisions as known_revisions
from controller.schema_guard import revision_chain as _revision_chain  # noqa: F401

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str) -> str:
    """Use psycopg 3 for PostgreSQL URLs given without a driver."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword", "passfile", "sslkey"})


def redact_url(url: str) -> str:
    """The URL with any password masked (also one given as a query parameter), for messages and logs."""
    try:
        parsed = sa.make_url(url)
    except (sa.exc.ArgumentError, ValueError):
        return "<unparseable database URL>"
    secret = [k for k in parsed.query if k.lower() in _SECRET_QUERY_KEYS]
    if secret:
        parsed = parsed.update_query_dict({k: "redacted" for k in secret})
    return parsed.render_as_string(hide_password=True)


def create_db_engine(url: str, *, pool_size: int = 10) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        engine = sa.create_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000, "check_same_thread": False},
        )
        _install_sqlite_hooks(engine)
        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)


def _install_sqlite_hooks(engine: Engine) -> None:
    """WAL, busy timeout, and transactions that SQLAlchemy (not pysqlite) begins.

    pysqlite's own implicit BEGIN is disabled so that ``BEGIN IMMEDIATE`` can be issued when a
    transaction must hold the write lock from its first statement (claims, leader election).
    """

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: sa.Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@dataclass
class Database:
    """An engine plus a session factory. Cheap to pass around; one per process.

    The first writable session checks that the schema is at the revision this code knows
    (:func:`check_schema`) and raises :class:`SchemaError` otherwise, so no command of an older or
    newer leasectl writes into a schema it was not built for. ``db upgrade`` migrates through the
    engine and is not subject to it; ``check_schema=False`` turns it off (migration tests).
    """

    engine: Engine
    check_schema: bool = True

    def __post_init__(self) -> None:
        self._writer = self.engine.execution_options(sqlite_immediate=True)
        self._schema_checked = not self.check_schema

    @property
    def url(self) -> str:
        return redact_url(self.engine.url.render_as_string(hide_password=False))

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def session(self, *, readonly: bool = False) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any exception."""
        if not readonly and not self._schema_checked:
            check_schema(self)
            self._schema_checked = True
        from sqlalchemy.orm import Session  # not at the top: `get` reads with Core only (read())

        bind = self.engine if readonly else self._writer
        with Session(bind, expire_on_commit=False) as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A writing Core transaction (``BEGIN IMMEDIATE`` on SQLite) without an ORM session:
        committed on success, rolled back on any exception. For hot paths whose statements never
        hold rows as objects (the execution queue's claims and results)."""
        with self.writer() as conn, conn.begin():
            yield conn

    def writer(self) -> sa.Connection:
        """A connection whose transactions write (``BEGIN IMMEDIATE`` on SQLite), for a caller that
        keeps it across transactions (the execution dispatcher) and closes it."""
        if not self._schema_checked:
            check_schema(self)
            self._schema_checked = True
        return self._writer.connect()

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read-only Core transaction (no ORM session): for reads that need no mapped objects."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def dispose(self) -> None:
        self.engine.dispose()


def connect(url: str, *, check_schema: bool = True) -> Database:
    return Database(create_db_engine(url), check_schema=check_schema)


def upgrade(db: Database, revision: str = "head") -> None:
    """Migrate the schema to ``revision`` (idempotent); refuses a schema newer than it knows."""
    state = schema_state(db)
    if state.newer:
        raise SchemaError(state.problem() or "")
    from alembic import command

    with db.engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(db: Database, revision: str = "base") -> None:
    from alembic import command

    with db.engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_revision(db: Database) -> str | None:
    """The database's revision: one ``SELECT`` of ``alembic_version`` (None without that table).
    Several rows (a branched history, which leasectl never makes) are left to Alembic to report."""
    with db.engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return None
        rows = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars().all()
        if len(rows) <= 1:
            return str(rows[0]) if rows else None
        from alembic.runtime.migration import MigrationContext

        return MigrationContext.configure(conn).get_current_revision()


def schema_is_current(db: Database) -> bool:
    return current_revision(db) == head_revision()


def schema_state(db: Database) -> SchemaState:
    return SchemaState.of(current_revision(db))


def check_schema(db: Database) -> None:
    """Raise :class:`SchemaError` (naming the command to run) unless the schema is at head."""
    problem = schema_state(db).problem()
    if problem is not None:
        raise SchemaError(problem)
