"""Migrations: up, down, up again on both backends, and no drift between models and migrations."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from controller import db as dbmod
from models import metadata
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
