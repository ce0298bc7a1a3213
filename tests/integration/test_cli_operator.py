"""Issue 13: the CLI as an operator runs it (subprocesses, real SDK against the local Daytona API).

Prune guard, exec cancellation that reaches the sandbox, no tracebacks, exit codes, read-only
commands that never create a database, clean exec stderr, watch modes, YAML errors, completion.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from controller import db as dbmod
from controller import exitcodes
from controller.leader import LeaderElector
from tests.support.emulator import EmulatorProcess

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(database_url: str | None, emulator: EmulatorProcess | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))}
    env["LEASECTL_CONFIG"] = os.devnull
    env["PYTHONPATH"] = str(REPO_ROOT)
    if database_url is not None:
        env["LEASECTL_DATABASE_URL"] = database_url
    if emulator is not None:
        env["DAYTONA_API_URL"] = emulator.api_url
        env["DAYTONA_API_KEY"] = emulator.api_key
    env.update(extra)
    return env


def cli(
    env: dict[str, str], *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "controller.cli", *args],
        env=env,
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def popen(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "controller.cli", *args],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def pgrep(pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [p for p in found if p != str(os.getpid())]


def wait_for(predicate: object, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'leasectl.db'}"
    database = dbmod.connect(url)
    dbmod.upgrade(database)
    database.dispose()
    return url


@pytest.fixture
def ready(emulator: EmulatorProcess, sqlite_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A lease `demo` that is Ready; yields the environment of the quick start."""
    env = _env(sqlite_url, emulator)
    leases = tmp_path / "leases.yaml"
    leases.write_text("leases:\n  - name: demo\n")
    assert cli(env, "apply", "-f", str(leases)).returncode == 0

    def is_ready() -> bool:
        cli(env, "reconcile", "--once")
        return "Ready" in cli(env, "get", "demo").stdout

    wait_for(is_ready, 60, "lease demo Ready")
    yield env


def execution_state(url: str, execution_id: int) -> str:
    database = dbmod.connect(url)
    try:
        with database.engine.connect() as conn:
            return str(
                conn.execute(
                    sa.text("SELECT state FROM executions WHERE id = :i"), {"i": execution_id}
                ).scalar()
            )
    finally:
        database.dispose()


# -- exec: Ctrl-C and cancel reach the sandbox -----------------------------------------------------


def test_sigint_stops_the_command_in_the_sandbox(ready: dict[str, str], sqlite_url: str) -> None:
    token = f"40.{uuid.uuid4().int % 10**6}"  # `sleep 40.NNNNNN`: findable with pgrep, unique
    proc = popen(ready, "exec", "demo", "--", "sleep", token)
    wait_for(lambda: pgrep(f"^sleep {token}"), 20, "the command to run")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == exitcodes.INTERRUPTED, err
    assert "interrupted: the command was stopped in the sandbox" in err
    assert "Traceback" not in err
    wait_for(lambda: not pgrep(f"^sleep {token}"), 5, "no process of the command left")
    assert execution_state(sqlite_url, 1) == "interrupted"


def test_cancel_of_a_running_queued_execution_reaches_the_sandbox(
    ready: dict[str, str], sqlite_url: str
) -> None:
    from controller import execution

    worker = popen({**ready, "LEASECTL_EXEC__POLL_INTERVAL_SECONDS": "0.2"}, "exec-worker")
    try:
        database = dbmod.connect(sqlite_url)
        tokens = [f"41.{uuid.uuid4().int % 10**6}", f"42.{uuid.uuid4().int % 10**6}"]
        ids = [  # unordered: both run at once (rows of one lease otherwise run one at a time)
            execution.enqueue(database, lease_name="demo", command=f"sleep {t}", ordered=False)
            for t in tokens
        ]
        database.dispose()
        for token in tokens:
            wait_for(lambda t=token: pgrep(f"^sleep {t}"), 20, "the queued command to run")

        # `leasectl cancel` stops it at once, from the CLI.
        result = cli(ready, "cancel", str(ids[0]))
        assert result.returncode == 0, result.stderr
        assert "stopped in the sandbox" in result.stdout
        wait_for(lambda: not pgrep(f"^sleep {tokens[0]}"), 5, "the cancelled command to be gone")
        assert execution_state(sqlite_url, ids[0]) == "cancelled"

        # Cancelled with plain SQL: its dispatcher stops it within a poll.
        database = dbmod.connect(sqlite_url)
        with database.engine.begin() as conn:
            conn.execute(sa.text("UPDATE executions SET state='cancelled' WHERE id=:i"), {"i": ids[1]})
        database.dispose()
        wait_for(lambda: not pgrep(f"^sleep {tokens[1]}"), 10, "the SQL-cancelled command to be gone")
        assert execution_state(sqlite_url, ids[1]) == "cancelled"

        again = cli(ready, "cancel", str(ids[0]))
        assert again.returncode == exitcodes.INVALID and "already ended" in again.stderr
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)


