"""Scale: the cost of one reconcile pass over a converged fleet, and the imperative way beside it.

For each fleet size N and backend (SQLite, PostgreSQL):

1. seed, in bulk: N ``leases`` rows and N ``lease_status`` rows with SQL, and N matching ``started``
   sandboxes straight into the local Daytona API's store (labels ``leasectl-instance``,
   ``leasectl-lease``, ``leasectl-spec`` = the lease's spec hash, names from the planner's
   ``sandbox_name``). The status values are what the planner itself decides for a Ready lease, so
   the fleet is converged in the controller's own terms;
2. in a fresh child process (so that its peak RSS is the controller's, not the seeding's): one
   warm-up pass (must plan 0 actions), then ONE measured pass: wall time, CPU time
   (``time.process_time`` of the process, all threads), SQL statements (a ``before_cursor_execute``
   listener), API requests served (the emulator's counters, reset just before), peak RSS
   (``getrusage`` ``ru_maxrss`` of the child: imports + warm-up + measured pass) and, in a third,
   separate pass under ``tracemalloc``, the peak of Python allocations during a pass;
3. the imperative way, same child, same fleet: read the recorded sandbox ids from the database, then
   one GET per lease, as per-lease plugins do (sequentially, and with the applier's concurrency;
   above 10,000 leases only the latter) -> ratios of API requests and of wall time against the pass.

The warm-up pass's CPU is reported too (``cold_pass_cpu_s``): the first pass of a process validates
and hashes every lease row; later passes reuse that for rows whose stored values did not change.
``--huge`` (``make bench-huge``) runs 1,000, 10,000 and 100,000 leases, so the report can show how the
cost grows with the fleet (it should be linear).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import (
    INSTANCE,
    REPO_ROOT,
    EmulatorAdmin,
    Output,
    QueryCounter,
    bench_settings,
    database,
    log,
    make_reconciler,
    pg_reachable,
    ratio,
    start_emulator,
    table,
    workdir,
)

QUICK_SIZES = (200, 1_000)
FULL_SIZES = (1_000, 10_000)
HUGE_SIZES = (1_000, 10_000, 100_000)  # make bench-huge: how the cost grows, up to 100,000 leases
# The one-GET-per-lease way is also run one GET at a time up to this size; above it only with the
# applier's concurrency (100,000 sequential GETs take minutes and count the same requests).
SEQUENTIAL_IMPERATIVE_MAX = 10_000
# Issue 14's targets for a no-op pass (CPU seconds), printed beside each figure with its ratio.
CPU_TARGETS = {10_000: 0.4, 100_000: 5.0}
RSS_TARGET_MIB = 1024
WORKSPACE = "/home/daytona/workspace"


def lease_names(n: int) -> list[str]:
    return [f"fleet-{i:05d}" for i in range(n)]


def _views(names: Sequence[str]) -> list[Any]:
    from controller.reconciler import lease_view
    from models import Lease

    return [
        lease_view(Lease(name=n, desired_state="running", env={}, labels={}), INSTANCE, "workspace")
        for n in names
    ]


def seed_sandboxes(state_dir: Path, names: Sequence[str]) -> dict[str, str]:
    """N started sandboxes in the emulator's store (before it starts); lease name -> sandbox id."""
    from controller.emulator.state import SandboxRecord, Store

    state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(state_dir)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    now = time.time() - 60
    ids: dict[str, str] = {}
    records = []
    for view in _views(names):
        sid = str(uuid.uuid4())
        ids[view.name] = sid
        records.append(
            SandboxRecord(
                id=sid,
                name=view.create.name,
                seq=store.next_seq(),
                created_ts=now,
                created_at=stamp,
                updated_at=stamp,
                state="started",
                labels={**view.create.labels, "code-toolbox-language": "python"},
            )
        )
    store.save_many(records)
    store.close()
    return ids


