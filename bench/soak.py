"""Chaos soak: the daemon under faults, edits and SIGKILLs; at the end nothing is lost or doubled.

``python -m bench.soak [--minutes 5] [--backend sqlite|postgres] [--seed N]`` (``--quick``: a 30 s
drive, what ``make bench-quick`` runs).

Set-up: the local Daytona API in a subprocess with ~10% injected failures on every operation
(429 with Retry-After, 500, 503), 20 ms latency per request, 0.3-0.5 s transitions and a list that
lags 1.5 s behind creates and deletes; ``leasectl run`` as a subprocess (short intervals, orphan
grace 2 s) on a fresh database.

While the drive lasts, a driver picks at random, every 0.2-0.8 s: ``leasectl apply`` of a few leases
(a subprocess, at most every 8 s), INSERT a lease, UPDATE desired_state, UPDATE env (a spec change:
the sandbox is replaced), DELETE a lease row, DELETE a lease_status row (the controller's memory),
or INSERT an execution. Each execution runs ``echo <token> >> <markers file>``: the file lives on
the host, outside every sandbox (the local Daytona API runs real processes on the host), so a
token written by a sandbox deleted later still counts. Meanwhile a killer thread SIGKILLs the
daemon's process group every 4-10 s and starts it again.

Then faults go off, kills stop, the daemon keeps running, and the soak settles (up to
``--settle-seconds``, ending early once every count below is 0 twice in a row). Figures:

* ``duplicate_sandboxes``: live sandboxes of this instance beyond one per ``leasectl-lease`` label;
* ``orphans``: live sandboxes of this instance whose lease row is gone or desired ``absent``;
* ``leases_not_converged``: phase differs from what the desired state asks (running -> Ready,
  stopped -> Stopped, archived -> Archived, absent -> Deleted), or the sandboxes on the API do
  not match (running: exactly one, started, with the lease's spec label; stopped/archived: none,
  or one in that state; absent: none);
* ``executions_lost``: rows still ``queued`` or ``running``;
* ``executions_run_twice``: tokens found more than once in the markers file;
* ``executions_not_started_error``: rows that provably never started (every attempt failed before
  the command reached the sandbox) and still ended in ``error``: the queue retries those until
  ``exec.queue_wait_seconds``, so under the soak's faults there must be none.

Executions are also counted by cause (``execution_cause``: ran, ran after retries, refused before
running, never started, ``unknown``, ``interrupted``, ``cancelled``) and re-attachments to session
commands after a SIGKILL are counted from the events.

``interrupted`` executions (killed mid-command; terminal, never re-run) are counted apart, as are
the other terminal states. Exit status 1 if any of the six counts is not 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import (
    API_KEY,
    DEFAULT_PG_ADMIN_URL,
    REPO_ROOT,
    EmulatorAdmin,
    Output,
    database,
    log,
    pg_reachable,
    table,
    workdir,
)

INSTANCE = "soak"
FAULTS: dict[str, Any] = {
    "fail_rate": {"*": {"429": 0.04, "500": 0.03, "503": 0.03}},
    "latency": {"*": 0.02},
    "transition_latency": {"create": 0.5, "start": 0.3, "stop": 0.3, "archive": 0.3, "delete": 0.3},
    "list_lag": 1.5,
    "retry_after": 1,
}
EXPECTED_PHASE = {"running": "Ready", "stopped": "Stopped", "archived": "Archived", "absent": "Deleted"}
EXPECTED_STATE = {"running": "started", "stopped": "stopped", "archived": "archived"}
GONE_STATES = {"destroyed"}


def _reason(error: str | None) -> str:
    """An error message with names and ids taken out, so that equal causes group together."""
    text = re.sub(r"'[^']*'", "'…'", error or "")
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27,}", "<id>", text)
    return text[:80]


def execution_cause(state: str, attempts: int | None, error: str | None) -> str:
    """Why an execution ended as it did, for the soak's table (controller.execution's causes)."""
    tried = " after retries" if attempts else ""
    if state in ("succeeded", "failed", "timed_out"):
        return f"ran: {state}{tried}"
    if state == "error":
        if (error or "").startswith("not started after"):
            return "error: never started (retries exhausted)"
        # a row retried earlier may still end here when its lease went away meanwhile
        return f"error: refused before running{tried} (lease missing, not running or not ready; bad env)"
    if state == "unknown":
        return "unknown: may have run (answer lost after sending)"
    return state


class Soak:
    def __init__(self, tmp: Path, url: str, *, seed: int, leases: int) -> None:
        from controller import db as dbmod
        from tests.support.daemon import DaemonProcess
        from tests.support.emulator import EmulatorProcess

        self.tmp = tmp
        self.url = url
        self.rng = random.Random(seed)
        self.names = [f"soak-{i:02d}" for i in range(leases)]
        self.markers = tmp / "ran.log"
        self.markers.touch()
        self.tokens: list[str] = []
        self.ops: collections.Counter[str] = collections.Counter()
        self.kills = 0
        self.restart_failures = 0
        self.start_seconds: list[float] = []
        self.killer_error: BaseException | None = None
        self.emu = EmulatorProcess(tmp / "daytona", api_key=API_KEY, startup_timeout=60).start()
        self.admin = EmulatorAdmin(self.emu.api_url)
        self.db = dbmod.connect(url)
        self.daemon_env = {
            "LEASECTL_DATABASE_URL": url,
            "DAYTONA_API_URL": self.emu.api_url,
            "DAYTONA_API_KEY": API_KEY,
            "DAYTONA_TARGET": "local",
            "LEASECTL_CONTROLLER__INSTANCE": INSTANCE,
            "LEASECTL_CONTROLLER__ORPHAN_GRACE_SECONDS": "2",
            "LEASECTL_CONTROLLER__GC_INTERVAL_SECONDS": "3",
            "LEASECTL_CONTROLLER__API_RATE_PER_SECOND": "100",
            "LEASECTL_CONTROLLER__ACTION_TIMEOUT_SECONDS": "30",
            "LEASECTL_CONTROLLER__SHUTDOWN_TIMEOUT_SECONDS": "5",
            "LEASECTL_EXEC__QUEUE_WAIT_SECONDS": "30",
            "LEASECTL_EXEC__DEFAULT_TIMEOUT_SECONDS": "30",
            "LEASECTL_LOGGING__LEVEL": "INFO",
        }
        self.daemon = DaemonProcess(tmp / "daemon.log", self.daemon_env)

    # -- the driver ------------------------------------------------------------------------------

    def _lease_rows(self) -> dict[str, str]:
        from models import Lease

        with self.db.session(readonly=True) as session:
            return dict(session.execute(sa.select(Lease.name, Lease.desired_state)).tuples().all())

    def _write(self, statement: Any) -> None:
        with self.db.session() as session:
            session.execute(statement)

    def step(self, last_apply: float) -> float:
        from models import Execution, Lease, LeaseStatus, utcnow

        rows = self._lease_rows()
        now = utcnow()
        name = self.rng.choice(self.names)
        roll = self.rng.random()
        if roll < 0.08 and time.monotonic() - last_apply > 8:
            self._apply()
            return time.monotonic()
        if roll < 0.45:
            running = [n for n, s in rows.items() if s == "running"]
            if running:
                token = uuid.uuid4().hex
                self.tokens.append(token)
                self._write(
                    sa.insert(Execution).values(
                        lease_name=self.rng.choice(running),
                        command=f"echo {token} >> {self.markers}",
                        state="queued",
                    )
                )
                self.ops["sql_insert_execution"] += 1
                return last_apply
        if name not in rows:
            self._write(
                sa.insert(Lease).values(
                    name=name,
                    desired_state="running",
                    env={},
                    labels={},
                    paused=False,
                    created_at=now,
                    updated_at=now,
                )
            )
            self.ops["sql_insert_lease"] += 1
        elif roll < 0.70:
            state = self.rng.choice(["running", "running", "running", "stopped", "archived", "absent"])
            self._write(
                sa.update(Lease).where(Lease.name == name).values(desired_state=state, updated_at=now)
            )
            self.ops["sql_update_state"] += 1
        elif roll < 0.82:
            env = {"SOAK_VERSION": str(self.rng.randint(1, 1000))}
            self._write(sa.update(Lease).where(Lease.name == name).values(env=env, updated_at=now))
            self.ops["sql_update_spec"] += 1
        elif roll < 0.92:
            self._write(sa.delete(Lease).where(Lease.name == name))
            self.ops["sql_delete_lease"] += 1
        else:
            self._write(sa.delete(LeaseStatus).where(LeaseStatus.lease_name == name))
            self.ops["sql_delete_status"] += 1
        return last_apply

    def _apply(self) -> None:
        import yaml

        chosen = self.rng.sample(self.names, k=min(4, len(self.names)))
        doc = {
            "leases": [
                {
                    "name": n,
                    "state": self.rng.choice(["running", "running", "stopped"]),
                    "env": {"SOAK_APPLY": str(self.rng.randint(1, 3))},
                }
                for n in chosen
            ]
        }
        path = self.tmp / "leases.yaml"
        path.write_text(yaml.safe_dump(doc))
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))}
        env.update(LEASECTL_CONFIG=os.devnull, LEASECTL_DATABASE_URL=self.url)
        proc = subprocess.run(
            [sys.executable, "-m", "controller.cli", "apply", "-f", str(path)],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        self.ops["leasectl_apply" if proc.returncode == 0 else "leasectl_apply_failed"] += 1

    # -- the killer ------------------------------------------------------------------------------

    def killer(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(self.rng.uniform(4, 10)):
                self.daemon.kill()
                self.kills += 1
                self._start_daemon()
        except BaseException as exc:  # re-raised by the drive loop
            self.killer_error = exc
            stop.set()

    def _start_daemon(self) -> None:
        for _ in range(3):
            try:
                t0 = time.monotonic()
                self.daemon.start()
                self.start_seconds.append(time.monotonic() - t0)
                return
            except RuntimeError as exc:
                self.restart_failures += 1
                log(f"soak: daemon did not start: {str(exc)[-300:]}")
                self.daemon.kill()
        raise RuntimeError("soak: the daemon failed to start three times")

    # -- the verdict -----------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        from controller.providers.base import LABEL_INSTANCE, LABEL_LEASE, LABEL_SPEC
        from controller.providers.daytona import DaytonaProvider
        from controller.reconciler import lease_view
        from models import Event, Execution, Lease, LeaseStatus

        provider = DaytonaProvider(self.emu.api_url, API_KEY, target="local")
        sandboxes = [
            s for s in provider.list_sandboxes({LABEL_INSTANCE: INSTANCE}) if s.state not in GONE_STATES
        ]
        with self.db.session(readonly=True) as session:
            leases = {
                row.name: lease_view(row, INSTANCE, "workspace") for row in session.scalars(sa.select(Lease))
            }
            status_rows = {row.lease_name: row for row in session.scalars(sa.select(LeaseStatus))}
            exec_states = collections.Counter(session.scalars(sa.select(Execution.state)).all())
            errors = collections.Counter(
                _reason(e)
                for e in session.scalars(sa.select(Execution.error).where(Execution.state == "error"))
            )
            succeeded_commands = list(
                session.scalars(sa.select(Execution.command).where(Execution.state == "succeeded"))
            )
            causes = collections.Counter(
                execution_cause(r.state, r.attempts, r.error)
                for r in session.execute(sa.select(Execution.state, Execution.attempts, Execution.error))
            )
            reattached = session.scalar(
                sa.select(sa.func.count()).select_from(Event).where(Event.outcome == "reattached")
            )
        by_lease: dict[str, list[Any]] = collections.defaultdict(list)
        for sb in sandboxes:
            by_lease[sb.labels.get(LABEL_LEASE, "")].append(sb)
        duplicates = sum(len(group) - 1 for group in by_lease.values() if len(group) > 1)
        orphans = sum(
            len(group)
            for lease, group in by_lease.items()
            if lease not in leases or leases[lease].desired_state == "absent"
        )
        not_converged: list[dict[str, Any]] = []
        for name, view in leases.items():
            desired = view.desired_state
            group = by_lease.get(name, [])
            status = status_rows.get(name)
            ok = status is not None and status.phase == EXPECTED_PHASE[desired]
            if desired == "absent":
                ok = ok and not group
            elif desired == "running":
                ok = ok and len(group) == 1 and group[0].state == EXPECTED_STATE[desired]
                ok = ok and group[0].labels.get(LABEL_SPEC) == view.spec_hash
            else:  # stopped/archived: no sandbox is fine (none is created for them), else one in that state
                ok = ok and len(group) <= 1 and all(sb.state == EXPECTED_STATE[desired] for sb in group)
            if not ok:
                not_converged.append(
                    {
                        "lease": name,
                        "desired": desired,
                        "phase": status.phase if status else None,
                        "message": status.message if status else None,
                        "sandboxes": [f"{sb.name}:{sb.state}" for sb in group],
                    }
                )
        seen = collections.Counter(self.markers.read_text().split())
        run_twice = sum(1 for n in seen.values() if n > 1)
        tokens_succeeded = {c.split()[1] for c in succeeded_commands if c.startswith("echo ")}
        return {
            "duplicate_sandboxes": duplicates,
            "orphans": orphans,
            "leases_not_converged": len(not_converged),
            "executions_lost": exec_states.get("queued", 0) + exec_states.get("running", 0),
            "executions_run_twice": run_twice,
            "executions_not_started_error": causes.get("error: never started (retries exhausted)", 0),
            "executions_by_cause": dict(causes),
            "executions_reattached": reattached or 0,
            "not_converged_leases": not_converged,
            "executions_interrupted": exec_states.get("interrupted", 0),
            "executions_by_state": dict(exec_states),
            "executions_queued_total": len(self.tokens),
            "execution_errors": dict(errors.most_common(6)),
            "markers_written": len(seen),
            "succeeded_without_marker": len(tokens_succeeded - set(seen)),
            "leases": len(leases),
            "live_sandboxes": len(sandboxes),
        }

    def close(self) -> None:
        try:
            if self.daemon.process is not None and self.daemon.process.poll() is None:
                try:
                    self.daemon.terminate(timeout=30)
                except Exception:
                    self.daemon.kill()
        finally:
            self.db.dispose()
            self.emu.kill()


LOSS_KEYS = (
    "duplicate_sandboxes",
    "orphans",
    "leases_not_converged",
    "executions_lost",
    "executions_run_twice",
    "executions_not_started_error",
)


def soak(
    out: Output,
    *,
    drive_seconds: float,
    settle_seconds: float,
    backend: str = "sqlite",
    pg_admin_url: str = DEFAULT_PG_ADMIN_URL,
    seed: int | None = None,
    leases: int = 12,
) -> dict[str, Any]:
    seed = seed if seed is not None else random.SystemRandom().randint(1, 10**6)
    with workdir("soak") as tmp, database(backend, tmp, pg_admin_url) as url:
        run = Soak(tmp, url, seed=seed, leases=leases)
        try:
            run.admin.set_faults(**FAULTS, seed=seed)
            run._start_daemon()
            log(f"soak: driving for {drive_seconds:.0f}s (seed {seed}, {backend})")
            stop = threading.Event()
            killer = threading.Thread(target=run.killer, args=(stop,), name="soak-killer", daemon=True)
            killer.start()
            started = time.monotonic()
            last_apply = 0.0
            while time.monotonic() - started < drive_seconds and not stop.is_set():
                last_apply = run.step(last_apply)
                time.sleep(run.rng.uniform(0.2, 0.8))
            stop.set()
            killer.join(timeout=120)
            if run.killer_error is not None:
                raise RuntimeError(f"soak: could not restart the daemon: {run.killer_error}")
            if run.daemon.process is None or run.daemon.process.poll() is not None:
                run._start_daemon()
            api_during_drive = run.admin.stats()
            run.admin.reset_faults()
            log(f"soak: drive done ({run.kills} SIGKILLs); faults off, settling up to {settle_seconds:.0f}s")
            settle_started = time.monotonic()
            figures = run.figures()
            clean_in_a_row = 0
            while time.monotonic() - settle_started < settle_seconds:
                time.sleep(2)
                figures = run.figures()
                clean = not any(figures[k] for k in LOSS_KEYS)
                clean_in_a_row = clean_in_a_row + 1 if clean else 0
                if clean_in_a_row >= 2:
                    break
            settled = time.monotonic() - settle_started
            daemon_alive = run.daemon.process is not None and run.daemon.process.poll() is None
        finally:
            run.close()
        daemon_log = (tmp / "daemon.log").read_text(errors="replace")
        tracebacks = daemon_log.count("Traceback (most recent call last)")
    figures.update(
        sigkills=run.kills,
        daemon_restart_failures=run.restart_failures,
        daemon_mean_start_to_healthy_s=round(sum(run.start_seconds) / max(len(run.start_seconds), 1), 2),
        daemon_alive_at_end=daemon_alive,
        settle_seconds=round(settled, 1),
        driver_ops=dict(run.ops),
        api_requests_during_drive=sum(api_during_drive.values()),
        daemon_log_tracebacks=tracebacks,
    )
    params = {
        "drive_seconds": drive_seconds,
        "settle_max_seconds": settle_seconds,
        "backend": backend,
        "seed": seed,
        "lease_names": leases,
        "faults": FAULTS,
        "kill_every_seconds": [4, 10],
    }
    record = out.emit("soak", params, figures)
    print()
    print("soak: after the drive and the settle period (every count must be 0)")
    print(table(["figure", "value"], [[k, figures[k]] for k in LOSS_KEYS]))
    print(table(["executions by cause", "count"], sorted(figures["executions_by_cause"].items())))
    print(
        table(
            ["other", "value"],
            [
                ["sigkills", run.kills],
                ["executions queued", figures["executions_queued_total"]],
                ["executions interrupted", figures["executions_interrupted"]],
                ["executions by state", json.dumps(figures["executions_by_state"], sort_keys=True)],
                ["executions re-attached", figures["executions_reattached"]],
                ["leases at the end", figures["leases"]],
                ["settle seconds", figures["settle_seconds"]],
            ],
        )
    )
    print()
    return record


def failed(record: dict[str, Any]) -> bool:
    return any(record["figures"][k] for k in LOSS_KEYS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to drive (default 5)")
    parser.add_argument("--quick", action="store_true", help="a 30 s drive (make bench-quick)")
    parser.add_argument("--settle-seconds", type=float, default=None, help="longest settle period")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--pg-url", default=DEFAULT_PG_ADMIN_URL, help="PostgreSQL admin URL")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--leases", type=int, default=12, help="lease names the driver plays with")
    parser.add_argument("--jsonl", type=Path, default=None, help="also append the JSON line here")
    args = parser.parse_args(argv)
    if args.backend == "postgres" and (problem := pg_reachable(args.pg_url)):
        print(problem, file=sys.stderr)
        return 2
    drive = 30.0 if args.quick else args.minutes * 60
    settle = args.settle_seconds if args.settle_seconds is not None else (40.0 if args.quick else 120.0)
    out = Output(args.pg_url if args.backend == "postgres" else None, args.jsonl)
    record = soak(
        out,
        drive_seconds=drive,
        settle_seconds=settle,
        backend=args.backend,
        pg_admin_url=args.pg_url,
        seed=args.seed,
        leases=args.leases,
    )
    return 1 if failed(record) else 0


if __name__ == "__main__":
    sys.exit(main())
