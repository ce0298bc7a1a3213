"""Leader election through the database, with a fencing term, on SQLite and PostgreSQL.

One row of ``leader_election`` per controller instance names the holder, the term and when the
lease expires. Acquiring and renewing is ONE conditional UPDATE (take the row if it is mine, free,
or expired), so two replicas can never both win, whatever the backend. Each takeover increments
``term``.

Three rules keep a deposed leader harmless:

* it renews every ``lease/3`` and considers itself leader only until ``renew_started + lease *
  SAFETY`` on its own monotonic clock, i.e. it stops acting *before* anyone else may take over;
* every controller write goes through :meth:`LeaderElector.fence` inside the writing
  transaction: it re-reads the row (``FOR SHARE`` on PostgreSQL, so a takeover waits for the
  transaction; SQLite serializes writers anyway) and raises NotLeaderError unless holder and term
  are still ours and the lease has not expired;
* every provider call that changes a sandbox is fenced at the moment it is sent
  (:meth:`LeaderElector.fence_term`, the applier's ``fence`` hook): still leader on the local
  monotonic clock (free: a pause such as SIGSTOP or a long rate-limit wait moves it past the
  deadline), then ONE primary-key SELECT of the election row: same holder, same term as the pass
  was planned under, not expired on the wall clock. The query covers what the monotonic clock does
  not see (a suspended VM does not advance it) and a renewal cannot revive a stale plan because the
  term must match. Mutating calls are few (a converged fleet makes none), so this costs a handful
  of indexed reads per pass at most; a database that cannot answer means "do not act";
* releasing on shutdown sets ``expires_at`` to the past so a standby takes over at once.

Replicas compare wall-clock times stored in the row: keep their clocks in sync (NTP), as for any
lease-based election.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from controller.db import Database
from controller.errors import NotLeaderError
from models import LeaderElection, utcnow

log = logging.getLogger(__name__)

SAFETY = 0.8  # act for at most this fraction of the lease after a successful renewal
RENEWALS_PER_LEASE = 3


def renew_interval(lease_seconds: float) -> float:
    """How often a replica renews (or tries to acquire): ``lease / 3``, well within the ``lease *
    SAFETY`` a renewal lets it act for, so a leader that renews on time never stops leading between
    two renewals. No floor: a floor above ``lease * SAFETY`` (it was 1 s) made a short lease lapse
    locally every period, failing the passes and silently skipping the reconcile runs that fell there."""
    return lease_seconds / RENEWALS_PER_LEASE


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_holder_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Leadership:
    holder: str
    term: int
    expires_at: datetime


class LeaderElector:
    """Acquire, renew, check and release the leader lease of one controller instance."""

    def __init__(
        self,
        db: Database,
        instance: str,
        lease_seconds: float,
        *,
        holder: str | None = None,
        clock: Callable[[], datetime] = utcnow,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.instance = instance
        self.lease_seconds = lease_seconds
        self.holder = holder or make_holder_id()
        self._clock = clock
        self._monotonic = monotonic
        self._term: int | None = None
        self._valid_until = 0.0

    @property
    def term(self) -> int | None:
        return self._term if self.is_leader() else None

    def is_leader(self) -> bool:
        """True while the last renewal is fresh enough to act on (local monotonic clock)."""
        return self._term is not None and self._monotonic() < self._valid_until

    def try_acquire(self) -> bool:
        """Acquire or renew. Returns whether this replica leads now. Never raises for contention."""
        started = self._monotonic()
        now = self._clock()
        expires = now + timedelta(seconds=self.lease_seconds)
        try:
            won = self._update(now, expires) or self._insert(now, expires)
        except sa.exc.SQLAlchemyError as exc:
            # An outage is expected weather: one line, the traceback only when debugging.
            log.warning(
                "leader election: database unavailable; not leading: %s",
                _first_line(exc),
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            self._lose()
            return False
        if not won:
            if self._term is not None:
                log.warning("leader election: lost leadership of instance %s", self.instance)
            self._lose()
            return False
        with self.db.session() as session:
            row = session.get(LeaderElection, self.instance)
            assert row is not None
            term = row.term
        if self._term != term:
            log.info("leader election: %s leads instance %s (term %d)", self.holder, self.instance, term)
        self._term = term
        self._valid_until = started + self.lease_seconds * SAFETY
        return True

    def _update(self, now: datetime, expires: datetime) -> bool:
        row = LeaderElection
        mine = row.holder == self.holder
        statement = (
            sa.update(row)
            .where(row.instance == self.instance)
            .where(sa.or_(mine, row.holder.is_(None), row.expires_at <= now))
            .values(
                term=sa.case((mine, row.term), else_=row.term + 1),
                acquired_at=sa.case((mine, row.acquired_at), else_=now),
                holder=self.holder,
                renewed_at=now,
                expires_at=expires,
            )
        )
        with self.db.session() as session:
            result = session.execute(statement, execution_options={"synchronize_session": False})
            return cast("CursorResult[Any]", result).rowcount == 1

    def _insert(self, now: datetime, expires: datetime) -> bool:
        try:
            with self.db.session() as session:
                if session.get(LeaderElection, self.instance) is not None:
                    return False
                session.add(
                    LeaderElection(
                        instance=self.instance,
                        holder=self.holder,
                        term=1,
                        acquired_at=now,
                        renewed_at=now,
                        expires_at=expires,
                    )
                )
        except sa.exc.IntegrityError:
            return False  # another replica inserted first
        return True

    def _lose(self) -> None:
        self._term = None
        self._valid_until = 0.0

    def fence(self, session: Session) -> None:
        """Inside a writing transaction: refuse the write unless we still hold the lease."""
        if self._term is None or not self.is_leader():
            raise NotLeaderError(f"not the leader of instance {self.instance}")
        query = sa.select(LeaderElection).where(LeaderElection.instance == self.instance)
        if self.db.engine.dialect.name == "postgresql":
            query = query.with_for_update(read=True)
        row = session.scalars(query).one_or_none()
        if (
            row is None
            or row.holder != self.holder
            or row.term != self._term
            or row.expires_at is None
            or row.expires_at <= self._clock()
        ):
            self._lose()
            raise NotLeaderError(f"leadership of instance {self.instance} moved on; write refused")

    def fence_term(self, term: int | None) -> None:
        """Before a provider call that changes something: NotLeaderError unless this replica still
        leads in ``term`` (the term its plan was made under): local deadline, then one PK SELECT."""
        refused = (
            f"not the leader of instance {self.instance} in term {term} any more; provider call not sent"
        )
        if term is None or self._term != term or not self.is_leader():
            raise NotLeaderError(refused)
        try:
            with self.db.session(readonly=True) as session:
                row = session.execute(
                    sa.select(LeaderElection.holder, LeaderElection.term, LeaderElection.expires_at).where(
                        LeaderElection.instance == self.instance
                    )
                ).one_or_none()
        except sa.exc.SQLAlchemyError as exc:
            raise NotLeaderError(f"{refused} (leadership cannot be confirmed: {type(exc).__name__})") from exc
        if row is None or row.holder != self.holder or row.term != term:
            self._lose()
            raise NotLeaderError(refused)
        if row.expires_at is None or row.expires_at <= self._clock():
            raise NotLeaderError(refused)

    def release(self) -> None:
        """Give the lease up (shutdown): a standby may take over immediately."""
        if self._term is None:
            return
        try:
            with self.db.session() as session:
                session.execute(
                    sa.update(LeaderElection)
                    .where(LeaderElection.instance == self.instance, LeaderElection.holder == self.holder)
                    .values(holder=None, expires_at=self._clock()),
                    execution_options={"synchronize_session": False},
                )
            log.info("leader election: %s released instance %s", self.holder, self.instance)
        except sa.exc.SQLAlchemyError as exc:
            log.warning(
                "leader election: could not release; it expires by itself: %s",
                _first_line(exc),
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
        self._lose()

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Lead for the duration of a block (one-off commands): renew in the background, release.

        Raises NotLeaderError at once if another replica leads.
        """
        if not self.try_acquire():
            current = self.current()
            who = current.holder if current else "another replica"
            raise NotLeaderError(f"instance {self.instance!r} is led by {who}")
        done = threading.Event()

        def renew() -> None:
            while not done.wait(renew_interval(self.lease_seconds)):
                self.try_acquire()

        thread = threading.Thread(target=renew, name="leader-renew", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.release()

    def current(self) -> Leadership | None:
        with self.db.session() as session:
            row = session.get(LeaderElection, self.instance)
            if row is None or row.holder is None or row.expires_at is None:
                return None
            return Leadership(row.holder, row.term, row.expires_at)
