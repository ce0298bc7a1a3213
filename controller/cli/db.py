"""``leasectl db upgrade`` and ``db current``: the schema of the database (controller/db.py)."""

from __future__ import annotations

import typer

from controller import db as dbmod
from controller.cli.base import context_of, db_app
from controller.cli.output import handled, out


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the schema to the newest revision (safe to run again)."""
    cli = context_of(ctx)
    with handled():
        database = cli.database(create=True)
        dbmod.upgrade(database)
        out.print(f"database {database.url} at revision {dbmod.current_revision(database)}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Show the schema revision of the database and the newest one known."""
    cli = context_of(ctx)
    with handled():
        database = cli.database()
        out.print(f"current: {dbmod.current_revision(database)}  head: {dbmod.head_revision()}")
