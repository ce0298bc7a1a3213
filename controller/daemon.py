"""The daemon behind ``leasectl run``: APScheduler wiring, leader election, signals, health and metrics.

Jobs (BlockingScheduler, in-memory job store, ``max_instances=1``, coalescing):

* ``leader``    every lease/3 s: acquire or renew leadership (every replica); a replica that
  becomes leader (a takeover, or leadership back after a lapse) reconciles at once;
* ``reconcile`` every ``controller.reconcile_interval_seconds``: one pass, leader only;
* ``gc``        every ``controller.gc_interval_seconds``: orphans, stale rows, retention, leader only;
* ``exec``      every ``exec.poll_interval_seconds``: the execution dispatcher (every replica: its
  claims are atomic);
* ``housekeeping`` every 15 s: gauges (executions by state) and the readiness probe's DB check.

A job that fails logs the error and the daemon goes on (with a traceback when it is not a
LeasectlError or a database error: a bug). SIGTERM/SIGINT: no new work is taken, the
applier lets in-flight actions finish within ``controller.shutdown_timeout_seconds``, leadership is
released, the process exits 0. On PostgreSQL a LISTEN on channel ``leasectl_leases`` wakes the
reconcile job early when a NOTIFY arrives (migration 0002 adds a trigger on ``leases``, 0004 one on
``pools``); on SQLite a watcher thread polls ``PRAGMA data_version`` and a change counter every 250 ms
for the same effect. A change that arrives during a pass makes that job run another pass at once;
while pool members are on their way, and after a pass whose actions left a lease half-way (a
create not yet Ready, a start, a stop, a delete), the next pass comes after
``pool_busy_interval_seconds``; when a schedule (controller.schedules) changes a desired state or
a pool's ``min_ready`` before the next interval, the next pass comes at that moment. These are a
bonus: the interval is the guarantee.

The daemon refuses to start on a schema older or newer than it knows (``SchemaError`` names
``leasectl db upgrade`` or "upgrade leasectl"); when the schema changes under a running replica
(another version migrated it), housekeeping notices within 15 s, releases leadership and every job
but housekeeping stops until the schema is one this replica knows again.

``/healthz`` answers while the process runs; ``/readyz`` is 200 only when the database is
reachable, the schema is current and (when leader) the last pass succeeded, within three intervals;
``/metrics`` is Prometheus text. Every other GET goes to the read-only status page
(:class:`controller.web.page.StatusPage`: ``/``, ``/leases/NAME``, ``/static/...``), which reads the
database and :meth:`Daemon.runtime` (this replica's last pass, API request rates, 429 pauses). The
HTTP server binds ``server.listen`` (127.0.0.1 by default); a non-loopback address is refused
(``ConfigError``) unless ``server.allow_remote`` is true, and then logged as a warning: health,
readiness and metrics have no authentication (the status page needs ``server.access_token`` there).
"""

from __future__ import annotations

import contextlib
import faulthandler
import io
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import sqlalchemy as sa
from apscheduler.schedulers.blocking import BlockingScheduler

from controller import db as dbmod
from controller.config import Settings
from controller.errors import (
    AUTH_HINT,
    SCOPE_ALL,
    SCOPE_CREATE,
    SCOPE_LIFECYCLE,
    AuthError,
    ConfigError,
    LeasectlError,
)
from controller.leader import LeaderElector, renew_interval
from controller.metrics import Metrics
from controller.pool_sync import SETTLED_PHASES
from controller.providers.base import SandboxProvider
from controller.reconciler import PassResult
from controller.web.access import is_loopback
from controller.web.page import StatusPage
from controller.web.runtime import PassSummary, RequestRates, Runtime
from models import EXECUTION_STATES, Execution, utcnow

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "leasectl_leases"
SQLITE_WATCH_SECONDS = 0.25
MAX_PASSES_PER_WAKE = 5
WAKE_AGAIN_SECONDS = 0.25  # a pass the reconcile job asks for itself: due once the job has returned


