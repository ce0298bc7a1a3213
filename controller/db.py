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

import functools
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from controller import resources
from controller.errors import SchemaError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory
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


def alembic_config(url: str | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.migrations_dir()))
    if url is not None:
        cfg.attributes["database_url"] = url
    return cfg


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


@functools.cache
def _script() -> ScriptDirectory:
    """The migrations this leasectl ships, as Alembic reads them (read once per process)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


_REVISION_LINE = re.compile(
    r"^(?P<key>revision|down_revision)\s*(?::[^=]*)?=\s*(?:(?P<none>None)|[\"'](?P<id>[^\"']+)[\"'])\s*$",
    re.M,
)


@functools.cache
def _revision_chain() -> tuple[str, ...]:
    """Every revision of migrations/versions, oldest first, read from the files' ``revision`` and
    ``down_revision`` lines without importing Alembic. A layout this does not understand (a file
    without both lines, a merge, a branch) is read by Alembic instead."""
    down_of: dict[str, str | None] = {}
    for path in sorted((resources.migrations_dir() / "versions").glob("*.py")):
        found = {m["key"]: m["id"] for m in _REVISION_LINE.finditer(path.read_text(encoding="utf-8"))}
        if "revision" not in found or "down_revision" not in found or found["revision"] is None:
            return _alembic_chain()
        down_of[found["revision"]] = found["down_revision"]
    children = {down for down in down_of.values() if down is not None}
    heads = [rev for rev in down_of if rev not in children]
    if len(heads) != 1 or len(children) != len(down_of) - 1:
        return _alembic_chain()
    chain: list[str] = []
    current: str | None = heads[0]
    while current is not None:
        if current not in down_of or current in chain:
            return _alembic_chain()
        chain.append(current)
        current = down_of[current]
    if len(chain) != len(down_of):
        return _alembic_chain()
    return tuple(reversed(chain))


def _alembic_chain() -> tuple[str, ...]:
    return tuple(rev.revision for rev in reversed(list(_script().walk_revisions())))


def head_revision() -> str | None:
    chain = _revision_chain()
    return chain[-1] if chain else None


def known_revisions() -> list[str]:
    """Every revision this leasectl's migrations hold, oldest first."""
    return list(_revision_chain())


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


@dataclass(frozen=True)
class SchemaState:
    """The database's schema revision against the ones this leasectl knows."""

    current: str | None
    head: str | None
    known: bool

    @property
    def ok(self) -> bool:
        return self.current == self.head

    @property
    def newer(self) -> bool:
        """The database was migrated by a newer leasectl (a revision this one does not have)."""
        return self.current is not None and not self.known

    def problem(self) -> str | None:
        """What is wrong and the command that fixes it; None when the schema is current."""
        if self.ok:
            return None
        if self.current is None:
            return "the database has no leasectl schema yet: run `leasectl db upgrade`"
        if self.newer:
            from controller import __version__

            return (
                f"the database schema (revision {self.current}) is newer than leasectl {__version__} "
                f"knows (newest: {self.head}): upgrade leasectl"
            )
        return (
            f"the database schema (revision {self.current}) is older than this leasectl's "
            f"({self.head}): run `leasectl db upgrade`"
        )


def schema_state(db: Database) -> SchemaState:
    current = current_revision(db)
    known = known_revisions()
    return SchemaState(current=current, head=head_revision(), known=current in known)


def check_schema(db: Database) -> None:
    """Raise :class:`SchemaError` (naming the command to run) unless the schema is at head."""
    problem = schema_state(db).problem()
    if problem is not None:
        raise SchemaError(problem)