def test_exec_stderr_is_the_commands_own(ready: dict[str, str]) -> None:
    result = cli(ready, "exec", "demo", "--shell", "echo out; nosuchprog")
    assert result.returncode == 127
    # The toolbox returns stdout and stderr as one stream; ours (stderr) carries no log line. No
    # wrapper line numbers: what `bash -c 'echo out; nosuchprog'` prints.
    assert result.stdout == "out\nbash: line 1: nosuchprog: command not found\n"
    assert result.stderr == ""
    verbose = cli(ready, "-v", "exec", "demo", "--", "true")
    assert verbose.returncode == 0 and "INFO" in verbose.stderr


# -- errors, exit codes, databases -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "needle"),
    [("mysql://x@y/z", "supports SQLite"), ("/tmp/x.db", "is not a URL"), ("postgresql://", "")],
)
def test_bad_database_urls_print_one_line_and_no_traceback(tmp_path: Path, url: str, needle: str) -> None:
    env = _env(None)
    result = cli(env, "--database-url", url, "get", cwd=tmp_path)
    assert result.returncode in (exitcodes.INVALID, exitcodes.FAILURE, exitcodes.NO_DATABASE)
    assert "Traceback" not in result.stderr and needle in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr
    debug = cli({**env, "LEASECTL_DEBUG": "1"}, "--database-url", url, "get", cwd=tmp_path)
    if url != "postgresql://":
        assert "Traceback" in debug.stderr


def test_read_only_commands_never_create_a_database(tmp_path: Path) -> None:
    env = _env(None)
    for command in (["get"], ["events"], ["executions"], ["export"], ["db", "current"], ["plan"]):
        result = cli(env, *command, cwd=tmp_path)
        assert result.returncode == exitcodes.NO_DATABASE, (command, result.stderr)
        assert "sqlite:///leasectl.db (from built-in default)" in result.stderr
        assert "leasectl db upgrade" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []
    named = cli(_env(f"sqlite:///{tmp_path / 'x.db'}"), "get", cwd=tmp_path)
    assert "from environment variable LEASECTL_DATABASE_URL" in named.stderr
    assert list(tmp_path.iterdir()) == []


def test_not_leader_has_its_own_exit_code(sqlite_url: str, emulator: EmulatorProcess) -> None:
    database = dbmod.connect(sqlite_url)
    elector = LeaderElector(database, "default", 60)
    assert elector.try_acquire()
    try:
        env = _env(sqlite_url, emulator)
        for command in (["reconcile", "--once"], ["gc"]):
            result = cli(env, *command)
            assert result.returncode == exitcodes.NOT_LEADER, result.stderr
            assert "is led by" in result.stderr and "leasectl plan" in result.stderr
        assert cli(env, "plan").returncode == 0
    finally:
        elector.release()
        database.dispose()


def test_events_and_get_of_an_unknown_lease_agree(sqlite_url: str) -> None:
    env = _env(sqlite_url)
    for command in ("get", "events"):
        result = cli(env, command, "nosuch")
        assert result.returncode == exitcodes.INVALID and "no such lease: nosuch" in result.stderr


def test_readme_exit_code_table_is_exitcodes_table() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (\d+) \| (.+?) \| (.+?) \|$", readme, re.MULTILINE)
    assert [(int(c), w, m) for c, w, m in rows] == [(c, w, m) for c, w, m in exitcodes.TABLE]


# -- apply: prune guard and YAML errors ------------------------------------------------------------


