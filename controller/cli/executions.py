"""``exec``, ``executions`` and ``exec-worker``: commands on Ready leases (controller/execution.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import sqlalchemy as sa
import typer
import yaml
from rich.table import Table

from controller import db as dbmod
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


def _report_outcome(execution_id: int, outcome: Any) -> NoReturn:
    from controller.execution import EXIT_TIMED_OUT

    write_raw(outcome.output)
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
        str | None, typer.Option("--shell", help="A command line run as written, instead of `-- PROG ARGS`.")
    ] = None,
    cwd: Annotated[
        str | None, typer.Option("--cwd", help="Working directory (default: the lease workspace).")
    ] = None,
    env_items: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="NAME=VALUE for the command; repeatable.")
    ] = None,
    stdin_file: Annotated[
        str | None, typer.Option("--stdin", help="Feed FILE ('-' for this process's stdin) to the command.")
    ] = None,
    timeout: Annotated[
        int | None, typer.Option("--timeout", min=1, help="Seconds before the command is stopped (exit 124).")
    ] = None,
    queue: Annotated[
        bool, typer.Option("--queue", help="Enqueue for a dispatcher (daemon or exec-worker) and wait.")
    ] = False,
) -> None:
    """Run a command in a login shell of a Ready lease; exit with its exit code (124: timed out).

    Usage: leasectl exec NAME [OPTIONS] -- PROG [ARGS...]   or   leasectl exec NAME --shell 'LINE'
    """
    from controller import execution
    from controller.execution_script import quote_argv

    cli = context_of(ctx)
    if (shell is None) == (not argv):
        fail("give exactly one of `-- PROG [ARGS...]` and `--shell 'LINE'`", EXIT_INVALID)
    env = _parse_env_options(env_items)
    try:
        env = execution.check_env(env)
        command = shell if shell is not None else quote_argv(list(argv or ()))
    except (execution.InvalidCommandError, ValueError) as exc:
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
        database = cli.database()
        if queue:
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
                )
            except execution.ExecutionError as exc:
                fail(str(exc), EXIT_INVALID)
            err.print(f"execution {execution_id} queued; waiting for a dispatcher", highlight=False)
            try:
                record = execution.wait_for(
                    database, execution_id, poll_seconds=min(0.5, settings.exec.poll_interval_seconds)
                )
            except KeyboardInterrupt:
                if execution.cancel_if_queued(database, execution_id):
                    fail(f"execution {execution_id} cancelled", 130)
                fail(f"execution {execution_id} already started; see `leasectl executions`", 130)
            _report_outcome(execution_id, record.outcome)
        from controller.providers import build_provider

        provider = build_provider(settings)
        try:
            execution_id, outcome = execution.execute_now(
                database,
                provider,
                settings.exec,
                lease_name=name,
                command=command,
                cwd=cwd,
                env=env,
                stdin=stdin,
                timeout_seconds=timeout,
            )
        except execution.ExecutionError as exc:
            fail(str(exc), EXIT_INVALID)
    _report_outcome(execution_id, outcome)


EXECUTION_COLUMNS = ("ID", "LEASE", "STATE", "EXIT", "CREATED", "SECONDS", "COMMAND")


@app.command()
def executions(
    ctx: typer.Context,
    lease: Annotated[str | None, typer.Option("--lease", help="Only this lease.")] = None,
    state: Annotated[
        str | None, typer.Option("--state", help="Only this state (queued, running, ...).")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Newest N executions.")] = 50,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """List executions, newest last (env and stdin are never shown)."""
    from models import Execution
    from models.tables import EXECUTION_STATES

    cli = context_of(ctx)
    if state is not None and state not in EXECUTION_STATES:
        fail(f"--state must be one of {', '.join(EXECUTION_STATES)}", EXIT_INVALID)
    with handled(), cli.database().session(readonly=True) as session:
        query = sa.select(Execution).order_by(Execution.id.desc()).limit(limit)
        if lease:
            query = query.where(Execution.lease_name == lease)
        if state:
            query = query.where(Execution.state == state)
        rows = list(reversed(session.scalars(query).all()))
    data = [
        {
            "id": r.id,
            "lease": r.lease_name,
            "state": r.state,
            "exit_code": r.exit_code,
            "command": r.command,
            "cwd": r.cwd,
            "timeout_seconds": r.timeout_seconds,
            "error": r.error,
            "output": r.output,
            "output_truncated": r.output_truncated,
            "claimed_by": r.claimed_by,
            "sandbox_id": r.sandbox_id,
            "created_at": jsonable(r.created_at),
            "started_at": jsonable(r.started_at),
            "finished_at": jsonable(r.finished_at),
        }
        for r in rows
    ]
    if output is OutputFormat.table:
        table = Table(box=None, pad_edge=False)
        for col in EXECUTION_COLUMNS:
            table.add_column(col, overflow="fold")
        for r in rows:
            seconds = (
                f"{(r.finished_at - r.started_at).total_seconds():.1f}"
                if r.started_at and r.finished_at
                else "-"
            )
            command = r.command if len(r.command) <= 60 else r.command[:57] + "..."
            table.add_row(
                str(r.id),
                r.lease_name,
                r.state + (" (cut)" if r.output_truncated else ""),
                "-" if r.exit_code is None else str(r.exit_code),
                r.created_at.isoformat()[:19] if r.created_at else "-",
                seconds,
                command,
            )
        out.print(table, markup=False, highlight=False)
    elif output is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


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

    from controller.execution import Dispatcher
    from controller.providers import build_provider

    cli = context_of(ctx)
    with handled():
        settings = cli.settings
        database = cli.database()
        if not dbmod.schema_is_current(database):
            fail("the database schema is not current: run `leasectl db upgrade`", EXIT_INVALID)
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