@dataclass
class Health:
    """What the probes report; updated by the jobs."""

    db_ok: bool = False
    schema_ok: bool = False
    schema_problem: str | None = None
    db_error: str | None = None
    last_pass_ok_at: datetime | None = None
    last_pass_error: str | None = None
    last_pass: PassSummary | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def listen_address(settings: Settings) -> tuple[str, int]:
    """(host, port) to bind; ConfigError for a non-loopback host unless ``server.allow_remote``."""
    host, _, port = settings.server.listen.rpartition(":")
    host = host.strip("[]")
    if not is_loopback(host):
        if not settings.server.allow_remote:
            raise ConfigError(
                f"server.listen {settings.server.listen!r} is not a loopback address: health and metrics "
                "would be served to the network without authentication; use 127.0.0.1:PORT, or set "
                "server.allow_remote: true to allow it"
            )
        log.warning(
            "health and metrics listen on %s (server.allow_remote is true): reachable from the network, "
            "without authentication",
            settings.server.listen,
        )
    return host, int(port)


SCHEDULE_SLACK_SECONDS = 0.05  # pass just after a schedule's change, never just before it


def _follow_up(result: PassResult) -> bool:
    """An action of this pass set a lease on its way without finishing it (a create answered before
    the sandbox was started or its workspace realized, a start, a stop, a delete, a lookup, a state
    the list had not shown yet): the next pass records or finishes it. A create that realized its
    workspace (Ready) and a realize_workspace need none; a failure waits for its back-off."""
    for outcome in result.outcomes:
        if not outcome.ok:
            continue
        kind = outcome.action.kind
        if kind == "realize_workspace" or (kind == "create" and outcome.workspace_path is not None):
            continue
        return True
    return False


def _pools_busy(result: PassResult) -> bool:
    """Pool members are on their way (to Ready or to gone) before or after this pass."""
    pools = result.pools
    if pools is None:
        return False
    decisions = result.plan.decisions
    return pools.busy or any(
        decisions[name].phase not in SETTLED_PHASES for name in pools.members if name in decisions
    )


def _stacks_on_sigusr1() -> None:
    """``kill -USR1 <pid>``: every thread's stack on stderr, the daemon going on (a stuck job shows
    where it waits). Not when stderr is no file (the daemon run inside a test's CLI runner)."""
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (AttributeError, ValueError, io.UnsupportedOperation) as exc:
        log.debug("no thread stacks on SIGUSR1: %s", exc)


