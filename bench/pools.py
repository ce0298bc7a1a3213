"""Pools: claim latency of warm and cold claims, side by side with the lease-row path of today.

A real daemon (``leasectl run`` in a subprocess, reconcile interval 30 s, so only its wake-up explains
a quick reaction) runs against the local Daytona API with a create latency of L seconds at the
server. On each backend:

* warm: a pool with ``min_ready`` R is filled; then K claims are made in this process through
  ``controller.claims.claim`` at a steady rate below the create rate, each released at once (the
  daemon deletes it and refills). Claim latency is the claim call itself (one transaction); the
  fewest Ready members seen just after each claim, and a sampler reading the Ready count every
  50 ms through the whole warm phase (its minimum, the time spent below ``min_ready``), show how
  closely refill keeps ``min_ready``;
* cold: a pool with ``min_ready`` 0; each claim waits (``--wait``) while a member is created, once
  the warm pool has nothing left on its way (passes do not overlap: a claim made while a pass
  creates for another pool also waits for that pass);
* lease row: a lease INSERTed with SQL; time until its status shows the create (the daemon's
  wake-up, on SQLite the change watcher) and until it is Ready;
* CLI: ``leasectl claim`` as a subprocess, for its start-up cost (reported apart).

Nothing here is asserted; the figures are printed as JSON lines and a table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import (
    API_KEY,
    EmulatorAdmin,
    Output,
    database,
    log,
    pg_reachable,
    start_emulator,
    table,
    wait_until,
    workdir,
)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[index] * 1000, 2)


def _ms(values: list[float]) -> dict[str, float | None]:
    return {
        "p50_ms": _pct(values, 0.5),
        "p99_ms": _pct(values, 0.99),
        "max_ms": round(max(values) * 1000, 2) if values else None,
    }


def _apply(url: str, tmp: Path, pools: list[dict[str, Any]]) -> None:
    from controller import db as dbmod
    from controller.leases import apply_specs
    from controller.specs import PoolSpec

    db = dbmod.connect(url)
    try:
        apply_specs(db, [], pools=[PoolSpec.model_validate(p) for p in pools])
    finally:
        db.dispose()


def _ready(db: Any, pool: str) -> int:
    from models import Lease, LeaseStatus

    with db.session(readonly=True) as session:
        return int(
            session.scalar(
                sa.select(sa.func.count())
                .select_from(Lease)
                .join(LeaseStatus, LeaseStatus.lease_name == Lease.name)
                .where(
                    Lease.pool == pool,
                    Lease.claimed_by.is_(None),
                    Lease.desired_state == "running",
                    LeaseStatus.phase == "Ready",
                )
            )
            or 0
        )


def _provisioning(db: Any, pool: str) -> int:
    from controller.pool_sync import load_members
    from controller.pools import count

    with db.session(readonly=True) as session:
        return count(load_members(session, pool)).provisioning


def _phase(db: Any, lease: str) -> str | None:
    from models import LeaseStatus

    with db.session(readonly=True) as session:
        phase = session.scalar(sa.select(LeaseStatus.phase).where(LeaseStatus.lease_name == lease))
    return None if phase is None else str(phase)


class ReadySampler:
    """Reads the pool's unclaimed Ready count every ``period`` seconds in a thread of its own: the
    fewest seen and the time spent below ``target`` (a sample below it counts until the next one)."""

    def __init__(self, db: Any, pool: str, target: int, period: float = 0.05) -> None:
        self.db, self.pool, self.target, self.period = db, pool, target, period
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ready-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), _ready(self.db, self.pool)))
            self._stop.wait(self.period)

    def __enter__(self) -> ReadySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), _ready(self.db, self.pool)))

    def figures(self) -> dict[str, Any]:
        below = 0.0
        for (t0, n), (t1, _) in zip(self.samples, self.samples[1:], strict=False):
            if n < self.target:
                below += t1 - t0
        span = self.samples[-1][0] - self.samples[0][0] if len(self.samples) > 1 else 0.0
        counts = [n for _, n in self.samples]
        return {
            "samples": len(counts),
            "min": min(counts),
            "mean": round(sum(counts) / len(counts), 2),
            "below_min_ready_s": round(below, 2),
            "below_min_ready_share": round(below / span, 3) if span else None,
            "span_s": round(span, 2),
        }


def measure(
    *,
    backend: str,
    pg_admin_url: str,
    ready: int,
    claims: int,
    cold: int,
    rows: int,
    latency: float,
    rate: float,
    cli_runs: int = 3,
) -> dict[str, Any]:
    from controller import db as dbmod
    from controller.claims import claim, release
    from tests.support.daemon import DaemonProcess

    with workdir("pools") as tmp:
        emu = start_emulator(tmp / "daytona")
        daemon = None
        try:
            EmulatorAdmin(emu.api_url).set_faults(latency={"create": latency})
            with database(backend, tmp, pg_admin_url) as url:
                _apply(url, tmp, [{"name": "warm", "min_ready": ready}, {"name": "cold", "min_ready": 0}])
                daemon = DaemonProcess(
                    tmp / "daemon.log",
                    {
                        "DAYTONA_API_URL": emu.api_url,
                        "DAYTONA_API_KEY": API_KEY,
                        "LEASECTL_DATABASE_URL": url,
                        "LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS": "30",
                        "LEASECTL_CONTROLLER__MAX_CONCURRENT_ACTIONS": "16",
                        "LEASECTL_CONTROLLER__API_RATE_PER_SECOND": "1000",
                        "LEASECTL_LOGGING__LEVEL": "WARNING",
                    },
                ).start()
                db = dbmod.connect(url)
                fill_started = time.perf_counter()
                if not wait_until(
                    lambda: _ready(db, "warm") >= ready, timeout=120 + 4 * latency * ready, interval=0.1
                ):
                    raise RuntimeError(f"pool did not fill: {daemon.log()}")
                fill_s = time.perf_counter() - fill_started

                # Warm claims at a steady rate, each released at once; the daemon refills.
                warm: list[float] = []
                fallback: list[float] = []  # found no Ready member: waited while one was created
                seen: list[int] = []
                gap = 1.0 / rate
                sampler_db = dbmod.connect(url)
                with ReadySampler(sampler_db, "warm", ready) as sampler:
                    for _ in range(claims):
                        t0 = time.perf_counter()
                        got = claim(db, "warm", owner="bench", wait_seconds=60)
                        (fallback if got.cold else warm).append(time.perf_counter() - t0)
                        release(db, got.lease)
                        seen.append(_ready(db, "warm"))
                        time.sleep(max(0.0, gap - (time.perf_counter() - t0)))
                sampler_db.dispose()
                refilled = wait_until(lambda: _ready(db, "warm") >= ready, timeout=60, interval=0.1)
                # The warm pool may still be creating its headroom: passes do not overlap, so a cold
                # claim made meanwhile would also wait for the pass in progress. Measure it on a
                # daemon that has nothing else to create.
                wait_until(lambda: _provisioning(db, "warm") == 0, timeout=60, interval=0.1)

                # Cold claims: nothing warm; each waits while a member is created.
                cold_s: list[float] = []
                for _ in range(cold):
                    t0 = time.perf_counter()
                    got = claim(db, "cold", owner="bench", wait_seconds=120)
                    cold_s.append(time.perf_counter() - t0)
                    release(db, got.lease)

                # Lease rows of today: INSERT, wait until the create shows, then until Ready.
                acted: list[float] = []
                row_ready: list[float] = []
                for i in range(rows):
                    name = f"row-{i}"
                    t0 = time.perf_counter()
                    with db.engine.begin() as conn:
                        conn.execute(sa.text("INSERT INTO leases (name) VALUES (:n)"), {"n": name})
                    wait_until(lambda: _phase(db, name) is not None, timeout=60, interval=0.01)  # noqa: B023
                    acted.append(time.perf_counter() - t0)
                    wait_until(lambda: _phase(db, name) == "Ready", timeout=120, interval=0.01)  # noqa: B023
                    row_ready.append(time.perf_counter() - t0)

                # The CLI's own start-up: `leasectl claim` as a subprocess.
                cli_s: list[float] = []
                env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))}
                env["LEASECTL_CONFIG"] = os.devnull
                for _ in range(cli_runs):
                    wait_until(lambda: _ready(db, "warm") >= 1, timeout=60, interval=0.05)
                    t0 = time.perf_counter()
                    done = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "controller.cli",
                            "--database-url",
                            url,
                            "claim",
                            "warm",
                            "-o",
                            "json",
                        ],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    cli_s.append(time.perf_counter() - t0)
                    if done.returncode == 0:
                        release(db, json.loads(done.stdout)["lease"])
                db.dispose()
        finally:
            if daemon is not None:
                daemon.kill()
            emu.kill()
    return {
        "fill_s": round(fill_s, 3),
        "warm": {**_ms(warm), "claims": len(warm)},
        "warm_misses": {**_ms(fallback), "claims": len(fallback)},
        "ready_after_each_claim": {
            "min": min(seen),
            "mean": round(sum(seen) / len(seen), 2),
            "max": max(seen),
        },
        "ready_sampled": sampler.figures(),
        "refilled_after": refilled,
        "cold": {**_ms(cold_s), "claims": len(cold_s)},
        "cold_within_latency_plus_1s": (max(cold_s) <= latency + 1.0) if cold_s else None,
        "lease_row_first_action": _ms(acted),
        "lease_row_ready": _ms(row_ready),
        "cli_claim": _ms(cli_s),
    }


def run(
    out: Output,
    *,
    quick: bool,
    pg_admin_url: str,
    backends: tuple[str, ...] = ("sqlite", "postgres"),
    ready: int | None = None,
    claims: int | None = None,
    cold: int | None = None,
    rows: int | None = None,
    latency: float = 1.0,
    cli_runs: int = 3,
) -> list[dict[str, Any]]:
    ready = ready or (10 if quick else 20)
    claims = claims or (50 if quick else 200)
    cold = cold if cold is not None else (2 if quick else 10)
    rows = rows if rows is not None else (1 if quick else 10)  # each waits for the 30 s interval
    rate = 2.0  # claims per second, below what the daemon creates (16 at once, L s each)
    records = []
    for backend in backends:
        if backend == "postgres" and (not pg_admin_url or pg_reachable(pg_admin_url)):
            log("pools: PostgreSQL not reachable; skipped")
            continue
        log(f"pools: {backend}, pool of {ready}, {claims} claims at {rate:g}/s, create latency {latency}s")
        figures = measure(
            backend=backend,
            pg_admin_url=pg_admin_url,
            ready=ready,
            claims=claims,
            cold=cold,
            rows=rows,
            latency=latency,
            rate=rate,
            cli_runs=cli_runs,
        )
        records.append(
            out.emit(
                "pools",
                {
                    "backend": backend,
                    "min_ready": ready,
                    "claims": claims,
                    "claim_rate_per_s": rate,
                    "create_latency_s": latency,
                    "reconcile_interval_s": 30,
                },
                figures,
            )
        )
    print()
    print("pools: claim latency (ms) against the lease-row path, same daemon, same local API")
    print(
        table(
            [
                "backend",
                "warm p50",
                "warm p99",
                "misses",
                "ready min/mean",
                "sampled min",
                "below R s",
                "cold p50",
                "cold max",
                "row acted p50",
                "row ready p50",
                "cli p50",
            ],
            [
                [
                    r["parameters"]["backend"],
                    r["figures"]["warm"]["p50_ms"],
                    r["figures"]["warm"]["p99_ms"],
                    r["figures"]["warm_misses"]["claims"],
                    f"{r['figures']['ready_after_each_claim']['min']}/"
                    f"{r['figures']['ready_after_each_claim']['mean']}",
                    r["figures"]["ready_sampled"]["min"],
                    f"{r['figures']['ready_sampled']['below_min_ready_s']} "
                    f"({r['figures']['ready_sampled']['below_min_ready_share']})",
                    r["figures"]["cold"]["p50_ms"],
                    r["figures"]["cold"]["max_ms"],
                    r["figures"]["lease_row_first_action"]["p50_ms"],
                    r["figures"]["lease_row_ready"]["p50_ms"],
                    r["figures"]["cli_claim"]["p50_ms"],
                ]
                for r in records
            ],
        )
    )
    return records


if __name__ == "__main__":
    from bench.common import DEFAULT_PG_ADMIN_URL

    run(Output(DEFAULT_PG_ADMIN_URL), quick="--quick" in sys.argv, pg_admin_url=DEFAULT_PG_ADMIN_URL)