def seed_database(url: str, ids: dict[str, str]) -> None:
    """Lease rows and the status rows the planner would write for a Ready fleet, in bulk."""
    from controller import db as dbmod
    from controller.planner import StatusView, plan
    from controller.providers.base import ObservedSandbox
    from models import Lease, LeaseStatus, utcnow

    now = utcnow()
    views = _views(list(ids))
    observed = [
        ObservedSandbox(id=ids[v.name], name=v.create.name, state="started", labels=dict(v.create.labels))
        for v in views
    ]
    statuses = {
        v.name: StatusView(
            sandbox_id=ids[v.name],
            sandbox_name=v.create.name,
            observed_state="started",
            phase="Ready",
            spec_hash=v.spec_hash,
            ready_at=now,
            workspace_path=WORKSPACE,
        )
        for v in views
    }
    the_plan = plan(views, statuses, observed, now, instance=INSTANCE)
    assert not the_plan.actions, "seeded fleet is not converged"
    lease_rows = [
        {
            "name": v.name,
            "desired_state": "running",
            "env": {},
            "labels": {},
            "paused": False,
            "created_at": now,
            "updated_at": now,
        }
        for v in views
    ]
    status_rows = []
    for v in views:
        values = the_plan.decisions[v.name].status_values()
        status_rows.append(
            {
                "lease_name": v.name,
                "failures": 0,
                "updated_at": now,
                "last_reconciled_at": now,
                "create_attempt_name": None,
                "create_attempt_at": None,
                "next_attempt_at": None,
                "last_error": None,
                **values,
            }
        )
    db = dbmod.connect(url)
    try:
        with db.engine.begin() as conn:
            for start in range(0, len(lease_rows), 2000):
                conn.execute(sa.insert(Lease), lease_rows[start : start + 2000])
                conn.execute(sa.insert(LeaseStatus), status_rows[start : start + 2000])
    finally:
        db.dispose()


# -- the child: measures one pass -----------------------------------------------------------------


