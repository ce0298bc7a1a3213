"""``pools``, ``claim`` and ``release``: warm pools from the command line (controller/claims.py)."""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import typer

from controller import exitcodes
from controller.cli.base import app, context_of
from controller.cli.output import EXIT_INVALID, OutputFormat, fail, handled, out, yaml_dump

POOL_HEADERS = (
    "NAME",
    "MIN_READY",
    "READY",
    "CLAIMED",
    "PROVISIONING",
    "FAILING",
    "MAX",
    "CLAIM_TTL",
    "MESSAGE",
)


def _emit(data: Any, output: OutputFormat) -> None:
    if output is OutputFormat.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        sys.stdout.write(yaml_dump(data))


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        line = "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=False)) + "  " + r[-1]
        out.print(line.rstrip(), markup=False, highlight=False)


@app.command("pools")
def pools_command(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Pool names (default: all).")] = None,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", metavar="FORMAT", help="table, json or yaml.")
    ] = OutputFormat.table,
) -> None:
    """Show each pool: members ready, claimed, provisioning and failing, and its sizes."""
    import sqlalchemy as sa

    from controller.pool_sync import load_members, pool_view
    from controller.pools import count
    from controller.specs import format_duration
    from models import Pool, utcnow

    cli = context_of(ctx)
    with handled(), cli.database().session(readonly=True) as session:
        query = sa.select(Pool).order_by(Pool.name)
        if names:
            query = query.where(Pool.name.in_(names))
        data: list[dict[str, Any]] = []
        for row in session.scalars(query):
            view, _ = pool_view(row, utcnow())
            c = count(load_members(session, row.name))
            data.append(
                {
                    "name": row.name,
                    "min_ready": view.min_ready,  # in force now (a schedule may set it)
                    "ready": c.ready,
                    "claimed": c.claimed,
                    "provisioning": c.provisioning,
                    "failing": c.failing,
                    "retiring": c.retiring,
                    "members": c.total,
                    "max_size": row.max_size,
                    "claim_ttl": format_duration(row.claim_ttl_seconds) if row.claim_ttl_seconds else None,
                    "problem": view.problem,
                }
            )
    missing = sorted(set(names or ()) - {d["name"] for d in data})
    if output is OutputFormat.table:
        rows: list[tuple[str, ...]] = [POOL_HEADERS]
        rows += [
            (
                d["name"],
                str(d["min_ready"]),
                str(d["ready"]),
                str(d["claimed"]),
                str(d["provisioning"]),
                str(d["failing"]),
                "-" if d["max_size"] is None else str(d["max_size"]),
                d["claim_ttl"] or "-",
                d["problem"] or "",
            )
            for d in data
        ]
        _table(rows)
    else:
        _emit(data, output)
    if missing:
        fail(f"no such pool: {', '.join(missing)}", EXIT_INVALID)


@app.command("claim")
def claim_command(
    ctx: typer.Context,
    pool: Annotated[str, typer.Argument(help="The pool to take a member from.")],
    owner: Annotated[
        str | None,
        typer.Option("--owner", metavar="TEXT", help="Who holds the claim (default user@host:pid)."),
    ] = None,
    ttl: Annotated[
        str | None,
        typer.Option(
            "--ttl",
            metavar="DURATION",
            help="Claim expires after this (90s, 15m, 2h); default: the pool's claim_ttl.",
        ),
    ] = None,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            metavar="SECONDS",
            min=0,
            help="If no member is ready, wait this long while one is created.",
        ),
    ] = 0.0,
    output: Annotated[
        OutputFormat, typer.Option("--output", "-o", metavar="FORMAT", help="table, json or yaml.")
    ] = OutputFormat.table,
) -> None:
    """Atomically take one Ready member of POOL and print it (exit 5 when none is ready)."""
    from controller.claims import NoMemberReadyError, claim
    from controller.specs import parse_duration

    cli = context_of(ctx)
    ttl_seconds = None
    if ttl is not None:
        try:
            ttl_seconds = parse_duration(ttl)
        except ValueError as exc:
            fail(f"--ttl: {exc}", EXIT_INVALID)
    with handled():
        try:
            got = claim(cli.database(), pool, owner=owner, ttl_seconds=ttl_seconds, wait_seconds=wait)
        except NoMemberReadyError as exc:
            fail(str(exc), exitcodes.NO_MEMBER_READY)
    data = got.as_dict()
    if output is OutputFormat.table:
        for key, value in data.items():
            out.print(f"{key + ':':<14}{'-' if value is None else value}", markup=False, highlight=False)
    else:
        _emit(data, output)


@app.command("release")
def release_command(
    ctx: typer.Context,
    lease: Annotated[str, typer.Argument(help="The claimed member (its lease name).")],
) -> None:
    """Give a claimed pool member back: it is deleted (never handed out again) and the pool refills."""
    from controller.claims import release

    cli = context_of(ctx)
    with handled():
        done = release(cli.database(), lease)
    out.print(
        f"lease/{done.lease} released (pool {done.pool}); it is deleted and the pool refills", highlight=False
    )
