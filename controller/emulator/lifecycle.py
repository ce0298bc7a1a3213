"""The sandbox state machine: which operation is allowed from which state, and transitions in time.

Each lifecycle operation moves a sandbox to a transitional state (``creating``, ``starting``,
``restoring``, ``stopping``, ``archiving``, ``destroying``) and records the final state with a due
time (``transition_latency`` of the operation, from the fault settings). With latency 0 the final
state is set at once, so the SDK's waits cost nothing. ``tick`` completes due transitions; the app
calls it before every request and a timer calls it a few times a second, so states advance without
requests too (and after a restart, since due times are stored).

Refusals follow Daytona: 409 while a transition is in progress and for a duplicate name, 400 for an
operation the current state does not allow, 403 over the sandbox quota.
"""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import SOURCE_API, ApiError, now_iso
from .faults import Faults
from .state import DEFAULT_SNAPSHOT, HOME_RELATIVE, SandboxRecord, Store

TRANSITIONAL = frozenset(
    {
        "creating",
        "starting",
        "stopping",
        "archiving",
        "restoring",
        "destroying",
        "pending_build",
        "building_snapshot",
        "pulling_snapshot",
        "resizing",
        "snapshotting",
        "forking",
        "pausing",
        "resuming",
    }
)
LANGUAGES = ("python", "typescript", "javascript")


