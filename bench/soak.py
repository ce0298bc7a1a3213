"""Chaos soak: daemons under every fault, operator edits, SIGKILLs and a database outage; at the end
nothing is lost, doubled or left behind.

``python -m bench.soak [--minutes 20] [--backend postgres|sqlite] [--replicas N] [--seed N]``
(``--quick``: a 30 s drive, what ``make bench-quick`` runs; ``make soak`` runs both backends).

Set-up: a fresh database; the local Daytona API in a subprocess; ``leasectl run`` as subprocesses,
two replicas on PostgreSQL (reaching the database through a TCP proxy the soak can cut) and one on
SQLite, with short intervals and an orphan grace of 2 s.

The local API runs with every fault it has, some all the time and some that come and go:

* always (``BASE_FAULTS``): 429 with Daytona's named ``Retry-After-*`` headers, 500, 503 and
  time-outs (the operation happens, the answer is a 504 after ``hang_seconds``) on every operation;
  latency; transitions that take time; a list that shows every sandbox as it was 1.5 s ago
  (creates, deletes and state changes); creates, starts and recovers that fail late (``error``
  after the wait, answered 400 "Sandbox failed to start") and creates that end ``build_failed``;
  auto-stop minutes passing ``time_scale`` times faster (leases with ``auto_stop_interval`` park
  and show ``Idle``);
* weather (``WEATHER``), changed every 8-20 s: quota 400s on the number of sandboxes, CPU and disk,
  "No available runners", errors that cannot be recovered; or calm.
* not used: ``stuck_starting`` (a sandbox stays ``starting`` for good, also after faults go off,
  so it measures the local API, not the controller).

The driver picks every 0.2-0.8 s: ``leasectl apply`` of a few leases (a subprocess, at most every
8 s), INSERT a lease (every third with ``auto_stop_interval``), UPDATE desired_state, UPDATE env (a
spec change: the sandbox is replaced), DELETE a lease row, DELETE a lease_status row (the
controller's memory), INSERT an execution, cancel one (``leasectl cancel``, or SQL), force a
sandbox into ``stopped`` or ``error`` behind the controller's back (as a dashboard would), and
:meth:`Soak.pool_step` (also every ``POOL_EVERY_SECONDS``): claim a member of the soak's pool
(``POOL``, declared at the start through the same YAML ``apply`` reads, and in every later apply)
with :func:`controller.claims.claim`, no wait ("no member ready" is counted, not a fault), or
release one the soak holds. Each execution runs ``echo <token> >>
<markers file>`` (some after a ``sleep 1``, so that cancels find them running): the file lives on
the host, outside every sandbox, so a token written by a sandbox deleted later still counts.

A killer SIGKILLs every 4-10 s: with two replicas the leader 70% of the time, both 15%, the
follower 15%; then starts them again. Halfway through, the database goes away for
``outage_seconds`` (PostgreSQL: every connection of the daemons cut and new ones refused by the
proxy; the driver keeps its direct connection, as operators would); kills pause meanwhile, since a
daemon cannot start without its database.

Then faults go off, kills stop, the daemons keep running, leases the operator would have to fix
(``Failed`` after a build failure while desired running: "change the spec to retry") get a spec
change, and the soak settles (up to ``--settle-seconds``, ending early once every loss count is 0
twice in a row). Loss counts (exit status 1 if any is not 0):

* ``duplicate_sandboxes``: live sandboxes of this instance beyond one per ``leasectl-lease`` label;
* ``orphans``: live sandboxes of this instance whose lease row is gone or desired ``absent``;
* ``leases_not_converged``: phase or sandboxes not what the desired state asks (see
  :func:`lease_converged`);
* ``executions_lost`` / ``executions_run_twice``: see :func:`account_executions`;
* ``pool_members_claimed_twice``: members handed to more than one claim, from the soak's own record
  and from the claim events (see :func:`count_pool_claims`);
* ``daemon_log_tracebacks``: tracebacks in any daemon's log;
* ``api_key_in_logs``: the Daytona API key found in a daemon log or in the events table.
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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
BASE_FAULTS: dict[str, Any] = {
    "fail_rate": {"*": {"429": 0.03, "500": 0.02, "503": 0.02, "timeout": 0.005}},
    "latency": {"*": 0.02},
    "transition_latency": {"create": 0.5, "start": 0.3, "stop": 0.3, "archive": 0.3, "delete": 0.3},
    "list_lag": 1.5,
    "retry_after": 1,
    "hang_seconds": 2,
    "start_wait_seconds": 5,
    "sandbox_error": {"create": 0.03, "start": 0.03, "recover": 0.05},
    "error_recoverable": True,
    "build_failed": 0.02,
    "time_scale": 30,
}
# Faults that come and go: one is in force at a time, for 8-20 s. Every key is set each time, so
# the previous weather ends when the next begins.
CALM: dict[str, Any] = {
    "quota": None,
    "quota_cpu": None,
    "quota_disk": None,
    "no_runners": 0.0,
    "error_recoverable": True,
}
WEATHER: dict[str, dict[str, Any]] = {
    "calm": {},
    "quota_sandboxes": {"quota": 5},
    "quota_cpu": {"quota_cpu": 6},
    "quota_disk": {"quota_disk": 25},
    "no_runners": {"no_runners": 0.5},
    "unrecoverable_errors": {"error_recoverable": False},
}
POOL_NAME = "soak-pool"
# Small, so that claims sometimes find no member Ready and the soak's held members bound the rest.
POOL: dict[str, Any] = {
    "name": POOL_NAME,
    "template": {"env": {"SOAK_POOL": "1"}},
    "min_ready": 2,
    "max_size": 6,
}
POOL_EVERY_SECONDS = 2.0  # the driver's pool step runs at least this often
POOL_HOLD_MAX = 3  # members the soak holds at most before it releases one
HANDED_OUT = ("warm", "cold")  # claim event outcomes that hand a member to a claimer ("reserved" does not)
AUTO_STOP_MINUTES = 1  # with time_scale 30: parked after 2 s without activity
KILL_EVERY_SECONDS = (4.0, 10.0)
KILL_MIX = {"leader": 0.70, "both": 0.15, "follower": 0.15}  # with two replicas
EXPECTED_PHASE = {"running": "Ready", "stopped": "Stopped", "archived": "Archived", "absent": "Deleted"}
# The sandbox states each desired state accepts (docs/architecture.md, the planner's table): a
# stopped lease is met by a paused or archived sandbox too (archived is stopped as well; restoring
# it only to stop it again would cost a restore for nothing).
EXPECTED_STATES = {
    "running": ("started",),
    "stopped": ("stopped", "paused", "archived"),
    "archived": ("archived",),
}
GONE_STATES = {"destroyed"}
NOT_TERMINAL = ("queued", "running")
_TOKEN = re.compile(r"echo ([0-9a-f]{32}) >>")


def _reason(error: str | None) -> str:
    """An error message with names and ids taken out, so that equal causes group together."""
    text = re.sub(r"'[^']*'", "'…'", error or "")
    text = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27,}", "<id>", text)
    return text[:80]


# -- the verdict, in pure functions ----------------------------------------------------------------


def account_executions(rows: Iterable[tuple[str, str | None]], markers: Mapping[str, int]) -> dict[str, Any]:
    """What became of the queued executions: ``rows`` are (state, command), ``markers`` how often
    each token reached the markers file.

    * lost: a row still ``queued``/``running`` after the settle period, or ``succeeded`` while its
      token never reached the file;
    * run twice: a token written more than once;
    * a state this function does not know (e.g. one added to the queue later) is neither lost nor
      run twice: it is counted in ``executions_unknown_states`` and reported.
    """
    from models.tables import EXECUTION_STATES

    by_state: collections.Counter[str] = collections.Counter()
    unknown: collections.Counter[str] = collections.Counter()
    lost = 0
    succeeded_without_marker = 0
    cancelled_after_running = 0
    tokens_seen_in_rows: set[str] = set()
    for state, command in rows:
        by_state[state] += 1
        match = _TOKEN.search(command or "")
        token = match.group(1) if match else None
        if token is not None:
            tokens_seen_in_rows.add(token)
        if state not in EXECUTION_STATES:
            unknown[state] += 1
        elif state in NOT_TERMINAL:
            lost += 1
        elif state == "succeeded" and token is not None and markers.get(token, 0) == 0:
            lost += 1
            succeeded_without_marker += 1
        elif state == "cancelled" and token is not None and markers.get(token, 0) > 0:
            cancelled_after_running += 1
    return {
        "executions_lost": lost,
        "executions_run_twice": sum(1 for n in markers.values() if n > 1),
        "executions_by_state": dict(sorted(by_state.items())),
        "executions_unknown_states": dict(unknown),
        "executions_succeeded_without_marker": succeeded_without_marker,
        "executions_cancelled_after_their_command_ran": cancelled_after_running,
        "markers_without_row": len(set(markers) - tokens_seen_in_rows),
    }


NEVER_STARTED_ERROR = "error: never started (retries exhausted)"


def execution_cause(state: str, attempts: int | None, error: str | None) -> str:
    """Why an execution ended as it did (the causes of docs/execution.md), for the soak's table.

    The queue retries what provably never reached the sandbox until ``exec.queue_wait_seconds``, so
    under the soak's faults no row may end as :data:`NEVER_STARTED_ERROR` (a loss count).
    """
    tried = " after retries" if attempts else ""
    if state in ("succeeded", "failed", "timed_out"):
        return f"ran: {state}{tried}"
    if state == "error":
        if (error or "").startswith("not started after"):
            return NEVER_STARTED_ERROR
        # a row retried earlier may still end here when its lease went away meanwhile
        return f"error: refused before running{tried} (lease missing, not running or not ready; bad env)"
    if state == "unknown":
        return "unknown: may have run (answer lost after sending)"
    return state


def count_causes(rows: Iterable[tuple[str, int | None, str | None]], reattached: int) -> dict[str, Any]:
    """Executions by cause from (state, attempts, error) rows, and the re-attachments to session
    commands after a worker died (from the events)."""
    causes = collections.Counter(execution_cause(state, attempts, error) for state, attempts, error in rows)
    return {
        "executions_not_started_error": causes.get(NEVER_STARTED_ERROR, 0),
        "executions_by_cause": dict(sorted(causes.items())),
        "executions_reattached": reattached,
    }


def count_pool_claims(
    got: Iterable[tuple[str, str]],
    claim_events: Iterable[tuple[str | None, str]],
    ops: Mapping[str, int],
) -> dict[str, Any]:
    """Pool claims from the soak's own record and from the events table.

    ``got`` is every (member, owner) a claim handed the soak; ``claim_events`` the (lease, outcome)
    of every ``claim`` event (``warm``/``cold`` hand a member out, ``reserved`` does not); ``ops``
    the driver's counters. A member is claimed twice when either source shows it handed out more
    than once (every claim of the soak has its own owner, so even the same owner twice counts).
    """
    got = list(got)
    by_record = collections.Counter(member for member, _ in got)
    by_events = collections.Counter(lease for lease, outcome in claim_events if outcome in HANDED_OUT)
    twice_record = {m for m, n in by_record.items() if n > 1}
    twice_events = {m for m, n in by_events.items() if n > 1}
    return {
        "pool_members_claimed_twice": len(twice_record | twice_events),
        "pool_members_claimed_twice_in_record": sorted(twice_record),
        "pool_members_claimed_twice_in_events": sorted(twice_events),
        "pool_claims_made": len(got),
        "pool_claims_refused": ops.get("pool_claim_refused", 0),
        "pool_releases": ops.get("pool_release", 0),
        "pool_releases_refused": ops.get("pool_release_refused", 0),
        "pool_claim_events": sum(by_events.values()),
        "pool_claims_without_event": len(set(by_record) - set(by_events)),
    }


@dataclass(frozen=True)
class SandboxSeen:
    name: str
    state: str
    spec_hash: str | None


def lease_converged(
    desired: str, parks_when_idle: bool, spec_hash: str, phase: str | None, group: list[SandboxSeen]
) -> tuple[bool, bool]:
    """(converged, left_by_design) for one lease and the live sandboxes carrying its label.

    running: exactly one sandbox with the lease's spec, ``started`` and phase Ready, or (a lease
    with ``auto_stop_interval``) ``stopped`` and phase Idle. stopped/archived: phase Stopped /
    Archived with no sandbox or one in a state :data:`EXPECTED_STATES` accepts (a stopped lease
    whose sandbox was archived before the lease asked for stopped is met); or, by design, one
    sandbox left in ``error`` or ``build_failed`` with phase Error / Failed (the planner leaves
    those alone until the lease asks for running or absent). absent: phase Deleted, no sandbox.
    """
    if desired == "absent":
        return phase == "Deleted" and not group, False
    if desired == "running":
        if len(group) != 1 or group[0].spec_hash != spec_hash:
            return False, False
        state = group[0].state
        if state == "started" and phase == "Ready":
            return True, False
        return parks_when_idle and state == "stopped" and phase == "Idle", False
    if len(group) == 1 and (group[0].state, phase) in (("error", "Error"), ("build_failed", "Failed")):
        return True, True
    ok = phase == EXPECTED_PHASE[desired] and len(group) <= 1
    return ok and all(sb.state in EXPECTED_STATES[desired] for sb in group), False


def choose_victims(rng: random.Random, replicas: int, leader: int | None) -> tuple[str, list[int]]:
    """Which daemons (indexes) the killer SIGKILLs: (kind, indexes)."""
    if replicas == 1:
        return "leader" if leader == 0 else "only", [0]
    leader = leader if leader is not None else rng.randrange(replicas)
    roll = rng.random()
    if roll < KILL_MIX["leader"]:
        return "leader", [leader]
    if roll < KILL_MIX["leader"] + KILL_MIX["both"]:
        return "both", list(range(replicas))
    return "follower", [rng.choice([i for i in range(replicas) if i != leader])]


# -- the run ---------------------------------------------------------------------------------------


class Soak:
    def __init__(
        self,
        tmp: Path,
        url: str,
        *,
        seed: int,
        leases: int,
        replicas: int,
        daemon_url: str | None = None,
        kill_every: tuple[float, float] = KILL_EVERY_SECONDS,
    ) -> None:
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
        self.kills: collections.Counter[str] = collections.Counter()
        self.sigkills = 0
        self.weather: collections.Counter[str] = collections.Counter()
        self.restart_failures = 0
        self.start_seconds: list[float] = []
        self.kill_every = kill_every
        self.pool_got: list[tuple[str, str]] = []  # every (member, owner) a claim handed the soak
        self.pool_held: list[str] = []  # members the soak holds (claimed, not yet released)
        self.last_pool = 0.0
        self.background_error: BaseException | None = None
        self.outage = threading.Event()  # set while the database is cut off: no kills then
        self.lock = threading.Lock()  # daemons are killed and started by one thread at a time
        self.emu = EmulatorProcess(tmp / "daytona", api_key=API_KEY, startup_timeout=60).start()
        self.admin = EmulatorAdmin(self.emu.api_url)
        self.db = dbmod.connect(url)
        daemon_env = {
            "LEASECTL_DATABASE_URL": daemon_url or url,
            "DAYTONA_API_URL": self.emu.api_url,
            "DAYTONA_API_KEY": API_KEY,
            "DAYTONA_TARGET": "local",
            "LEASECTL_CONTROLLER__INSTANCE": INSTANCE,
            "LEASECTL_CONTROLLER__ORPHAN_GRACE_SECONDS": "2",
            "LEASECTL_CONTROLLER__GC_INTERVAL_SECONDS": "3",
            "LEASECTL_CONTROLLER__API_RATE_PER_SECOND": "100",
            "LEASECTL_CONTROLLER__ACTION_TIMEOUT_SECONDS": "30",
            "LEASECTL_CONTROLLER__SHUTDOWN_TIMEOUT_SECONDS": "5",
            "LEASECTL_CONTROLLER__BLOCKED_BACKOFF_MAX_SECONDS": "5",
            "LEASECTL_EXEC__QUEUE_WAIT_SECONDS": "30",
            "LEASECTL_EXEC__DEFAULT_TIMEOUT_SECONDS": "30",
            "LEASECTL_EXEC__IDLE_START_TIMEOUT_SECONDS": "30",
            "LEASECTL_LOGGING__LEVEL": "INFO",
        }
        self.daemons = [DaemonProcess(tmp / f"daemon-{i}.log", daemon_env) for i in range(replicas)]

    # -- the driver ------------------------------------------------------------------------------

    def _lease_rows(self) -> dict[str, str]:
        from models import Lease

        with self.db.session(readonly=True) as session:
            return dict(session.execute(sa.select(Lease.name, Lease.desired_state)).tuples().all())

    def _write(self, statement: Any) -> int:
        with self.db.session() as session:
            return int(getattr(session.execute(statement), "rowcount", 0) or 0)

    def _cli(self, *args: str) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))}
        env.update(
            LEASECTL_CONFIG=os.devnull,
            LEASECTL_DATABASE_URL=self.url,
            DAYTONA_API_URL=self.emu.api_url,
            DAYTONA_API_KEY=API_KEY,
            DAYTONA_TARGET="local",
            LEASECTL_CONTROLLER__INSTANCE=INSTANCE,
        )
        proc = subprocess.run(
            [sys.executable, "-m", "controller.cli", *args],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return proc.returncode

    def step(self, last_cli: float) -> float:
        """One operator move; returns when a CLI subprocess last ran (they are spaced out)."""
        if time.monotonic() - self.last_pool >= POOL_EVERY_SECONDS:
            self.pool_step()
        rows = self._lease_rows()
        roll = self.rng.random()
        cli_ok = time.monotonic() - last_cli > 8
        if roll < 0.06 and cli_ok:
            self._apply()
            return time.monotonic()
        if roll < 0.10 and cli_ok and self._cancel_with_cli():
            return time.monotonic()
        if roll < 0.13:
            self._cancel_with_sql()
        elif roll < 0.16:
            self._force_drift()
        elif roll < 0.17:
            self.pool_step()
        elif roll < 0.47 and any(s == "running" for s in rows.values()):
            self._queue_execution([n for n, s in rows.items() if s == "running"])
        else:
            self._edit_lease(rows, roll)
        return last_cli

    def _queue_execution(self, running: list[str]) -> None:
        from models import Execution

        token = uuid.uuid4().hex
        self.tokens.append(token)
        slow = self.rng.random() < 0.3
        command = f"{'sleep 1; ' if slow else ''}echo {token} >> {self.markers}"
        self._write(
            sa.insert(Execution).values(lease_name=self.rng.choice(running), command=command, state="queued")
        )
        self.ops["sql_insert_execution"] += 1

    def _edit_lease(self, rows: dict[str, str], roll: float) -> None:
        from models import Lease, LeaseStatus, utcnow

        now = utcnow()
        name = self.rng.choice(self.names)
        if name not in rows:
            index = self.names.index(name)
            self._write(
                sa.insert(Lease).values(
                    name=name,
                    desired_state="running",
                    env={},
                    labels={},
                    auto_stop_interval=AUTO_STOP_MINUTES if index % 3 == 0 else None,
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

    def _apply_doc(self, doc: dict[str, Any]) -> int:
        import yaml

        path = self.tmp / "leases.yaml"
        path.write_text(yaml.safe_dump(doc))
        return self._cli("apply", "-f", str(path))

    def declare_pool(self) -> None:
        """The soak's pool, declared as an operator would: ``leasectl apply`` of a ``pools:`` list."""
        code = self._apply_doc({"pools": [POOL]})
        if code != 0:
            raise RuntimeError(f"soak: leasectl apply of the pool exited {code}")

    def _apply(self) -> None:
        chosen = self.rng.sample(self.names, k=min(4, len(self.names)))
        doc = {
            "leases": [
                {
                    "name": n,
                    "state": self.rng.choice(["running", "running", "stopped"]),
                    "env": {"SOAK_APPLY": str(self.rng.randint(1, 3))},
                    **({"auto_stop_interval": AUTO_STOP_MINUTES} if self.names.index(n) % 3 == 0 else {}),
                }
                for n in chosen
            ],
            "pools": [POOL],  # the same declaration each time: apply leaves the pool as it is
        }
        code = self._apply_doc(doc)
        self.ops["leasectl_apply" if code == 0 else "leasectl_apply_failed"] += 1

    def _open_executions(self) -> list[int]:
        from models import Execution

        with self.db.session(readonly=True) as session:
            return list(
                session.scalars(
                    sa.select(Execution.id).where(Execution.state.in_(NOT_TERMINAL)).order_by(Execution.id)
                )
            )

    def _cancel_with_cli(self) -> bool:
        """``leasectl cancel`` of a queued or running execution (exit 3: it ended meanwhile)."""
        open_ids = self._open_executions()
        if not open_ids:
            return False
        code = self._cli("cancel", str(self.rng.choice(open_ids)))
        self.ops["leasectl_cancel" if code == 0 else "leasectl_cancel_refused"] += 1
        return True

    def _cancel_with_sql(self) -> None:
        """The README's SQL cancel of a queued execution."""
        from models import Execution

        open_ids = self._open_executions()
        if not open_ids:
            return
        done = self._write(
            sa.update(Execution)
            .where(Execution.id == self.rng.choice(open_ids), Execution.state == "queued")
            .values(state="cancelled")
        )
        self.ops["sql_cancel_execution" if done else "sql_cancel_missed"] += 1

    def _force_drift(self) -> None:
        """A change behind the controller's back: a sandbox stopped or broken (as the dashboard or a
        failing runner would)."""
        from controller.providers.base import LABEL_INSTANCE
        from controller.providers.daytona import DaytonaProvider
        from tests.support.emulator import EmulatorError

        provider = DaytonaProvider(self.emu.api_url, API_KEY, target="local")
        try:
            started = [
                sb for sb in provider.list_sandboxes({LABEL_INSTANCE: INSTANCE}) if sb.state == "started"
            ]
        except Exception:  # an injected fault on the list: try another time
            return
        if not started:
            return
        sandbox = self.rng.choice(started)
        state = self.rng.choice(["stopped", "error"])
        try:
            self.emu.force_state(sandbox.id, state, recoverable=True, error_reason="soak: runner lost")
        except EmulatorError:
            return
        self.ops[f"drift_{state}"] += 1

    def pool_step(self) -> None:
        """Claim a member of the soak's pool (one transaction, no wait; each claim has its own
        owner) and record (member, owner), or release a member the soak holds: always when it holds
        ``POOL_HOLD_MAX``, else 40% of the time. :meth:`figures` counts members claimed twice."""
        from controller.claims import NoMemberReadyError, NotClaimedError, claim, release

        self.last_pool = time.monotonic()
        if self.pool_held and (len(self.pool_held) >= POOL_HOLD_MAX or self.rng.random() < 0.4):
            member = self.pool_held.pop(self.rng.randrange(len(self.pool_held)))
            try:
                release(self.db, member)
            except NotClaimedError as exc:  # reported: nothing else releases the soak's members
                log(f"soak: release of {member} refused: {exc}")
                self.ops["pool_release_refused"] += 1
                return
            self.ops["pool_release"] += 1
            return
        owner = f"soak-claim-{self.ops['pool_claim'] + self.ops['pool_claim_refused']}"
        try:
            got = claim(self.db, POOL_NAME, owner=owner, wait_seconds=0)
        except NoMemberReadyError:
            self.ops["pool_claim_refused"] += 1
            return
        self.pool_got.append((got.lease, owner))
        self.pool_held.append(got.lease)
        self.ops["pool_claim"] += 1

    # -- faults that come and go -----------------------------------------------------------------

    def weather_loop(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(self.rng.uniform(8, 20)):
                kind = self.rng.choice(sorted(WEATHER))
                self.admin.set_faults(**{**CALM, **WEATHER[kind]})
                self.weather[kind] += 1
            self.admin.set_faults(**CALM)
        except BaseException as exc:  # re-raised by the drive loop
            self.background_error = exc
            stop.set()

    # -- the killer and the outage ---------------------------------------------------------------

    def leader_index(self) -> int | None:
        """Which daemon holds leadership (from the election row's holder, host:pid:nonce)."""
        from models import LeaderElection, utcnow

        with self.db.session(readonly=True) as session:
            row = session.get(LeaderElection, INSTANCE)
        if row is None or row.holder is None or row.expires_at is None or row.expires_at < utcnow():
            return None
        parts = row.holder.split(":")
        for i, d in enumerate(self.daemons):
            if len(parts) >= 2 and d.process is not None and str(d.process.pid) == parts[1]:
                return i
        return None

    def killer(self, stop: threading.Event) -> None:
        try:
            while not stop.wait(self.rng.uniform(*self.kill_every)):
                with self.lock:
                    if self.outage.is_set():  # set under the lock: no daemon starts into an outage
                        continue
                    kind, victims = choose_victims(self.rng, len(self.daemons), self.leader_index())
                    for i in victims:
                        self.daemons[i].kill()
                        self.sigkills += 1
                    self.kills[kind] += 1
                    for i in victims:
                        self._start_daemon(i)
        except BaseException as exc:  # re-raised by the drive loop
            self.background_error = exc
            stop.set()

    def _start_daemon(self, i: int) -> None:
        for _ in range(3):
            try:
                t0 = time.monotonic()
                self.daemons[i].start()
                self.start_seconds.append(time.monotonic() - t0)
                return
            except RuntimeError as exc:
                self.restart_failures += 1
                log(f"soak: daemon {i} did not start: {str(exc)[-300:]}")
                self.daemons[i].kill()
        raise RuntimeError(f"soak: daemon {i} failed to start three times")

    def ensure_daemons(self) -> None:
        with self.lock:
            for i, d in enumerate(self.daemons):
                if d.process is None or d.process.poll() is not None:
                    self._start_daemon(i)

    # -- the verdict -----------------------------------------------------------------------------

    def respec_failed_leases(self) -> int:
        """The operator's fix for a lease ``Failed`` by a build failure while desired running
        ("change the spec to retry"): a new env value. Returns how many were changed."""
        from models import Lease, LeaseStatus, utcnow

        with self.db.session(readonly=True) as session:
            names = list(
                session.scalars(
                    sa.select(Lease.name)
                    .join(LeaseStatus, LeaseStatus.lease_name == Lease.name)
                    .where(Lease.desired_state == "running", LeaseStatus.phase == "Failed")
                )
            )
        for name in names:
            env = {"SOAK_RESPEC": uuid.uuid4().hex[:8]}
            self._write(sa.update(Lease).where(Lease.name == name).values(env=env, updated_at=utcnow()))
        return len(names)

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
            execution_rows = session.execute(sa.select(Execution.state, Execution.command)).tuples().all()
            cause_rows = (
                session.execute(sa.select(Execution.state, Execution.attempts, Execution.error))
                .tuples()
                .all()
            )
            claim_events = (
                session.execute(sa.select(Event.lease_name, Event.outcome).where(Event.action == "claim"))
                .tuples()
                .all()
            )
            reattached = session.scalar(
                sa.select(sa.func.count()).select_from(Event).where(Event.outcome == "reattached")
            )
            errors = collections.Counter(
                _reason(e)
                for e in session.scalars(sa.select(Execution.error).where(Execution.state == "error"))
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
        by_design = 0
        for name, view in leases.items():
            group = by_lease.get(name, [])
            status = status_rows.get(name)
            seen = [SandboxSeen(sb.name, sb.state, sb.labels.get(LABEL_SPEC)) for sb in group]
            ok, left = lease_converged(
                view.desired_state,
                view.parks_when_idle,
                view.spec_hash,
                status.phase if status else None,
                seen,
            )
            by_design += left
            if not ok:
                not_converged.append(
                    {
                        "lease": name,
                        "desired": view.desired_state,
                        "phase": status.phase if status else None,
                        "message": status.message if status else None,
                        "sandboxes": [f"{sb.name}:{sb.state}" for sb in group],
                    }
                )
        markers = collections.Counter(self.markers.read_text().split())
        figures = {
            "duplicate_sandboxes": duplicates,
            "orphans": orphans,
            "leases_not_converged": len(not_converged),
            "not_converged_leases": not_converged,
            "leases_left_in_error_by_design": by_design,
            "leases": len(leases),
            "leases_by_phase": dict(
                collections.Counter(s.phase for n, s in status_rows.items() if n in leases).most_common()
            ),
            "live_sandboxes": len(sandboxes),
            "executions_queued_total": len(self.tokens),
            "execution_errors": dict(errors.most_common(6)),
        }
        figures.update(account_executions(execution_rows, markers))
        figures.update(count_causes(cause_rows, reattached or 0))
        figures.update(count_pool_claims(self.pool_got, claim_events, self.ops))
        return figures

    def close(self) -> None:
        try:
            for d in self.daemons:
                if d.process is not None and d.process.poll() is None:
                    try:
                        d.terminate(timeout=30)
                    except Exception:
                        d.kill()
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
    "pool_members_claimed_twice",
    "daemon_log_tracebacks",
    "api_key_in_logs",
)


class _NoProxy:
    """SQLite has no server to cut off: the outage step is skipped."""

    port = 0

    def cut(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        return None

    def stop(self) -> None:
        return None


def _proxied(url: str) -> tuple[Any, str | None]:
    """(proxy, the daemons' URL through it) on PostgreSQL; (_NoProxy(), None) on SQLite."""
    if not url.startswith("postgresql"):
        return _NoProxy(), None
    from tests.support.daemon import TcpProxy

    target = sa.make_url(url)
    proxy = TcpProxy(target.host or "127.0.0.1", target.port or 5432).start()
    through = target.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    return proxy, through


def _keep_logs(tmp: Path, replicas: int) -> str:
    """Copy the daemons' and the local API's logs out of the work dir (deleted at the end)."""
    import shutil
    import tempfile

    kept = Path(tempfile.mkdtemp(prefix="leasectl-soak-logs-"))
    for path in [*(tmp / f"daemon-{i}.log" for i in range(replicas)), *tmp.glob("emulator-*.log")]:
        if path.exists():
            shutil.copy(path, kept / path.name)
    return str(kept)


def _api_key_hits(db: Any, logs: list[str]) -> int:
    from models import Event

    hits = sum(text.count(API_KEY) for text in logs)
    with db.session(readonly=True) as session:
        hits += int(session.scalar(sa.select(sa.func.count()).where(Event.message.contains(API_KEY))) or 0)
    return hits


def soak(
    out: Output,
    *,
    drive_seconds: float,
    settle_seconds: float,
    backend: str = "sqlite",
    pg_admin_url: str = DEFAULT_PG_ADMIN_URL,
    seed: int | None = None,
    leases: int = 12,
    replicas: int | None = None,
    outage_seconds: float = 30.0,
    kill_every: tuple[float, float] = KILL_EVERY_SECONDS,
) -> dict[str, Any]:
    seed = seed if seed is not None else random.SystemRandom().randint(1, 10**6)
    replicas = replicas if replicas is not None else (2 if backend == "postgres" else 1)
    outage_done = 0.0
    with workdir("soak") as tmp, database(backend, tmp, pg_admin_url) as url:
        proxy, daemon_url = _proxied(url)
        run = Soak(
            tmp,
            url,
            seed=seed,
            leases=leases,
            replicas=replicas,
            daemon_url=daemon_url,
            kill_every=kill_every,
        )
        try:
            run.admin.set_faults(**BASE_FAULTS, seed=seed)
            run.declare_pool()
            run.ensure_daemons()
            log(f"soak: driving for {drive_seconds:.0f}s (seed {seed}, {backend}, {replicas} replica(s))")
            stop = threading.Event()
            threads = [
                threading.Thread(target=run.killer, args=(stop,), name="soak-killer", daemon=True),
                threading.Thread(target=run.weather_loop, args=(stop,), name="soak-weather", daemon=True),
            ]
            for thread in threads:
                thread.start()
            started = time.monotonic()
            started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            last_cli = 0.0
            cut_at = 0.0
            outage_at = drive_seconds / 2 if daemon_url is not None and outage_seconds > 0 else None
            # The drive lasts drive_seconds, and longer while the outage has not run its full length:
            # a slow operator step must not cut the outage short (or skip it).
            while not stop.is_set() and (
                time.monotonic() - started < drive_seconds or outage_at is not None or run.outage.is_set()
            ):
                if outage_at is not None and time.monotonic() - started >= outage_at:
                    outage_at = None
                    with run.lock:
                        run.outage.set()
                    log(f"soak: database outage for {outage_seconds:.0f}s")
                    proxy.cut()
                    cut_at = time.monotonic()
                if run.outage.is_set() and time.monotonic() - cut_at >= outage_seconds:
                    proxy.restore()
                    outage_done += time.monotonic() - cut_at
                    run.outage.clear()
                    log("soak: database back")
                last_cli = run.step(last_cli)
                time.sleep(run.rng.uniform(0.2, 0.8))
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
            if run.outage.is_set():
                proxy.restore()
                outage_done += time.monotonic() - cut_at
                run.outage.clear()
            if run.background_error is not None:
                raise RuntimeError(f"soak: a background thread failed: {run.background_error}")
            run.ensure_daemons()
            api_during_drive = run.admin.stats()
            run.admin.reset_faults()
            log(
                f"soak: drive done ({run.sigkills} SIGKILLs); faults off, "
                f"settling up to {settle_seconds:.0f}s"
            )
            settle_started = time.monotonic()
            respecced = run.respec_failed_leases()
            figures = run.figures()
            clean_in_a_row = 0
            while time.monotonic() - settle_started < settle_seconds:
                time.sleep(2)
                respecced += run.respec_failed_leases()
                figures = run.figures()
                clean = not any(figures[k] for k in LOSS_KEYS if k in figures)
                clean_in_a_row = clean_in_a_row + 1 if clean else 0
                if clean_in_a_row >= 2:
                    break
            settled = time.monotonic() - settle_started
            alive = sum(1 for d in run.daemons if d.process is not None and d.process.poll() is None)
        finally:
            run.close()
            proxy.stop()
        logs = [(tmp / f"daemon-{i}.log").read_text(errors="replace") for i in range(replicas)]
        tracebacks = sum(text.count("Traceback (most recent call last)") for text in logs)
        kept = (
            _keep_logs(tmp, replicas)
            if tracebacks or any(figures[k] for k in LOSS_KEYS if k in figures)
            else None
        )
        key_hits = _api_key_hits(run.db, logs)
        run.db.dispose()
    figures.update(
        daemon_log_tracebacks=tracebacks,
        logs_kept_in=kept,
        api_key_in_logs=key_hits,
        drive_started_at=started_at,
        sigkills=run.sigkills,
        kill_rounds=dict(run.kills),
        database_outage_seconds=round(outage_done, 1),
        weather=dict(run.weather),
        failed_leases_respecced=respecced,
        daemon_restart_failures=run.restart_failures,
        daemon_mean_start_to_healthy_s=round(sum(run.start_seconds) / max(len(run.start_seconds), 1), 2),
        daemons_alive_at_end=alive,
        settle_seconds=round(settled, 1),
        driver_ops=dict(sorted(run.ops.items())),
        api_requests_during_drive=sum(api_during_drive.values()),
    )
    params = {
        "drive_seconds": drive_seconds,
        "settle_max_seconds": settle_seconds,
        "backend": backend,
        "replicas": replicas,
        "seed": seed,
        "lease_names": leases,
        "faults": BASE_FAULTS,
        "weather": WEATHER,
        "outage_seconds": outage_seconds if daemon_url is not None else 0,
        "kill_every_seconds": list(kill_every),
        "kill_mix": KILL_MIX if replicas > 1 else {"only": 1.0},
    }
    record = out.emit("soak", params, figures)
    print()
    print(f"soak on {backend} with {replicas} replica(s): after the drive and the settle period")
    print(table(["loss (must be 0)", "value"], [[k, figures[k]] for k in LOSS_KEYS]))
    print(
        table(
            ["other", "value"],
            [
                ["SIGKILLs", run.sigkills],
                ["kill rounds", json.dumps(figures["kill_rounds"], sort_keys=True)],
                ["database outage s", figures["database_outage_seconds"]],
                ["weather", json.dumps(figures["weather"], sort_keys=True)],
                ["executions queued", figures["executions_queued_total"]],
                ["executions by state", json.dumps(figures["executions_by_state"], sort_keys=True)],
                ["executions in unknown states", json.dumps(figures["executions_unknown_states"])],
                ["executions by cause", json.dumps(figures["executions_by_cause"], sort_keys=True)],
                ["executions re-attached", figures["executions_reattached"]],
                ["pool claims made", figures["pool_claims_made"]],
                ["pool claims refused (none ready)", figures["pool_claims_refused"]],
                ["pool releases", figures["pool_releases"]],
                ["pool releases refused", figures["pool_releases_refused"]],
                ["leases at the end", figures["leases"]],
                ["leases by phase", json.dumps(figures["leases_by_phase"], sort_keys=True)],
                ["left in error by design", figures["leases_left_in_error_by_design"]],
                ["Failed leases re-specced", respecced],
                ["settle seconds", figures["settle_seconds"]],
            ],
        )
    )
    if figures["not_converged_leases"]:
        print(json.dumps(figures["not_converged_leases"], indent=1))
    print()
    return record


def failed(record: dict[str, Any]) -> bool:
    return any(record["figures"].get(k) for k in LOSS_KEYS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="how long to drive (default 20)")
    parser.add_argument("--quick", action="store_true", help="a 30 s drive (make bench-quick)")
    parser.add_argument("--settle-seconds", type=float, default=None, help="longest settle period")
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="postgres")
    parser.add_argument(
        "--replicas", type=int, default=None, help="daemons (default: 2 on postgres, 1 on sqlite)"
    )
    parser.add_argument("--outage-seconds", type=float, default=None, help="database outage (postgres; 30)")
    parser.add_argument("--pg-url", default=DEFAULT_PG_ADMIN_URL, help="PostgreSQL admin URL")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--leases", type=int, default=12, help="lease names the driver plays with")
    parser.add_argument("--jsonl", type=Path, default=None, help="also append the JSON line here")
    args = parser.parse_args(argv)
    if args.backend == "postgres" and (problem := pg_reachable(args.pg_url)):
        print(problem, file=sys.stderr)
        return 2
    drive = 30.0 if args.quick else args.minutes * 60
    settle = args.settle_seconds if args.settle_seconds is not None else (60.0 if args.quick else 180.0)
    outage = args.outage_seconds if args.outage_seconds is not None else (8.0 if args.quick else 30.0)
    out = Output(args.pg_url if args.backend == "postgres" else None, args.jsonl)
    record = soak(
        out,
        drive_seconds=drive,
        settle_seconds=settle,
        backend=args.backend,
        pg_admin_url=args.pg_url,
        seed=args.seed,
        leases=args.leases,
        replicas=args.replicas,
        outage_seconds=outage,
    )
    return 1 if failed(record) else 0


if __name__ == "__main__":
    sys.exit(main())
