"""``leasectl db upgrade`` and ``db current`` (the schema of the database, controller/db.py) and
``config example`` (the settings file leasectl ships)."""

from __future__ import annotations

import sys

import typer

from controller.cli.base import config_app, context_of, db_app
from controller.cli.output import handled, out


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the schema to the newest revision (safe to run again)."""
    from controller import db as dbmod

    cli = context_of(ctx)
    with handled():
        database = cli.database(create=True)
        dbmod.upgrade(database)
        out.print(f"database {database.url} at revision {dbmod.current_revision(database)}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Show the schema revision of the database and the newest one known."""
    from controller import db as dbmod

    cli = context_of(ctx)
    with handled():
        database = cli.database()
        out.print(f"current: {dbmod.current_revision(database)}  head: {dbmod.head_revision()}")


@config_app.command("example")
def config_example() -> None:
    """Print config.example.yaml: every setting, commented, with its default."""
    from controller.resources import example_config

    with handled():
        sys.stdout.write(example_config())