def child(params: dict[str, Any]) -> dict[str, Any]:
    from controller import db as dbmod
    from controller.providers import build_provider

    settings = bench_settings(
        params["database_url"],
        params["api_url"],
        max_concurrent_actions=params["concurrency"],
        api_rate_per_second=100_000,
    )
    admin = EmulatorAdmin(params["api_url"])
    db = dbmod.connect(settings.database_url)
    counter = QueryCounter(db.engine)
    provider = build_provider(settings)
    reconciler = make_reconciler(settings, db, provider)

    cold0 = time.process_time()
    warm = reconciler.run_pass()  # the first pass of a process: every row validated and hashed
    cold_cpu = time.process_time() - cold0
    warm_actions = len(warm.outcomes)

    admin.reset_stats()
    counter.take()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    result = reconciler.run_pass()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    queries = counter.take()
    api = admin.stats()
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    phases: dict[str, int] = {}
    for decision in result.plan.decisions.values():
        phases[decision.phase] = phases.get(decision.phase, 0) + 1
    if params.get("pass_only"):  # the baseline's child: the same two passes, nothing else
        db.dispose()
        return {
            "leases": len(result.plan.decisions),
            "phases": phases,
            "actions": len(result.outcomes),
            "wall_s": round(wall, 4),
            "cpu_s": round(cpu, 4),
            "cold_pass_cpu_s": round(cold_cpu, 4),
            "peak_rss_mib": round(peak_rss_kib / 1024, 1),
            "db_queries": queries,
            "api_requests": sum(api.values()),
        }

    # The imperative way: what a per-lease plugin does to learn the state of its sandboxes.
    from models import LeaseStatus

    def observe_imperatively(workers: int) -> tuple[float, float, dict[str, int], int]:
        admin.reset_stats()
        counter.take()
        w0, c0 = time.perf_counter(), time.process_time()
        with db.session(readonly=True) as session:
            ids = [
                sid
                for sid in session.scalars(sa.select(LeaseStatus.sandbox_id).order_by(LeaseStatus.lease_name))
                if sid is not None
            ]
        if workers == 1:
            found = [provider.get(sid) for sid in ids]
        else:
            with ThreadPoolExecutor(workers) as pool:
                found = list(pool.map(provider.get, ids))
        w, c = time.perf_counter() - w0, time.process_time() - c0
        assert all(f is not None and f.state == "started" for f in found)
        return w, c, admin.stats(), counter.take()

    sequential = params.get("sequential_imperative", True)
    imp_wall, imp_cpu, imp_api, imp_queries = observe_imperatively(1) if sequential else (0, 0, {}, 0)
    par_wall, _par_cpu, par_api, par_queries = observe_imperatively(params["concurrency"])

    tracemalloc.start()
    reconciler.run_pass()
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    counter.close()
    db.dispose()
    n = len(result.plan.decisions)
    api_total = sum(api.values())
    par_total = sum(par_api.values())
    imp_total = sum(imp_api.values()) if sequential else par_total
    target = CPU_TARGETS.get(n)
    return {
        "leases": n,
        "phases": phases,
        "warmup_actions": warm_actions,
        "actions": len(result.outcomes),
        "wall_s": round(wall, 4),
        "cpu_s": round(cpu, 4),
        "cpu_us_per_lease": round(1e6 * cpu / n, 2) if n else None,
        "cpu_target_s": target,
        "ratio_cpu_to_target": ratio(cpu, target) if target else None,
        "cold_pass_cpu_s": round(cold_cpu, 4),
        "cold_pass_how": "the warm-up pass: the first of a process, which validates and hashes every row",
        "ratio_cold_over_warm_cpu": ratio(cold_cpu, cpu),
        "peak_rss_mib": round(peak_rss_kib / 1024, 1),
        "peak_rss_target_mib": RSS_TARGET_MIB,
        "peak_rss_how": "getrusage ru_maxrss of a fresh child process (imports + warm-up + measured pass)",
        "pass_alloc_peak_mib": round(traced_peak / 2**20, 1),
        "pass_alloc_peak_how": "tracemalloc peak during a separate, identical pass",
        "db_queries": queries,
        "api_requests": api_total,
        "api_by_op": api,
        "imperative_sequential": sequential,
        "imperative_wall_s": round(imp_wall, 4) if sequential else None,
        "imperative_cpu_s": round(imp_cpu, 4) if sequential else None,
        "imperative_api_requests": imp_total,
        "imperative_db_queries": imp_queries if sequential else par_queries,
        "imperative_parallel_wall_s": round(par_wall, 4),
        "imperative_parallel_api_requests": par_total,
        "ratio_api_requests": ratio(imp_total, api_total),
        "ratio_wall": ratio(imp_wall, wall) if sequential else None,
        "ratio_wall_parallel": ratio(par_wall, wall),
    }


def _run_child(params: dict[str, Any], baseline: Path | None = None) -> dict[str, Any]:
    """One child process; with ``baseline`` (a directory holding another version's ``controller``
    and ``models``), that version's code runs this file's child: the child's cwd comes first on
    sys.path, the repository (for ``bench``) after it."""
    env = None
    if baseline is not None:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--child", json.dumps(params)],
        cwd=baseline or REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scale child failed ({proc.returncode}): {proc.stderr[-3000:]}")
    figures: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return figures


# -- the parent -----------------------------------------------------------------------------------


def _baseline_figures(name: str, base: dict[str, Any], ours: dict[str, Any]) -> dict[str, Any]:
    return {
        "baseline": name,
        "baseline_how": "the same two passes (warm-up, measured) by that revision's controller, in a "
        "fresh process, on the same fleet and database right after ours",
        "baseline_cpu_s": base["cpu_s"],
        "baseline_cold_pass_cpu_s": base["cold_pass_cpu_s"],
        "baseline_wall_s": base["wall_s"],
        "baseline_peak_rss_mib": base["peak_rss_mib"],
        "baseline_db_queries": base["db_queries"],
        "baseline_api_requests": base["api_requests"],
        "ratio_baseline_cpu": ratio(base["cpu_s"], ours["cpu_s"]),
    }


_RUN_PATHS = ("controller", "models", "migrations", "alembic.ini", "config.example.yaml")


