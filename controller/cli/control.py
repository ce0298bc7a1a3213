"""``reconcile``, ``plan``, ``run``, ``doctor`` and ``local-daytona``: driving the controller."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from controller import exitcodes
from controller.cli.base import CliContext, app, context_of
from controller.cli.output import (
    EXIT_INVALID,
    OutputFormat,
    UnusableDatabaseError,
    fail,
    first_line,
    handled,
    out,
    yaml_dump,
)
from controller.errors import AUTH_HINT, AuthError, ConfigError, LeasectlError


def _reconciler(cli: CliContext, *, elector: Any = None) -> Any:
    from controller.providers import build_provider
    from controller.reconciler import build_reconciler

    settings = cli.settings
    return build_reconciler(cli.database(), build_provider(settings), settings, elector=elector)


@app.command()
def reconcile(
    ctx: typer.Context,
    once: Annotated[
        bool,
        typer.Option(
            "--once/--loop",
            help="One pass, then exit (the default). For a loop run the daemon: `leasectl run`.",
        ),
    ] = True,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", metavar="FORMAT")] = OutputFormat.table,
) -> None:
    """Run one reconcile pass now and print a summary; exit 1 if a lease ended in error.

    Takes the leader lease for the pass, so it never acts beside a running daemon of the same
    instance: while a daemon leads it, exit 3 and change nothing (`leasectl plan` still works).
    """
    from controller.leader import LeaderElector
    from controller.reconciler import summarize

    cli = context_of(ctx)
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
        raise typer.Exit(exitcodes.FAILURE)


@app.command()
def plan(
    ctx: typer.Context,
    detailed_exitcode: Annotated[
        bool,
        typer.Option("--detailed-exitcode", help="Exit 0: no changes, 2: changes, 1: any error."),
    ] = False,
    at: Annotated[
        str | None,
        typer.Option(
            "--at",
            metavar="TIME",
            help="Plan as of TIME (ISO 8601 with a zone, e.g. 2026-11-30T09:00+01:00): what schedules, "
            "expiries and back-offs say then, against the fleet as observed now.",
        ),
    ] = None,
) -> None:
    """Show the actions a pass would take, taking none (works beside a running daemon)."""
    cli = context_of(ctx)
    when = _parse_at(at) if at is not None else None
    try:
        with handled():
            the_plan, _, _, invalid = _reconciler(cli).observe_and_plan(when)
    except typer.Exit as exc:
        # With --detailed-exitcode, 2 means "changes": every error is 1, as with Terraform.
        if detailed_exitcode and exc.exit_code != exitcodes.OK:
            raise typer.Exit(exitcodes.FAILURE) from None
        raise

    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for col in ("ACTION", "LEASE", "SANDBOX", "REASON"):
        table.add_column(col, overflow="fold")
    for action in the_plan.actions:
        table.add_row(
            action.kind, action.lease_name, action.sandbox_id or action.sandbox_name or "-", action.reason
        )
    for name, decision in sorted(the_plan.decisions.items()):
        if decision.phase == "Blocked" and decision.action is None:
            table.add_row("wait", name, decision.sandbox_id or "-", decision.message)
    for bad in invalid:
        table.add_row("skip", bad.name, "-", bad.message)
    if table.row_count:
        out.print(table)
    as_of = f" as of {when.isoformat()}" if when is not None else ""
    out.print(
        f"{len(the_plan.actions)} action(s) planned for {len(the_plan.decisions)} lease(s){as_of}",
        highlight=False,
    )
    if detailed_exitcode and the_plan.actions:
        raise typer.Exit(exitcodes.PLAN_CHANGES)


def _parse_at(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        fail(f"--at: not an ISO 8601 time: {text!r} (e.g. 2026-11-30T09:00+01:00)", EXIT_INVALID)
    if when.tzinfo is None:
        fail(f"--at: {text!r} has no time zone (add Z or +01:00)", EXIT_INVALID)
    return when.astimezone(UTC)


@app.command()
def run(ctx: typer.Context) -> None:
    """Run the controller daemon in the foreground (reconcile, GC, executions, health/metrics)."""
    from controller import db as dbmod
    from controller.daemon import Daemon
    from controller.metrics import Metrics
    from controller.providers import build_provider

    cli = context_of(ctx)
    cli.long_running = True
    with handled():
        settings = cli.settings
        database = cli.database()
        dbmod.check_schema(database)
        metrics = Metrics()
        provider = build_provider(settings, on_request=metrics.record_request)
        code = Daemon(settings, database, provider, metrics=metrics).run()
    raise typer.Exit(code)


QUICKSTART_KEY_FILE = Path(".leasectl") / "api-key"


def _local_key_hint(api_url: str) -> str:
    """The absolute path of the quick start's key file, when the API is a local one and it exists."""
    host = (urlsplit(api_url).hostname or "").lower()
    if host not in ("127.0.0.1", "localhost", "::1") or not QUICKSTART_KEY_FILE.is_file():
        return ""
    return f" (here: {QUICKSTART_KEY_FILE.resolve()}; `. .leasectl/env` exports it)"


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

    import sqlalchemy as sa

    from controller import db as dbmod
    from controller.config import redacted
    from controller.providers import build_provider
    from controller.providers.base import LABEL_INSTANCE, CreateRequest

    cli = context_of(ctx)
    settings = cli.settings
    problems = 0

    def report(ok: bool, what: str, detail: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        mark = "[green]ok[/]  " if ok else "[red]FAIL[/]"
        out.print(f"{mark} {what}: {detail}", highlight=False)

    out.print("settings (secrets masked):", highlight=False)
    sys.stdout.write(yaml_dump(redacted(settings)))

    try:
        database = cli.database()
        current, head = dbmod.current_revision(database), dbmod.head_revision()
        report(True, "database", database.url)
        problem = dbmod.schema_state(database).problem()
        detail = f"at {current}, newest {head}"
        report(problem is None, "schema", f"{detail}: {problem}" if problem else detail)
    except UnusableDatabaseError as exc:
        report(False, "database", str(exc))
    except sa.exc.SQLAlchemyError as exc:
        detail = first_line(exc.orig if hasattr(exc, "orig") else exc)
        report(False, "database", f"{cli.describe_database()}: {detail}")

    try:
        provider = build_provider(settings)
        report(True, "credentials", "API key set")
    except ConfigError as exc:
        report(False, "credentials", f"{exc}{_local_key_hint(settings.daytona.api_url)}")
        raise typer.Exit(exitcodes.FAILURE) from None
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
        hint = f"; {AUTH_HINT}" if isinstance(exc, AuthError) else ""
        report(False, "Daytona API", f"{settings.daytona.api_url}: {exc}{hint}")
        raise typer.Exit(exitcodes.FAILURE) from None

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
        raise typer.Exit(exitcodes.FAILURE)


# -- local Daytona API (controller/emulator) ------------------------------------------------------


def _register_local_daytona() -> None:
    from controller.emulator.cli import local_daytona

    app.command(
        "local-daytona",
        help="Serve a local Daytona-compatible API (development and tests; not an isolation boundary).",
    )(local_daytona)


_register_local_daytona()
