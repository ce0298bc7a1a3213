"""``python -m bench --quick|--full|--huge [--only NAME] [--pg-url URL] [--jsonl PATH]``.

Runs scale, convergence, execution, pools and the soak in that order (``--only`` picks some);
``--huge`` runs only scale, up to 100,000 leases. The
soak runs on PostgreSQL with two replicas (when reachable) and, with ``--full``, also on SQLite with
one; with ``--quick`` once, 30 s, on PostgreSQL if reachable, else SQLite. Exit status 1 when the soak
counted a loss or a duplicate; the benchmarks themselves never fail on a figure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench import common, convergence, execution, pools, scale, soak

BENCHES = ("scale", "convergence", "execution", "pools", "soak")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="leasectl benchmarks")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--quick", action="store_true", help="small sizes, a few minutes in all")
    size.add_argument("--full", action="store_true", help="full sizes (minutes)")
    size.add_argument(
        "--huge",
        action="store_true",
        help="scale only, at 1,000, 10,000 and 100,000 leases (about half an hour; not run by CI)",
    )
    parser.add_argument("--only", action="append", choices=BENCHES, help="run only this (repeatable)")
    parser.add_argument(
        "--pg-url",
        default=common.DEFAULT_PG_ADMIN_URL,
        help="PostgreSQL URL used to create and drop the benchmark databases "
        "(default: $LEASECTL_TEST_PG_URL or postgres@127.0.0.1:5432/test)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        default=None,
        help="scale: also run the same pass with this git revision's controller (e.g. main), up to "
        "10,000 leases, for its CPU beside ours",
    )
    parser.add_argument("--jsonl", type=Path, default=None, help="also append every JSON line to this file")
    parser.add_argument("--soak-minutes", type=float, default=20.0, help="soak drive time with --full")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    chosen = args.only or (["scale"] if args.huge else list(BENCHES))
    out = common.Output(args.pg_url, args.jsonl)
    started = time.monotonic()
    status = 0
    for name in BENCHES:
        if name not in chosen:
            continue
        t0 = time.monotonic()
        if name == "scale":
            scale.run(
                out, quick=quick, pg_admin_url=args.pg_url, huge=bool(args.huge), baseline=args.baseline
            )
        elif name == "convergence":
            convergence.run(out, quick=quick, pg_admin_url=args.pg_url)
        elif name == "execution":
            execution.run(out, quick=quick, pg_admin_url=args.pg_url)
        elif name == "pools":
            pools.run(out, quick=quick, pg_admin_url=args.pg_url)
        else:
            backends = ["postgres"] if common.pg_reachable(args.pg_url) is None else []
            for backend in [*backends, "sqlite"] if not quick else backends or ["sqlite"]:
                record = soak.soak(
                    out,
                    drive_seconds=30.0 if quick else args.soak_minutes * 60,
                    settle_seconds=60.0 if quick else 180.0,
                    backend=backend,
                    pg_admin_url=args.pg_url,
                    outage_seconds=8.0 if quick else 30.0,
                )
                status = 1 if soak.failed(record) else status
        common.log(f"{name} took {time.monotonic() - t0:.1f}s")
    common.log(f"all done in {time.monotonic() - started:.1f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