def _export(revision: str) -> tuple[Path, str]:
    """What a revision runs (``controller``, ``models``, its migrations and resources) in a fresh
    directory, and its short hash."""
    target = Path(tempfile.mkdtemp(prefix="leasectl-baseline-"))
    short = subprocess.run(
        ["git", "rev-parse", "--short", revision], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(
        [*("git", "archive", revision), *_RUN_PATHS], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target, short


def run(
    out: Output,
    *,
    quick: bool,
    pg_admin_url: str,
    sizes: Sequence[int] | None = None,
    backends: Sequence[str] = ("sqlite", "postgres"),
    huge: bool = False,
    baseline: str | None = None,
) -> list[dict[str, Any]]:
    """``baseline``: a git revision whose controller runs the same pass on the same fleet and
    database right after ours (its CPU beside ours, the ratio of the two), up to 10,000 leases."""
    sizes = tuple(sizes or (HUGE_SIZES if huge else QUICK_SIZES if quick else FULL_SIZES))
    baseline_dir, baseline_rev = _export(baseline) if baseline else (None, None)
    pg_problem = pg_reachable(pg_admin_url) if "postgres" in backends else None
    concurrency = 8
    records = []
    for n in sizes:
        with workdir("scale") as tmp:
            t0 = time.monotonic()
            ids = seed_sandboxes(tmp / "daytona", lease_names(n))
            emu = start_emulator(tmp / "daytona", startup_timeout=60 + n / 500)  # loads every sandbox
            log(f"scale: {n} sandboxes seeded and served in {time.monotonic() - t0:.1f}s")
            try:
                for backend in backends:
                    if backend == "postgres" and pg_problem:
                        log(f"scale: skipping PostgreSQL: {pg_problem}")
                        continue
                    with database(backend, tmp, pg_admin_url) as url:
                        t0 = time.monotonic()
                        seed_database(url, ids)
                        seeded = time.monotonic() - t0
                        figures = _run_child(
                            {
                                "database_url": url,
                                "api_url": emu.api_url,
                                "concurrency": concurrency,
                                "sequential_imperative": n <= SEQUENTIAL_IMPERATIVE_MAX,
                            }
                        )
                        if baseline_dir is not None and n <= SEQUENTIAL_IMPERATIVE_MAX:
                            child_params = {"database_url": url, "api_url": emu.api_url, "pass_only": True}
                            base = _run_child(child_params | {"concurrency": concurrency}, baseline_dir)
                            figures.update(_baseline_figures(f"{baseline} ({baseline_rev})", base, figures))
                    figures["seed_db_s"] = round(seeded, 2)
                    params = {
                        "leases": n,
                        "backend": backend,
                        "imperative_concurrency": concurrency,
                        "api": "local Daytona API (subprocess)",
                    }
                    records.append(out.emit("scale", params, figures))
            finally:
                emu.kill()
    print()
    print("scale: one reconcile pass over a converged fleet vs one GET per lease")
    print(
        table(
            [
                "leases",
                "db",
                "wall s",
                "cpu s",
                "cold cpu s",
                "us/lease",
                "rss MiB",
                "queries",
                "api req",
                "imp api",
                "imp wall s",
                "api ratio",
                "wall ratio",
                "par wall ratio",
            ],
            [
                [
                    r["parameters"]["leases"],
                    r["parameters"]["backend"],
                    r["figures"]["wall_s"],
                    r["figures"]["cpu_s"],
                    r["figures"]["cold_pass_cpu_s"],
                    r["figures"]["cpu_us_per_lease"],
                    r["figures"]["peak_rss_mib"],
                    r["figures"]["db_queries"],
                    r["figures"]["api_requests"],
                    r["figures"]["imperative_api_requests"],
                    r["figures"]["imperative_wall_s"],
                    r["figures"]["ratio_api_requests"],
                    r["figures"]["ratio_wall"],
                    r["figures"]["ratio_wall_parallel"],
                ]
                for r in records
            ],
        )
    )
    print()
    return records


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        print("usage: python -m bench --only scale", file=sys.stderr)
        sys.exit(2)
