"""``apply``, ``get``, ``export`` and ``events``: the operator's view of leases (controller/leases.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
import typer
import yaml
from rich.table import Table

from controller.cli.base import app, context_of
from controller.cli.output import EXIT_INVALID, OutputFormat, err, fail, handled, jsonable, out
from controller.leases import apply_specs, overview, read_specs
from controller.specs import dump_leases, load_lease_files


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
    cli = context_of(ctx)
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


GET_COLUMNS = ("name", "desired_state", "phase", "observed_state", "sandbox_id", "message")


@app.command()
def get(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Lease names (default: all).")] = None,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """Show desired and observed state of leases."""
    cli = context_of(ctx)
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
        data = [{k: jsonable(v) for k, v in r.items()} for r in rows]
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
    cli = context_of(ctx)
    with handled(), cli.database().session(readonly=True) as session:
        text = dump_leases(read_specs(session, names or ()))
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        err.print(f"wrote {output}")


@app.command()
def events(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this lease.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="Newest N events.")] = 50,
    output: Annotated[OutputFormat, typer.Option("--output", "-o")] = OutputFormat.table,
) -> None:
    """Show the event history, newest last."""
    from models import Event

    cli = context_of(ctx)
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
