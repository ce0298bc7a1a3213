"""Sandbox records and their store: in memory for speed, written through to SQLite for restarts.

The store owns the metadata of every sandbox (``SandboxRecord``), the SQLite index file
``<state-dir>/index.sqlite3`` (one row per sandbox, JSON payload, WAL journal) and the directory of
each sandbox under ``<state-dir>/sandboxes/<id>/``. All rows are loaded at start (10,000 sandboxes
load in well under a second); each change rewrites one row. Every save also keeps a copy of the
record, stamped with the time, in memory (``versions``), so that a lagging list can show each
sandbox as it was some seconds ago (creates, state changes and deletes alike); the lifecycle prunes
the copies no lagging list can show any more. It also owns the list's derived states
(``list_state``). It is used only from the event loop thread of the server, so it needs no locks.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

ORGANIZATION_ID = "org-local"
DEFAULT_SNAPSHOT = "daytonaio/sandbox:local"
SANDBOX_USER = "daytona"
HOME_RELATIVE = "home/daytona"

# Fields of the full Sandbox DTO that list items do not carry (contract §3).
_NOT_IN_LIST = ("env", "kvm", "volumes", "buildInfo")
ERRORED = frozenset({"error", "build_failed"})


def list_state(state: str, desired: str) -> str:
    """The state the list shows (the server's ``sandbox-list-item.dto.ts``): a pending change shows
    as the transition it starts, and an unknown state as ``creating``."""
    if desired == "destroyed" and state not in ("destroyed", *ERRORED):
        return "destroying"
    if state == "started" and desired == "stopped":
        return "stopping"
    if state == "stopped" and desired == "started":
        return "starting"
    if state == "archived" and desired == "started":
        return "restoring"
    if state == "unknown":
        return "creating"
    return state


@dataclass
class SandboxRecord:
    """What the emulator knows about one sandbox; ``to_dto`` renders Daytona's JSON."""

    id: str
    name: str
    seq: int
    created_ts: float
    created_at: str
    updated_at: str
    state: str = "started"
    desired_state: str = "started"
    snapshot: str | None = DEFAULT_SNAPSHOT
    user: str = SANDBOX_USER
    env: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    public: bool = False
    network_block_all: bool = False
    kvm: bool = False
    target: str = "local"
    cpu: int = 1
    gpu: int = 0
    memory: int = 1
    disk: int = 3
    auto_stop_interval: int = 15
    auto_archive_interval: int = 10080
    auto_delete_interval: int = -1
    error_reason: str | None = None
    recoverable: bool = False
    build_info: dict[str, Any] | None = None
    volumes: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # A transition in progress: ``state`` becomes ``pending_state`` at ``pending_until`` (epoch s).
    pending_state: str | None = None
    pending_until: float | None = None
    pending_error: str | None = None
    pending_recoverable: bool = False
    deleted_ts: float | None = None
    # Epoch seconds of the last SDK/toolbox call on this sandbox (auto-stop) and of the last state
    # change (auto-archive, auto-delete); 0 = unknown (records written before these existed).
    last_activity_ts: float = 0.0
    last_activity_at: str = ""
    state_since_ts: float = 0.0

    def to_dto(self, toolbox_proxy_url: str, *, list_item: bool = False) -> dict[str, Any]:
        dto: dict[str, Any] = {
            "id": self.id,
            "organizationId": ORGANIZATION_ID,
            "name": self.name,
            "snapshot": self.snapshot,
            "user": self.user,
            "env": dict(self.env),
            "labels": dict(self.labels),
            "public": self.public,
            "networkBlockAll": self.network_block_all,
            "kvm": self.kvm,
            "target": self.target,
            "cpu": self.cpu,
            "gpu": self.gpu,
            "memory": self.memory,
            "disk": self.disk,
            "state": self.state,
            "desiredState": self.desired_state,
            "errorReason": self.error_reason,
            "recoverable": self.recoverable,
            "backupState": "None",
            "autoStopInterval": self.auto_stop_interval,
            "autoArchiveInterval": self.auto_archive_interval,
            "autoDeleteInterval": self.auto_delete_interval,
            "volumes": list(self.volumes),
            "buildInfo": self.build_info,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "lastActivityAt": self.last_activity_at or self.updated_at,
            "sandboxClass": "container",
            "daemonVersion": "local-daytona",
            "runnerId": "local",
            "toolboxProxyUrl": toolbox_proxy_url,
        }
        dto.update(self.extra)
        if list_item:
            dto["state"] = list_state(self.state, self.desired_state)
            for key in _NOT_IN_LIST:
                dto.pop(key, None)
        elif dto["buildInfo"] is None:
            del dto["buildInfo"]
        return dto


def encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> list[Any] | None:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, list) else None


Version = tuple[float, SandboxRecord]


