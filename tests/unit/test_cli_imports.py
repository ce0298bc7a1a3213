"""What the CLI imports before it does anything: start-up time is mostly imports, so a regression
here is a slower ``leasectl`` for every operator (issue 14; the times are in bench/cli.py).

Each case runs in a fresh interpreter, drives ``controller.cli.main`` as the console script does,
and lists the heavy packages found in ``sys.modules`` afterwards. ``--help`` builds the whole
command tree, so it catches a command module that imports a heavy dependency at its top. ``exec``
runs a real command on a Ready lease of the local Daytona API.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
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
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
top = sorted({name.split(".")[0] for name in sys.modules})
models = sys.modules.get("models")
mapped = models is not None and models.Execution.__mapper__.configured
print(json.dumps({"top": top, "orm": "sqlalchemy.orm" in sys.modules, "modules": sorted(sys.modules),
                  "mapped": mapped, "code": code, "frozen": __import__("gc").get_freeze_count()}),
      file=sys.stderr)
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


def _get_reads_one_lease(url: str, cwd: Path) -> set[str]:
    """Run ``get`` on ``url`` (a database holding the stopped lease 'one'); the top-level packages
    it imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))}
    env["LEASECTL_DATABASE_URL"] = url
    found = _imported(["get"], env=env, cwd=cwd)
    assert "one" in str(found["stdout"]) and "stopped" in str(found["stdout"])
    return set(found["top"])  # type: ignore[arg-type]


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
    top = _get_reads_one_lease(url, tmp_path)
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
    top = _get_reads_one_lease(pg_url, tmp_path)
    assert "psycopg" in top
    assert {n for n in HEAVY_FOR_GET if n in top} == set()


# -- events, executions ----------------------------------------------------------------------------

# What `events` and `executions` must not import: they read raw rows through the driver, as `get`
# (the executions table may import rich, YAML output yaml: see _allowed).
HEAVY_FOR_HISTORY = tuple(name for name in HEAVY_FOR_GET if name not in ("rich", "yaml"))
HISTORY_COMMANDS = [
    ["events"],
    ["events", "one", "-n", "5", "-o", "json"],
    ["events", "-o", "yaml"],
    ["executions"],
    ["executions", "--lease", "one", "--state", "succeeded", "-n", "5", "-o", "json"],
    ["executions", "-o", "yaml"],
    ["executions", "logs", "1"],
    ["executions", "logs", "1", "-f"],
]


def _history_rows(database: dbmod.Database, *, pg: bool) -> None:
    """Lease 'one', an event of it and a finished execution, written as an operator would with SQL."""
    false, true = ("false", "true") if pg else ("0", "1")
    with database.engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO leases (name, desired_state, env, labels, paused, created_at, updated_at) "
            f"VALUES ('one', 'stopped', '{{}}', '{{}}', {false}, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
        )
        conn.exec_driver_sql(
            "INSERT INTO events (at, lease_name, action, outcome, message) "
            "VALUES (CURRENT_TIMESTAMP, 'one', 'stop', 'ok', 'stopped one')"
        )
        conn.exec_driver_sql(
            "INSERT INTO executions (lease_name, command, state, exit_code, output, output_truncated, "
            "ordered, attempts, attempt_log, created_at, started_at, finished_at) VALUES ('one', "
            f"'echo ran', 'succeeded', 0, 'ran\n', {false}, {true}, 0, '[]', CURRENT_TIMESTAMP, "
            "CURRENT_TIMESTAMP, "
            "CURRENT_TIMESTAMP)"
        )


