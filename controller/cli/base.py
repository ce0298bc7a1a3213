"""The typer application, its global options and the context every command reads settings from.

Start-up time matters here: ``leasectl --help`` builds the whole command tree, so this module and
the command modules import only typer and the standard library at the top; settings (pydantic),
the database (SQLAlchemy), the SDK and the local API are imported by the commands that use them.
tests/unit/test_cli_imports.py counts what ``--help``, ``get``, ``events``, ``executions`` and
``exec`` import.

Command modules (``db``, ``leases``, ``control``, ``executions``, ``gc``) register their commands on
:data:`app`; :mod:`controller.cli` imports them all and exposes ``main``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from controller import __version__, exitcodes
from controller.cli.output import EXIT_INVALID, UnusableDatabaseError, fail, first_line, out, state
from controller.errors import ConfigError

if TYPE_CHECKING:
    from controller import db as dbmod
    from controller.config import Settings
    from controller.dbapi import Reader, Rows
    from controller.execution_run import ExecRows

app = typer.Typer(
    name="leasectl",
    help="Declarative lease controller for Daytona sandboxes.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich panels print Python types (<list[Path]>, <bool>) as metavars.
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")
config_app = typer.Typer(help="Settings file commands.", no_args_is_help=True)
app.add_typer(config_app, name="config")


@dataclass
class CliContext:
    """What the global options said; settings are loaded on first use, once."""

    config: Path | None
    overrides: dict[str, Any] = field(default_factory=dict)
    verbose: int = 0
    long_running: bool = False  # run, exec-worker: log at the configured level from the start
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            from controller.config import load_settings

            try:
                self._settings = load_settings(self.config, self.overrides)
            except ConfigError as exc:
                fail(str(exc), EXIT_INVALID)
            from controller import logs

            logs.configure(self._log_level(self._settings), self._settings.logging.format)
        return self._settings

    @property
    def database_url(self) -> str:
        """The database URL as the settings resolve it. Before the settings are loaded (``get``
        needs nothing else) it is read through the same layers without validating the rest, so
        pydantic is not imported; a value that is not a string loads the settings, whose error
        names it."""
        if self._settings is None:
            from controller.config_sources import DEFAULT_DATABASE_URL, peek

            try:
                found = peek("database_url", self.config, self.overrides)
            except ConfigError as exc:
                fail(str(exc), EXIT_INVALID)
            if found is None:
                return DEFAULT_DATABASE_URL
            if isinstance(found, str):
                return found
        return self.settings.database_url

    def _log_level(self, settings: Settings) -> str:
        """One-off commands print only their result: their logs show with -v (INFO), -vv (DEBUG) or
        an explicit --log-level; long-running ones log at the configured level."""
        if self.verbose:
            return "DEBUG" if self.verbose > 1 else "INFO"
        if self.long_running or "logging" in self.overrides:
            return settings.logging.level
        return "WARNING" if settings.logging.level in ("DEBUG", "INFO") else settings.logging.level

    def describe_database(self) -> str:
        """``database URL (from ORIGIN)``, password masked, for messages."""
        from controller import db as dbmod
        from controller.config_sources import describe_origin

        url = self.settings.database_url
        origin = describe_origin("database_url", self.config, self.overrides)
        return f"database {dbmod.redact_url(dbmod.normalize_url(url))} (from {origin})"

    @contextmanager
    def reader(self) -> Iterator[Reader]:
        """A read-only view of the database for commands that only read raw rows (``get``,
        ``events``, ``executions``): the driver itself when the URL is a plain one
        (controller/dbapi.py: SQLAlchemy is not even imported), else a SQLAlchemy connection. Either
        way each statement runs on its own, so ``get -w`` and ``events -f`` see what was committed
        since their last look (a transaction kept open would show SQLite's snapshot of its start).
        A missing SQLite file is refused as by :meth:`database`, never created."""
        from controller import dbapi

        url = self.database_url
        path = dbapi.sqlite_path(url)
        if path is not None and not Path(path).exists():
            self.database()  # raises the same UnusableDatabaseError as every other command
        opened = dbapi.open_reader(url)
        if opened is None:
            from controller.overview import sqlalchemy_reader

            database = self.database()
            try:
                with database.engine.connect() as conn:
                    read_in_transaction = sqlalchemy_reader(conn)

                    def read_alone(sql: str, params: Mapping[str, Any] | None = None) -> Rows:
                        try:
                            return read_in_transaction(sql, params)
                        finally:
                            conn.rollback()  # read-only; a later statement sees later commits

                    yield read_alone
            finally:
                database.dispose()
            return
        read, close = opened
        try:
            yield read
        finally:
            close()

    @contextmanager
    def exec_rows(self) -> Iterator[ExecRows]:
        """The rows of ``exec``'s direct path: through the driver when the URL is a plain one
        (controller/exec_rows.py: SQLAlchemy is not even imported), else through SQLAlchemy. A
        missing SQLite file is refused as by :meth:`database`, never created."""
        from controller import dbapi
        from controller.exec_rows import open_exec_rows

        url = self.database_url
        path = dbapi.sqlite_path(url)
        if path is not None and not Path(path).exists():
            self.database()  # raises the same UnusableDatabaseError as every other command
        rows = open_exec_rows(url)
        if rows is None:
            from controller.execution import DatabaseRows

            database = self.database()
            try:
                yield DatabaseRows(database)
            finally:
                database.dispose()
            return
        try:
            yield rows
        finally:
            rows.close()

    def database(self, *, create: bool = False) -> dbmod.Database:
        """The database of the settings. Only ``create=True`` (``db upgrade``) may create a SQLite
        file; every other command refuses a missing one instead of leaving an empty file behind.
        Raises :class:`UnusableDatabaseError` (which :func:`handled` turns into a line and a code)."""
        import sqlalchemy as sa

        from controller import db as dbmod
        from controller.config_sources import describe_origin

        url = dbmod.normalize_url(self.settings.database_url)
        origin = describe_origin("database_url", self.config, self.overrides)
        try:
            parsed = sa.make_url(url)
        except sa.exc.ArgumentError:
            shown = repr(url) if "@" not in url else "(not shown: it may hold a password)"
            raise UnusableDatabaseError(
                f"the database URL from {origin} is not a URL: {shown}; use sqlite:///RELATIVE/PATH, "
                "sqlite:////ABSOLUTE/PATH or postgresql://USER@HOST/DB",
                EXIT_INVALID,
            ) from None
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise UnusableDatabaseError(
                f"{self.describe_database()}: leasectl supports SQLite (sqlite:///PATH) and "
                f"PostgreSQL (postgresql://USER@HOST/DB), not {backend}",
                EXIT_INVALID,
            )
        if backend == "sqlite" and not create:
            path = parsed.database or ""
            if path and path != ":memory:" and not path.startswith("file:") and not Path(path).exists():
                raise UnusableDatabaseError(
                    f"no database at {path} ({self.describe_database()}): run `leasectl db upgrade` to "
                    "create it, or point --database-url / LEASECTL_DATABASE_URL at yours",
                    exitcodes.NO_DATABASE,
                )
        try:
            return dbmod.connect(url)
        except (ImportError, sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
            raise UnusableDatabaseError(
                f"{self.describe_database()}: cannot be opened: {first_line(exc)}", EXIT_INVALID
            ) from exc


def _version(value: bool) -> None:
    if value:
        out.print(f"leasectl {__version__}")
        raise typer.Exit()


def _set(overrides: dict[str, Any], dotted: str, value: Any) -> None:
    if value is None:
        return
    node = overrides
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            metavar="PATH",
            help="Settings file (default: $LEASECTL_CONFIG or ./leasectl.yaml).",
        ),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", metavar="URL", help="SQLAlchemy URL of the database.")
    ] = None,
    instance: Annotated[
        str | None, typer.Option("--instance", metavar="NAME", help="Controller instance name.")
    ] = None,
    api_url: Annotated[str | None, typer.Option("--api-url", metavar="URL", help="Daytona API URL.")] = None,
    log_level: Annotated[
        str | None, typer.Option("--log-level", metavar="LEVEL", help="DEBUG, INFO, WARNING, ERROR.")
    ] = None,
    log_format: Annotated[
        str | None, typer.Option("--log-format", metavar="FORMAT", help="text or json.")
    ] = None,
    verbose: Annotated[
        int,
        typer.Option("--verbose", "-v", count=True, help="Show log lines of one-off commands (-vv: debug)."),
    ] = 0,
    debug: Annotated[
        bool,
        typer.Option("--debug", help="Show the traceback of an error (also LEASECTL_DEBUG=1)."),
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    overrides: dict[str, Any] = {}
    _set(overrides, "database_url", database_url)
    _set(overrides, "controller.instance", instance)
    _set(overrides, "daytona.api_url", api_url)
    _set(overrides, "logging.level", log_level)
    _set(overrides, "logging.format", log_format)
    if debug:
        state.debug = True
    cli = CliContext(config=config, overrides=overrides, verbose=verbose)
    state.describe_database = cli.describe_database
    ctx.obj = cli


def context_of(ctx: typer.Context) -> CliContext:
    obj = ctx.find_root().obj
    assert isinstance(obj, CliContext)
    return obj