class Store:
    """All sandboxes by id and name, persisted row by row, with recent versions for lagging lists."""

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.state_dir = state_dir
        self.clock = clock
        self.sandboxes_dir = state_dir / "sandboxes"
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(state_dir / "index.sqlite3"), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS sandboxes (id TEXT PRIMARY KEY, seq INTEGER, data TEXT)")
        self.by_id: dict[str, SandboxRecord] = {}
        self.by_name: dict[str, SandboxRecord] = {}
        self.pending: set[str] = set()
        # id -> [(time, copy)], oldest first; the last copy is the current record (or its deletion).
        self.versions: dict[str, list[Version]] = {}
        self._history: set[str] = set()  # ids with more than one version, or deleted
        self.generation = 0  # moves on every change of a live sandbox (list results may be reused until then)
        records = [
            SandboxRecord(**json.loads(data))
            for (data,) in self._db.execute("SELECT data FROM sandboxes ORDER BY seq")
        ]
        loaded = self.clock()
        for record in records:
            if not record.last_activity_ts:
                record.last_activity_ts = loaded
            if not record.state_since_ts:
                record.state_since_ts = loaded
            self._index(record)
            self.versions[record.id] = [(0.0, replace(record))]  # visible to any lag at once
        self._next_seq = max((r.seq for r in records), default=0) + 1

    def close(self) -> None:
        self._db.close()

    # -- lookups ------------------------------------------------------------------------------

    def find(self, id_or_name: str) -> SandboxRecord | None:
        return self.by_id.get(id_or_name) or self.by_name.get(id_or_name)

    def ordered(self) -> Iterable[SandboxRecord]:
        """Live sandboxes in creation order (dicts keep insertion order; load is by seq)."""
        return self.by_id.values()

    def as_of(self, horizon: float) -> list[SandboxRecord]:
        """Every sandbox as it was at ``horizon`` (epoch seconds), destroyed ones left out."""
        seen: list[SandboxRecord] = []
        for history in self.versions.values():
            view: SandboxRecord | None = None
            for stamp, copy in reversed(history):
                if stamp <= horizon:
                    view = copy
                    break
            if view is not None and view.state != "destroyed":
                seen.append(view)
        return seen

    def count(self) -> int:
        return len(self.by_id)

    def root_of(self, record: SandboxRecord) -> Path:
        return self.sandboxes_dir / record.id

    def next_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    # -- changes ------------------------------------------------------------------------------

    def _index(self, record: SandboxRecord) -> None:
        self.generation += 1
        self.by_id[record.id] = record
        self.by_name[record.name] = record
        if record.pending_until is not None:
            self.pending.add(record.id)
        else:
            self.pending.discard(record.id)

    def _remember(self, record: SandboxRecord, stamp: float) -> None:
        history = self.versions.setdefault(record.id, [])
        history.append((stamp, replace(record)))
        if len(history) > 1:
            self._history.add(record.id)

    def save(self, record: SandboxRecord) -> None:
        """Insert or update one sandbox (memory and disk)."""
        self._index(record)
        self._remember(record, self.clock())
        self._db.execute(
            "INSERT OR REPLACE INTO sandboxes (id, seq, data) VALUES (?, ?, ?)",
            (record.id, record.seq, json.dumps(asdict(record))),
        )

    def rename(self, record: SandboxRecord, name: str) -> None:
        """Give a sandbox a new name at once (the old name is free for a new create)."""
        if self.by_name.get(record.name) is record:
            del self.by_name[record.name]
        record.name = name
        self.save(record)

    def save_many(self, records: Iterable[SandboxRecord]) -> None:
        """Insert or update many sandboxes in one transaction (seeding large fleets)."""
        batch = list(records)
        for record in batch:
            self._index(record)
            self.versions[record.id] = [(0.0, replace(record))]
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT OR REPLACE INTO sandboxes (id, seq, data) VALUES (?, ?, ?)",
            [(r.id, r.seq, json.dumps(asdict(r))) for r in batch],
        )
        self._db.execute("COMMIT")

    def remove(self, record: SandboxRecord, now: float) -> None:
        """Forget a destroyed sandbox; its last version stays for lagging lists."""
        self.generation += 1
        self.by_id.pop(record.id, None)
        if self.by_name.get(record.name) is record:
            del self.by_name[record.name]
        self.pending.discard(record.id)
        record.deleted_ts = now
        record.state = "destroyed"
        self._remember(record, now)
        self._history.add(record.id)
        self._db.execute("DELETE FROM sandboxes WHERE id = ?", (record.id,))

    def prune_versions(self, horizon: float) -> None:
        """Drop the versions that no list lagging to ``horizon`` or later can show."""
        for sandbox_id in list(self._history):
            history = self.versions.get(sandbox_id)
            if not history:
                self._history.discard(sandbox_id)
                continue
            keep = 0
            for index in range(len(history) - 1, -1, -1):
                if history[index][0] <= horizon:
                    keep = index
                    break
            if keep:
                del history[:keep]
            last_stamp, last = history[-1]
            if last.state == "destroyed" and last_stamp <= horizon:
                del self.versions[sandbox_id]
                self._history.discard(sandbox_id)
            elif len(history) == 1:
                self._history.discard(sandbox_id)
