"""``exec``, ``executions`` and ``exec-worker``: commands on Ready leases (controller/execution.py)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from controller import exitcodes
from controller.cli.base import app, context_of
from controller.cli.output import (
    EXIT_INVALID,
    OutputFormat,
    err,
    fail,
    handled,
    jsonable,
    out,
    write_raw,
    yaml_dump,
)


def _parse_env_options(items: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            # Never echo the item: it may be a secret given without its name.
            fail("every --env must be NAME=VALUE (one had no '=')", EXIT_INVALID)
        env[key] = value
    return env


def _report_outcome(execution_id: int, outcome: Any, already_written: str = "") -> NoReturn:
    from controller.execution_run import EXIT_TIMED_OUT

    output = outcome.output
    write_raw(output[len(already_written) :] if output.startswith(already_written) else output)
    if outcome.output_truncated:
        err.print(f"note: output of execution {execution_id} was cut at the configured cap", highlight=False)
    code = outcome.cli_exit_code
    if outcome.state == "timed_out":
        err.print(
            f"[bold red]error:[/] execution {execution_id} {outcome.error or 'timed out'}", highlight=False
        )
        code = EXIT_TIMED_OUT
    elif outcome.state not in ("succeeded", "failed"):
        detail = outcome.error or outcome.state
        err.print(
            f"[bold red]error:[/] execution {execution_id} ended {outcome.state}: {detail}", highlight=False
        )
    raise typer.Exit(code)


@app.command("exec")
def exec_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The lease (must be Ready).")],
    argv: Annotated[
        list[str] | None, typer.Argument(help="After `--`: the program and its arguments, passed as is.")
    ] = None,
    shell: Annotated[
        str | None,
        typer.Option(
            "--shell", metavar="LINE", help="A command line run as written, instead of `-- PROG ARGS`."
        ),
    ] = None,
    cwd: Annotated[
        str | None,
        typer.Option("--cwd", metavar="DIR", help="Working directory (default: the lease workspace)."),
    ] = None,
    env_items: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", metavar="NAME=VALUE", help="NAME=VALUE for the command; repeatable."),
    ] = None,
    stdin_file: Annotated[
        str | None,
        typer.Option(
            "--stdin", metavar="FILE", help="Feed FILE ('-' for this process's stdin) to the command."
        ),
    ] = None,
    timeout: Annotated[
        int | None,
        typer.Option(
            "--timeout", metavar="SECONDS", min=1, help="Seconds before the command is stopped (exit 124)."
        ),
    ] = None,
    queue: Annotated[
        bool, typer.Option("--queue", help="Enqueue for a dispatcher (daemon or exec-worker) and wait.")
    ] = False,
    unordered: Annotated[
        bool,
        typer.Option(
            "--unordered", help="With --queue: do not wait for earlier queued commands of this lease."
        ),
    ] = False,
) -> None:
    """Run a command in a login shell of a Ready lease; exit with its exit code (124: timed out).

    Usage: leasectl exec NAME [OPTIONS] -- PROG [ARGS...]   or   leasectl exec NAME --shell 'LINE'
    """
    from controller import execution_run
    from controller.execution_script import quote_argv

    cli = context_of(ctx)
    if (shell is None) == (not argv):
        fail("give exactly one of `-- PROG [ARGS...]` and `--shell 'LINE'`", EXIT_INVALID)
    env = _parse_env_options(env_items)
    try:
        env = execution_run.check_env(env)
        command = shell if shell is not None else quote_argv(list(argv or ()))
    except (execution_run.InvalidCommandError, ValueError) as exc:
        fail(str(exc), EXIT_INVALID)
    stdin: bytes | None = None
    if stdin_file == "-":
        stdin = sys.stdin.buffer.read()
    elif stdin_file is not None:
        try:
            stdin = Path(stdin_file).read_bytes()
        except OSError as exc:
            fail(f"--stdin {stdin_file}: {exc.strerror or exc}", EXIT_INVALID)
    settings = cli.settings
    with handled():
        if queue:
            _exec_queued(
                cli,
                name,
                command=command,
                cwd=cwd,
                env=env,
                stdin=stdin,
                timeout=timeout,
                ordered=not unordered,
            )
        from controller.providers import build_provider

        with cli.exec_rows() as rows:  # the driver on a plain URL: no SQLAlchemy (controller/exec_rows.py)
            provider = build_provider(settings)
            streamer = _Streamer()
            try:
                execution_id, outcome = _execute_interruptibly(
                    lambda on_start, interrupted: execution_run.execute_now(
                        rows,
                        provider,
                        settings.exec,
                        lease_name=name,
                        command=command,
                        cwd=cwd,
                        env=env,
                        stdin=stdin,
                        timeout_seconds=timeout,
                        on_start=on_start,
                        interrupted=interrupted,
                        on_output=streamer.feed,
                    ),
                    provider,
                    streamer,
                )
            except execution_run.ExecutionError as exc:
                fail(str(exc), EXIT_INVALID)
    _report_outcome(execution_id, outcome, already_written=streamer.written)


def _exec_queued(
    cli: Any,
    name: str,
    command: str,
    *,
    cwd: str | None,
    env: dict[str, str],
    stdin: bytes | None,
    timeout: int | None,
    ordered: bool,
) -> NoReturn:
    """``exec --queue``: enqueue the row, wait for a dispatcher to run it, exit as ``exec`` does."""
    from controller import execution, execution_run

    database = cli.database()
    try:
        with database.session() as session:
            execution.check_runnable(session, name)  # still starting is fine: it waits
        execution_id = execution.enqueue(
            database,
            lease_name=name,
            command=command,
            cwd=cwd,
            env=env,
            stdin=stdin,
            timeout_seconds=timeout,
            ordered=ordered,
        )
    except execution_run.ExecutionError as exc:
        fail(str(exc), EXIT_INVALID)
    err.print(f"execution {execution_id} queued; waiting for a dispatcher", highlight=False)
    signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))  # the same as Ctrl-C
    streamer = _Streamer()
    try:
        record = execution.wait_for(
            database,
            execution_id,
            poll_seconds=min(0.5, cli.settings.exec.poll_interval_seconds),
            on_output=streamer.feed,  # a session command's output, as its worker records it
        )
    except KeyboardInterrupt:
        _cancel_queued_or_running(cli, database, execution_id)
    _report_outcome(execution_id, record.outcome, already_written=streamer.written)


class _Streamer:
    """Writes the output of a session command to stdout as it grows (``execute_now``'s on_output)."""

    def __init__(self) -> None:
        self.written = ""
        self._lock = threading.Lock()

    def feed(self, text: str) -> None:
        with self._lock:
            if text.startswith(self.written):
                write_raw(text[len(self.written) :])
                sys.stdout.flush()
                self.written = text


STOP_WAIT_SECONDS = 15.0
SIGNAL_EXIT: dict[int, int] = {signal.SIGINT: exitcodes.INTERRUPTED, signal.SIGTERM: exitcodes.TERMINATED}


def _execute_interruptibly(
    run: Callable[..., tuple[int, Any]], provider: Any, streamer: _Streamer | None = None
) -> tuple[int, Any]:
    """Run ``run(on_start, interrupted)`` (a blocking execute_now) in a worker thread; on SIGINT or
    SIGTERM stop the command in the sandbox, print what it had written and exit 130 (143).

    A second signal while stopping gives up at once (exit 130) and says the command may still run.
    """
    from controller import execution_run

    started: dict[str, Any] = {}
    reason: list[str] = []
    received: list[int] = []
    result: list[tuple[int, Any]] = []
    failure: list[BaseException] = []
    done = threading.Event()
    progress = threading.Event()

    def on_start(execution_id: int, sandbox_id: str, marker: str) -> None:
        started.update(id=execution_id, sandbox=sandbox_id, marker=marker)
        progress.set()

    def work() -> None:
        try:
            result.append(run(on_start, lambda: reason[0] if reason else None))
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()
            progress.set()

    def on_signal(signum: int, _frame: Any) -> None:
        if received:
            where = f" in sandbox {started['sandbox']}" if started else ""
            err.print(f"gave up stopping it: the command may still run{where}", highlight=False)
            os._exit(exitcodes.INTERRUPTED)
        received.append(signum)
        progress.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in SIGNAL_EXIT}
    try:
        threading.Thread(target=work, name="leasectl-exec", daemon=True).start()
        while not done.is_set() and not received:
            progress.wait()
            progress.clear()
        if received and not done.is_set():
            signum = received[0]
            name = signal.Signals(signum).name
            deadline = time.monotonic() + STOP_WAIT_SECONDS
            while not started and not done.is_set() and time.monotonic() < deadline:
                done.wait(0.1)  # the row and the command are about to start: stop them once they do
            if started and not done.is_set():
                reason.append(f"interrupted by {name}: the command was stopped in the sandbox")
                err.print(f"{name}: stopping execution {started['id']} in the sandbox...", highlight=False)
                problem = execution_run.stop_in_sandbox(provider, started["sandbox"], started["marker"])
                done.wait(STOP_WAIT_SECONDS)
                if result:
                    output, shown = result[0][1].output, streamer.written if streamer else ""
                    write_raw(output[len(shown) :] if output.startswith(shown) else output)
                if problem is not None:
                    fail(
                        f"execution {started['id']} interrupted, but {problem}; it may still run in "
                        f"sandbox {started['sandbox']} (see `leasectl executions`)",
                        SIGNAL_EXIT[signum],
                    )
                fail(
                    f"execution {started['id']} interrupted: the command was stopped in the sandbox",
                    SIGNAL_EXIT[signum],
                )
            if not done.is_set():
                fail(f"interrupted by {name} before the command started", SIGNAL_EXIT[signum])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]
    return result[0]


