"""``apply``, ``get``, ``export`` and ``events``: the operator's view of leases (controller/leases.py;
``get`` reads controller/overview.py, ``events`` controller/history.py)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from zoneinfo import ZoneInfo

import typer

from controller import exitcodes
from controller.cli.base import CliContext, app, context_of
from controller.cli.output import EXIT_INVALID, OutputFormat, err, fail, handled, jsonable, out, yaml_dump

if TYPE_CHECKING:
    from controller.dbapi import Reader


@app.command()
def apply(
    ctx: typer.Context,
    files: Annotated[
        list[Path], typer.Option("--file", "-f", metavar="FILE", help="Lease YAML file ('-' for stdin).")
    ],
    prune: Annotated[
        bool, typer.Option("--prune", help="Set leases missing from the files to desired state 'absent'.")
    ] = False,
    prune_all: Annotated[
        bool,
        typer.Option(
            "--prune-all",
            help="With --prune: allow pruning all leases, or more than controller.max_prune_share.",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; write nothing.")
    ] = False,
) -> None:
    """Sync lease files into the database in one transaction.

    --prune refuses (exit 2, nothing written) to set all live leases, or more than
    controller.max_prune_share of them, absent unless --prune-all is given.
    """
    from controller.leases import apply_specs
    from controller.specs import load_manifest

    cli = context_of(ctx)
    if prune_all and not prune:
        fail("--prune-all only makes sense with --prune", EXIT_INVALID)
    with handled():
        manifest = load_manifest(files)
        result = apply_specs(
            cli.database(),
            manifest.leases,
            pools=manifest.pools,
            volumes=manifest.volumes,
            quotas=manifest.quotas,
            prune=prune,
            dry_run=dry_run,
            prune_all=prune_all,
            max_prune_share=cli.settings.controller.max_prune_share,
        )
    suffix = " (dry run: nothing written)" if dry_run else ""
    for label, names in (
        ("created", result.created),
        ("updated", result.updated),
        ("unchanged", result.unchanged),
        ("pruned", result.pruned),
    ):
        for name in names:
            out.print(f"lease/{name} {label}", highlight=False)
    for label, names in (
        ("created", result.pools_created),
        ("updated", result.pools_updated),
        ("unchanged", result.pools_unchanged),
        ("pruned", result.pools_pruned),
    ):
        for name in names:
            out.print(f"pool/{name} {label}", highlight=False)
    for label, names in (
        ("created", result.volumes_created),
        ("updated", result.volumes_updated),
        ("unchanged", result.volumes_unchanged),
    ):
        for name in names:
            out.print(f"volume/{name} {label}", highlight=False)
    q = result.quotas
    for label, names in (
        ("created", q.created),
        ("updated", q.updated),
        ("unchanged", q.unchanged),
        ("pruned", q.pruned),
    ):
        for name in names:
            out.print(f"quota/{name} {label}", highlight=False, markup=False)
    out.print(
        f"{len(result.created)} created, {len(result.updated)} updated, "
        f"{len(result.unchanged)} unchanged, {len(result.pruned)} pruned{suffix}",
        highlight=False,
    )


GET_COLUMNS = ("name", "desired_state", "phase", "observed_state", "sandbox_id", "message")
GET_HEADERS = ("NAME", "DESIRED", "PHASE", "OBSERVED", "SANDBOX", "MESSAGE")
EVENT_HEADERS = ("TIME", "LEASE", "ACTION", "OUTCOME", "MESSAGE")


def _desired(r: dict[str, Any]) -> str:
    """``running``, or with a schedule ``stopped (schedule; running at 2026-11-30 09:00 CET)``."""
    state = r.get("scheduled_state")
    if state is None:
        return str(r["desired_state"])
    change = r.get("next_change")
    if change is None:
        return f"{state} (schedule)"
    local = change.astimezone(ZoneInfo(r["schedule_timezone"]))
    return f"{state} (schedule; {r['next_state']} at {local:%Y-%m-%d %H:%M %Z})"


def _lease_cells(r: dict[str, Any]) -> tuple[str, ...]:
    desired = _desired(r) + (" (paused)" if r["paused"] else "")
    return (
        r["name"],
        desired,
        r["phase"],
        r["observed_state"] or "-",
        r["sandbox_id"] or "-",
        r["message"] or "",
    )


class _Columns:
    """Plain aligned columns (two spaces apart, never cut), widened as longer values arrive; the
    watch modes print rows one at a time under the header, as `kubectl get -w` does."""

    def __init__(self, headers: Sequence[str]) -> None:
        self.widths = [len(h) for h in headers]
        self.headers = tuple(headers)

    def fit(self, rows: Iterable[Sequence[str]]) -> None:
        for row in rows:
            self.widths = [max(w, len(c)) for w, c in zip(self.widths, row, strict=True)]

    def line(self, cells: Sequence[str]) -> str:
        *head, last = cells
        return "  ".join([c.ljust(w) for c, w in zip(head, self.widths, strict=False)] + [last]).rstrip()

    def print(self, cells: Sequence[str]) -> None:
        sys.stdout.write(self.line(cells) + "\n")  # plain text: no rich console needed
        sys.stdout.flush()


def _emit(data: Any, output: OutputFormat, *, stream: bool = False) -> None:
    """JSON (one object per line when streaming) or YAML (documents) of rows."""
    if output is OutputFormat.json:
        sys.stdout.write((json.dumps(data) if stream else json.dumps(data, indent=2)) + "\n")
    else:
        sys.stdout.write(("---\n" if stream else "") + yaml_dump(data))
    sys.stdout.flush()


@app.command()
def get(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Lease names (default: all).")] = None,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", metavar="FORMAT", help="table, json or yaml.")
    ] = OutputFormat.table,
    watch: Annotated[
        bool,
        typer.Option("--watch", "-w", help="After the table, print each lease again when it changes."),
    ] = False,
    interval: Annotated[
        float,
        typer.Option(
            "--interval", metavar="SECONDS", min=0.05, help="Seconds between looks in --watch mode."
        ),
    ] = 1.0,
) -> None:
    """Show desired and observed state of leases (-w: keep watching; Ctrl-C ends it, exit 0)."""
    cli = context_of(ctx)
    with handled(), cli.reader() as read:  # one connection, kept while watching
        _get(cli, read, names or (), output, watch, interval)


def _get(
    cli: CliContext, read: Reader, names: Sequence[str], output: OutputFormat, watch: bool, interval: float
) -> None:
    from controller.overview import overview_rows

    rows = overview_rows(read, names)
    if output is not OutputFormat.table:  # json/yaml also show the spec (env values never)
        from controller.leases import shown_specs

        database = cli.database()
        try:
            with database.session(readonly=True) as session:
                specs = shown_specs(session, names)
        finally:
            database.dispose()
        rows = [{**r, "spec": specs.get(r["name"])} for r in rows]
    missing = sorted(set(names) - {r["name"] for r in rows})
    if missing and watch:
        fail(f"no such lease: {', '.join(missing)}", EXIT_INVALID)
    columns = _Columns(GET_HEADERS)
    if output is OutputFormat.table:
        table = [_lease_cells(r) for r in rows]
        columns.fit(table)
        for line in (GET_HEADERS, *table):
            columns.print(line)
    else:
        _emit([{k: jsonable(v) for k, v in r.items()} for r in rows], output)
    if missing:
        fail(f"no such lease: {', '.join(missing)}", EXIT_INVALID)
    if not watch:
        return
    seen = {r["name"]: _lease_cells(r) for r in rows}
    try:
        while True:
            time.sleep(interval)
            current = overview_rows(read, names)
            for r in current:
                cells = _lease_cells(r)
                if seen.get(r["name"]) == cells:
                    continue
                seen[r["name"]] = cells
                if output is OutputFormat.table:
                    columns.print(cells)
                else:
                    _emit({k: jsonable(v) for k, v in r.items()}, output, stream=True)
            for gone in sorted(set(seen) - {r["name"] for r in current}):
                del seen[gone]
                if output is OutputFormat.table:
                    columns.print((gone, "(deleted)", "", "", "", "the lease row was deleted"))
                else:
                    _emit({"name": gone, "deleted": True}, output, stream=True)
    except KeyboardInterrupt:
        raise typer.Exit(exitcodes.OK) from None


@app.command()
def export(
    ctx: typer.Context,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", metavar="FILE", help="Write to FILE (default stdout).")
    ] = None,
    names: Annotated[list[str] | None, typer.Argument(help="Lease names (default: all).")] = None,
) -> None:
    """Print the leases and pools as YAML that `apply` accepts (pool members belong to their pool)."""
    from controller.leases import read_pools, read_specs, read_volumes
    from controller.quota_rows import read_quota_specs
    from controller.specs import dump_leases

    cli = context_of(ctx)
    with handled(), cli.database().session(readonly=True) as session:
        invalid: list[Any] = []
        text = dump_leases(
            read_specs(session, names or (), invalid=invalid),
            read_pools(session) if not names else (),
            read_volumes(session) if not names else (),
            quotas=read_quota_specs(session) if not names else (),
        )
    for bad in invalid:
        err.print(f"skipped lease {bad.name!r}: {bad.message}", highlight=False, markup=False)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        err.print(f"wrote {output}")


def _event_cells(d: dict[str, str | None]) -> tuple[str, ...]:
    return (str(d["at"])[:19], d["lease"] or "-", d["action"] or "", d["outcome"] or "", d["message"] or "")


@app.command()
def rollout(
    ctx: typer.Context,
    names: Annotated[list[str], typer.Argument(metavar="LEASE...", help="Leases whose sandbox to replace.")],
) -> None:
    """Replace the sandboxes of these leases on demand (e.g. after rotating a referenced secret).

    Sets `rollout_requested_at` (operators may set it with SQL too); the controller then replaces
    each sandbox created before that time, delete-then-create, with the crash safety of a spec
    change. An unknown lease is an error (exit 2) and nothing is changed.
    """
    from controller.leases import request_rollout

    cli = context_of(ctx)
    with handled():
        missing = request_rollout(cli.database(), names)
    if missing:
        fail(f"no such lease: {', '.join(missing)} (nothing changed)", EXIT_INVALID)
    out.print(f"rollout requested for {', '.join(names)}; the next pass replaces their sandboxes")


@app.command()
def events(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="Only this lease.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", metavar="N", min=1, help="Newest N events.")] = 50,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", metavar="FORMAT", help="table, json or yaml.")
    ] = OutputFormat.table,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing events as they are written.")
    ] = False,
    interval: Annotated[
        float,
        typer.Option(
            "--interval", metavar="SECONDS", min=0.05, help="Seconds between looks in --follow mode."
        ),
    ] = 1.0,
) -> None:
    """Show the event history, newest last (-f: follow; Ctrl-C ends it, exit 0).

    A lease that does not exist and has no events is an error (exit 2), as for `get`.
    """
    cli = context_of(ctx)
    with handled(), cli.reader() as read:  # one connection, kept while following
        _events(read, name or None, limit, output, follow, interval)


def _events(
    read: Reader, name: str | None, limit: int, output: OutputFormat, follow: bool, interval: float
) -> None:
    from controller import history

    rows = history.recent_events(read, limit, name)
    if name and not rows and not history.lease_exists(read, name):
        fail(f"no such lease: {name} (and no events name it)", EXIT_INVALID)
    last_id = rows[-1]["id"] if rows else history.last_event_id(read)
    data = [history.event_data(r) for r in rows]
    columns = _Columns(EVENT_HEADERS)
    if output is OutputFormat.table:
        table = [_event_cells(d) for d in data]
        columns.fit(table)
        for line in (EVENT_HEADERS, *table):
            columns.print(line)
    elif follow:
        for d in data:
            _emit(d, output, stream=True)
    else:
        _emit(data, output)
    if not follow:
        return
    try:
        while True:
            time.sleep(interval)
            for r in history.events_after(read, last_id, name):
                last_id = max(last_id, r["id"])
                d = history.event_data(r)
                if output is OutputFormat.table:
                    columns.print(_event_cells(d))
                else:
                    _emit(d, output, stream=True)
    except KeyboardInterrupt:
        raise typer.Exit(exitcodes.OK) from None
