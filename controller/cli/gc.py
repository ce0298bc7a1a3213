"""``leasectl gc``: orphaned sandboxes, stale rows and retention (controller/gc.py)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from controller.cli.base import app, context_of
from controller.cli.output import OutputFormat, handled, out, yaml_dump


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
            "--grace",
            metavar="SECONDS",
            min=0,
            help="Orphan grace in seconds (default: controller.orphan_grace_seconds).",
        ),
    ] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o", metavar="FORMAT")] = OutputFormat.table,
) -> None:
    """Delete this instance's orphaned sandboxes (after the grace), stale status rows and old history.

    Only sandboxes labelled with this controller's instance are ever looked at. Takes the leader
    lease unless --dry-run, so it never acts beside a running daemon of the same instance. Exit 1 if
    a deletion failed.
    """
    from controller.gc import GcResult, Orphan, collect_garbage
    from controller.leader import LeaderElector
    from controller.providers import build_provider

    cli = context_of(ctx)
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
            from rich.table import Table

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
            sys.stdout.write(yaml_dump(data))
    if result.failed:
        raise typer.Exit(1)