class Daemon:
    def __init__(
        self,
        settings: Settings,
        db: dbmod.Database,
        provider: SandboxProvider,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        from controller.reconciler import build_reconciler

        self.settings = settings
        self.db = db
        self.provider = provider
        self.metrics = metrics or Metrics()
        self.health = Health()
        c = settings.controller
        self.elector = LeaderElector(db, c.instance, c.leader_lease_seconds)
        self.reconciler = build_reconciler(db, provider, settings, elector=self.elector, metrics=self.metrics)
        self.applier = self.reconciler.applier
        self.dispatcher = self._make_dispatcher()
        self.scheduler = BlockingScheduler(
            job_defaults={"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        )
        self._stopping = threading.Event()
        self._wake = threading.Event()  # a change arrived (NOTIFY / SQLite change counter)
        self._reconciling = threading.Event()
        self._jobs_idle = threading.Condition()
        self._active_jobs = 0
        self._http: ThreadingHTTPServer | None = None
        self.request_rates = RequestRates(self.metrics)
        self.page = StatusPage(db, settings, self.runtime)

    def _make_dispatcher(self) -> Any:
        from controller.execution import Dispatcher

        return Dispatcher(self.db, self.provider, self.settings.exec, worker_id=self.elector.holder)

    # -- jobs ------------------------------------------------------------------------------------

    def _guard(self, name: str, fn: Callable[[], None]) -> Callable[[], None]:
        def job() -> None:
            with self._jobs_idle:
                if self._stopping.is_set() or (not self.health.schema_ok and name != "housekeeping"):
                    return
                self._active_jobs += 1
            try:
                fn()
            except Exception as exc:
                # An expected failure (the API, the database, leadership) is one line; anything else
                # is a bug and comes with its traceback, so it is seen rather than retried quietly.
                # A refused key is said as such: the passes back off and retry (nothing is marked
                # Failed) until an operator fixes the key or the organization.
                expected = isinstance(exc, LeasectlError | sa.exc.SQLAlchemyError)
                hint = f"; {AUTH_HINT}" if isinstance(exc, AuthError) else ""
                log.error(
                    "job %s failed: %s%s",
                    name,
                    exc if expected else f"{type(exc).__name__}: {exc}",
                    hint,
                    exc_info=not expected or log.isEnabledFor(logging.DEBUG),
                )
                if name == "reconcile":
                    self.health.last_pass_error = str(exc)
            finally:
                with self._jobs_idle:
                    self._active_jobs -= 1
                    self._jobs_idle.notify_all()

        return job

    def job_leader(self) -> None:
        was_leading = self.elector.is_leader()
        leading = self.elector.try_acquire()
        self.metrics.leader.set(1 if leading else 0)
        if leading and not was_leading:
            # A takeover (the previous leader died or stepped down) or leadership back after a
            # lapse: the reconcile runs in between returned without a pass and without scheduling
            # the follow-up their work needed; without this the next pass would wait for the interval.
            log.info("leading instance %s: reconciling now", self.settings.controller.instance)
            self.wake_reconcile()

    def job_reconcile(self) -> None:
        if not self.elector.is_leader():
            log.debug("reconcile: not the leader; the pass comes when leadership does")
            return
        self._reconciling.set()
        try:
            for _ in range(MAX_PASSES_PER_WAKE):
                self._wake.clear()
                result = self.reconciler.run_pass()
                finished = utcnow()
                self.health.last_pass_ok_at = finished
                self.health.last_pass_error = None
                self.health.last_pass = PassSummary(
                    pass_id=result.pass_id,
                    finished_at=finished,
                    duration_seconds=result.duration_seconds,
                    leases=len(result.plan.decisions),
                    actions=len(result.outcomes),
                    errors=len(result.errors),
                )
                if not self._wake.is_set() or self._stopping.is_set():
                    break  # a change arrived during the pass: look again at once
        finally:
            self._reconciling.clear()
            if self._wake.is_set() and not self._stopping.is_set():
                # A wake this job did not act on: one that arrived during a failed pass (a change,
                # leadership back after a lapse that failed it), after the last pass's check, or
                # beyond MAX_PASSES_PER_WAKE. A waker that saw this job running left it to the job,
                # so it must not wait for the interval. Not at once: a run that falls due while this
                # job is still running (logging its failure, say) is skipped by the scheduler
                # (max_instances=1) and moved to the interval.
                self._reconcile_within(WAKE_AGAIN_SECONDS)
        if _pools_busy(result) or _follow_up(result):
            # Leases or pool members on their way: the next pass comes soon, not after an interval.
            self._reconcile_within(self.settings.controller.pool_busy_interval_seconds)
        if result.next_change is not None:
            # A schedule changes a desired state (or a pool's min_ready) then: pass at that moment.
            wait = (result.next_change - utcnow()).total_seconds() + SCHEDULE_SLACK_SECONDS
            self._reconcile_within(max(wait, 0.0))

    def job_gc(self) -> None:
        if not self.elector.is_leader():
            return
        from controller.gc import collect_garbage

        result = collect_garbage(self.db, self.provider, self.settings, dry_run=False, elector=self.elector)
        self.metrics.orphans_collected.inc(len(result.deleted))
        if result.failed:
            log.warning("gc: %d orphan deletion(s) failed; retried next run (see events)", len(result.failed))

    def job_exec(self) -> None:
        self.dispatcher.run_once(wait=False)

    def job_housekeeping(self) -> None:
        try:
            with self.db.session(readonly=True) as session:
                rows = session.execute(sa.select(Execution.state, sa.func.count()).group_by(Execution.state))
                counts: dict[str, int] = {state: int(n) for state, n in rows}
            self.health.db_ok, self.health.db_error = True, None
            self.request_rates.sample()
            for state in EXECUTION_STATES:
                self.metrics.executions.labels(state=state).set(counts.get(state, 0))
            self._check_schema()
        except sa.exc.SQLAlchemyError as exc:
            self.health.db_ok, self.health.db_error = False, str(exc).splitlines()[0]
            log.warning("database unreachable: %s", self.health.db_error)

    def _check_schema(self) -> None:
        """A replica whose schema moved under it (a rolling upgrade) stops acting and steps down."""
        problem = dbmod.schema_state(self.db).problem()
        if problem is not None and problem != self.health.schema_problem:
            log.error("%s; this replica stops reconciling, collecting and executing", problem)
            self.elector.release()
            self.metrics.leader.set(0)
        elif problem is None and self.health.schema_problem is not None:
            log.info("database schema is current again; acting again")
        self.health.schema_ok, self.health.schema_problem = problem is None, problem

    def runtime(self) -> Runtime:
        """What the status page shows of this replica beyond the database."""
        now = self.applier.monotonic()
        paused = {}
        for scope in (SCOPE_ALL, SCOPE_CREATE, SCOPE_LIFECYCLE):
            left = self.applier.paused_until(scope) - now
            if left > 0:
                paused[scope] = left
        return Runtime(
            holder=self.elector.holder,
            leading=self.elector.is_leader(),
            last_pass=self.health.last_pass,
            last_pass_error=self.health.last_pass_error,
            rates=self.request_rates.sample(),
            paused=paused,
        )

    # -- readiness -------------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        interval = self.settings.controller.reconcile_interval_seconds
        leader = self.elector.is_leader()
        fresh = True
        if leader:
            last = self.health.last_pass_ok_at
            fresh = (
                last is not None
                and self.health.last_pass_error is None
                and utcnow() - last < timedelta(seconds=3 * interval + 30)
            )
        ready = self.health.db_ok and self.health.schema_ok and fresh
        return ready, {
            "ready": ready,
            "database": "ok" if self.health.db_ok else (self.health.db_error or "unknown"),
            "schema_current": self.health.schema_ok,
            "schema_problem": self.health.schema_problem,
            "leader": leader,
            "last_pass_ok_at": self.health.last_pass_ok_at.isoformat()
            if self.health.last_pass_ok_at
            else None,
            "last_pass_error": self.health.last_pass_error,
        }

    def _start_http(self) -> None:
        host, port = listen_address(self.settings)
        daemon = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/healthz":
                    self._send(200, b"ok\n", "text/plain")
                elif self.path == "/readyz":
                    ready, body = daemon.readiness()
                    self._send(200 if ready else 503, json.dumps(body).encode() + b"\n", "application/json")
                elif self.path == "/metrics":
                    self._send(200, daemon.metrics.render(), "text/plain; version=0.0.4")
                else:
                    page = daemon.page.handle(self.path, dict(self.headers.items()))
                    if page is None:
                        self._send(404, b"not found\n", "text/plain")
                    else:
                        self._send(page.status, page.body, page.content_type, page.headers)

            def _send(
                self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._http = ThreadingHTTPServer((host, port), Handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="health-http", daemon=True).start()
        log.info("health, metrics and status page on http://%s:%d", host, self._http.server_address[1])
        if not self.page.protected:
            return
        if self.settings.server.access_token is None:
            log.warning("status page disabled on %s: set server.access_token to serve it there", host)

    # -- PostgreSQL LISTEN/NOTIFY wake-up ---------------------------------------------------------

    def _listen_for_changes(self) -> None:
        if self.db.engine.dialect.name != "postgresql":
            return

        def loop() -> None:
            while not self._stopping.is_set():
                try:
                    raw = self.db.engine.raw_connection()
                    try:
                        driver = raw.driver_connection
                        assert driver is not None
                        driver.autocommit = True
                        driver.execute(f"LISTEN {NOTIFY_CHANNEL}")
                        while not self._stopping.is_set():
                            for _ in driver.notifies(timeout=1.0, stop_after=1):
                                log.info("lease change notified; reconciling now")
                                self.wake_reconcile()
                    except Exception:
                        # The connection is probably broken (database gone): it must not go back to
                        # the pool, whose reset would fail on it and log a traceback.
                        raw.invalidate()
                        raise
                    raw.close()
                except Exception as exc:
                    log.debug("LISTEN loop: %s", exc)
                    self._stopping.wait(5)

        threading.Thread(target=loop, name="pg-listen", daemon=True).start()

    def _watch_sqlite_changes(self) -> None:
        """SQLite has no NOTIFY: every :data:`SQLITE_WATCH_SECONDS` read ``PRAGMA data_version`` (it
        moves when another connection commits; no table is read) and, only when it moved, the one-row
        ``change_counter`` that triggers on ``leases`` and ``pools`` bump (migration 0004). The
        controller's own status writes move data_version but not the counter, so they wake nothing.
        Its cost does not grow with the number of leases."""
        if not self.db.is_sqlite:
            return

        def loop() -> None:
            raw = None
            last_version: Any = None
            last_counter: Any = None
            while not self._stopping.is_set():
                try:
                    if raw is None:
                        raw = self.db.engine.raw_connection()
                    cur = raw.cursor()
                    cur.execute("PRAGMA data_version")
                    fetched = cur.fetchone()
                    version = fetched[0] if fetched else None
                    if version != last_version:
                        last_version = version
                        cur.execute("SELECT counter FROM change_counter WHERE id = 1")
                        row = cur.fetchone()
                        counter = row[0] if row else 0
                        if last_counter is not None and counter != last_counter:
                            log.info("leases or pools changed; reconciling now")
                            self.wake_reconcile()
                        last_counter = counter
                    cur.close()
                except Exception as exc:
                    log.debug("SQLite change watch: %s", exc)
                    if raw is not None:
                        with contextlib.suppress(Exception):
                            raw.close()
                    raw = None
                    self._stopping.wait(2)
                self._stopping.wait(SQLITE_WATCH_SECONDS)
            if raw is not None:
                with contextlib.suppress(Exception):
                    raw.close()

        threading.Thread(target=loop, name="sqlite-watch", daemon=True).start()

    def wake_reconcile(self) -> None:
        """Reconcile now; a wake during a pass makes that job run one more pass when it ends."""
        self._wake.set()
        if self._reconciling.is_set():
            return
        self._reconcile_within(0.0)

    def _reconcile_within(self, seconds: float) -> None:
        job = self.scheduler.get_job("reconcile")
        if job is None:
            return
        at = utcnow() + timedelta(seconds=seconds)
        if job.next_run_time is None or job.next_run_time > at:
            job.modify(next_run_time=at)

    # -- lifecycle -------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: finishing in-flight work, then exiting", signal.Signals(signum).name)
        self._stopping.set()
        threading.Thread(target=self.scheduler.shutdown, kwargs={"wait": False}, daemon=True).start()

    def run(self) -> int:
        c = self.settings.controller
        dbmod.check_schema(self.db)  # SchemaError names the command to run
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        _stacks_on_sigusr1()
        self._start_http()  # first: refuses a network-wide listener before anything else starts
        self.job_housekeeping()
        self.dispatcher.recover_interrupted()
        self._add_jobs(utcnow())
        self._listen_for_changes()
        self._watch_sqlite_changes()
        log.info("leasectl daemon started (instance %s, holder %s)", c.instance, self.elector.holder)
        try:
            self.scheduler.start()
        finally:
            self._shutdown()
        return 0

    def _add_jobs(self, now: datetime) -> None:
        c = self.settings.controller
        add = self.scheduler.add_job
        add(
            self._guard("leader", self.job_leader),
            "interval",
            seconds=renew_interval(c.leader_lease_seconds),
            id="leader",
            next_run_time=now,
        )
        add(
            self._guard("reconcile", self.job_reconcile),
            "interval",
            seconds=c.reconcile_interval_seconds,
            id="reconcile",
            next_run_time=now + timedelta(seconds=0.5),
        )
        add(
            self._guard("gc", self.job_gc),
            "interval",
            seconds=c.gc_interval_seconds,
            id="gc",
            next_run_time=now + timedelta(seconds=1),
        )
        add(
            self._guard("exec", self.job_exec),
            "interval",
            seconds=self.settings.exec.poll_interval_seconds,
            id="exec",
            next_run_time=now + timedelta(seconds=1),
        )
        add(self._guard("housekeeping", self.job_housekeeping), "interval", seconds=15, id="housekeeping")

    def _shutdown(self) -> None:
        self._stopping.set()
        timeout = self.settings.controller.shutdown_timeout_seconds
        deadline = time.monotonic() + timeout
        self.applier.shutdown(timeout=timeout)
        self.dispatcher.shutdown(timeout=max(0.0, deadline - time.monotonic()))
        with self._jobs_idle:  # let running jobs write their results (status, execution rows)
            while self._active_jobs and time.monotonic() < deadline:
                self._jobs_idle.wait(max(0.0, deadline - time.monotonic()))
            if self._active_jobs:
                log.warning("shutdown time-out: %d job(s) still running", self._active_jobs)
        self.elector.release()
        self.metrics.leader.set(0)
        if self._http is not None:
            self._http.shutdown()
        log.info("leasectl daemon stopped")