def _cancel_queued_or_running(cli: Any, database: Any, execution_id: int) -> NoReturn:
    """Ctrl-C while waiting for a queued execution: cancel it; if it runs, stop it in the sandbox."""
    from controller import execution, execution_run

    try:
        cancelled = execution.cancel(database, execution_id, by=execution_run.make_worker_id("cli"))
    except execution_run.ExecutionError:
        fail(f"execution {execution_id} had already ended; see `leasectl executions`", exitcodes.INTERRUPTED)
    if cancelled.marker is None or cancelled.sandbox_id is None:
        fail(f"execution {execution_id} cancelled before it started", exitcodes.INTERRUPTED)
    fail(_stop_message(cli, cancelled), exitcodes.INTERRUPTED)


def _stop_message(cli: Any, cancelled: Any) -> str:
    from controller import execution_run
    from controller.providers import build_provider

    problem = execution_run.stop_in_sandbox(
        build_provider(cli.settings), cancelled.sandbox_id, cancelled.marker, cancelled.session_id
    )
    if problem is None:
        return f"execution {cancelled.id} cancelled: the command was stopped in the sandbox"
    return (
        f"execution {cancelled.id} cancelled, but {problem}; "
        f"it may still run in sandbox {cancelled.sandbox_id}"
    )


@app.command()
def cancel(
    ctx: typer.Context,
    ids: Annotated[list[int], typer.Argument(help="Execution ids (see `leasectl executions`).")],
) -> None:
    """Cancel queued or running executions; a running command is stopped in its sandbox.

    A queued one never runs. A running one is stopped at once from here (SIGTERM, then SIGKILL after
    2 s, to every process carrying its marker); its dispatcher would also stop it within one poll.
    """
    from controller import execution, execution_run

    cli = context_of(ctx)
    with handled():
        database = cli.database()
        for execution_id in ids:
            try:
                cancelled = execution.cancel(database, execution_id, by=execution_run.make_worker_id("cli"))
            except execution_run.ExecutionError as exc:
                fail(str(exc), EXIT_INVALID)
            if cancelled.marker is None or cancelled.sandbox_id is None:
                out.print(f"execution {execution_id} cancelled (it had not started)", highlight=False)
            else:
                out.print(_stop_message(cli, cancelled), highlight=False)


