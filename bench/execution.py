"""Execution: throughput and per-command overhead of the queue dispatcher vs the SDK's exec.

A few leases are made Ready with real reconcile passes against the local Daytona API. Then, in the
same run and at the same concurrency C:

* direct: the official SDK, ``sandbox.process.exec(command)`` from C threads, with the ``Sandbox``
  objects fetched once beforehand (the cheapest a caller can do); once with the bare command and
  once with exactly what the dispatcher sends: its login-shell script around the command (the
  lease's workspace as the directory, a process marker) and its time-out (the script's own cost,
  without the queue);
* dispatcher, drain: M rows INSERTed with SQL, then ``controller.execution.Dispatcher.drain()``
  (claims up to C rows, runs them, claims again);
* dispatcher, poll: the same, driven the way the daemon drives it: ``run_once(wait=False)`` every
  ``poll_interval`` (50 ms here), so free slots refill without waiting for a whole batch;
* dispatcher, session: polled the same way, but every command runs through a Daytona session
  (create, execute with runAsync, read command + logs every ``log_poll_seconds`` = 0.2 s here,
  delete): what long commands cost, and why short ones keep the one-request path.

Per-lease ordering is off in all three (``exec.per_lease_concurrency: 0``). With ``--full`` the
direct login-shell run, drain and poll take turns three times (one round with ``--quick``) and each
mode reports its median round, its ratio against the direct run of the same round, and every
round's ratio (``ratio_login_shell_rounds``): single runs on this shared 2-core host swing by
more than the margin the target leaves. The session mode runs once, after the rounds.

Each dispatcher command goes through the whole path: claim, login-shell script (profiles, cwd,
env, subshell), provider call (the toolbox execute; the sandbox's toolbox URL is fetched once per
sandbox), result row and event. In drain and poll mode a slot whose command ended writes its result
and claims its next row in one transaction (group-committed with the results and free slots of
other threads): about 3 statements per command on SQLite, 0.7 on PostgreSQL (docs/execution.md,
Throughput, has the statements). The figure to watch is
``ratio_throughput_login_shell_over_dispatcher`` (direct with the same script / dispatcher); what
is left is mostly that transaction on the slot's path (its commit waits for the WAL flush on
PostgreSQL) and the dispatcher's CPU on a host the API server and bash already saturate.
Per-command overhead = (dispatcher wall - direct wall) x C / M.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa

from bench.common import (
    API_KEY,
    EmulatorAdmin,
    Output,
    QueryCounter,
    bench_settings,
    database,
    log,
    make_reconciler,
    ratio,
    start_emulator,
    table,
    wait_until,
    workdir,
)

LEASES = 4


def _ready_fleet(url: str, api_url: str) -> dict[str, tuple[str, str | None]]:
    """LEASES leases made Ready by real passes; lease name -> (sandbox id, workspace)."""
    from controller import db as dbmod
    from controller.providers import build_provider
    from models import Lease, LeaseStatus, utcnow

    now = utcnow()
    db = dbmod.connect(url)
    with db.engine.begin() as conn:
        conn.execute(
            sa.insert(Lease),
            [
                {
                    "name": f"exec-{i}",
                    "desired_state": "running",
                    "env": {},
                    "labels": {},
                    "paused": False,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(LEASES)
            ],
        )
    settings = bench_settings(url, api_url, api_rate_per_second=1000)
    reconciler = make_reconciler(settings, db, build_provider(settings))

    def all_ready() -> bool:
        reconciler.run_pass()
        with db.session(readonly=True) as session:
            rows = session.execute(
                sa.select(LeaseStatus.lease_name, LeaseStatus.sandbox_id, LeaseStatus.workspace_path).where(
                    LeaseStatus.phase == "Ready"
                )
            ).all()
        found.update({r.lease_name: (r.sandbox_id, r.workspace_path) for r in rows})
        return len(found) == LEASES

    found: dict[str, tuple[str, str | None]] = {}
    if not wait_until(all_ready, timeout=60, interval=0.1):
        raise RuntimeError("execution bench: leases did not become Ready")
    reconciler.applier.shutdown()
    db.dispose()
    return found


def _direct(
    api_url: str,
    sandboxes_and_workspaces: list[tuple[str, str | None]],
    m: int,
    concurrency: int,
    *,
    login_shell: bool = False,
) -> tuple[float, list[float]]:
    from daytona import Daytona, DaytonaConfig

    from controller.config import ExecSettings
    from controller.execution_run import command_line, execution_marker

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client = Daytona(
            DaytonaConfig(
                api_key=API_KEY,
                api_url=api_url,
                target="local",
                use_deprecated_polling=True,
                connection_pool_maxsize=32,
            )
        )
    sandboxes = [client.get(sid) for sid, _ in sandboxes_and_workspaces]
    workspaces = [workspace for _, workspace in sandboxes_and_workspaces]
    timeout = ExecSettings().default_timeout_seconds
    latencies: list[float] = []

    def one(i: int) -> None:
        t0 = time.perf_counter()
        command = f"echo direct-{i}"
        if not login_shell:
            response = sandboxes[i % len(sandboxes)].process.exec(command)
        else:  # the very script and time-out the dispatcher sends: isolates the cost of the queue
            line = command_line(
                command,
                workspace=workspaces[i % len(workspaces)],
                env={},
                marker=execution_marker(i, "bench:0:direct"),
            )
            response = sandboxes[i % len(sandboxes)].process.exec(line, timeout=timeout)
        latencies.append(time.perf_counter() - t0)
        assert response.exit_code == 0, response

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(m)))
    return time.perf_counter() - started, latencies


def _queue(db: Any, leases: list[str], m: int, tag: str) -> None:
    from models import Execution

    with db.engine.begin() as conn:
        conn.execute(
            sa.insert(Execution),
            [
                {"lease_name": leases[i % len(leases)], "command": f"echo {tag}-{i}", "state": "queued"}
                for i in range(m)
            ],
        )


SESSION_POLL_SECONDS = 0.2


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run whose ratio to its own round's direct login-shell run is the median one."""
    ordered = sorted(runs, key=lambda r: r["seconds"] / r["wrapped_seconds"])
    return ordered[len(ordered) // 2]


def _dispatch(
    db: Any, provider: Any, m: int, concurrency: int, mode: str, leases: list[str], tag: str
) -> dict[str, Any]:
    """One dispatcher run of ``m`` rows whose commands are ``echo <tag>-<i>`` (a tag per run)."""
    from controller.config import ExecSettings
    from controller.execution import Dispatcher
    from models import Execution

    _queue(db, leases, m, tag)
    # Per-lease ordering off: the figure is the dispatcher's throughput, not one lease's queue.
    path = {"session_min_timeout_seconds": 0} if mode == "session" else {"session_min_timeout_seconds": 10**6}
    dispatcher = Dispatcher(
        db,
        provider,
        ExecSettings(
            max_concurrent=concurrency,
            poll_interval_seconds=0.05,
            per_lease_concurrency=0,
            log_poll_seconds=SESSION_POLL_SECONDS,
            **path,
        ),
    )
    statements = QueryCounter(db.engine)  # the dispatcher's statements only: the bench watches on its own
    watch = sa.create_engine(db.engine.url)
    started = time.perf_counter()
    if mode == "drain":
        dispatcher.drain()
    else:
        # The end is watched on the dispatcher's own counters (every row claimed and no command or
        # result write in flight), then confirmed by one count: a count every 50 ms would be the
        # bench's load on both cores and the database, not the dispatcher's.
        first = dispatcher._processed
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            dispatcher.run_once(wait=False)
            if dispatcher._processed - first >= m and not dispatcher._pending():
                with watch.connect() as session:
                    left = session.scalar(
                        sa.select(sa.func.count()).where(
                            Execution.state.in_(("queued", "running")),
                            Execution.command.like(f"echo {tag}-%"),
                        )
                    )
                if not left:
                    break
            time.sleep(0.05)
    elapsed = time.perf_counter() - started
    statement_count = statements.take()
    statements.close()
    watch.dispose()
    dispatcher.shutdown()
    with db.session(readonly=True) as session:
        rows = session.execute(
            sa.select(Execution.state, Execution.started_at, Execution.finished_at).where(
                Execution.command.like(f"echo {tag}-%")
            )
        ).all()
    states: dict[str, int] = {}
    for r in rows:
        states[r.state] = states.get(r.state, 0) + 1
    run_s = [(r.finished_at - r.started_at).total_seconds() for r in rows if r.started_at and r.finished_at]
    return {
        "seconds": elapsed,
        "sql_statements": statement_count,
        "states": states,
        "mean_row_seconds": sum(run_s) / len(run_s) if run_s else None,
    }


def run(
    out: Output,
    *,
    quick: bool,
    pg_admin_url: str,
    backend: str = "sqlite",
    m: int | None = None,
    concurrency: int = 8,
    rounds: int | None = None,
) -> list[dict[str, Any]]:
    from controller import db as dbmod
    from controller.providers import build_provider

    m = m or (200 if quick else 1000)
    rounds = rounds or (1 if quick else 3)
    records = []
    with workdir("execution") as tmp:
        emu = start_emulator(tmp / "daytona")
        try:
            admin = EmulatorAdmin(emu.api_url)
            with database(backend, tmp, pg_admin_url) as url:
                fleet = _ready_fleet(url, emu.api_url)
                leases = sorted(fleet)
                log(f"execution: {m} commands on {len(leases)} leases, concurrency {concurrency}")
                targets = [fleet[n] for n in leases]
                admin.reset_stats()
                direct_s, latencies = _direct(emu.api_url, targets, m, concurrency)
                direct_api = admin.stats()
                settings = bench_settings(url, emu.api_url)
                db = dbmod.connect(url)
                provider = build_provider(settings)
                # The ratio the target is about compares runs made seconds apart on a shared, noisy
                # host: the direct login-shell run and the drain and poll runs take turns, ``rounds``
                # times, and each mode's figures are those of its median round. The session path,
                # slow and not a target, runs once, last: its five writes per command leave the
                # tables a vacuum's work that would otherwise land in the next rounds (it doubled
                # PostgreSQL's CPU per command there and took the ratio from 1.12 to 1.25).
                wrapped: list[float] = []
                runs: dict[str, list[dict[str, Any]]] = {"drain": [], "poll": [], "session": []}
                for round_ in range(rounds + 1):
                    last = round_ == rounds
                    if not last:
                        wrapped.append(_direct(emu.api_url, targets, m, concurrency, login_shell=True)[0])
                    for mode in ("session",) if last else ("drain", "poll"):
                        admin.reset_stats()
                        run_ = _dispatch(db, provider, m, concurrency, mode, leases, f"{mode}{round_}")
                        run_["api"] = admin.stats()
                        run_["wrapped_seconds"] = wrapped[-1]
                        runs[mode].append(run_)
                db.dispose()
                results = {mode: _median_run(done) for mode, done in runs.items()}
        finally:
            emu.kill()
    direct_tput = m / direct_s
    for mode, res in results.items():
        tput = m / res["seconds"]
        wrapped_s = res["wrapped_seconds"]
        figures = {
            "commands": m,
            "direct_seconds": round(direct_s, 3),
            "direct_per_second": round(direct_tput, 1),
            "direct_mean_latency_ms": round(1000 * sum(latencies) / len(latencies), 2),
            "direct_api_requests": sum(direct_api.values()),
            "direct_login_shell_seconds": round(wrapped_s, 3),
            "direct_login_shell_per_second": round(m / wrapped_s, 1),
            "dispatcher_seconds": round(res["seconds"], 3),
            "dispatcher_per_second": round(tput, 1),
            "dispatcher_mean_row_ms": round(1000 * res["mean_row_seconds"], 2)
            if res["mean_row_seconds"]
            else None,
            "dispatcher_states": res["states"],
            "dispatcher_api_requests": sum(res["api"].values()),
            "dispatcher_api_by_op": res["api"],
            "dispatcher_api_requests_per_command": round(sum(res["api"].values()) / m, 3),
            "dispatcher_sql_statements_per_command": round(res["sql_statements"] / m, 2),
            "overhead_per_command_ms": round(1000 * (res["seconds"] - direct_s) * concurrency / m, 2),
            "ratio_throughput_direct_over_dispatcher": ratio(direct_tput, tput),
            "ratio_throughput_login_shell_over_dispatcher": ratio(m / wrapped_s, tput),
            "ratio_login_shell_rounds": [ratio(r["seconds"], r["wrapped_seconds"]) for r in runs[mode]],
        }
        records.append(
            out.emit(
                "execution",
                {
                    "mode": mode,
                    "commands": m,
                    "leases": LEASES,
                    "concurrency": concurrency,
                    "backend": backend,
                    "command": "echo <tag>-<i>",
                    "rounds": len(runs[mode]),
                },
                figures,
            )
        )
    print()
    print("execution: queue dispatcher vs the SDK's process.exec at the same concurrency")
    print(
        table(
            [
                "mode",
                "cmds",
                "direct/s",
                "direct+shell/s",
                "dispatcher/s",
                "ratio bare",
                "ratio shell",
                "overhead ms/cmd",
                "api/cmd direct",
                "api/cmd queue",
                "sql/cmd queue",
            ],
            [
                [
                    r["parameters"]["mode"],
                    r["figures"]["commands"],
                    r["figures"]["direct_per_second"],
                    r["figures"]["direct_login_shell_per_second"],
                    r["figures"]["dispatcher_per_second"],
                    r["figures"]["ratio_throughput_direct_over_dispatcher"],
                    r["figures"]["ratio_throughput_login_shell_over_dispatcher"],
                    r["figures"]["overhead_per_command_ms"],
                    r["figures"]["direct_api_requests"] / m,
                    r["figures"]["dispatcher_api_requests"] / m,
                    r["figures"]["dispatcher_sql_statements_per_command"],
                ]
                for r in records
            ],
        )
    )
    print()
    return records
