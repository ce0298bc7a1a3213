"""``quotas`` and ``usage``: policy as the operator reads it (controller/quota_rows.py, usage.py)."""

from __future__ import annotations

import csv
import json
import sys
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer

from controller.cli.base import app, context_of
from controller.cli.output import EXIT_INVALID, OutputFormat, fail, handled, out, yaml_dump


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]
        out.print(line.rstrip(), markup=False, highlight=False)


def _emit(data: Any, output: OutputFormat) -> None:
    if output is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml_dump(data))


@app.command("quotas")
def quotas_command(
    ctx: typer.Context,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", metavar="FORMAT", help="table, json or yaml.")
    ] = OutputFormat.table,
) -> None:
    """Show each quota's use against its limits (use/limit), per scope, from what the last pass saw.

    A quota on a label no lease carries is allowed and listed with the note 'matches no lease'."""
    from controller.quota_rows import quota_report
    from controller.quotas import DIMENSIONS

    cli = context_of(ctx)
    with handled(), cli.database().session(readonly=True) as session:
        lines = quota_report(session)
    data: list[dict[str, Any]] = [
        {
            "quota": line.quota,
            "scope": line.scope,
            "leases": line.leases,
            "blocked": line.blocked,
            "limits": line.limits,
            "use": line.use,
            "note": line.note,
        }
        for line in lines
    ]
    if output is not OutputFormat.table:
        _emit(data, output)
        return
    headers = ("QUOTA", "SCOPE", "LEASES", "BLOCKED", *(d.upper() for d in DIMENSIONS), "NOTE")
    rows: list[tuple[str, ...]] = [headers]
    for d in data:
        cells = [
            f"{d['use'][dim]}/{'-' if d['limits'][dim] is None else d['limits'][dim]}" for dim in DIMENSIONS
        ]
        rows.append((d["quota"], d["scope"], str(d["leases"]), str(d["blocked"]), *cells, d["note"]))
    if not data:
        out.print("no quotas (add a `quotas:` list to a lease file and apply it)", highlight=False)
        return
    _table(rows)


class UsageFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def _time(option: str, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        fail(
            f"{option}: not an ISO 8601 time or date: {text!r} (e.g. 2026-11-01 or 2026-11-01T09:00Z)",
            EXIT_INVALID,
        )
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@app.command("usage")
def usage_command(
    ctx: typer.Context,
    by: Annotated[
        str | None,
        typer.Option("--by", metavar="LABEL", help="Group by this label's value (default: per lease)."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", metavar="TIME", help="From TIME (ISO 8601; a date is midnight UTC)."),
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", metavar="TIME", help="Up to TIME (default: now).")
    ] = None,
    output: Annotated[
        UsageFormat, typer.Option("--output", "-o", metavar="FORMAT", help="table, json or csv.")
    ] = UsageFormat.table,
) -> None:
    """Report sandbox-hours, CPU-hours and GiB-hours of memory and disk from what was observed.

    With policy.prices in the settings, an estimated cost too. Times without a zone are UTC."""
    from controller.usage import load_segments, report

    cli = context_of(ctx)
    start, end = _time("--since", since), _time("--until", until)
    prices = cli.settings.policy.prices
    with handled(), cli.database().session(readonly=True) as session:
        segments = load_segments(session, start, end)
    lines = report(
        segments,
        by=by,
        since=start,
        until=end,
        prices=prices.model_dump(exclude={"currency"}) if prices is not None else None,
    )
    data = [line.as_dict() for line in lines]
    currency = prices.currency if prices is not None else None
    if output is UsageFormat.json:
        sys.stdout.write(
            json.dumps({"by": by or "lease", "currency": currency, "lines": data}, indent=2) + "\n"
        )
        return
    columns = ["group", "sandbox_hours", "cpu_hours", "memory_gib_hours", "disk_gib_hours", "gpu_hours"]
    if prices is not None:
        columns.append("cost")
    if output is UsageFormat.csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow([by or "lease", *columns[1:]])
        for d in data:
            writer.writerow([d[c] for c in columns])
        return
    headers = (
        (by or "lease").upper(),
        "SANDBOX-H",
        "CPU-H",
        "MEM-GIB-H",
        "DISK-GIB-H",
        "GPU-H",
        *([f"COST ({currency})"] if prices is not None else []),
        "",
    )
    rows: list[tuple[str, ...]] = [headers]
    for d in data:
        rows.append((str(d["group"]), *(f"{d[c]:.2f}" for c in columns[1:]), ""))
    _table(rows)