EXECUTION_COLUMNS = ("ID", "LEASE", "STATE", "EXIT", "TRIES", "CREATED", "SECONDS", "COMMAND")


executions_app = typer.Typer(
    help="List executions (newest last); `executions logs ID [-f]` prints (follows) one's output.",
    invoke_without_command=True,
)
app.add_typer(executions_app, name="executions")


@executions_app.callback(invoke_without_command=True)
def executions(
    ctx: typer.Context,
    lease: Annotated[str | None, typer.Option("--lease", metavar="NAME", help="Only this lease.")] = None,
    state: Annotated[
        str | None, typer.Option("--state", metavar="STATE", help="Only this state (queued, running, ...).")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", "-n", metavar="N", min=1, help="Newest N executions.")
    ] = 50,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", metavar="FORMAT")] = OutputFormat.table,
) -> None:
    """List executions, newest last (env and stdin are never shown)."""
    from controller import history

    if ctx.invoked_subcommand is not None:
        return
    cli = context_of(ctx)
    if state is not None and state not in history.EXECUTION_STATES:
        fail(f"--state must be one of {', '.join(history.EXECUTION_STATES)}", EXIT_INVALID)
    with handled(), cli.reader() as read:  # the driver on a plain URL: no SQLAlchemy (controller/dbapi.py)
        rows = history.recent_executions(read, limit, lease=lease, state=state)
    if output is OutputFormat.table:
        from rich.table import Table

        table = Table(box=None, pad_edge=False)
        for col in EXECUTION_COLUMNS:
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(*_execution_cells(r))
        out.print(table, markup=False, highlight=False)
    elif output is OutputFormat.json:
        sys.stdout.write(json.dumps([history.execution_data(r) for r in rows], indent=2) + "\n")
    else:
        sys.stdout.write(yaml_dump([history.execution_data(r) for r in rows]))


