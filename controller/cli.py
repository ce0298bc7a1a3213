"""The ``leasectl`` command line (typer). Parses settings once and passes them down.

Exit codes: 0 success; 1 runtime failure; 2 invalid input (bad config, lease file, arguments, or a
lease that cannot take the request). Commands that report differences (``plan``) document their own.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import sqlalchemy as sa
import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from controller import __version__
from controller import db as dbmod
from controller.config import Settings, load_settings
from controller.errors import ConfigError, LeasectlError, SpecError
from controller.leases import apply_specs, overview, read_specs
from controller.specs import dump_leases, load_lease_files

app = typer.Typer(
    name="leasectl",
    help="Declarative lease controller for Daytona sandboxes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")

# Tables are never squeezed to the terminal's width (rich would cut the NAME column first): one
# row per line, as kubectl prints them, which also keeps them greppable when piped.
out = Console(soft_wrap=True, width=10_000)
err = Console(stderr=True, soft_wrap=True)

EXIT_INVALID = 2


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


@dataclass
class CliContext:
    """What the global options said; settings are loaded on first use, once."""

    config: Path | None
    overrides: dict[str, Any] = field(default_factory=dict)
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config, self.overrides)
            except ConfigError as exc:
                fail(str(exc), EXIT_INVALID)
            from controller import logs

            logs.configure(self._settings.logging.level, self._settings.logging.format)
        return self._settings

    def database(self) -> dbmod.Database:
        return dbmod.connect(self.settings.database_url)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    raise typer.Exit(code)


@contextmanager
def handled() -> Iterator[None]:
    """Turn expected errors into a clear message and exit code instead of a traceback."""
    try:
        yield
    except (SpecError, ConfigError) as exc:
        fail(str(exc), EXIT_INVALID)
    except LeasectlError as exc:
        fail(str(exc))
    except (sa.exc.IntegrityError, sa.exc.DataError) as exc:
        fail(f"the database refused the change: {exc.orig}", EXIT_INVALID)
    except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
        detail = str(exc.orig)
        if "no such table" in detail or "does not exist" in detail:
            detail += " (is the schema there? run `leasectl db upgrade`)"
        fail(f"database error: {detail}")


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
        typer.Option("--config", "-c", help="Settings file (default: $LEASECTL_CONFIG or ./leasectl.yaml)."),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="SQLAlchemy URL of the database.")
    ] = None,
    instance: Annotated[str | None, typer.Option("--instance", help="Controller instance name.")] = None,
    api_url: Annotated[str | None, typer.Option("--api-url", help="Daytona API URL.")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR.")] = None,
    log_format: Annotated[str | None, typer.Option("--log-format", help="text or json.")] = None,
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
    ctx.obj = CliContext(config=config, overrides=overrides)


def _ctx(ctx: typer.Context) -> CliContext:
    obj = ctx.find_root().obj
    assert isinstance(obj, CliContext)
    return obj


# -- db ------------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or migrate the schema to the newest revision (safe to run again)."""
    cli = _ctx(ctx)
    with handled():
        database = cli.database()
        dbmod.upgrade(database)
        out.print(f"database {database.url} at revision {dbmod.current_revision(database)}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Show the schema revision of the database and the newest one known."""
    cli = _ctx(ctx)
    with handled():
        database = cli.database()
        out.print(f"current: {dbmod.current_revision(database)}  head: {dbmod.head_revision()}")


# -- leases --------------------------------------------------------------------------------------


@app.command()
def apply(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Option("--file", "-f", help="Lease YAML file ('-' for stdin).")],
    prune: Annotated[
        bool, typer.Option("--prune", help="Set leases missing from the files to desired state 'absent'.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; write nothing.")
    ] = False,
) -> None:
    """Sync lease files into the database in one transaction."""
    cli = _ctx(ctx)
    with handled():
        specs = load_lease_files(files)
        result = apply_specs(cli.database(), specs, prune=prune, dry_run=dry_run)
    suffix = " (dry run: nothing written)" if dry_run else ""
    for label, names in (
        ("created", result.created),
        ("updated", result.updated),
        ("unchanged", result.unchanged),
        ("pruned", result.pruned),
    ):
        for name in names:
            out.print(f"lease/{name} {label}", highlight=False)
    out.print(
        f"{len(result.created)} created, {len(result.updated)} updated, "
        f"{len(result.unchanged)} unchanged, {len(result.pruned)} pruned{suffix}",
        highlight=False,
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


GET_COLUMNS = ("name", "desired_state", "phase", "observed_state", "sandbox_id", "message")


@app.command()
def get(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Lease names (default: all).")] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """Show desired and observed state of leases."""
    cli = _ctx(ctx)
    with handled(), cli.database().session(readonly=True) as session:
        rows = overview(session, names or ())
    missing = sorted(set(names or ()) - {r["name"] for r in rows})
    if output is OutputFormat.table:
        table = Table(box=None, pad_edge=False)
        for col in ("NAME", "DESIRED", "PHASE", "OBSERVED", "SANDBOX", "MESSAGE"):
            table.add_column(col, no_wrap=True)
        for r in rows:
            desired = r["desired_state"] + (" (paused)" if r["paused"] else "")
            table.add_row(
                r["name"],
                desired,
                r["phase"],
                r["observed_state"] or "-",
                r["sandbox_id"] or "-",
                r["message"] or "",
            )
        out.print(table)
    else:
        data = [{k: _jsonable(v) for k, v in r.items()} for r in rows]
        if output is OutputFormat.json:
            sys.stdout.write(json.dumps(data, indent=2) + "\n")
        else:
            sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    if missing:
        fail(f"no such lease: {', '.join(missing)}", EXIT_INVALID)


@app.command()
def export(
    ctx: typer.Context,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to FILE (default stdout).")
    ] = None,
    names: Annotated[list[str] | None, typer.Argument(help="Lease names (default: all).")] = None,
) -> None:
    """Print the leases as YAML that `apply` accepts."""
    cli = _ctx(ctx)
    with handled(), cli.database().session(readonly=True) as session:
        invalid: list[Any] = []
        text = dump_leases(read_specs(session, names or (), invalid=invalid))
    for bad in invalid:
        err.print(f"skipped lease {bad.name!r}: {bad.message}", highlight=False, markup=False)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        err.print(f"wrote {output}")


# -- reconcile, plan, events, doctor, run, local-daytona -----------------------------------------


def _reconciler(cli: CliContext, *, elector: Any = None) -> Any:
    from controller.providers import build_provider
    from controller.reconciler import build_reconciler

    settings = cli.settings
    return build_reconciler(cli.database(), build_provider(settings), settings, elector=elector)


@app.command()
def reconcile(
    ctx: typer.Context,
    once: Annotated[bool, typer.Option("--once", help="Run exactly one pass (required for now).")] = True,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """Run one reconcile pass now and print a summary; exit 1 if a lease ended in error.

    Takes the leader lease for the pass, so it never acts beside a running daemon of the same
    instance.
    """
    from controller.leader import LeaderElector
    from controller.reconciler import summarize

    cli = _ctx(ctx)
    if not once:
        fail("use `leasectl run` for continuous reconciliation", EXIT_INVALID)
    with handled():
        database = cli.database()
        c = cli.settings.controller
        elector = LeaderElector(database, c.instance, c.leader_lease_seconds)
        with elector.hold():
            result = _reconciler(cli, elector=elector).run_pass()
    summary = summarize(result)
    if output is OutputFormat.table:
        for outcome in result.outcomes:
            status = "ok" if outcome.ok else f"FAILED: {outcome.message}"
            out.print(f"{outcome.action.kind:<18} {outcome.action.lease_name:<30} {status}", highlight=False)
        for bad in result.invalid:
            out.print(f"{'skip':<18} {bad.name:<30} {bad.message}", highlight=False, markup=False)
        phases = ", ".join(f"{k}={v}" for k, v in sorted(summary["phases"].items()))
        out.print(
            f"pass {summary['pass_id']}: {summary['leases']} leases, {summary['actions']} actions, "
            f"{summary['failed']} failed in {summary['seconds']}s ({phases})",
            highlight=False,
        )
    else:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    if (
        result.errors
        or result.invalid
        or any(d.phase in ("Error", "Failed") for d in result.plan.decisions.values())
    ):
        raise typer.Exit(1)


@app.command()
def plan(
    ctx: typer.Context,
    detailed_exitcode: Annotated[
        bool, typer.Option("--detailed-exitcode", help="Exit 0: no changes, 2: changes, 1: error.")
    ] = False,
) -> None:
    """Show the actions a pass would take, taking none."""
    cli = _ctx(ctx)
    try:
        the_plan, _, _, invalid = _reconciler(cli).observe_and_plan()
    except (SpecError, ConfigError) as exc:
        fail(str(exc), EXIT_INVALID)
    except (LeasectlError, sa.exc.SQLAlchemyError) as exc:
        fail(str(exc), 1)
    table = Table(box=None, pad_edge=False)
    for col in ("ACTION", "LEASE", "SANDBOX", "REASON"):
        table.add_column(col, overflow="fold")
    for action in the_plan.actions:
        table.add_row(
            action.kind, action.lease_name, action.sandbox_id or action.sandbox_name or "-", action.reason
        )
    for bad in invalid:
        table.add_row("skip", bad.name, "-", bad.message)
    if the_plan.actions or invalid:
        out.print(table)
    out.print(
        f"{len(the_plan.actions)} action(s) planned for {len(the_plan.decisions)} lease(s)", highlight=False
    )
    if detailed_exitcode and the_plan.actions:
        raise typer.Exit(2)


@app.command()
def events(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this lease.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Newest N events.")] = 50,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """Show the event history, newest last."""
    from models import Event

    cli = _ctx(ctx)
    with handled(), cli.database().session(readonly=True) as session:
        query = sa.select(Event).order_by(Event.id.desc()).limit(limit)
        if name:
            query = query.where(Event.lease_name == name)
        rows = list(reversed(session.scalars(query).all()))
    data: list[dict[str, str | None]] = [
        {
            "at": r.at.isoformat(),
            "lease": r.lease_name,
            "sandbox_id": r.sandbox_id,
            "action": r.action,
            "outcome": r.outcome,
            "message": r.message,
            "pass_id": r.pass_id,
        }
        for r in rows
    ]
    if output is OutputFormat.table:
        table = Table(box=None, pad_edge=False)
        for col in ("TIME", "LEASE", "ACTION", "OUTCOME", "MESSAGE"):
            table.add_column(col, no_wrap=True)
        for d in data:
            table.add_row(str(d["at"])[:19], d["lease"] or "-", d["action"], d["outcome"], d["message"] or "")
        out.print(table)
    elif output is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


@app.command()
def run(ctx: typer.Context) -> None:
    """Run the controller daemon in the foreground (reconcile, GC, executions, health/metrics)."""
    from controller.daemon import Daemon
    from controller.metrics import Metrics
    from controller.providers import build_provider

    cli = _ctx(ctx)
    with handled():
        settings = cli.settings
        database = cli.database()
        if not dbmod.schema_is_current(database):
            fail("the database schema is not current: run `leasectl db upgrade`", EXIT_INVALID)
        metrics = Metrics()
        provider = build_provider(settings, on_request=metrics.record_request)
        code = Daemon(settings, database, provider, metrics=metrics).run()
    raise typer.Exit(code)


# -- executions: exec, executions, exec-worker (controller/execution.py) ---------------------------


def _parse_env_options(items: list[str] | None) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep:
            # Never echo the item: it may be a secret given without its name.
            fail("every --env must be NAME=VALUE (one had no '=')", EXIT_INVALID)
        env[key] = value
    return env


def _write_raw(text: str) -> None:
    """Print command output as received: no markup, no added newline."""
    try:
        data = text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        data = text.encode("utf-8", errors="replace")
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        buffer.write(data)
        buffer.flush()
    else:
        sys.stdout.write(data.decode("utf-8", errors="replace"))
        sys.stdout.flush()


def _report_outcome(execution_id: int, outcome: Any) -> NoReturn:
    from controller.execution import EXIT_TIMED_OUT

    _write_raw(outcome.output)
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

    cli = _ctx(ctx)
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

    cli = _ctx(ctx)
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
            "created_at": _jsonable(r.created_at),
            "started_at": _jsonable(r.started_at),
            "finished_at": _jsonable(r.finished_at),
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

    cli = _ctx(ctx)
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


# -- end of executions ---------------------------------------------------------------------------


# -- doctor --------------------------------------------------------------------------------------


@app.command()
def doctor(
    ctx: typer.Context,
    probe: Annotated[
        bool, typer.Option("--probe", help="Also create, exec in and delete a throwaway sandbox.")
    ] = False,
) -> None:
    """Check settings, database and schema, Daytona credentials and reachability."""
    import time
    import uuid

    from controller.config import redacted
    from controller.providers import build_provider
    from controller.providers.base import LABEL_INSTANCE, CreateRequest

    cli = _ctx(ctx)
    settings = cli.settings
    problems = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        mark = "[green]ok[/]  " if ok else "[red]FAIL[/]"
        out.print(f"{mark} {what}: {detail}", highlight=False)

    out.print("settings (secrets masked):", highlight=False)
    sys.stdout.write(yaml.safe_dump(redacted(settings), sort_keys=False))

    try:
        database = cli.database()
        current, head = dbmod.current_revision(database), dbmod.head_revision()
        report(True, "database", database.url)
        report(
            current == head,
            "schema",
            f"at {current}, newest {head}" + ("" if current == head else " (run `leasectl db upgrade`)"),
        )
    except sa.exc.SQLAlchemyError as exc:
        report(False, "database", str(exc.orig if hasattr(exc, "orig") else exc).splitlines()[0])

    try:
        provider = build_provider(settings)
        report(True, "credentials", "API key set")
    except ConfigError as exc:
        report(False, "credentials", str(exc))
        raise typer.Exit(1) from None
    instance = settings.controller.instance
    try:
        started = time.monotonic()
        mine = provider.list_sandboxes({LABEL_INSTANCE: instance})
        report(
            True,
            "Daytona API",
            f"{settings.daytona.api_url} answered in "
            f"{time.monotonic() - started:.2f}s; {len(mine)} sandbox(es) of instance {instance!r}",
        )
    except LeasectlError as exc:
        report(False, "Daytona API", f"{settings.daytona.api_url}: {exc}")
        raise typer.Exit(1) from None

    if probe:
        name = f"leasectl-doctor-{uuid.uuid4().hex[:8]}"
        labels = {LABEL_INSTANCE: f"{instance}-doctor"}  # never this instance's: GC must not see it
        sandbox_id: str | None = None
        try:
            sandbox = provider.create(CreateRequest(name=name, labels=labels))
            sandbox_id = sandbox.id
            deadline = time.monotonic() + settings.controller.action_timeout_seconds
            while sandbox.state != "started" and time.monotonic() < deadline:
                if sandbox.state in ("error", "build_failed"):
                    raise LeasectlError(f"probe sandbox fell into {sandbox.state}: {sandbox.error_reason}")
                time.sleep(1)
                sandbox = provider.get(sandbox_id) or sandbox
            result = provider.exec(sandbox_id, "echo leasectl-probe-ok", timeout=60)
            ok = result.exit_code == 0 and "leasectl-probe-ok" in result.output
            report(ok, "probe", f"created {name}, exec exit {result.exit_code}")
        except LeasectlError as exc:
            report(False, "probe", str(exc))
        finally:
            if sandbox_id is not None:
                try:
                    provider.delete(sandbox_id)
                    report(True, "probe cleanup", f"deleted {name}")
                except LeasectlError as exc:
                    report(False, "probe cleanup", f"{name} ({sandbox_id}) NOT deleted: {exc}")
    if problems:
        raise typer.Exit(1)


# -- local Daytona API (controller/emulator) ------------------------------------------------------


def _register_local_daytona() -> None:
    from controller.emulator.cli import local_daytona

    app.command(
        "local-daytona",
        help="Serve a local Daytona-compatible API (development and tests; not an isolation boundary).",
    )(local_daytona)


_register_local_daytona()


# -- gc: orphaned sandboxes, stale rows, retention (controller/gc.py) ----------------------------


def _gc_age(seconds: float) -> str:
    if seconds < 0:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@app.command("gc")
def gc_command(
    ctx: typer.Context,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be deleted; change nothing.")
    ] = False,
    grace: Annotated[
        float | None,
        typer.Option(
            "--grace", min=0, help="Orphan grace in seconds (default: controller.orphan_grace_seconds)."
        ),
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """Delete this instance's orphaned sandboxes (after the grace), stale status rows and old history.

    Only sandboxes labelled with this controller's instance are ever looked at. Takes the leader
    lease unless --dry-run, so it never acts beside a running daemon of the same instance. Exit 1 if
    a deletion failed.
    """
    from controller.gc import GcResult, Orphan, collect_garbage
    from controller.leader import LeaderElector
    from controller.providers import build_provider

    cli = _ctx(ctx)
    with handled():
        settings = cli.settings
        database = cli.database()
        provider = build_provider(settings)
        if dry_run:
            result: GcResult = collect_garbage(
                database, provider, settings, dry_run=True, grace_seconds=grace
            )
        else:
            c = settings.controller
            elector = LeaderElector(database, c.instance, c.leader_lease_seconds)
            with elector.hold():
                result = collect_garbage(
                    database, provider, settings, dry_run=False, grace_seconds=grace, elector=elector
                )
    deleted = {o.sandbox.id for o in result.deleted}
    failed = {d.orphan.sandbox.id: d.error or "" for d in result.failed}
    skipped = {o.sandbox.id for o in result.skipped}

    def status(orphan: Orphan) -> str:
        sid = orphan.sandbox.id
        if orphan.status == "in_grace":
            return f"in grace ({_gc_age(orphan.remaining_seconds)} left)"
        if orphan.status == "deleting":
            return "being deleted"
        if result.dry_run:
            return "would delete"
        if sid in deleted:
            return "deleted"
        if sid in failed:
            return f"FAILED: {failed[sid]}"
        if sid in skipped:
            return "skipped (rate limited)"
        return "kept (wanted again)"

    counts = result.cleanup
    rows = [
        {
            "sandbox_id": o.sandbox.id,
            "name": o.sandbox.name,
            "lease_label": o.lease_label,
            "state": o.sandbox.state,
            "orphaned_seconds": round(o.orphaned_seconds, 1),
            "status": status(o),
            "reason": o.reason,
        }
        for o in result.report.orphans
    ]
    if output is OutputFormat.table:
        if rows:
            table = Table(box=None, pad_edge=False)
            for col in ("SANDBOX", "NAME", "LEASE", "AGE", "STATUS", "WHY"):
                table.add_column(col, overflow="fold")
            for o, r in zip(result.report.orphans, rows, strict=True):
                table.add_row(
                    o.sandbox.id,
                    o.sandbox.name,
                    o.lease_label or "-",
                    _gc_age(o.orphaned_seconds),
                    str(r["status"]),
                    o.reason,
                )
            out.print(table, markup=False, highlight=False)
        verb = "would remove" if result.dry_run else "removed"
        if result.dry_run:
            head = f"{len(result.would_delete)} orphan(s) would be deleted"
        else:
            head = f"{len(result.deleted)} orphan(s) deleted, {len(result.failed)} failed"
        out.print(
            f"{head}, {len(result.report.in_grace)} in grace (grace {result.grace_seconds:g}s); "
            f"{verb} {counts.stale_status_rows} stale status row(s), {counts.purged_leases} purged "
            f"lease(s), {counts.events} event(s), {counts.executions} execution(s)"
            + (" (dry run: nothing changed)" if result.dry_run else ""),
            highlight=False,
        )
    else:
        data = {
            "run_id": result.run_id,
            "dry_run": result.dry_run,
            "grace_seconds": result.grace_seconds,
            "orphans": rows,
            "cleanup": {
                "stale_status_rows": counts.stale_status_rows,
                "purged_leases": counts.purged_leases,
                "events": counts.events,
                "executions": counts.executions,
            },
        }
        if output is OutputFormat.json:
            sys.stdout.write(json.dumps(data, indent=2) + "\n")
        else:
            sys.stdout.write(yaml.safe_dump(data, sort_keys=False))
    if result.failed:
        raise typer.Exit(1)


# -- end of gc -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    app(args=list(argv) if argv is not None else None, prog_name="leasectl")


if __name__ == "__main__":
    main()