def _history_imports(url: str, args: list[str], cwd: Path) -> set[str]:
    """Run ``args`` on ``url`` (see :func:`_history_rows`); the top-level packages it imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))}
    env["LEASECTL_DATABASE_URL"] = url
    found = _imported(args, env=env, cwd=cwd)
    assert found["code"] == 0, found
    expected = {"events": "stopped one", "executions": "echo ran", "logs": "ran\n"}
    assert expected[args[1] if args[1:2] == ["logs"] else args[0]] in str(found["stdout"]), found["stdout"]
    return set(found["top"])  # type: ignore[arg-type]


def _allowed(args: list[str]) -> set[str]:
    """What a command may import beyond the standard library: rich for the executions table (its
    columns are rich's), PyYAML for YAML."""
    allowed = {"yaml"} if "yaml" in args else set()
    if args[0] == "executions" and "-o" not in args:
        allowed.add("rich")
    return allowed


@pytest.fixture(scope="module")
def history_sqlite(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('history') / 'leasectl.db'}"
    database = dbmod.connect(url)
    dbmod.upgrade(database)
    _history_rows(database, pg=False)
    database.dispose()
    return url


@pytest.mark.parametrize("args", HISTORY_COMMANDS, ids=" ".join)
def test_events_and_executions_import_neither_sqlalchemy_nor_the_models_nor_pydantic(
    history_sqlite: str, tmp_path: Path, args: list[str]
) -> None:
    top = _history_imports(history_sqlite, args, tmp_path)
    assert "sqlite3" in top  # it did read the database: through the driver (controller/dbapi.py)
    heavy = (*HEAVY_FOR_HISTORY, "psycopg", "rich", "yaml")
    assert {n for n in heavy if n in top} - _allowed(args) == set()


def test_events_and_executions_on_postgresql_read_through_psycopg(pg_url: str, tmp_path: Path) -> None:
    database = dbmod.connect(pg_url)
    truncate_all(database)
    _history_rows(database, pg=True)
    database.dispose()
    for args in HISTORY_COMMANDS:
        top = _history_imports(pg_url, args, tmp_path)
        assert "psycopg" in top, args
        assert {n for n in HEAVY_FOR_HISTORY if n in top} == set(), args


def test_events_follow_imports_neither_sqlalchemy_nor_the_models(history_sqlite: str, tmp_path: Path) -> None:
    """``events -f``: the history, then the loop that polls for new events, ended by Ctrl-C."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))}
    env["LEASECTL_DATABASE_URL"] = history_sqlite
    proc = subprocess.Popen(
        [sys.executable, "-c", PROBE, "events", "-f", "--interval", "0.05"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("TIME")
        assert "stopped one" in proc.stdout.readline()
        time.sleep(0.3)  # a few looks for new events (not a timing assertion)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    found = json.loads(stderr.strip().splitlines()[-1])
    assert found["code"] == 0
    top = set(found["top"])
    assert "sqlite3" in top and {n for n in (*HEAVY_FOR_HISTORY, "rich", "yaml") if n in top} == set()


def test_the_schema_guard_reads_the_same_revisions_as_alembic() -> None:
    """The guard reads the version files without Alembic; it must agree with Alembic's reading."""
    assert dbmod.known_revisions() == list(dbmod._alembic_chain())
    assert dbmod.head_revision() == dbmod._script().get_current_head()


def test_the_overview_reader_knows_every_timestamp_and_boolean_column_of_the_view() -> None:
    """``get`` reads the view with plain SQL; its typed columns are declared in models/views.py."""
    from models import UTCDateTime, lease_overview

    assert {c.key for c in lease_overview.c if isinstance(c.type, UTCDateTime)} == overview.TIMESTAMP_COLUMNS
    assert {c.key for c in lease_overview.c if isinstance(c.type, sa.Boolean)} == overview.BOOLEAN_COLUMNS


def test_the_history_reader_knows_every_execution_state() -> None:
    """``executions --state`` is checked against controller.history's copy of the states."""
    from controller import history
    from models.tables import EXECUTION_STATES, EXECUTION_TERMINAL_STATES

    assert history.EXECUTION_STATES == EXECUTION_STATES
    assert history.EXECUTION_TERMINAL_STATES == EXECUTION_TERMINAL_STATES


# -- exec ------------------------------------------------------------------------------------------

API_KEY = "imports-" + uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def ready_lease(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a ``leasectl exec`` on lease ``box``, Ready on a started sandbox of the
    local Daytona API (a subprocess), in a SQLite database."""
    from controller.providers.base import CreateRequest
    from controller.providers.daytona import DaytonaProvider
    from models import Lease, LeaseStatus
    from tests.support.emulator import EmulatorProcess

    tmp = tmp_path_factory.mktemp("exec-imports")
    with EmulatorProcess(tmp / "daytona", api_key=API_KEY) as emu:
        provider = DaytonaProvider(emu.api_url, API_KEY, request_timeout=30)
        created = provider.create(CreateRequest(name="imports-box", labels={"leasectl-instance": "test"}))
        deadline = time.monotonic() + 30
        while (seen := provider.get(created.id)) is None or seen.state != "started":
            assert time.monotonic() < deadline, f"sandbox not started: {seen}"
            time.sleep(0.1)
        url = f"sqlite:///{tmp / 'leasectl.db'}"
        database = dbmod.connect(url)
        dbmod.upgrade(database)
        with database.session() as session:
            session.add(Lease(name="box", desired_state="running"))
            session.add(LeaseStatus(lease_name="box", phase="Ready", sandbox_id=created.id))
        database.dispose()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))}
        env |= {"LEASECTL_DATABASE_URL": url, "DAYTONA_API_URL": emu.api_url, "DAYTONA_API_KEY": API_KEY}
        yield env


@pytest.mark.parametrize("stdin", [False, True], ids=["", "stdin"])
@pytest.mark.parametrize("timeout", [[], ["--timeout", "30"]], ids=["session", "one-request"])
def test_exec_imports_neither_sqlalchemy_nor_alembic_nor_the_high_level_sdk(
    ready_lease: dict[str, str], tmp_path: Path, timeout: list[str], stdin: bool
) -> None:
    """``exec`` (both paths: the default time-out runs in a session, a short one in one request;
    with and without ``--stdin``, whose file is uploaded and deleted) imports the generated clients
    it sends its requests with, and nothing else of weight: on a plain URL it writes its row
    through the driver (controller/exec_rows.py), so no SQLAlchemy, no models and not the queue's
    module; no Alembic, no aiohttp, no high-level ``daytona`` client (the SDK uploads with it), no
    local API server, no generated API module (the toolbox address GET, the process and the two
    file calls go through the SDK's clients without them: each module wraps every method in
    pydantic's ``validate_call``, the process API's about 40)."""
    feed: list[str] = []
    if stdin:
        (tmp_path / "in.txt").write_bytes(b"fed in\n")
        feed = ["--stdin", str(tmp_path / "in.txt")]
    script = "cat; echo hello; exit 3" if stdin else "echo hello; exit 3"
    found = _imported(
        ["exec", "box", *timeout, *feed, "--", "sh", "-c", script], env=ready_lease, cwd=tmp_path
    )
    assert found["code"] == 3 and found["stdout"] == ("fed in\nhello\n" if stdin else "hello\n")
    top = set(found["top"])  # type: ignore[arg-type]
    assert "sqlite3" in top  # it did write its row: through the driver
    assert {
        n
        for n in ("sqlalchemy", "models", "alembic", "aiohttp", "rich", "yaml", "socketio", "opentelemetry")
        if n in top
    } == set()
    modules = set(found["modules"])  # type: ignore[arg-type]
    sdk = {m for m in modules if m.startswith("daytona.")}
    assert sdk <= {"daytona.internal", "daytona.internal.urllib3_retry"}  # only the retry policy
    assert {
        m
        for m in modules
        if m.startswith(("controller.emulator.server", "controller.emulator.app", "controller.reconciler"))
        or m in ("controller.execution", "controller.db")  # the queue and the engine: SQLAlchemy
        or m.endswith(("volumes_api", "object_storage_api", "sandbox_api"))  # the toolbox address: one GET
        or m.endswith(("process_api", "file_system_api"))  # sent by providers.daytona.Toolbox
    } == set()
    assert found["frozen"] > 10_000  # main() froze what the command made: the exit does not walk it


def test_exec_on_postgresql_writes_through_psycopg_without_sqlalchemy(
    ready_lease: dict[str, str], pg_url: str, tmp_path: Path
) -> None:
    """The same on PostgreSQL: the row and its event are written through psycopg."""
    import sqlite3

    sqlite_file = ready_lease["LEASECTL_DATABASE_URL"].removeprefix("sqlite:///")
    with sqlite3.connect(sqlite_file) as conn:
        [(sandbox_id,)] = conn.execute("SELECT sandbox_id FROM lease_status WHERE lease_name = 'box'")
    database = dbmod.connect(pg_url)
    truncate_all(database)
    with database.engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO leases (name, desired_state) VALUES ('box', 'running')")
        conn.exec_driver_sql(
            "INSERT INTO lease_status (lease_name, phase, sandbox_id) VALUES ('box', 'Ready', %(s)s)",
            {"s": sandbox_id},
        )
    try:
        found = _imported(
            ["exec", "box", "--", "sh", "-c", "echo pg; exit 5"],
            env=ready_lease | {"LEASECTL_DATABASE_URL": pg_url},
            cwd=tmp_path,
        )
        assert found["code"] == 5 and found["stdout"] == "pg\n"
        top = set(found["top"])  # type: ignore[arg-type]
        assert "psycopg" in top and not {"sqlalchemy", "models"} & top
        with database.engine.connect() as conn:
            row = conn.exec_driver_sql("SELECT state, exit_code, output FROM executions").one()
            event = conn.exec_driver_sql("SELECT outcome, message FROM events WHERE action = 'exec'").one()
        assert tuple(row) == ("failed", 5, "pg\n")
        assert event.outcome == "failed" and event.message.endswith(": exit 5")
    finally:
        truncate_all(database)
        database.dispose()


def test_exec_on_a_url_the_driver_does_not_open_goes_through_sqlalchemy_without_the_mappers(
    ready_lease: dict[str, str], tmp_path: Path
) -> None:
    """A URL that is not a plain one (here a query string) is SQLAlchemy's to read: exec then writes
    its row with Core statements (controller.execution.DatabaseRows), still never configuring the
    ORM mappers (30-40 ms, longer than ``exec NAME -- true`` runs)."""
    env = ready_lease | {"LEASECTL_DATABASE_URL": ready_lease["LEASECTL_DATABASE_URL"] + "?timeout=30"}
    found = _imported(["exec", "box", "--", "sh", "-c", "echo again; exit 4"], env=env, cwd=tmp_path)
    assert found["code"] == 4 and found["stdout"] == "again\n"
    assert "controller.execution" in set(found["modules"])  # type: ignore[arg-type]
    assert found["mapped"] is False


# -- one command built per start -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["exec", "box", "--", "true"], "exec"),
        (["--database-url", "sqlite:///x.db", "-vv", "exec", "box"], "exec"),
        (["--database-url=sqlite:///x.db", "--debug", "get"], "get"),
        (["-c", "leasectl.yaml", "db", "upgrade"], "db"),
        (["-cleasectl.yaml", "get"], "get"),
        ([], None),
        (["--help"], None),
        (["--help", "exec"], None),
        (["-x", "get"], None),  # not plainly read: the whole app says what is wrong
        (["--", "get"], None),
    ],
)
def test_command_name_is_the_first_word_after_the_global_options(argv: list[str], name: str | None) -> None:
    from controller.cli import command_name

    assert command_name(argv) == name


def test_the_global_options_that_take_a_value_are_known() -> None:
    import typer.main

    from controller.cli import VALUE_OPTIONS, app

    group = typer.main.get_command(app)
    taking = {
        opt
        for param in group.params
        if not getattr(param, "is_flag", False) and not getattr(param, "count", False)
        for opt in param.opts
    }
    assert taking == VALUE_OPTIONS


def test_each_command_alone_has_the_same_help_as_in_the_whole_app() -> None:
    """``app_for`` registers only the command run; its help (options, arguments) is the same."""
    import typer.main
    from typer.testing import CliRunner

    from controller.cli import app, app_for

    names = sorted(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert "exec" in names and "get" in names and "db" in names
    runner = CliRunner()
    for name in names:
        one = app_for([name])
        assert one is not app and sorted(typer.main.get_command(one).commands) == [name]  # type: ignore[attr-defined]
        whole = runner.invoke(app, [name, "--help"], prog_name="leasectl")
        alone = runner.invoke(one, [name, "--help"], prog_name="leasectl")
        assert alone.exit_code == whole.exit_code == 0 and alone.output == whole.output, name
    assert app_for(["nosuch"]) is app and app_for(["--help"]) is app