def _execution_cells(r: dict[str, Any]) -> tuple[str, ...]:
    """One row of the ``executions`` table (controller.history.recent_executions' dicts)."""
    started, finished, created = r["started_at"], r["finished_at"], r["created_at"]
    timed = isinstance(started, datetime) and isinstance(finished, datetime)
    seconds = f"{(finished - started).total_seconds():.1f}" if timed else "-"
    command = r["command"] if len(r["command"]) <= 60 else r["command"][:57] + "..."
    return (
        str(r["id"]),
        r["lease_name"],
        r["state"] + (" (cut)" if r["output_truncated"] else ""),
        "-" if r["exit_code"] is None else str(r["exit_code"]),
        str((r["attempts"] or 0) + (0 if r["state"] == "queued" else 1)),
        jsonable(created)[:19] if created else "-",
        seconds,
        command,
    )


FOLLOW_POLL_SECONDS = 0.5


@executions_app.command("logs")
def execution_logs(
    ctx: typer.Context,
    execution_id: Annotated[int, typer.Argument(metavar="ID", help="Execution id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new output until the execution ends.")
    ] = False,
) -> None:
    """Print the output of an execution (so far, while it runs); with -f follow it to its end.

    Exits 0 once printed (with -f: once the execution has ended; its state goes to stderr when it
    did not succeed). Output written while it runs comes from its session command, read by the
    worker that runs it, so it lags by about ``exec.log_poll_seconds``.
    """
    from controller.history import EXECUTION_TERMINAL_STATES, execution_output

    cli = context_of(ctx)
    printed = ""
    with handled(), cli.reader() as read:  # the driver on a plain URL, as `executions`
        while True:
            row = execution_output(read, execution_id)
            if row is None:
                fail(f"no such execution: {execution_id}", EXIT_INVALID)
            text = row["output"] or ""
            if text.startswith(printed):
                write_raw(text[len(printed) :])
            else:  # the output was rewritten (re-attached, or cut at the cap): print it again
                write_raw("\n" + text)
            printed = text
            sys.stdout.flush()
            if not follow or row["state"] in EXECUTION_TERMINAL_STATES:
                break
            time.sleep(FOLLOW_POLL_SECONDS)
    if follow and row["state"] != "succeeded":
        detail = f"exit {row['exit_code']}" if row["exit_code"] is not None else (row["error"] or "")
        err.print(f"execution {execution_id} {row['state']}: {detail}", highlight=False)


@app.command("exec-worker")
def exec_worker(
    ctx: typer.Context,
    once: Annotated[
        bool, typer.Option("--once", help="Run what is runnable now, then exit (no waiting for leases).")
    ] = False,
) -> None:
    """Run the execution dispatcher alone (the daemon runs one too); Ctrl-C or SIGTERM stops it."""
    import signal
    import threading

    from controller import db as dbmod
    from controller.execution import Dispatcher
    from controller.providers import build_provider

    cli = context_of(ctx)
    with handled():
        settings = cli.settings
        database = cli.database()
        dbmod.check_schema(database)
        dispatcher = Dispatcher(database, build_provider(settings), settings.exec)
        if once:
            try:
                dispatcher.recover_interrupted()
                processed = dispatcher.drain()
            finally:
                dispatcher.shutdown()
            out.print(f"{processed} execution(s) processed", highlight=False)
            return
        stop = threading.Event()

        def _stop(signum: int, _frame: Any) -> None:
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _stop)
        err.print(
            f"exec-worker {dispatcher.worker_id}: polling every {settings.exec.poll_interval_seconds:g} s",
            highlight=False,
        )
        dispatcher.run_forever(stop)