def test_a_prune_of_everything_is_refused_and_changes_nothing(sqlite_url: str, tmp_path: Path) -> None:
    env = _env(sqlite_url)
    full = tmp_path / "full.yaml"
    full.write_text("leases:\n  - name: a\n  - name: b\n  - name: c\n")
    assert cli(env, "apply", "-f", str(full)).returncode == 0
    before = cli(env, "get", "-o", "json").stdout
    for text in ("", "leases: []\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        for dry in ([], ["--dry-run"]):
            result = cli(env, "apply", "-f", str(empty), "--prune", *dry)
            assert result.returncode == exitcodes.INVALID
            assert "refusing to prune all 3" in result.stderr and "--prune-all" in result.stderr
            assert cli(env, "get", "-o", "json").stdout == before
    forced = cli(env, "apply", "-f", str(empty), "--prune", "--prune-all")
    assert forced.returncode == 0 and "3 pruned" in forced.stdout


def test_yaml_errors_have_line_numbers_and_suggestions(sqlite_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("leases:\n  - name: a\n  - name: b\n    snapshott: small\n")
    result = cli(_env(sqlite_url), "apply", "-f", str(bad))
    assert result.returncode == exitcodes.INVALID
    assert f"{bad}:4: lease 'b': snapshott: unknown field (did you mean 'snapshot'?)" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("leases:\n  - name: a\n   state: x\n")
    result = cli(_env(sqlite_url), "apply", "-f", str(broken))
    assert result.returncode == exitcodes.INVALID and f"{broken}:3: not valid YAML" in result.stderr


# -- watch, follow, completion ---------------------------------------------------------------------


def test_get_watch_prints_a_changed_phase_and_events_follow(sqlite_url: str, tmp_path: Path) -> None:
    env = _env(sqlite_url)
    leases = tmp_path / "l.yaml"
    leases.write_text("leases:\n  - name: web\n")
    assert cli(env, "apply", "-f", str(leases)).returncode == 0
    watch = popen(env, "get", "-w", "--interval", "0.1")
    follow = popen(env, "events", "-f", "--interval", "0.1")
    lines: list[str] = []
    followed: list[str] = []

    def read(proc: subprocess.Popen[str], into: list[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            into.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, args=(watch, lines), daemon=True)
    reader.start()
    follower = threading.Thread(target=read, args=(follow, followed), daemon=True)
    follower.start()

    def printed(phase: str) -> bool:
        return any(line.startswith("web") and phase in line for line in list(lines))

    try:
        # The row changes only once the watch has printed the first frame and `events -f` its header
        # (their start-up times vary; a Ctrl-C before a command reaches its loop exits 130, as it should).
        deadline = time.monotonic() + 60
        while not (printed("Pending") and followed) and time.monotonic() < deadline:
            time.sleep(0.1)
        database = dbmod.connect(sqlite_url)
        with database.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO lease_status (lease_name, phase) VALUES ('web', 'Ready')"))
            conn.execute(
                sa.text(
                    "INSERT INTO events (at, lease_name, action, outcome, message) "
                    "VALUES (CURRENT_TIMESTAMP, 'web', 'create', 'ok', 'hello from the test')"
                )
            )
        database.dispose()
        deadline = time.monotonic() + 60
        while not printed("Ready") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # events -f: its next look
    finally:
        for proc in (watch, follow):
            proc.send_signal(signal.SIGINT)
    assert watch.wait(timeout=10) == 0, watch.stderr.read() if watch.stderr else ""
    reader.join(timeout=10)
    out = "\n".join(lines)
    assert lines[0].startswith("NAME") and "Pending" in lines[1], out
    assert any(line.startswith("web") and "Ready" in line for line in lines[2:]), out
    assert follow.wait(timeout=10) == 0, follow.stderr.read() if follow.stderr else ""
    follower.join(timeout=10)
    assert any("hello from the test" in line for line in followed), followed


def test_shell_completion_scripts() -> None:
    leasectl = Path(sys.executable).parent / "leasectl"  # completion keys on the program's name
    for shell, needle in (
        ("bash", "complete -o default"),
        ("zsh", "#compdef leasectl"),
        ("fish", "complete"),
    ):
        env = _env(None, _LEASECTL_COMPLETE=f"source_{shell}")
        result = subprocess.run([str(leasectl)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and needle in result.stdout, (shell, result.stderr)
