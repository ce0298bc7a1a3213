"""``quotas`` and ``usage``: policy as the operator reads it (controller/quota_rows.py, usage.py)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer
import yaml

from controller.cli.base import app, context_of
from controller.cli.output import OutputFormat, handled, out
from controller.quota_rows import quota_report
from controller.quotas import DIMENSIONS

QUOTA_HEADERS = ("QUOTA", "SCOPE", "LEASES", "BLOCKED", *(d.upper() for d in DIMENSIONS), "NOTE")


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]
        out.print(line.rstrip(), markup=False, highlight=False)


def _emit(data: Any, output: OutputFormat) -> None:
    if output is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


@app.command("quotas")
def quotas_command(
    ctx: typer.Context,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", metavar="FORMAT", help="table, json or yaml.")
    ] = OutputFormat.table,
) -> None:
    """Show each quota's use against its limits (use/limit), per scope, from what the last pass saw.

    A quota on a label no lease carries is allowed and listed with the note 'matches no lease'."""
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
    rows: list[tuple[str, ...]] = [QUOTA_HEADERS]
    for d in data:
        cells = [
            f"{d['use'][dim]}/{'-' if d['limits'][dim] is None else d['limits'][dim]}" for dim in DIMENSIONS
        ]
        rows.append((d["quota"], d["scope"], str(d["leases"]), str(d["blocked"]), *cells, d["note"]))
    if not data:
        out.print("no quotas (add a `quotas:` list to a lease file and apply it)", highlight=False)
        return
    _table(rows)
