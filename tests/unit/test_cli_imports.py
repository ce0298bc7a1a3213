"""What the CLI imports before it does anything: start-up time is mostly imports, so a regression
here is a slower ``leasectl`` for every operator (issue 14; the times are in bench/cli.py).

Each case runs in a fresh interpreter, drives ``controller.cli.main`` as the console script does,
and lists the heavy packages found in ``sys.modules`` afterwards. ``--help`` builds the whole
command tree, so it catches a command module that imports a heavy dependency at its top.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from controller import db as dbmod
from controller import overview
from tests.conftest import truncate_all

HEAVY = ("sqlalchemy", "alembic", "daytona", "daytona_api_client", "aiohttp", "rich", "yaml", "pydantic")

# What `get` (the table) must not import: it reads raw rows through the driver.
HEAVY_FOR_GET = (
    "sqlalchemy",
    "pydantic",
    "alembic",
    "daytona",
    "daytona_api_client",
    "aiohttp",
    "rich",
    "models",
)

PROBE = """
import json, sys
from controller.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
top = sorted({name.split(".")[0] for name in sys.modules})
print(json.dumps({"top": top, "orm": "sqlalchemy.orm" in sys.modules}), file=sys.stderr)
"""


def _imported(
    args: list[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )
    last = done.stderr.strip().splitlines()[-1]
    result: dict[str, object] = json.loads(last)
    result["stdout"] = done.stdout
    return result


def test_help_imports_none_of_the_heavy_packages() -> None:
    found = _imported(["--help"])
    assert "exec" in str(found["stdout"]) and "local-daytona" in str(found["stdout"])
    top = set(found["top"])  # type: ignore[arg-type]
    assert {name for name in HEAVY if name in top} == set()


def test_get_imports_neither_alembic_nor_the_sdk_nor_the_local_api(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'leasectl.db'}"
    database = dbmod.connect(url)
    dbmod.upgrade(database)
    with database.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO leases (name, desired_state, env, labels, paused, created_at, updated_at) "
            "VALUES ('one', 'stopped', '{}', '{}', 0, '2026-11-27 00:00:00', '2026-11-27 00:00:00')"
        )
    database.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))}
    env["LEASECTL_DATABASE_URL"] = url
    found = _imported(["get"], env=env, cwd=tmp_path)
    assert "one" in str(found["stdout"]) and "stopped" in str(found["stdout"])
    top = set(found["top"])  # type: ignore[arg-type]
    assert "sqlite3" in top  # it did read the database: through the driver (controller/dbapi.py)
    assert {n for n in (*HEAVY_FOR_GET, "psycopg") if n in top} == set()


def test_get_on_postgresql_reads_through_psycopg_without_sqlalchemy(pg_url: str, tmp_path: Path) -> None:
    database = dbmod.connect(pg_url)
    truncate_all(database)
    with database.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO leases (name, desired_state, env, labels, paused, created_at, updated_at) "
            "VALUES ('one', 'stopped', '{}', '{}', false, now(), now())"
        )
    database.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))}
    env["LEASECTL_DATABASE_URL"] = pg_url
    found = _imported(["get"], env=env, cwd=tmp_path)
    assert "one" in str(found["stdout"]) and "stopped" in str(found["stdout"])
    top = set(found["top"])  # type: ignore[arg-type]
    assert "psycopg" in top
    assert {n for n in HEAVY_FOR_GET if n in top} == set()


def test_the_schema_guard_reads_the_same_revisions_as_alembic() -> None:
    """The guard reads the version files without Alembic; it must agree with Alembic's reading."""
    assert dbmod.known_revisions() == list(dbmod._alembic_chain())
    assert dbmod.head_revision() == dbmod._script().get_current_head()


def test_the_overview_reader_knows_every_timestamp_and_boolean_column_of_the_view() -> None:
    """``get`` reads the view with plain SQL; its typed columns are declared in models/views.py."""
    from models import UTCDateTime, lease_overview

    assert {c.key for c in lease_overview.c if isinstance(c.type, UTCDateTime)} == overview.TIMESTAMP_COLUMNS
    assert {c.key for c in lease_overview.c if isinstance(c.type, sa.Boolean)} == overview.BOOLEAN_COLUMNS
