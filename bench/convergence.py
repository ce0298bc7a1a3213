"""Convergence: how close the time from nothing to all Ready gets to what the API allows.

N leases are inserted with SQL into an empty database; reconcile passes run back to back (as a
daemon with a zero interval would) against the local Daytona API until every lease is Ready
(created, started, workspace realized). Two cases, each in its own emulator:

* latency-bound: every create request takes L seconds at the server (``latency.create``), the
  applier runs C actions at once, the API and create rate limits are set high. Lower bound:
  N x L / C (the creates alone, with every worker busy all the time) -> ratio measured / bound.
* rate-bound: no injected latency; the applier's creation rate limit r (per minute) binds.
  Lower bound: N / r -> ratio measured / bound. (The create bucket starts with one second's
  worth of tokens, so the bound is conservative by r/60 creates.)

A ratio close to 1 means the controller adds little on top of the limit it was given.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from bench.common import (
    EmulatorAdmin,
    Output,
    bench_settings,
    database,
    log,
    make_reconciler,
    ratio,
    start_emulator,
    table,
    workdir,
)


def _insert_leases(url: str, n: int) -> None:
    from controller import db as dbmod
    from models import Lease, utcnow

    now = utcnow()
    db = dbmod.connect(url)
    try:
        with db.engine.begin() as conn:
            conn.execute(
                sa.insert(Lease),
                [
                    {
                        "name": f"conv-{i:04d}",
                        "desired_state": "running",
                        "env": {},
                        "labels": {},
                        "paused": False,
                        "created_at": now,
                        "updated_at": now,
                    }
                    for i in range(n)
                ],
            )
    finally:
        db.dispose()


def converge(
    *,
    n: int,
    concurrency: int,
    create_latency: float,
    create_rate_per_minute: float,
    backend: str,
    pg_admin_url: str,
    timeout: float,
) -> dict[str, Any]:
    from controller import db as dbmod
    from controller.providers import build_provider
    from models import LeaseStatus

    with workdir("convergence") as tmp:
        emu = start_emulator(tmp / "daytona")
        try:
            admin = EmulatorAdmin(emu.api_url)
            if create_latency > 0:
                admin.set_faults(latency={"create": create_latency})
            with database(backend, tmp, pg_admin_url) as url:
                _insert_leases(url, n)
                settings = bench_settings(
                    url,
                    emu.api_url,
                    max_concurrent_actions=concurrency,
                    api_rate_per_second=100_000,
                    create_rate_per_minute=create_rate_per_minute,
                    backoff_base_seconds=0.2,
                    backoff_max_seconds=1,
                )
                db = dbmod.connect(url)
                provider = build_provider(settings)
                reconciler = make_reconciler(settings, db, provider)
                admin.reset_stats()
                passes, ready, failed_actions = 0, 0, 0
                started = time.perf_counter()
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    result = reconciler.run_pass()
                    passes += 1
                    failed_actions += len(result.errors)
                    with db.session(readonly=True) as session:
                        ready = (
                            session.scalar(sa.select(sa.func.count()).where(LeaseStatus.phase == "Ready"))
                            or 0
                        )
                    if ready == n:
                        break
                elapsed = time.perf_counter() - started
                api = admin.stats()
                reconciler.applier.shutdown()
                db.dispose()
        finally:
            emu.kill()
    return {
        "seconds_to_all_ready": round(elapsed, 3),
        "ready": ready,
        "converged": ready == n,
        "passes": passes,
        "failed_actions": failed_actions,
        "api_requests": sum(api.values()),
        "api_by_op": api,
    }


def run(
    out: Output,
    *,
    quick: bool,
    pg_admin_url: str,
    backend: str = "sqlite",
    n: int | None = None,
    concurrency: int = 16,
    latency: float | None = None,
    rate: float | None = None,
) -> list[dict[str, Any]]:
    n = n or (100 if quick else 500)
    latency = latency or (0.5 if quick else 1.0)
    rate = rate or (1200.0 if quick else 1500.0)
    records = []

    log(f"convergence: {n} leases, create latency {latency}s, concurrency {concurrency}")
    figures = converge(
        n=n,
        concurrency=concurrency,
        create_latency=latency,
        create_rate_per_minute=1e6,
        backend=backend,
        pg_admin_url=pg_admin_url,
        timeout=60 + 4 * n * latency / concurrency,
    )
    bound = n * latency / concurrency
    figures.update(
        bound_s=round(bound, 3), bound="N*L/C", ratio=ratio(figures["seconds_to_all_ready"], bound)
    )
    records.append(
        out.emit(
            "convergence",
            {
                "case": "latency-bound",
                "leases": n,
                "create_latency_s": latency,
                "concurrency": concurrency,
                "create_rate_per_minute": None,
                "api_rate_per_second": 100_000,
                "backend": backend,
            },
            figures,
        )
    )

    log(f"convergence: {n} leases, creation rate limit {rate:g}/min")
    figures = converge(
        n=n,
        concurrency=concurrency,
        create_latency=0.0,
        create_rate_per_minute=rate,
        backend=backend,
        pg_admin_url=pg_admin_url,
        timeout=60 + 4 * n / rate * 60,
    )
    bound = n / rate * 60
    burst = rate / 60  # the create bucket's initial tokens (one second's worth)
    bound_burst = max(n - burst, 0) / rate * 60
    figures.update(
        bound_s=round(bound, 3),
        bound="N/r",
        ratio=ratio(figures["seconds_to_all_ready"], bound),
        bound_with_burst_s=round(bound_burst, 3),
        ratio_with_burst=ratio(figures["seconds_to_all_ready"], bound_burst),
    )
    records.append(
        out.emit(
            "convergence",
            {
                "case": "rate-bound",
                "leases": n,
                "create_latency_s": 0.0,
                "concurrency": concurrency,
                "create_rate_per_minute": rate,
                "api_rate_per_second": 100_000,
                "backend": backend,
            },
            figures,
        )
    )

    print()
    print("convergence: from nothing to all Ready, against the bound the limits allow")
    print(
        table(
            ["case", "leases", "seconds", "bound", "bound s", "ratio", "passes", "api req"],
            [
                [
                    r["parameters"]["case"],
                    r["parameters"]["leases"],
                    r["figures"]["seconds_to_all_ready"],
                    r["figures"]["bound"],
                    r["figures"]["bound_s"],
                    r["figures"]["ratio"],
                    r["figures"]["passes"],
                    r["figures"]["api_requests"],
                ]
                for r in records
            ],
        )
    )
    print()
    return records
