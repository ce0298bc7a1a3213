"""Execution end to end: the real Daytona SDK (controller.providers.daytona) against the local Daytona
API, commands run by real bash, rows in SQLite and PostgreSQL.

Covers what issue 6 checks: exit codes, binary stdin (5 MB), cwd, env, a quick time-out, the output
cap, a PATH entry exported by the sandbox's ~/.profile, `leasectl exec` delivering arguments full
of shell metacharacters byte for byte and exiting with the remote code (124 on time-out), and a row
inserted with SQL run once by `leasectl exec-worker --once`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from controller.config import ExecSettings
from controller.db import Database
from controller.execution import CommandOutcome, Dispatcher, execute_now, run_command
from controller.providers.base import CreateRequest
from controller.providers.daytona import DaytonaProvider
from models import Execution, Lease, LeaseStatus
from tests.support.emulator import EmulatorProcess

API_KEY = "test-key-" + uuid.uuid4().hex[:8]
NASTY_ARGS = [
    "plain",
    "",
    "two words",
    "-n",
    "--",
    "'single'",
    '"double"',
    "$HOME ${PATH} $(id) `id`",
    "back\\slash\\\\",
    "new\nline\n",
    "tab\there",
    "* ? [a-z] ~ {a,b}",
    "; | & && || > < >> 2>&1",
    "# not a comment",
    "!bang !! !$",
    "ünïcödé ✓ 日本",
    "%s %d %%",
    "a=b",
    " leading and trailing ",
]


@dataclass
class Sandbox:
    provider: DaytonaProvider
    url: str
    sandbox_id: str
    workspace: str


@pytest.fixture(scope="module")
def local_daytona_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmulatorProcess]:
    """One emulator subprocess for the module (the shared ``emulator`` fixture is per test)."""
    with EmulatorProcess(tmp_path_factory.mktemp("execution") / "daytona", api_key=API_KEY) as emu:
        yield emu


@pytest.fixture(scope="module")
def local_daytona(local_daytona_process: EmulatorProcess) -> str:
    return local_daytona_process.api_url


@pytest.fixture(scope="module")
def sandbox(local_daytona: str) -> Sandbox:
    provider = DaytonaProvider(local_daytona, API_KEY, request_timeout=30)
    created = provider.create(
        CreateRequest(name=f"exec-{uuid.uuid4().hex[:8]}", labels={"leasectl-instance": "test"})
    )
    deadline = time.monotonic() + 30
    while True:
        seen = provider.get(created.id)
        if seen is not None and seen.state == "started":
            break
        assert time.monotonic() < deadline, f"sandbox not started: {seen}"
        time.sleep(0.2)
    return Sandbox(provider, local_daytona, created.id, provider.work_dir(created.id))


@pytest.fixture
def lease(db: Database, sandbox: Sandbox) -> str:
    """A Ready lease on the shared sandbox, written by hand as the reconciler would."""
    with db.session() as session:
        session.add(Lease(name="box", desired_state="running"))
        session.add(
            LeaseStatus(
                lease_name="box",
                phase="Ready",
                sandbox_id=sandbox.sandbox_id,
                workspace_path=sandbox.workspace,
            )
        )
    return "box"


def run(sandbox: Sandbox, command: str, **kwargs: Any) -> CommandOutcome:
    kwargs.setdefault("timeout_seconds", 30)
    kwargs.setdefault("workspace", sandbox.workspace)
    return run_command(sandbox.provider, sandbox.sandbox_id, command, **kwargs)


# -- run_command through the SDK -----------------------------------------------------------------


def test_exit_codes(sandbox: Sandbox) -> None:
    ok = run(sandbox, "echo hi")
    assert (ok.state, ok.exit_code, ok.output) == ("succeeded", 0, "hi\n")
    failed = run(sandbox, "exit 7")
    assert (failed.state, failed.exit_code) == ("failed", 7)
    inner = run(sandbox, "exit 3; echo never")
    assert inner.exit_code == 3


def test_binary_stdin_of_5_mb_arrives_and_its_file_is_removed(sandbox: Sandbox) -> None:
    data = os.urandom(5 * 1024 * 1024)
    outcome = run(
        sandbox, "sha256sum; ls /tmp | grep -c leasectl-stdin- || true", stdin=data, timeout_seconds=60
    )
    assert outcome.state == "succeeded", outcome
    assert hashlib.sha256(data).hexdigest() in outcome.output
    leftovers = [n for n in os.listdir("/tmp") if n.startswith("leasectl-stdin-")]
    assert leftovers == []  # the emulator shares the host's /tmp


def test_cwd_defaults_to_the_workspace_and_can_be_given(sandbox: Sandbox, tmp_path: Path) -> None:
    assert run(sandbox, "pwd -P").output.strip() == os.path.realpath(sandbox.workspace)
    outcome = run(sandbox, "pwd -P", cwd="/tmp")
    assert outcome.output.strip() == os.path.realpath("/tmp")


def test_env_values_arrive_exactly(sandbox: Sandbox) -> None:
    env = {"PLAIN": "x", "NASTY": "a 'b' \"c\" $HOME `id` \\ \n é *", "EMPTY": ""}
    outcome = run(sandbox, 'printf \'%s|%s|%s\' "$PLAIN" "$NASTY" "$EMPTY"', env=env)
    assert outcome.output == "x|" + env["NASTY"] + "|"
    defaults = run(sandbox, 'printf %s "$GIT_TERMINAL_PROMPT"')
    assert defaults.output == "0"


def test_time_out_is_reported_quickly(sandbox: Sandbox) -> None:
    started = time.monotonic()
    outcome = run(sandbox, "sleep 30", timeout_seconds=1)
    assert time.monotonic() - started < 10
    assert (outcome.state, outcome.exit_code) == ("timed_out", None)


def test_output_cap(sandbox: Sandbox) -> None:
    outcome = run(sandbox, "head -c 5000 /dev/zero | tr '\\0' a", max_output_bytes=1024)
    assert outcome.output == "a" * 1024 and outcome.output_truncated


def test_profile_path_entry_is_visible(sandbox: Sandbox) -> None:
    home = run(sandbox, 'printf %s "$HOME"').output
    tool = f"hello-leasectl-{uuid.uuid4().hex[:6]}"
    sandbox.provider.upload(sandbox.sandbox_id, f"{home}/mybin/{tool}", b"#!/bin/sh\necho from-profile\n")
    sandbox.provider.upload(sandbox.sandbox_id, f"{home}/.profile", b'export PATH="$HOME/mybin:$PATH"\n')
    try:
        assert run(sandbox, f"chmod +x ~/mybin/{tool}").state == "succeeded"
        outcome = run(sandbox, tool)
        assert (outcome.state, outcome.output) == ("succeeded", "from-profile\n")
    finally:
        sandbox.provider.delete_file(sandbox.sandbox_id, f"{home}/.profile")


# -- rows and the CLI ----------------------------------------------------------------------------


def cli(
    sandbox: Sandbox, database_url: str, *args: str, stdin: bytes | None = None
) -> tuple[int, bytes, str]:
    from controller.cli import app

    result = CliRunner().invoke(
        app,
        ["--database-url", database_url, "--api-url", sandbox.url, *args],
        input=stdin,
        env={"DAYTONA_API_KEY": API_KEY},
    )
    return result.exit_code, result.stdout_bytes, result.stderr


def test_cli_exec_delivers_arguments_byte_for_byte(sandbox: Sandbox, lease: str, database_url: str) -> None:
    code, out, err = cli(
        sandbox,
        database_url,
        "exec",
        lease,
        "--",
        "python3",
        "-c",
        "import json, sys; sys.stdout.write(json.dumps(sys.argv[1:]))",
        *NASTY_ARGS,
    )
    assert code == 0, err
    assert json.loads(out) == NASTY_ARGS


def test_cli_exec_exit_code_stdin_env_and_timeout(
    sandbox: Sandbox, lease: str, database_url: str, db: Database
) -> None:
    code, _, _ = cli(sandbox, database_url, "exec", lease, "--shell", "exit 42")
    assert code == 42
    code, out, _ = cli(
        sandbox,
        database_url,
        "exec",
        lease,
        "--stdin",
        "-",
        "--env",
        "WHO=wörld $x",
        "--shell",
        'cat; printf " %s" "$WHO"',
        stdin=b"in put",
    )
    assert (code, out) == (0, "in put wörld $x".encode())
    started = time.monotonic()
    code, _, err = cli(sandbox, database_url, "exec", lease, "--timeout", "1", "--", "sleep", "30")
    assert code == 124 and "timed out" in err
    assert time.monotonic() - started < 10
    with db.session() as session:
        rows = session.execute(sa.select(Execution.state, Execution.exit_code).order_by(Execution.id)).all()
    assert [tuple(r) for r in rows] == [("failed", 42), ("succeeded", 0), ("timed_out", None)]


def test_sql_row_runs_once_by_exec_worker_and_is_readable_with_sql(
    sandbox: Sandbox, lease: str, database_url: str, db: Database
) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO executions (lease_name, command) VALUES ('box', 'echo from-sql; pwd -P')")
        )
    code, out, err = cli(sandbox, database_url, "exec-worker", "--once")
    assert code == 0, err
    assert b"1 execution(s) processed" in out
    code, out, err = cli(sandbox, database_url, "exec-worker", "--once")
    assert b"0 execution(s) processed" in out
    with db.engine.connect() as conn:
        state, exit_code, output = conn.execute(
            sa.text("SELECT state, exit_code, output FROM executions")
        ).one()
    assert (state, exit_code) == ("succeeded", 0)
    assert output == f"from-sql\n{os.path.realpath(sandbox.workspace)}\n"


def test_dispatcher_and_direct_run_with_the_real_provider(sandbox: Sandbox, lease: str, db: Database) -> None:
    settings = ExecSettings(max_output_bytes=1024)
    execution_id, outcome = execute_now(
        db, sandbox.provider, settings, lease_name=lease, command="yes | head -c 3000"
    )
    assert len(outcome.output) == 3000
    with db.session() as session:
        row = session.get(Execution, execution_id)
        assert row is not None and row.output_truncated and row.output == "y\n" * 512
    with db.session() as session:
        session.add(Execution(lease_name=lease, command="cat", stdin=b"queued stdin", env={"K": "v"}))
    d = Dispatcher(db, sandbox.provider, settings)
    try:
        assert d.drain() == 1
    finally:
        d.shutdown()
    with db.session() as session:
        [row] = session.scalars(sa.select(Execution).where(Execution.command == "cat")).all()
    assert (row.state, row.output, row.env, row.stdin) == ("succeeded", "queued stdin", None, None)


def test_a_queued_command_costs_one_api_request_and_a_bounded_number_of_statements(
    local_daytona_process: EmulatorProcess, sandbox: Sandbox, lease: str, db: Database
) -> None:
    """Issue 14's structural guard for the queue: through the dispatcher a command is one toolbox
    request (the sandbox's toolbox URL is looked up once per sandbox, then cached) and a bounded
    number of SQL statements per command, counted on the engine, whatever the number of commands."""
    emu = local_daytona_process
    statements = 0

    def served() -> dict[str, int]:
        return {op: n for op, n in emu.stats().items() if n}

    def count(*_args: Any) -> None:
        nonlocal statements
        statements += 1

    def queue(n: int, tag: str) -> None:
        with db.session() as session:
            session.add_all(
                Execution(lease_name=lease, command=f"echo {tag}-{i}", ordered=False) for i in range(n)
            )

    settings = ExecSettings(max_concurrent=1, per_lease_concurrency=0, session_min_timeout_seconds=10**6)
    d = Dispatcher(db, DaytonaProvider(sandbox.url, API_KEY, request_timeout=30), settings)
    sa.event.listen(db.engine, "before_cursor_execute", count)
    try:
        queue(1, "warm-up")
        emu.reset_stats()
        assert d.drain() == 1
        assert served() == {"get": 1, "execute": 1}  # the toolbox URL, once per sandbox
        per_run = {}
        for n in (1, 6):
            queue(n, f"run{n}")
            emu.reset_stats()
            statements = 0
            assert d.drain() == n
            assert served() == {"execute": n}  # exactly one API request per command
            per_run[n] = statements
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", count)
        d.shutdown()
    per_command = (per_run[6] - per_run[1]) / 5
    # A slot that frees up writes its result and claims its next row in one transaction. SQLite:
    # BEGIN, UPDATE result, INSERT event, SELECT claim, UPDATE claim. PostgreSQL (BEGIN is not a
    # statement of its own): ONE statement, whose data-modifying CTEs are the result UPDATE, its
    # event INSERT and the claim UPDATE ... FROM (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING
    # (two statements before: one round trip more per slot cycle). Once per drain: the idle check
    # and the first claim (SELECT, UPDATE), the last result, the idle check that ends it.
    assert per_command <= (5 if db.is_sqlite else 1), per_run
    assert per_run[1] - per_command <= (6 if db.is_sqlite else 4), per_run  # and nothing else
    with db.session(readonly=True) as session:
        states = session.scalars(sa.select(Execution.state).where(Execution.command.like("echo run%"))).all()
    assert states == ["succeeded"] * 7


@pytest.mark.parametrize("path", [["--timeout", "30"], []], ids=["one-request", "session"])
def test_cli_exec_with_a_wrong_key_fails_at_the_first_refusal(
    local_daytona_process: EmulatorProcess,
    sandbox: Sandbox,
    lease: str,
    database_url: str,
    db: Database,
    path: list[str],
) -> None:
    """A wrong API key: one refused request, no retry for ``exec.queue_wait_seconds``, exit 1 with a
    message that names the status and the setting, never the key. (Before AuthError, exec retried
    the 401 with back-off until the window closed: dozens of requests here, minutes by default.)"""
    from controller.cli import app

    wrong = "wrong-key-" + uuid.uuid4().hex[:8]
    local_daytona_process.reset_stats()
    result = CliRunner().invoke(
        app,
        ["--database-url", database_url, "--api-url", sandbox.url, "exec", lease, *path, "--", "true"],
        env={
            "DAYTONA_API_KEY": wrong,
            "LEASECTL_EXEC__QUEUE_WAIT_SECONDS": "5",
            "LEASECTL_EXEC__RETRY_BACKOFF_SECONDS": "0.05",
            "LEASECTL_EXEC__RETRY_BACKOFF_MAX_SECONDS": "0.1",
        },
    )
    assert result.exit_code == 1, result.stderr
    assert "HTTP 401" in result.stderr and "DAYTONA_API_KEY" in result.stderr, result.stderr
    assert wrong not in result.stderr and wrong not in result.stdout
    assert local_daytona_process.stats()["unauthorized"] == 1  # the sandbox lookup, refused once
    with db.session() as session:
        [(state, attempts, error)] = session.execute(
            sa.select(Execution.state, Execution.attempts, Execution.error)
        ).all()
    assert (state, attempts) == ("error", 1) and "DAYTONA_API_KEY" in error and wrong not in error


def test_cli_reconcile_with_a_wrong_key_fails_the_pass_and_marks_no_lease(
    local_daytona_process: EmulatorProcess, sandbox: Sandbox, lease: str, database_url: str, db: Database
) -> None:
    """For the reconciler a refused key stays transient: the pass fails (exit 1, the setting named),
    and no lease is marked Error or Failed for it: an operator fixes the key, not the spec."""
    from controller.cli import app

    wrong = "wrong-key-" + uuid.uuid4().hex[:8]
    local_daytona_process.reset_stats()
    result = CliRunner().invoke(
        app,
        ["--database-url", database_url, "--api-url", sandbox.url, "reconcile"],
        env={"DAYTONA_API_KEY": wrong},
    )
    assert result.exit_code == 1, result.stderr
    assert "HTTP 401" in result.stderr and "DAYTONA_API_KEY" in result.stderr, result.stderr
    assert wrong not in result.stderr + result.stdout
    assert local_daytona_process.stats()["unauthorized"] == 1  # the list, refused once
    with db.session() as session:
        status = session.get(LeaseStatus, lease)
        assert status is not None and (status.phase, status.failures) == ("Ready", 0)
