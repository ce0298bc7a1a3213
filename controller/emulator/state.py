"""Sandbox records and their store: in memory for speed, written through to SQLite for restarts.

The store owns the metadata of every sandbox (``SandboxRecord``), the SQLite index file
``<state-dir>/index.sqlite3`` (one row per sandbox, JSON payload, WAL journal) and the directory of
each sandbox under ``<state-dir>/sandboxes/<id>/``. All rows are loaded at start (10,000 sandboxes
load in well under a second); each change rewrites one row. Deleted sandboxes are kept in memory as
tombstones for a while so that list results can lag behind deletes (fault injection).
It is used only from the event loop thread of the server, so it needs no locks.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ORGANIZATION_ID = "org-local"
DEFAULT_SNAPSHOT = "daytonaio/sandbox:local"
SANDBOX_USER = "daytona"
HOME_RELATIVE = "home/daytona"

# Fields of the full Sandbox DTO that list items do not carry (contract §3).
_NOT_IN_LIST = ("env", "kvm", "volumes", "buildInfo")


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
            "lastActivityAt": self.updated_at,
            "sandboxClass": "container",
            "daemonVersion": "local-daytona",
            "runnerId": "local",
            "toolboxProxyUrl": toolbox_proxy_url,
        }
        dto.update(self.extra)
        if list_item:
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


class Store:
    """All sandboxes by id and name, in creation order, persisted row by row."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.sandboxes_dir = state_dir / "sandboxes"
        self.sandboxes_dir.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(state_dir / "index.sqlite3"), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS sandboxes (id TEXT PRIMARY KEY, seq INTEGER, data TEXT)")
        self.by_id: dict[str, SandboxRecord] = {}
        self.by_name: dict[str, SandboxRecord] = {}
        self.pending: set[str] = set()
        self.tombstones: list[SandboxRecord] = []
        records = [
            SandboxRecord(**json.loads(data))
            for (data,) in self._db.execute("SELECT data FROM sandboxes ORDER BY seq")
        ]
        for record in records:
            self._index(record)
        self._next_seq = max((r.seq for r in records), default=0) + 1

    def close(self) -> None:
        self._db.close()

    # -- lookups ------------------------------------------------------------------------------

    def find(self, id_or_name: str) -> SandboxRecord | None:
        return self.by_id.get(id_or_name) or self.by_name.get(id_or_name)

    def ordered(self) -> Iterable[SandboxRecord]:
        """Live sandboxes in creation order (dicts keep insertion order; load is by seq)."""
        return self.by_id.values()

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
        self.by_id[record.id] = record
        self.by_name[record.name] = record
        if record.pending_until is not None:
            self.pending.add(record.id)
        else:
            self.pending.discard(record.id)

    def save(self, record: SandboxRecord) -> None:
        """Insert or update one sandbox (memory and disk)."""
        old = self.by_id.get(record.id)
        if old is not None and old.name != record.name:
            self.by_name.pop(old.name, None)
        self._index(record)
        self._db.execute(
            "INSERT OR REPLACE INTO sandboxes (id, seq, data) VALUES (?, ?, ?)",
            (record.id, record.seq, json.dumps(asdict(record))),
        )

    def save_many(self, records: Iterable[SandboxRecord]) -> None:
        """Insert or update many sandboxes in one transaction (seeding large fleets)."""
        batch = list(records)
        for record in batch:
            self._index(record)
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT OR REPLACE INTO sandboxes (id, seq, data) VALUES (?, ?, ?)",
            [(r.id, r.seq, json.dumps(asdict(r))) for r in batch],
        )
        self._db.execute("COMMIT")

    def remove(self, record: SandboxRecord, now: float) -> None:
        """Forget a destroyed sandbox; keep a tombstone for lagging lists."""
        self.by_id.pop(record.id, None)
        if self.by_name.get(record.name) is record:
            del self.by_name[record.name]
        self.pending.discard(record.id)
        record.deleted_ts = now
        self.tombstones.append(record)
        self._db.execute("DELETE FROM sandboxes WHERE id = ?", (record.id,))

    def prune_tombstones(self, older_than: float) -> None:
        self.tombstones = [t for t in self.tombstones if (t.deleted_ts or 0) >= older_than]