def _str_map(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ApiError(400, f"{name} must be an object of strings", source=SOURCE_API)
    return dict(value)


def _int(body: dict[str, Any], key: str, default: int, minimum: int = 0) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ApiError(400, f"{key} must be an integer >= {minimum}", source=SOURCE_API)
    return value


class Lifecycle:
    """Applies lifecycle operations to the store, with fault settings and a clock."""

    def __init__(self, store: Store, faults: Faults, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.faults = faults
        self.clock = clock

    # -- time ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """Complete every transition that is due; drop tombstones no lagging list can show."""
        now = self.clock()
        for sandbox_id in [i for i in self.store.pending if self._due(i, now)]:
            record = self.store.by_id[sandbox_id]
            self._finish(record, record.pending_state or record.state, now)
        if self.store.tombstones:
            self.store.prune_tombstones(now - max(self.faults.settings.list_lag, 0.0) - 1.0)

    def _due(self, sandbox_id: str, now: float) -> bool:
        record = self.store.by_id.get(sandbox_id)
        return record is not None and record.pending_until is not None and record.pending_until <= now

    def _finish(self, record: SandboxRecord, final: str, now: float) -> None:
        record.state = final
        if final == "error":
            record.error_reason = record.pending_error or "injected fault: the sandbox failed"
            record.recoverable = record.pending_recoverable
        elif final != "destroyed":
            record.error_reason = None
            record.recoverable = False
        record.pending_state = None
        record.pending_until = None
        record.pending_error = None
        record.updated_at = now_iso()
        if final == "destroyed":
            self.store.remove(record, now)
            self._discard_dir(self.store.root_of(record))
        else:
            self.store.save(record)

    def _discard_dir(self, path: Path) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            shutil.rmtree(path, ignore_errors=True)
            return
        loop.run_in_executor(None, shutil.rmtree, path, True)

    def _begin(
        self, record: SandboxRecord, op: str, transitional: str, final: str, *, may_fail: bool = False
    ) -> None:
        now = self.clock()
        if may_fail and self.faults.sandbox_error(op):
            final = "error"
            record.pending_error = f"injected fault: {op} failed"
            record.pending_recoverable = self.faults.settings.error_recoverable
        elif may_fail and self.faults.stuck_starting(op):
            record.state = "starting"
            record.pending_state = None
            record.pending_until = None
            record.updated_at = now_iso()
            self.store.save(record)
            return
        latency = self.faults.transition_latency(op)
        if latency <= 0:
            self._finish(record, final, now)
            return
        record.state = transitional
        record.pending_state = final
        record.pending_until = now + latency
        record.updated_at = now_iso()
        self.store.save(record)

    # -- guards -------------------------------------------------------------------------------

    def _busy(self, record: SandboxRecord) -> None:
        if record.state in TRANSITIONAL:
            raise ApiError(
                409,
                f"Sandbox {record.id} is in state {record.state}: another operation is in progress",
                source=SOURCE_API,
            )

    def _refuse(self, record: SandboxRecord, op: str) -> ApiError:
        return ApiError(400, f"Sandbox {record.id} is {record.state}: cannot {op}", source=SOURCE_API)

    # -- operations ---------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> SandboxRecord:
        sandbox_id = str(uuid.uuid4())
        name = body.get("name")
        if name is None or name == "":
            name = sandbox_id
        if not isinstance(name, str):
            raise ApiError(400, "name must be a string", source=SOURCE_API)
        if self.store.find(name) is not None:
            raise ApiError(409, f"Sandbox with name {name} already exists", source=SOURCE_API)
        labels = _str_map(body.get("labels"), "labels")
        if labels.get("code-toolbox-language", "python") not in LANGUAGES:
            raise ApiError(400, "Invalid code-toolbox-language label", source=SOURCE_API)
        quota = self.faults.settings.quota
        if quota is not None and self.store.count() >= quota:
            raise ApiError(
                403,
                f"Total sandbox limit exceeded. Maximum allowed: {quota}.",
                source=SOURCE_API,
            )
        build_info = body.get("buildInfo")
        snapshot = body.get("snapshot")
        if snapshot is not None and not isinstance(snapshot, str):
            raise ApiError(400, "snapshot must be a string", source=SOURCE_API)
        now_text = now_iso()
        stored_build: dict[str, Any] | None = None
        if isinstance(build_info, dict):
            dockerfile = build_info.get("dockerfileContent")
            if not isinstance(dockerfile, str):
                raise ApiError(400, "buildInfo.dockerfileContent must be a string", source=SOURCE_API)
            stored_build = {
                "dockerfileContent": dockerfile,
                "contextHashes": list(build_info.get("contextHashes") or []),
                "createdAt": now_text,
                "updatedAt": now_text,
                "snapshotRef": f"local-build-{uuid.uuid5(uuid.NAMESPACE_OID, dockerfile).hex[:12]}",
            }
            snapshot = None
        elif snapshot is None:
            snapshot = DEFAULT_SNAPSHOT
        extra = {
            key: body[key]
            for key in ("networkAllowList", "domainAllowList", "outboundProxyUrl", "otelEndpointOverride")
            if isinstance(body.get(key), str)
        }
        record = SandboxRecord(
            id=sandbox_id,
            name=name,
            seq=self.store.next_seq(),
            created_ts=self.clock(),
            created_at=now_text,
            updated_at=now_text,
            state="creating",
            desired_state="started",
            snapshot=snapshot,
            user=body["user"] if isinstance(body.get("user"), str) else "daytona",
            env=_str_map(body.get("env"), "env"),
            labels=labels,
            public=bool(body.get("public", False)),
            network_block_all=bool(body.get("networkBlockAll", False)),
            kvm=bool(body.get("kvm", False)),
            target=body["target"] if isinstance(body.get("target"), str) else "local",
            cpu=_int(body, "cpu", 1, 1),
            gpu=_int(body, "gpu", 0),
            memory=_int(body, "memory", 1, 1),
            disk=_int(body, "disk", 3, 1),
            auto_stop_interval=_int(body, "autoStopInterval", 15),
            auto_archive_interval=_int(body, "autoArchiveInterval", 10080),
            auto_delete_interval=_int(body, "autoDeleteInterval", -1, -1),
            build_info=stored_build,
            volumes=[v for v in body.get("volumes") or [] if isinstance(v, dict)],
            extra=extra,
        )
        root = self.store.root_of(record)
        (root / HOME_RELATIVE).mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        self.store.save(record)
        self._begin(record, "create", "creating", "started", may_fail=True)
        return record

    def start(self, record: SandboxRecord) -> SandboxRecord:
        if record.state == "started":
            return record
        self._busy(record)
        if record.state not in ("stopped", "archived"):
            raise self._refuse(record, "start")
        record.desired_state = "started"
        transitional = "restoring" if record.state == "archived" else "starting"
        self._begin(record, "start", transitional, "started", may_fail=True)
        return record

    def stop(self, record: SandboxRecord) -> SandboxRecord:
        if record.state == "stopped":
            return record
        self._busy(record)
        if record.state != "started":
            raise self._refuse(record, "stop")
        record.desired_state = "stopped"
        self._begin(record, "stop", "stopping", "stopped")
        return record

    def archive(self, record: SandboxRecord) -> SandboxRecord:
        if record.state == "archived":
            return record
        self._busy(record)
        if record.state != "stopped":
            raise self._refuse(record, "archive (it must be stopped first)")
        record.desired_state = "archived"
        self._begin(record, "archive", "archiving", "archived")
        return record

    def recover(self, record: SandboxRecord) -> SandboxRecord:
        self._busy(record)
        if record.state != "error":
            raise self._refuse(record, "recover (only a sandbox in error can)")
        if not record.recoverable:
            raise ApiError(400, f"Sandbox {record.id} is not recoverable", source=SOURCE_API)
        record.desired_state = "started"
        self._begin(record, "recover", "starting", "started", may_fail=True)
        return record

    def delete(self, record: SandboxRecord) -> SandboxRecord:
        if record.state in ("destroying", "destroyed"):
            return record
        self._busy(record)
        record.desired_state = "destroyed"
        self._begin(record, "delete", "destroying", "destroyed")
        return record

    def force_state(self, record: SandboxRecord, body: dict[str, Any]) -> SandboxRecord:
        """Admin: put a sandbox into any state (e.g. ``error``), cancelling its transition."""
        state = body.get("state")
        if not isinstance(state, str) or not state:
            raise ApiError(400, "state must be a non-empty string", source=SOURCE_API)
        record.pending_state = None
        record.pending_until = None
        record.state = state
        record.error_reason = body.get("errorReason") if state in ("error", "build_failed") else None
        if state == "error" and record.error_reason is None:
            record.error_reason = "injected fault"
        record.recoverable = bool(body.get("recoverable", False)) if state == "error" else False
        record.updated_at = now_iso()
        if state == "destroyed":
            self.store.remove(record, self.clock())
            self._discard_dir(self.store.root_of(record))
        else:
            self.store.save(record)
        return record
