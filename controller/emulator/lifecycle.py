"""The sandbox state machine: which call is allowed from which state, transitions in time, waits.

Each lifecycle call sets the desired state and moves the sandbox to a transitional state
(``creating``, ``starting``, ``restoring``, ``stopping``, ``archiving``, ``destroying``,
``pending_build``) with the final state due after the ``transition_latency`` of the call (fault
settings); with latency 0 the final state is set at once. ``tick`` completes due transitions: the app
calls it before every request, a timer a few times a second and a callback at each due time, so
states advance without requests too (and after a restart, since due times are stored). ``sweep``
(timer only) stops, archives or deletes sandboxes whose auto-stop / auto-archive / auto-delete
interval has run out, in minutes scaled by ``time_scale``.

Refusals follow Daytona's ``sandbox.service.ts`` (reference/daytona-server-semantics.md):

- start: no-op on ``started``; allowed from stopped, archived, archiving and paused; errored -> 400
  "Sandbox is in an errored state"; a change in progress -> 409 "Sandbox state change in
  progress"; otherwise 400 "Sandbox is not in valid state";
- stop: from started or paused (an ephemeral sandbox is deleted instead), else 400 "Sandbox is not
  in a stoppable state"; archive: from stopped only, else 400 "Sandbox is not stopped";
  ephemeral -> 400;
- delete: from any state without a change in progress (archiving and pending_build included),
  else 409; it renames the sandbox at once to ``DESTROYED_<name>_<ms>``, freeing the name;
- recover: only ``error`` with ``recoverable``; create: 409 for a duplicate name, 400 for quota,
  capacity ("No available runners") and a GPU sandbox that is not ephemeral.

``wait_started`` is what create, start and recover await before answering (up to
``start_wait_seconds``): the app answers 400 "Sandbox failed to start: ..." when the sandbox reached
``error``/``build_failed`` first, and leaves the errored sandbox in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import SOURCE_API, ApiError, now_iso
from .faults import Faults
from .state import DEFAULT_SNAPSHOT, ERRORED, HOME_RELATIVE, SandboxRecord, Store

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
# After a call returns with its target state or an error, the wait is over.
WAIT_DONE = frozenset({"started", *ERRORED, "destroying", "destroyed"})
# Resources a sandbox holds against the CPU/memory quota: anything but stopped, archived or gone.
NOT_RUNNING = frozenset({"stopped", "archived", "archiving", "destroyed", "destroying", *ERRORED})
MAX_AUTO_ARCHIVE_MINUTES = 43200  # autoArchiveInterval 0 means "the maximum" (30 days)
IN_PROGRESS = "Sandbox state change in progress"


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


GPU_TYPES = ("H100", "H200", "B200", "B300", "RTX-PRO-6000", "RTX-4090", "RTX-5090", "MI355X")
_CIDR_RE = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})/(\d{1,2})$")


def secret_placeholder(name: str) -> str:
    """What a sandbox's env holds for a Daytona secret: an opaque stand-in, never a value (the real
    server substitutes the value on outbound requests; the local API has no secret store)."""
    return f"daytona-secret-placeholder:{name}"


def check_list(key: str, value: str) -> str:
    """A comma-separated allow list as Daytona stores it; CIDRs must be IPv4 networks."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if key == "networkAllowList":
        for item in items:
            match = _CIDR_RE.fullmatch(item)
            if match is None or any(int(p) > 255 for p in match.groups()[:4]) or int(match.group(5)) > 32:
                raise _bad(f"Invalid CIDR in networkAllowList: {item}")
    return ",".join(items)


def parse_secrets(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, list) or not all(
        isinstance(item, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in item.items())
        for item in value
    ):
        raise _bad("secrets must be a list of {ENV_NAME: secretName} objects")
    return {k: v for item in value for k, v in item.items()}


def _bad(message: str) -> ApiError:
    return ApiError(400, message, source=SOURCE_API)


