"""The sandbox provider boundary: a Protocol and the plain, frozen dataclasses that cross it.

Everything above this layer (planner, applier, reconciler, gc, execution) speaks only these types.
Two implementations exist: ``providers.daytona`` (the real SDK; the only module that imports it) and
``providers.memory`` (dicts, a call log and fault hooks, for fast tests). Both raise only the errors
of ``controller.errors``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime
from typing import Any, Protocol, TypeVar, runtime_checkable

_T = TypeVar("_T")

# Ownership labels put on every sandbox leasectl creates.
LABEL_INSTANCE = "leasectl-instance"
LABEL_LEASE = "leasectl-lease"
LABEL_SPEC = "leasectl-spec"  # hash of the replacing spec fields
LABEL_SETTINGS = "leasectl-settings"  # hash of the in-place spec fields (labels, intervals)
RESERVED_LABEL_PREFIX = "leasectl-"

# Daytona sandbox states (SandboxState in the API contract), grouped by what the planner does.
STATE_STARTED = "started"
STATE_STOPPED = "stopped"
STATE_PAUSED = "paused"
STATE_ARCHIVED = "archived"
STATE_ERROR = "error"
STATE_BUILD_FAILED = "build_failed"
STATE_DESTROYED = "destroyed"
STATE_DESTROYING = "destroying"
TRANSITIONAL_STATES = frozenset(
    {
        "creating",
        "restoring",
        "starting",
        "stopping",
        "archiving",
        "pulling_snapshot",
        "pending_build",
        "building_snapshot",
        "resizing",
        "snapshotting",
        "forking",
        "pausing",
        "resuming",
        "destroying",
    }
)
ALL_STATES = TRANSITIONAL_STATES | {
    STATE_STARTED,
    STATE_STOPPED,
    STATE_PAUSED,
    STATE_ARCHIVED,
    STATE_ERROR,
    STATE_BUILD_FAILED,
    STATE_DESTROYED,
    "unknown",
}


@dataclass(frozen=True)
class ObservedSandbox:
    """One sandbox as the provider reports it (from list or get)."""

    id: str
    name: str
    state: str  # a SandboxState value, or whatever unknown string the API sent
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    error_reason: str | None = None
    recoverable: bool = False
    snapshot: str | None = None
    target: str | None = None
    cpu: int | None = None
    memory: int | None = None
    disk: int | None = None
    gpu: int | None = None

    @property
    def lease_name(self) -> str | None:
        return self.labels.get(LABEL_LEASE)

    @property
    def instance(self) -> str | None:
        return self.labels.get(LABEL_INSTANCE)

    @property
    def spec_hash(self) -> str | None:
        return self.labels.get(LABEL_SPEC)

    @property
    def settings_hash(self) -> str | None:
        return self.labels.get(LABEL_SETTINGS)


def field_template(cls: type[Any]) -> dict[str, Any]:
    """Every field of a dataclass, in field order, with its plain default (None where it has none or
    a default factory): the first argument of :func:`frozen_instance`."""
    return {f.name: None if f.default is MISSING else f.default for f in fields(cls)}


def frozen_instance(cls: type[_T], template: Mapping[str, Any], values: Mapping[str, Any]) -> _T:
    """``cls(**values)`` for a frozen dataclass made once per lease per pass (``ObservedSandbox``,
    the planner's ``Decision``), without its generated ``__init__``, which sets every field through
    ``object.__setattr__`` (2-3 us for a dozen fields, most of the cost of making one). ``template``
    is :func:`field_template` of ``cls``; ``values`` must name only fields, and give every field
    whose default is missing or a factory. The result is the same frozen instance: equal, hashable,
    ``dataclasses.replace`` works (unit tests compare the two ways)."""
    instance: _T = object.__new__(cls)
    attributes = instance.__dict__
    attributes.update(template)  # field order first, as __init__ sets them
    attributes.update(values)
    return instance


_OBSERVED_TEMPLATE = field_template(ObservedSandbox)


def observed_sandbox(values: Mapping[str, Any]) -> ObservedSandbox:
    """``ObservedSandbox(**values)`` with every field given (a list page makes one per item)."""
    return frozen_instance(ObservedSandbox, _OBSERVED_TEMPLATE, values)


@dataclass(frozen=True)
class CreateRequest:
    """Everything needed to create one sandbox. ``snapshot`` and ``image`` are mutually exclusive."""

    name: str
    labels: Mapping[str, str]
    env: Mapping[str, str] = field(default_factory=dict)
    snapshot: str | None = None
    image: str | None = None
    target: str | None = None
    language: str | None = None
    cpu: int | None = None
    memory: int | None = None
    disk: int | None = None
    gpu: int | None = None
    auto_stop_interval: int | None = None
    auto_archive_interval: int | None = None
    auto_delete_interval: int | None = None
    # env variable -> secret reference ({"from_env": NAME} / {"from_file": path}); the applier resolves
    # them into ``env`` right before the create (controller.secrets), so providers never see one.
    secret_refs: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # -- the whole sandbox (issue 15); None = Daytona's default, not sent --
    os_user: str | None = None
    public: bool | None = None
    network: NetworkSettings | None = None
    gpu_type: str | None = None
    spot: bool | None = None
    auto_pause_interval: int | None = None
    ttl_minutes: int | None = None  # Daytona's own wall-clock end (from the lease's expires_at)
    secrets: Mapping[str, str] = field(default_factory=dict)  # env variable -> Daytona secret name
    # Mounts by volume name; the applier fills in each ``volume_id`` right before the create (the
    # volume must exist and be ready at Daytona, else the lease waits in phase Blocked).
    volumes: tuple[Mount, ...] = ()
    # An image Daytona builds: the Dockerfile's content and the absolute paths of its context files
    # (the Daytona provider uploads them to Daytona's object storage first). Excludes snapshot/image.
    dockerfile: str | None = None
    build_context: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mount:
    """A volume mounted into a sandbox at ``mount_path`` (``subpath``: only that directory of it)."""

    volume: str  # the volume's name
    mount_path: str
    subpath: str | None = None
    volume_id: str | None = None


VOLUME_READY = "ready"


@dataclass(frozen=True)
class ObservedVolume:
    """A Daytona volume (``state``: ready, creating, pending_create, deleting, error, ...)."""

    id: str
    name: str
    state: str
    error_reason: str | None = None


@dataclass(frozen=True)
class NetworkSettings:
    """A sandbox's outbound network policy (Daytona's network settings): block everything, or allow
    only the listed IPv4 networks and domains; all empty and False = unrestricted."""

    block_all: bool = False
    allow_list: tuple[str, ...] = ()  # IPv4 CIDRs
    domain_allow_list: tuple[str, ...] = ()

    @property
    def restricted(self) -> bool:
        return self.block_all or bool(self.allow_list) or bool(self.domain_allow_list)


@dataclass(frozen=True)
class SandboxUpdate:
    """An in-place change of a live sandbox; None = leave as is. ``labels`` replaces every label
    (ownership labels included) and is applied last, so a label that says "updated" is only ever
    written once every setter before it succeeded."""

    labels: Mapping[str, str] | None = None
    auto_stop_interval: int | None = None
    auto_archive_interval: int | None = None
    auto_delete_interval: int | None = None
    auto_pause_interval: int | None = None
    public: bool | None = None
    network: NetworkSettings | None = None
    ttl_minutes: int | None = None  # Daytona's ttl from now (0 = none)

    @property
    def setters(self) -> tuple[str, ...]:
        """The settings this update changes, in the order they are applied. Daytona refuses auto-stop
        and auto-pause both non-zero, so the one that becomes zero is set first."""
        order = list(UPDATE_SETTERS)
        if self.auto_pause_interval:
            order.remove("auto_pause_interval")
            order.insert(order.index("auto_stop_interval") + 1, "auto_pause_interval")
        return tuple(n for n in order if getattr(self, n) is not None)


# The setters of an in-place update, in the order they are applied (labels last).
UPDATE_SETTERS = (
    "auto_pause_interval",
    "auto_stop_interval",
    "auto_archive_interval",
    "auto_delete_interval",
    "public",
    "network",
    "ttl_minutes",
    "labels",
)


@dataclass(frozen=True)
class ExecResult:
    """The outcome of one command. ``exit_code`` is None only when the command timed out."""

    exit_code: int | None
    output: str
    timed_out: bool = False


@dataclass(frozen=True)
class SessionCommand:
    """A command started asynchronously in a sandbox session; ``exit_code`` is None while it runs."""

    command_id: str
    exit_code: int | None = None


@runtime_checkable
class SandboxProvider(Protocol):
    """What the controller needs from a sandbox platform. Every call has a bounded duration.

    Lifecycle calls return once the platform accepted the request; they do not promise that the
    sandbox reached its final state (the next observation tells). ``get`` returns None for an
    unknown id or name instead of raising.
    """

    def list_sandboxes(self, labels: Mapping[str, str]) -> list[ObservedSandbox]:
        """All sandboxes carrying every given label (all pages)."""
        ...

    def get(self, id_or_name: str) -> ObservedSandbox | None: ...

    def create(self, request: CreateRequest) -> ObservedSandbox: ...

    def start(self, sandbox_id: str) -> None: ...

    def stop(self, sandbox_id: str) -> None: ...

    def archive(self, sandbox_id: str) -> None: ...

    def recover(self, sandbox_id: str) -> None: ...

    def delete(self, sandbox_id: str) -> None:
        """Delete; a sandbox that is already gone is not an error."""
        ...

    def update(self, sandbox_id: str, update: SandboxUpdate) -> None:
        """Apply ``update`` in place (each setter is idempotent; labels last)."""
        ...

    # Volumes (Daytona's shared persistent storage, mounted into sandboxes by id).

    def list_volumes(self) -> list[ObservedVolume]: ...

    def get_volume(self, name: str) -> ObservedVolume | None:
        """The volume with this name, or None."""
        ...

    def create_volume(self, name: str) -> ObservedVolume: ...

    def delete_volume(self, volume_id: str) -> None:
        """Delete; a volume that is already gone is not an error."""
        ...

    def exec(
        self,
        sandbox_id: str,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: int | None = None,
    ) -> ExecResult: ...

    def work_dir(self, sandbox_id: str) -> str: ...

    def make_dir(self, sandbox_id: str, path: str) -> None: ...

    def upload(self, sandbox_id: str, path: str, data: bytes) -> None: ...

    def delete_file(self, sandbox_id: str, path: str) -> None:
        """Remove a file; a file that is already gone is not an error."""
        ...

    # Sessions (Daytona's toolbox session API): long commands run asynchronously, their output is
    # read while they run, and a later process can re-attach to them by (session id, command id).

    def create_session(self, sandbox_id: str, session_id: str) -> None: ...

    def session_execute(self, sandbox_id: str, session_id: str, command: str) -> str:
        """Start ``command`` asynchronously in the session; return its command id."""
        ...

    def session_command(self, sandbox_id: str, session_id: str, command_id: str) -> SessionCommand:
        """The command's state; NotFoundError when the session or the command is unknown."""
        ...

    def session_logs(self, sandbox_id: str, session_id: str, command_id: str) -> str:
        """All output of the command so far (stdout and stderr merged)."""
        ...

    def delete_session(self, sandbox_id: str, session_id: str) -> None:
        """Delete the session and stop what runs in it; a session already gone is not an error."""
        ...