class Lifecycle:
    """Applies lifecycle calls to the store, with fault settings and a clock."""

    def __init__(self, store: Store, faults: Faults, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.faults = faults
        self.clock = clock
        self._waiters: dict[str, asyncio.Event] = {}

    # -- time ---------------------------------------------------------------------------------

    def tick(self) -> None:
        """Complete every transition that is due."""
        now = self.clock()
        for sandbox_id in [i for i in self.store.pending if self._due(i, now)]:
            record = self.store.by_id[sandbox_id]
            self._finish(record, record.pending_state or record.state, now)

    def sweep(self) -> None:
        """Timer work: auto-stop, auto-archive and auto-delete; prune versions no list can show."""
        now = self.clock()
        for record in list(self.store.by_id.values()):
            if record.pending_until is not None or record.desired_state == "destroyed":
                continue
            if record.auto_destroy_ts and now >= record.auto_destroy_ts:  # ttl: whatever the state
                self._destroy(record)
                continue
            if record.state == "started" and record.auto_stop_interval > 0:
                if now - record.last_activity_ts >= self.faults.minutes(record.auto_stop_interval):
                    self._stop_or_destroy(record)
            elif record.state == "stopped":
                if record.auto_delete_interval > 0 and now - record.state_since_ts >= self.faults.minutes(
                    record.auto_delete_interval
                ):
                    self._destroy(record)
                    continue
                archive_after = record.auto_archive_interval or MAX_AUTO_ARCHIVE_MINUTES
                if record.auto_delete_interval != 0 and now - record.state_since_ts >= self.faults.minutes(
                    archive_after
                ):
                    record.desired_state = "archived"
                    self._begin(record, "archive", "archiving", "archived")
        self.store.prune_versions(now - self.faults.settings.list_lag - 1.0)

    def _due(self, sandbox_id: str, now: float) -> bool:
        record = self.store.by_id.get(sandbox_id)
        return record is not None and record.pending_until is not None and record.pending_until <= now

    def _save(self, record: SandboxRecord) -> None:
        """Persist a change and wake whoever waits on this sandbox."""
        self.store.save(record)
        self._notify(record)

    def _notify(self, record: SandboxRecord) -> None:
        event = self._waiters.pop(record.id, None)
        if event is not None:
            event.set()

    def _finish(self, record: SandboxRecord, final: str, now: float) -> None:
        if final != record.state:
            record.state_since_ts = now
        record.state = final
        if final in ERRORED:
            record.error_reason = record.pending_error or f"injected fault: the sandbox reached {final}"
            record.recoverable = record.pending_recoverable if final == "error" else False
        elif final != "destroyed":
            record.error_reason = None
            record.recoverable = False
        record.pending_state = None
        record.pending_until = None
        record.pending_error = None
        record.updated_at = now_iso()
        if final == "destroyed":
            self.store.remove(record, now)
            self._notify(record)
            self._discard_dir(self.store.root_of(record))
        else:
            self._save(record)

    def _discard_dir(self, path: Path) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            shutil.rmtree(path, ignore_errors=True)
            return
        loop.run_in_executor(None, shutil.rmtree, path, True)

    def _begin(self, record: SandboxRecord, op: str, transitional: str, final: str) -> None:
        now = self.clock()
        latency = self.faults.transition_latency(op)
        if latency <= 0:
            self._finish(record, final, now)
            return
        if record.state != transitional:
            record.state_since_ts = now
        record.state = transitional
        record.pending_state = final
        record.pending_until = now + latency
        record.updated_at = now_iso()
        self._save(record)
        # Without a running loop (direct use) the next tick completes it.
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().call_later(latency + 0.005, self.tick)

    def _begin_start(self, record: SandboxRecord, op: str, transitional: str) -> None:
        """A transition to ``started`` that the fault dice may send to error or leave stuck."""
        if op == "create" and self.faults.build_failed():
            record.pending_error = "injected fault: the build failed"
            self._begin(record, op, "pending_build", "build_failed")
        elif self.faults.sandbox_error(op):
            record.pending_error = f"injected fault: {op} failed"
            record.pending_recoverable = self.faults.settings.error_recoverable
            self._begin(record, op, transitional, "error")
        elif self.faults.stuck_starting(op):
            now = self.clock()
            record.state = "starting"
            record.state_since_ts = now
            record.pending_state = None
            record.pending_until = None
            record.updated_at = now_iso()
            self._save(record)
        else:
            self._begin(record, op, transitional, "started")

    def touch(self, record: SandboxRecord) -> None:
        """Record activity (an SDK or toolbox call on this sandbox): it resets the auto-stop timer."""
        record.last_activity_ts = self.clock()
        record.last_activity_at = now_iso()
        self.store.save(record)

    async def wait_started(self, record: SandboxRecord) -> SandboxRecord:
        """Wait until the sandbox is started, errored or deleted, at most ``start_wait_seconds``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.faults.settings.start_wait_seconds
        while record.state not in WAIT_DONE and record.desired_state != "destroyed":
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            event = self._waiters.setdefault(record.id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except TimeoutError:
                break
        return record

    # -- guards -------------------------------------------------------------------------------

    def _changing(self, record: SandboxRecord) -> bool:
        return record.pending_until is not None or record.state in TRANSITIONAL

    def _in_progress(self) -> ApiError:
        return ApiError(409, IN_PROGRESS, source=SOURCE_API)

    def _refuse_errored(self, record: SandboxRecord) -> None:
        if record.state in ERRORED:
            raise _bad("Sandbox is in an errored state")

    def _capacity(self, adding: SandboxRecord, *, new: bool) -> None:
        """Quota and runner checks of create (``new``) and start; all answer 400, as Daytona does."""
        settings = self.faults.settings
        if self.faults.no_runners():
            raise _bad("No available runners")
        if new and settings.quota is not None and self.store.count() + 1 > settings.quota:
            raise _bad(f"Total sandbox limit exceeded. Maximum allowed: {settings.quota}.")
        if settings.quota_cpu is None and settings.quota_memory is None and settings.quota_disk is None:
            return
        live = [r for r in self.store.by_id.values() if r is not adding]
        running = [r for r in live if r.state not in NOT_RUNNING]
        if settings.quota_cpu is not None and sum(r.cpu for r in running) + adding.cpu > settings.quota_cpu:
            raise _bad(f"Total CPU limit exceeded. Maximum allowed: {settings.quota_cpu}")
        if (
            settings.quota_memory is not None
            and sum(r.memory for r in running) + adding.memory > settings.quota_memory
        ):
            raise _bad(f"Total memory limit exceeded. Maximum allowed: {settings.quota_memory}GiB")
        holding = [r for r in live if r.state not in ("archived", "destroyed")]
        if settings.quota_disk is not None and sum(r.disk for r in holding) + (
            adding.disk if new or adding.state == "archived" else 0
        ) > (settings.quota_disk):
            raise _bad(f"Total disk limit exceeded. Maximum allowed: {settings.quota_disk}GiB")

    # -- operations ---------------------------------------------------------------------------

    def create(self, body: dict[str, Any]) -> SandboxRecord:
        sandbox_id = str(uuid.uuid4())
        name = body.get("name")
        if name is None or name == "":
            name = sandbox_id
        if not isinstance(name, str):
            raise _bad("name must be a string")
        if self.store.find(name) is not None:
            raise ApiError(409, f"Sandbox with name {name} already exists", source=SOURCE_API)
        labels = _str_map(body.get("labels"), "labels")
        if labels.get("code-toolbox-language", "python") not in LANGUAGES:
            raise _bad("Invalid code-toolbox-language label")
        build_info = body.get("buildInfo")
        snapshot = body.get("snapshot")
        if snapshot is not None and not isinstance(snapshot, str):
            raise _bad("snapshot must be a string")
        now = self.clock()
        now_text = now_iso()
        stored_build: dict[str, Any] | None = None
        if isinstance(build_info, dict):
            dockerfile = build_info.get("dockerfileContent")
            if not isinstance(dockerfile, str):
                raise _bad("buildInfo.dockerfileContent must be a string")
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
            if isinstance(body.get(key), str) and body[key] != ""
        }
        for key in ("networkAllowList", "domainAllowList"):
            if key in extra:
                extra[key] = check_list(key, extra[key])
        secrets = parse_secrets(body.get("secrets"))
        gpu_types = body.get("gpuType")
        if gpu_types is not None and (
            not isinstance(gpu_types, list) or not all(t in GPU_TYPES for t in gpu_types)
        ):
            raise _bad(f"gpuType must be a list of {', '.join(GPU_TYPES)}")
        ttl = _int(body, "ttlMinutes", 0)
        record = SandboxRecord(
            id=sandbox_id,
            name=name,
            seq=0,
            created_ts=now,
            created_at=now_text,
            updated_at=now_text,
            state="creating",
            desired_state="started",
            snapshot=snapshot,
            user=body["user"] if isinstance(body.get("user"), str) else "daytona",
            env={
                **_str_map(body.get("env"), "env"),
                **{k: secret_placeholder(v) for k, v in secrets.items()},
            },
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
            auto_pause_interval=_int(body, "autoPauseInterval", 0),
            spot=bool(body.get("spot", False)),
            gpu_type=gpu_types[0] if gpu_types else None,
            secrets=secrets,
            build_info=stored_build,
            volumes=self._mounts(body.get("volumes")),
            extra=extra,
            last_activity_ts=now,
            last_activity_at=now_text,
            state_since_ts=now,
        )
        if record.gpu > 0 and record.auto_delete_interval != 0:
            raise _bad("GPU sandboxes must be ephemeral (autoDeleteInterval 0)")
        if (record.spot or record.gpu_type is not None) and record.gpu == 0:
            raise _bad("spot and gpuType need a GPU sandbox")
        if record.auto_pause_interval and record.auto_stop_interval:
            raise _bad("autoStopInterval and autoPauseInterval are mutually exclusive")
        if record.auto_pause_interval and record.auto_delete_interval == 0:
            raise _bad("Ephemeral sandboxes cannot have auto-pause enabled")
        if ttl > 0:
            self.set_ttl(record, ttl, now)
        self._capacity(record, new=True)
        record.seq = self.store.next_seq()
        root = self.store.root_of(record)
        (root / HOME_RELATIVE).mkdir(parents=True, exist_ok=True)
        (root / "tmp").mkdir(exist_ok=True)
        for mount in record.volumes:
            # The volume's directory (or its subpath) is bind-mapped into the sandbox root by a
            # symlink at the mount path; the toolbox's file API follows it (see toolbox.py).
            target = self.store.volume_dir(mount["volumeId"]) / (mount.get("subpath") or "")
            target.mkdir(parents=True, exist_ok=True)
            link = root / mount["mountPath"].strip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                raise _bad(f"mount path {mount['mountPath']} is taken")
            link.symlink_to(target, target_is_directory=True)
        self._save(record)
        self._begin_start(record, "create", "creating")
        return record

    def _mounts(self, value: Any) -> list[dict[str, Any]]:
        """Validate a create's ``volumes``: each volume exists and is ready, mount paths are absolute,
        below / and distinct. Stored with the volume's id (a name is accepted too)."""
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise _bad("volumes must be a list of {volumeId, mountPath, subpath?}")
        mounts: list[dict[str, Any]] = []
        paths: set[str] = set()
        for item in value:
            volume_id, path, subpath = item.get("volumeId"), item.get("mountPath"), item.get("subpath")
            if not isinstance(volume_id, str) or not isinstance(path, str):
                raise _bad("each volume needs volumeId and mountPath strings")
            volume = self.store.find_volume(volume_id)
            if volume is None:
                raise ApiError(404, f"Volume {volume_id} not found", source=SOURCE_API)
            if volume.state != "ready":
                raise _bad(f"Volume {volume.name} is not ready ({volume.state})")
            norm = "/" + "/".join(p for p in path.split("/") if p)
            if not path.startswith("/") or norm == "/" or ".." in norm.split("/") or norm in paths:
                raise _bad(f"Invalid mount path {path}")
            if subpath is not None and (
                not isinstance(subpath, str) or subpath.startswith("/") or ".." in subpath.split("/")
            ):
                raise _bad(f"Invalid subpath {subpath}")
            paths.add(norm)
            mount = {"volumeId": volume.id, "mountPath": norm}
            if subpath:
                mount["subpath"] = subpath
            mounts.append(mount)
        return mounts

    def in_use(self, volume_id: str) -> bool:
        """Whether a sandbox that is not being destroyed mounts the volume."""
        return any(
            r.desired_state != "destroyed" and any(m.get("volumeId") == volume_id for m in r.volumes)
            for r in self.store.by_id.values()
        )

    def set_ttl(self, record: SandboxRecord, minutes: int, now: float | None = None) -> None:
        """Daytona's ttl: destroyed ``minutes`` from now whatever its state (0 = never)."""
        if minutes <= 0:
            record.auto_destroy_ts, record.auto_destroy_at = 0.0, None
            return
        at = (now if now is not None else self.clock()) + self.faults.minutes(minutes)
        record.auto_destroy_ts = at
        record.auto_destroy_at = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"

    def start(self, record: SandboxRecord) -> SandboxRecord:
        if record.state == "started" and record.pending_until is None:
            return record
        self._refuse_errored(record)
        if record.state == "archiving":  # the archive is abandoned; the disk is still local
            record.pending_state = None
            record.pending_until = None
        elif self._changing(record):
            raise self._in_progress()
        if record.state not in ("stopped", "archived", "archiving", "paused"):
            raise _bad("Sandbox is not in valid state")
        self._capacity(record, new=False)
        record.desired_state = "started"
        transitional = "restoring" if record.state == "archived" else "starting"
        self._begin_start(record, "start", transitional)
        return record

    def stop(self, record: SandboxRecord) -> SandboxRecord:
        self._refuse_errored(record)
        if record.state not in ("started", "paused"):
            raise _bad("Sandbox is not in a stoppable state")
        if self._changing(record) or record.desired_state not in ("started", "paused"):
            raise self._in_progress()
        self._stop_or_destroy(record)
        return record

    def _stop_or_destroy(self, record: SandboxRecord) -> None:
        if record.auto_delete_interval == 0:  # ephemeral: stopping deletes it
            self._destroy(record)
            return
        record.desired_state = "stopped"
        self._begin(record, "stop", "stopping", "stopped")

    def archive(self, record: SandboxRecord) -> SandboxRecord:
        self._refuse_errored(record)
        if record.auto_delete_interval == 0:
            raise _bad("Ephemeral sandboxes cannot be archived")
        if record.state != "stopped":
            raise _bad("Sandbox is not stopped")
        if self._changing(record) or record.desired_state != "stopped":
            raise self._in_progress()
        record.desired_state = "archived"
        self._begin(record, "archive", "archiving", "archived")
        return record

    def recover(self, record: SandboxRecord) -> SandboxRecord:
        if self._changing(record):
            raise self._in_progress()
        if record.state != "error":
            raise _bad("Sandbox is not in an errored state")
        if not record.recoverable:
            raise _bad("Sandbox cannot be recovered")
        record.desired_state = "started"
        self._begin_start(record, "recover", "starting")
        return record

    def delete(self, record: SandboxRecord) -> SandboxRecord:
        if record.desired_state == "destroyed" or (
            self._changing(record) and record.state not in ("archiving", "pending_build")
        ):
            raise self._in_progress()
        self._destroy(record)
        return record

    def _destroy(self, record: SandboxRecord) -> None:
        record.pending_state = None
        record.pending_until = None
        record.desired_state = "destroyed"
        self.store.rename(record, f"DESTROYED_{record.name}_{int(self.clock() * 1000)}")
        self._begin(record, "delete", "destroying", "destroyed")

    def force_state(self, record: SandboxRecord, body: dict[str, Any]) -> SandboxRecord:
        """Admin: put a sandbox into any state (e.g. ``error``), cancelling its transition.

        The desired state follows a stable forced state (started, stopped, archived, paused) unless
        ``desiredState`` is given, so the list does not show a change nobody asked for.
        """
        state = body.get("state")
        if not isinstance(state, str) or not state:
            raise _bad("state must be a non-empty string")
        desired = body.get("desiredState")
        if desired is not None and not isinstance(desired, str):
            raise _bad("desiredState must be a string")
        now = self.clock()
        record.pending_state = None
        record.pending_until = None
        if state != record.state:
            record.state_since_ts = now
        record.state = state
        if desired is not None:
            record.desired_state = desired
        elif state in ("started", "stopped", "archived", "paused"):
            record.desired_state = state
        record.error_reason = body.get("errorReason") if state in ERRORED else None
        if state in ERRORED and record.error_reason is None:
            record.error_reason = "injected fault"
        record.recoverable = bool(body.get("recoverable", False)) if state == "error" else False
        record.updated_at = now_iso()
        if state == "destroyed":
            self.store.remove(record, now)
            self._notify(record)
            self._discard_dir(self.store.root_of(record))
        else:
            self._save(record)
        return record
