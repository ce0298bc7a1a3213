"""LeaseSpec and PoolSpec: leases and pools as written in YAML, their validation, row form and hash.

``leasectl apply`` loads files with :func:`load_manifest` (errors name the file, the lease or pool and
the field), ``leasectl export`` turns rows back into the same YAML, and the reconciler hashes the spec
columns of a row with :func:`spec_hash` to detect changes, whoever made them (apply or plain SQL).
A pool's ``template`` is a lease without ``name`` and ``state``; :meth:`PoolSpec.member` is the lease
of one member, and :meth:`PoolSpec.template_hash` the spec hash every current member carries.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from controller.errors import SpecError
from controller.schedules import ScheduleError, lease_schedule, pool_schedule
from controller.secrets import check_ref

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_LABEL_PREFIX = "leasectl-"
# The whole env of a lease (keys and values, UTF-8). It travels in the create request and in every
# command line (`env K=V ...`); Linux refuses a single argument over 128 KiB (MAX_ARG_STRLEN).
MAX_ENV_BYTES = 65536
DesiredState = Literal["running", "stopped", "archived", "absent"]
Language = Literal["python", "typescript", "javascript"]

# Columns of `leases` that define the sandbox, classified by what a change does to a live sandbox
# (docs/architecture.md "In-place updates"). Daytona has no setter for these: a change replaces the
# sandbox. They alone make the spec hash (the ``leasectl-spec`` label and the sandbox name).
REPLACING_COLUMNS = (
    "snapshot",
    "image",
    "target",
    "language",
    "cpu",
    "memory",
    "disk",
    "gpu",
    "env",  # the toolbox's update_env changes only the daemon's process, not what a restart sees
    # -- issue 15, the whole sandbox (ADDED_COLUMNS: hashed only when set) --
    "os_user",  # the user is fixed when the sandbox is made
    "gpu_type",
    "spot",  # GPU placement: no setter
    "secrets",  # Daytona's update_secrets needs a restart for a sandbox created without any
    "volumes",  # mounts are fixed when the sandbox is made
    "build",  # the Dockerfile (content) and context digests: a new image
)
# Daytona changes these on a live sandbox with a setter (labels: PUT .../labels; the intervals:
# POST .../autostop|autoarchive|autodelete|autopause/{n}; public: POST .../public/{bool}; network:
# POST .../network-settings; ephemeral is auto_delete_interval 0): a change is an ``update``
# action, never a replacement. Their hash is the ``leasectl-settings`` label.
IN_PLACE_COLUMNS = (
    "labels",
    "auto_stop_interval",
    "auto_archive_interval",
    "auto_delete_interval",
    # -- issue 15, the whole sandbox (ADDED_COLUMNS: hashed only when set) --
    "auto_pause_interval",
    "ephemeral",
    "public",
    "network_block_all",
    "network_allow_list",
    "domain_allow_list",
    "expires_at",  # Daytona's ttl (POST .../ttl/{n}), re-anchored to the new end
)
SPEC_COLUMNS = REPLACING_COLUMNS + IN_PLACE_COLUMNS
# Spec columns added after sandboxes were already labelled with hashes: a column left unset (NULL)
# is left out of the hashes and field digests, so adding it changes no existing sandbox's hash.
ADDED_COLUMNS = frozenset(
    {
        "os_user",
        "gpu_type",
        "spot",
        "secrets",
        "volumes",
        "build",
        "auto_pause_interval",
        "ephemeral",
        "public",
        "network_block_all",
        "network_allow_list",
        "domain_allow_list",
        "expires_at",
    }
)
# Columns of `leases` holding JSON (lists or objects).
JSON_COLUMNS = ("env", "labels", "secrets", "network_allow_list", "domain_allow_list", "volumes", "build")
MAX_DOCKERFILE_BYTES = 65536
VOLUME_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# Daytona's GPU types (GpuType in the API contract).
GPU_TYPES = ("H100", "H200", "B200", "B300", "RTX-PRO-6000", "RTX-4090", "RTX-5090", "MI355X")
GpuType = Literal["H100", "H200", "B200", "B300", "RTX-PRO-6000", "RTX-4090", "RTX-5090", "MI355X"]
OS_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
DOMAIN_RE = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
MAX_ALLOW_LIST = 64  # entries per allow list (a guard against pasted files, not a Daytona limit)
# The columns the spec hash covered before in-place updates existed (every spec column): a sandbox
# labelled with this hash of the current spec is up to date and only needs the new labels.
LEGACY_SPEC_COLUMNS = (
    "snapshot",
    "image",
    "target",
    "language",
    "cpu",
    "memory",
    "disk",
    "gpu",
    "env",
    "labels",
    "auto_stop_interval",
    "auto_archive_interval",
    "auto_delete_interval",
)


INT_MAX = 2**31 - 1  # the integer columns of `leases` (PostgreSQL integer)


class FieldRuleError(ValueError):
    """A rule across fields, reported against ``field`` (``parse_leases`` names it in the message)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: int | None = Field(default=None, gt=0, le=INT_MAX, strict=True)
    memory: int | None = Field(default=None, gt=0, le=INT_MAX, strict=True, description="GiB")
    disk: int | None = Field(default=None, gt=0, le=INT_MAX, strict=True, description="GiB")
    gpu: int | None = Field(default=None, gt=0, le=INT_MAX, strict=True)


class VolumeMount(BaseModel):
    """A Daytona volume mounted into a lease's sandbox at ``mount_path`` (``subpath``: only that
    directory of the volume)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    volume: str
    mount_path: str
    subpath: str | None = None

    @field_validator("volume")
    @classmethod
    def _name(cls, value: str) -> str:
        return _volume_name(value)

    @field_validator("mount_path")
    @classmethod
    def _mount_path(cls, value: str) -> str:
        if not value.startswith("/") or "\x00" in value:
            raise ValueError(f"{value!r} must be an absolute path (starting with /)")
        parts = value.strip("/").split("/")
        if value == "/" or any(p in ("", ".", "..") for p in parts):
            raise ValueError(
                f"{value!r} must be a directory below / without '.', '..' or empty parts, e.g. /data"
            )
        return value.rstrip("/")

    @field_validator("subpath")
    @classmethod
    def _subpath(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = value.strip("/").split("/")
        if value.startswith("/") or "\x00" in value or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{value!r} must be a relative path inside the volume, without '.' or '..'")
        return value


def _volume_name(value: str) -> str:
    if not VOLUME_NAME_RE.fullmatch(value):
        raise ValueError(f"invalid volume name {value!r}: letters, digits, '.', '_' and '-', 1-63 characters")
    return value


class BuildSpec(BaseModel):
    """An image built by Daytona from a Dockerfile: inline (``dockerfile``) or a file relative to the
    lease file (``dockerfile_path``), plus ``context`` files or directories (relative to the lease
    file) that its COPY/ADD lines use. ``apply`` reads the file and resolves every path
    (:func:`resolve_build`), so the row holds the Dockerfile's content, absolute context paths and
    their digests (``context_sha256``): a change of any of them changes the spec hash at the next
    apply and replaces the sandbox."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dockerfile: str | None = Field(default=None, min_length=1)
    dockerfile_path: str | None = Field(default=None, min_length=1)
    context: list[str] = Field(default_factory=list)
    context_sha256: dict[str, str] | None = None  # set by apply: absolute path -> digest

    @model_validator(mode="after")
    def _one_dockerfile(self) -> BuildSpec:
        if (self.dockerfile is None) == (self.dockerfile_path is None):
            raise ValueError("give exactly one of dockerfile (inline) and dockerfile_path")
        if self.dockerfile is not None:
            if len(self.dockerfile.encode()) > MAX_DOCKERFILE_BYTES or "\x00" in self.dockerfile:
                raise ValueError(f"dockerfile: at most {MAX_DOCKERFILE_BYTES} bytes of text")
            if not any(line.strip().upper().startswith("FROM ") for line in self.dockerfile.splitlines()):
                raise ValueError("dockerfile: has no FROM line")
        return self


def _tree_digest(path: Path) -> str:
    """sha256 of a file's bytes, or of a directory's relative names and file contents."""
    digest = hashlib.sha256()
    if path.is_file():
        digest.update(path.read_bytes())
        return digest.hexdigest()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(item.relative_to(path)).encode() + b"\0")
        digest.update(hashlib.sha256(item.read_bytes()).digest())
    return digest.hexdigest()


def resolve_build(build: BuildSpec, base: Path) -> BuildSpec:
    """The stored form of ``build`` for a lease file in directory ``base``: the Dockerfile's content
    and every context path absolute, with its digest. ValueError names what cannot be read."""
    dockerfile = build.dockerfile
    if build.dockerfile_path is not None:
        path = (base / build.dockerfile_path).resolve()
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(
                f"dockerfile_path: cannot read {path}: {exc.strerror or type(exc).__name__}"
            ) from None
        try:
            dockerfile = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"dockerfile_path: {path} is not UTF-8 text") from None
    digests: dict[str, str] = {}
    for index, item in enumerate(build.context):
        path = (base / item).resolve()
        if not path.exists():
            raise ValueError(f"context.{index}: {path} does not exist")
        try:
            digests[str(path)] = _tree_digest(path)
        except OSError as exc:
            raise ValueError(f"context.{index}: cannot read {path}: {exc.strerror or exc}") from None
    return BuildSpec(dockerfile=dockerfile, context=list(digests), context_sha256=digests or None)


class VolumeSpec(BaseModel):
    """A Daytona volume leasectl manages (top-level ``volumes:``): created before the leases that
    mount it; deleted only when ``state: absent`` and no lease mounts it any more."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    state: Literal["present", "absent"] = "present"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _volume_name(value)


class LeaseSpec(BaseModel):
    """One lease. ``state`` is the desired state (column ``desired_state``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    state: DesiredState = "running"
    snapshot: str | None = Field(default=None, min_length=1, max_length=255)
    image: str | None = Field(default=None, min_length=1, max_length=1024)
    target: str | None = Field(default=None, min_length=1, max_length=64)
    language: Language | None = None
    resources: Resources | None = None
    # A value is a literal or a secret reference ({from_env: NAME} / {from_file: /path}, see
    # controller.secrets): only the reference is stored, the value is read at create time.
    env: dict[str, str | dict[str, str]] = Field(default_factory=dict)
    labels: dict[str, str] = Field(default_factory=dict)
    auto_stop_interval: int | None = Field(default=None, ge=0, le=INT_MAX, strict=True)
    auto_archive_interval: int | None = Field(default=None, ge=0, le=INT_MAX, strict=True)
    auto_delete_interval: int | None = Field(default=None, ge=-1, le=INT_MAX, strict=True)
    expires_at: datetime | None = None
    paused: bool = False
    # -- issue 15: the whole sandbox (None = Daytona's default, nothing sent) --
    os_user: str | None = None
    public: bool | None = None
    network_block_all: bool | None = None
    network_allow_list: list[str] | None = Field(default=None, max_length=MAX_ALLOW_LIST)
    domain_allow_list: list[str] | None = Field(default=None, max_length=MAX_ALLOW_LIST)
    gpu_type: GpuType | None = None
    spot: bool | None = None
    auto_pause_interval: int | None = Field(default=None, ge=0, le=INT_MAX, strict=True)
    ephemeral: bool | None = None
    # Daytona's own secrets: env variable -> name of a secret of the organization (the sandbox sees
    # an opaque placeholder, Daytona substitutes the value on outbound requests).
    secrets: dict[str, str] | None = None
    volumes: list[VolumeMount] | None = None
    build: BuildSpec | None = None

    @field_validator("volumes")
    @classmethod
    def _one_mount_per_path(cls, value: list[VolumeMount] | None) -> list[VolumeMount] | None:
        seen: set[str] = set()
        for mount in value or ():
            if mount.mount_path in seen:
                raise ValueError(f"two volumes are mounted on {mount.mount_path}")
            seen.add(mount.mount_path)
        return value

    @field_validator("os_user")
    @classmethod
    def _os_user(cls, value: str | None) -> str | None:
        if value is not None and not OS_USER_RE.fullmatch(value):
            raise ValueError(
                f"invalid user name {value!r}: lowercase letters, digits, '_' and '-', "
                "starting with a letter or '_', at most 32 characters"
            )
        return value

    @field_validator("network_allow_list")
    @classmethod
    def _cidrs(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for item in value:
            try:
                network = ipaddress.ip_network(item, strict=True)
            except ValueError as exc:
                hint = ""
                if "/" in item:
                    with contextlib.suppress(ValueError):
                        hint = f" (did you mean {ipaddress.ip_network(item, strict=False)}?)"
                raise ValueError(f"{item!r} is not an IPv4 network in CIDR form: {exc}{hint}") from None
            if network.version != 4 or "/" not in item:
                raise ValueError(f"{item!r} is not an IPv4 network in CIDR form, e.g. 10.0.0.0/8")
        if len(set(value)) != len(value):
            raise ValueError("lists a network twice")
        return value

    @field_validator("domain_allow_list")
    @classmethod
    def _domains(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for item in value:
            if not DOMAIN_RE.fullmatch(item) or len(item) > 253:
                raise ValueError(f"{item!r} is not a domain name (lowercase, e.g. pypi.org or *.github.com)")
        if len(set(value)) != len(value):
            raise ValueError("lists a domain twice")
        return value

    @field_validator("secrets")
    @classmethod
    def _native_secrets(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, name in (value or {}).items():
            if not ENV_KEY_RE.fullmatch(key):
                raise ValueError(f"invalid variable name {key!r}: must match {ENV_KEY_RE.pattern}")
            if not name or "\x00" in name or len(name) > 255:
                raise ValueError(f"{key}: the name of a Daytona secret must be 1-255 characters")
        return value

    schedule: dict[str, Any] | None = None  # controller.schedules: {timezone, entries: [{cron, state}]}

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> dict[str, Any] | None:
        try:
            parsed = lease_schedule(value)
        except ScheduleError as exc:
            raise FieldRuleError(_schedule_field(exc), str(exc)) from None
        return None if parsed is None else parsed.to_data()

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value):
            raise ValueError(
                "must be a lowercase slug: letters a-z, digits and dashes, 1-63 characters, "
                "not starting or ending with a dash"
            )
        return value

    @field_validator("env")
    @classmethod
    def _env_keys(cls, value: dict[str, str | dict[str, str]]) -> dict[str, str | dict[str, str]]:
        for key, item in value.items():
            if not ENV_KEY_RE.fullmatch(key):
                raise ValueError(f"invalid variable name {key!r}: must match {ENV_KEY_RE.pattern}")
            problem = None if isinstance(item, str) else check_ref(item)
            if problem is not None:
                raise ValueError(f"{key}: {problem}")
        size = sum(
            len(k.encode("utf-8", "replace")) + len(v.encode("utf-8", "replace"))
            for k, v in value.items()
            if isinstance(v, str)
        )
        if size > MAX_ENV_BYTES:
            raise ValueError(f"is {size} bytes; at most {MAX_ENV_BYTES} bytes of keys and values are allowed")
        return value

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key.startswith(RESERVED_LABEL_PREFIX):
                raise ValueError(f"label {key!r} uses the reserved prefix {RESERVED_LABEL_PREFIX!r}")
            if not key:
                raise ValueError("label keys must not be empty")
        return value

    @field_validator("snapshot", "image", "target", "env", "labels")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        texts = [*value.keys(), *value.values()] if isinstance(value, dict) else [value]
        texts += [v for t in texts if isinstance(t, dict) for v in t.values()]
        if any(isinstance(t, str) and "\x00" in t for t in texts):
            raise ValueError("must not contain NUL characters")
        return value

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("must include a time zone, e.g. 2026-12-31T18:00:00Z")
        return value.astimezone(UTC) if value is not None else None

    @model_validator(mode="after")
    def _image_rules(self) -> LeaseSpec:
        if sum(x is not None for x in (self.snapshot, self.image, self.build)) > 1:
            raise ValueError("give one of snapshot or image or build, not several")
        if self.resources is not None and self.image is None:
            raise ValueError("resources can only be set together with image")
        return self

    @model_validator(mode="after")
    def _ephemeral_rules(self) -> LeaseSpec:
        """Daytona's rules for ``auto_delete_interval: 0`` (ephemeral): stopping deletes the sandbox,
        archiving is refused, and a GPU sandbox must be ephemeral."""
        if self.auto_delete_interval == 0 and self.state in ("stopped", "archived"):
            raise FieldRuleError(
                "auto_delete_interval",
                f"0 makes the sandbox ephemeral: Daytona deletes it when it stops and cannot archive it, "
                f"so it cannot be kept {self.state}; use state running or absent, or another "
                "auto_delete_interval (-1 = never)",
            )
        if (
            self.ephemeral is not None
            and self.auto_delete_interval is not None
            and self.ephemeral != (self.auto_delete_interval == 0)
        ):
            raise FieldRuleError(
                "ephemeral",
                f"ephemeral: {str(self.ephemeral).lower()} contradicts auto_delete_interval: "
                f"{self.auto_delete_interval} (ephemeral means auto_delete_interval 0); give one of them",
            )
        if self.ephemeral and self.state in ("stopped", "archived"):
            raise FieldRuleError(
                "ephemeral",
                f"an ephemeral sandbox is deleted when it stops and cannot be archived, so it cannot be "
                f"kept {self.state}; use state running or absent",
            )
        parked = [
            index
            for index, entry in enumerate((self.schedule or {}).get("entries", ()))
            if entry.get("state") in ("stopped", "archived")
        ]
        if self.is_ephemeral and parked:
            raise FieldRuleError(
                f"schedule.entries.{parked[0]}.state",
                "the lease is ephemeral: Daytona deletes it when it stops and "
                "cannot archive it, so a schedule may only make it running or absent",
            )
        gpu = bool(self.resources is not None and self.resources.gpu)
        if gpu and not self.is_ephemeral:
            raise FieldRuleError(
                "auto_delete_interval",
                "a GPU sandbox must be ephemeral on Daytona: "
                "set auto_delete_interval: 0 (or ephemeral: true)",
            )
        if self.auto_pause_interval and self.is_ephemeral:
            raise FieldRuleError(
                "auto_pause_interval", "an ephemeral sandbox cannot auto-pause: set it to 0 or leave it out"
            )
        if self.auto_pause_interval and self.auto_stop_interval:
            raise FieldRuleError(
                "auto_pause_interval",
                "auto_stop_interval and auto_pause_interval are mutually exclusive: set at most one of them",
            )
        if self.gpu_type is not None and not gpu:
            raise FieldRuleError("gpu_type", "needs a GPU: set resources.gpu (and image)")
        if self.spot and not gpu:
            raise FieldRuleError("spot", "spot is for GPU sandboxes only: set resources.gpu (and image)")
        clash = sorted(set(self.secrets or ()) & set(self.env))
        if clash:
            raise FieldRuleError(
                "secrets",
                f"{', '.join(clash)} is also set in env: give each variable in env or in secrets, not both",
            )
        if self.network_block_all and (self.network_allow_list or self.domain_allow_list):
            raise FieldRuleError(
                "network_block_all",
                "blocks all traffic, so an allow list would not apply: give either network_block_all "
                "or network_allow_list/domain_allow_list",
            )
        return self

    @property
    def is_ephemeral(self) -> bool:
        """Daytona deletes the sandbox when it stops (``ephemeral: true`` or auto_delete_interval 0)."""
        return bool(self.ephemeral) or self.auto_delete_interval == 0

    # -- row form -------------------------------------------------------------------------------

    def to_row(self) -> dict[str, Any]:
        """Column values of ``leases`` for this spec (without id and timestamps)."""
        res = self.resources or Resources()
        return {
            "name": self.name,
            "desired_state": self.state,
            "snapshot": self.snapshot,
            "image": self.image,
            "target": self.target,
            "language": self.language,
            "cpu": res.cpu,
            "memory": res.memory,
            "disk": res.disk,
            "gpu": res.gpu,
            "env": dict(self.env),
            "labels": dict(self.labels),
            "auto_stop_interval": self.auto_stop_interval,
            "auto_archive_interval": self.auto_archive_interval,
            "auto_delete_interval": self.auto_delete_interval,
            "expires_at": self.expires_at,
            "paused": self.paused,
            "os_user": self.os_user,
            "public": self.public,
            "network_block_all": self.network_block_all,
            "network_allow_list": _list_or_none(self.network_allow_list),
            "domain_allow_list": _list_or_none(self.domain_allow_list),
            "gpu_type": self.gpu_type,
            "spot": self.spot,
            "auto_pause_interval": self.auto_pause_interval,
            "ephemeral": self.ephemeral,
            "secrets": dict(self.secrets) if self.secrets is not None else None,
            "volumes": (
                [m.model_dump(exclude_none=True) for m in self.volumes] if self.volumes is not None else None
            ),
            "build": self.build.model_dump(exclude_none=True) if self.build is not None else None,
            "schedule": self.schedule,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> LeaseSpec:
        resources = {k: row.get(k) for k in ("cpu", "memory", "disk", "gpu") if row.get(k) is not None}
        return cls(
            name=row["name"],
            state=row["desired_state"],
            snapshot=row.get("snapshot"),
            image=row.get("image"),
            target=row.get("target"),
            language=row.get("language"),
            resources=Resources(**resources) if resources else None,
            env=dict(row.get("env") or {}),
            labels=dict(row.get("labels") or {}),
            auto_stop_interval=row.get("auto_stop_interval"),
            auto_archive_interval=row.get("auto_archive_interval"),
            auto_delete_interval=row.get("auto_delete_interval"),
            paused=bool(row.get("paused")),
            **{col: row.get(col) for col in ADDED_COLUMNS if row.get(col) is not None},
            schedule=row.get("schedule"),
        )

    def to_yaml_dict(self) -> dict[str, Any]:
        """The YAML form: defaults and empty values left out, so exports stay short."""
        data = self.model_dump(mode="json", exclude_defaults=True, exclude_none=True)
        data["name"] = self.name
        data.setdefault("state", self.state)
        ordered = {"name": data.pop("name"), "state": data.pop("state")}
        ordered.update(data)
        return ordered


def _list_or_none(value: list[str] | None) -> list[str] | None:
    return list(value) if value is not None else None


def _digest(values: Mapping[str, Any]) -> str:
    canonical = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _hashed(row: Mapping[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    """The values a hash covers: every column, except an added column that is not set."""
    return {col: row.get(col) for col in columns if col not in ADDED_COLUMNS or row.get(col) is not None}


def spec_hash(row: Mapping[str, Any]) -> str:
    """A stable short hash of the replacing spec columns of a lease row: a change replaces the sandbox."""
    return _digest(_hashed(row, REPLACING_COLUMNS))


def settings_hash(row: Mapping[str, Any]) -> str:
    """A stable short hash of the in-place spec columns: a change is applied with Daytona's setters."""
    return _digest(_hashed(row, IN_PLACE_COLUMNS))


def legacy_spec_hash(row: Mapping[str, Any]) -> str | None:
    """The hash leasectl before in-place updates put on sandboxes (all spec columns), or None when the
    row uses a column that did not exist then (no sandbox of that time can match it)."""
    # expires_at existed then but was not hashed: it does not tell the sandbox's age
    newer = (col for col in SPEC_COLUMNS if col not in LEGACY_SPEC_COLUMNS and col != "expires_at")
    if any(row.get(col) not in (None, False) for col in newer):
        return None
    return _digest({col: row.get(col) for col in LEGACY_SPEC_COLUMNS})


def field_digests(row: Mapping[str, Any]) -> dict[str, str]:
    """Per spec column a short digest of its value (never the value): ``lease_status.spec_fields``
    keeps those of the sandbox, so ``plan`` can say which fields a change touches."""
    return {col: _digest({"v": value})[:8] for col, value in _hashed(row, SPEC_COLUMNS).items()}


def _schedule_field(exc: ScheduleError) -> str:
    return f"schedule.{exc.field}" if exc.field else "schedule"


def _field_path(loc: Sequence[Any]) -> str:
    return ".".join(str(p) for p in loc) or "(lease)"


LineMap = dict[int, tuple[int, dict[str, int]]]
"""Per lease index: (line of the item, {key: line of the key}); lines are 1-based."""


def yaml_lines(text: str) -> LineMap:
    """Where each lease and each of its keys is in the YAML text (empty when it cannot tell)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(root, yaml.MappingNode):
        return {}
    lines: LineMap = {}
    for key, value in root.value:
        if getattr(key, "value", None) != "leases" or not isinstance(value, yaml.SequenceNode):
            continue
        for index, item in enumerate(value.value):
            keys: dict[str, int] = {}
            if isinstance(item, yaml.MappingNode):
                keys = {str(k.value): k.start_mark.line + 1 for k, _ in item.value}
            lines[index] = (item.start_mark.line + 1, keys)
    return lines


def _did_you_mean(key: str) -> str:
    import difflib

    match = difflib.get_close_matches(key, list(LeaseSpec.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


TOP_LEVEL_KEYS = frozenset({"leases", "pools", "volumes", "quotas"})


def parse_leases(data: Any, source: str, lines: LineMap | None = None) -> list[LeaseSpec]:
    """Validate the parsed YAML of one file; every error names the source, the lease and the field."""
    if data is None:
        return []
    if not isinstance(data, Mapping) or set(data) - TOP_LEVEL_KEYS:
        extra = sorted(set(data) - TOP_LEVEL_KEYS) if isinstance(data, Mapping) else None
        hint = f" (unknown keys: {', '.join(map(str, extra))})" if extra else ""
        raise SpecError(
            f"{source}: the top level must be a mapping with the keys 'leases', 'pools', 'volumes' "
            f"and 'quotas'{hint}"
        )
    items = data.get("leases")
    if items is None:
        return []
    if not isinstance(items, list):
        raise SpecError(f"{source}: 'leases' must be a list")
    specs: list[LeaseSpec] = []
    problems: list[str] = []
    for index, item in enumerate(items):
        label = f"leases[{index}]"
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            label = f"lease {item['name']!r}"
        if not isinstance(item, Mapping):
            problems.append(f"{source}: {label}: must be a mapping")
            continue
        try:
            specs.append(LeaseSpec.model_validate(dict(item)))
        except ValidationError as exc:
            item_line, key_lines = (lines or {}).get(index, (None, {}))
            for err in exc.errors():
                loc = err["loc"]
                rule = (err.get("ctx") or {}).get("error")
                if isinstance(rule, FieldRuleError):
                    loc = (rule.field,)
                line = key_lines.get(str(loc[0]).split(".")[0]) if loc else None
                line = line or item_line
                where = f"{source}:{line}" if line else source
                message = str(rule) if isinstance(rule, FieldRuleError) else err["msg"]
                if err["type"] == "extra_forbidden" and len(loc) == 1:
                    message = f"unknown field{_did_you_mean(str(loc[0]))}"
                problems.append(f"{where}: {label}: {_field_path(loc)}: {message}")
    if problems:
        raise SpecError("\n".join(problems))
    return specs


def load_lease_files(paths: Iterable[Path]) -> list[LeaseSpec]:
    """Read and validate lease files; names must be unique across all of them."""
    return load_manifest(paths).leases


def load_manifest(paths: Iterable[Path]) -> Manifest:
    """Read and validate lease files (``leases:`` and ``pools:``); names must be unique across all of
    them, and no lease may be named like a pool's members (``<pool>-...``)."""
    specs: list[LeaseSpec] = []
    pools: list[PoolSpec] = []
    volumes: list[VolumeSpec] = []
    seen: dict[str, str] = {}
    seen_pools: dict[str, str] = {}
    seen_volumes: dict[str, str] = {}
    quotas: list[QuotaSpec] | None = None
    seen_quotas: dict[str, str] = {}
    problems: list[str] = []
    for path in paths:
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8") if source != "-" else _stdin()
        except OSError as exc:
            raise SpecError(f"{source}: cannot read: {exc.strerror or exc}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark is not None else source
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise SpecError(f"{where}: not valid YAML: {problem}") from exc
        try:
            file_specs = parse_leases(data, source, yaml_lines(text))
            file_pools = parse_pools(data, source)
            file_volumes = parse_volumes(data, source)
            file_quotas = parse_quotas(data, source)
        except SpecError as exc:
            problems.append(str(exc))
            continue
        for volume in file_volumes:
            if volume.name in seen_volumes:
                problems.append(
                    f"{source}: volume {volume.name!r}: name: duplicate (also defined in "
                    f"{seen_volumes[volume.name]})"
                )
            else:
                seen_volumes[volume.name] = source
                volumes.append(volume)
        if file_quotas is not None:
            quotas = quotas or []
            for quota in file_quotas:
                if quota.scope in seen_quotas:
                    problems.append(
                        f"{source}: quota {quota.scope}: duplicate "
                        f"(also defined in {seen_quotas[quota.scope]})"
                    )
                else:
                    seen_quotas[quota.scope] = source
                    quotas.append(quota)
        for pool in file_pools:
            if pool.name in seen_pools:
                problems.append(
                    f"{source}: pool {pool.name!r}: name: duplicate (also defined in {seen_pools[pool.name]})"
                )
            else:
                seen_pools[pool.name] = source
                pools.append(pool)
        base = Path(source).resolve().parent if source != "-" else Path.cwd()
        for index, spec in enumerate(file_specs):
            if spec.build is not None:
                try:
                    file_specs[index] = spec = spec.model_copy(
                        update={"build": resolve_build(spec.build, base)}
                    )
                except ValueError as exc:
                    problems.append(f"{source}: lease {spec.name!r}: build.{exc}")
                    continue
        for spec in file_specs:
            if spec.name in seen:
                problems.append(
                    f"{source}: lease {spec.name!r}: name: duplicate (also defined in {seen[spec.name]})"
                )
            else:
                seen[spec.name] = source
                specs.append(spec)
    for spec in specs:
        for pool in pools:
            if pool.owns_name(spec.name):
                problems.append(
                    f"{seen[spec.name]}: lease {spec.name!r}: name: matches the member names of pool "
                    f"{pool.name!r} ({pool.name}-...); rename the lease or the pool"
                )
    absent = {v.name for v in volumes if v.state == "absent"}
    for spec in specs:
        for index, mount in enumerate(spec.volumes or ()):
            if mount.volume in absent and spec.state != "absent":
                problems.append(
                    f"{seen[spec.name]}: lease {spec.name!r}: volumes.{index}.volume: {mount.volume!r} is "
                    f"declared state: absent in {seen_volumes[mount.volume]}; a lease cannot mount a "
                    "volume that is to be deleted"
                )
    if problems:
        raise SpecError("\n".join(problems))
    return Manifest(leases=specs, pools=pools, volumes=volumes, quotas=quotas)


def _stdin() -> str:
    import sys

    return sys.stdin.read()


def dump_leases(
    specs: Iterable[LeaseSpec],
    pools: Iterable[PoolSpec] = (),
    volumes: Iterable[VolumeSpec] = (),
    quotas: Iterable[QuotaSpec] = (),
) -> str:
    """YAML that :func:`load_manifest` accepts and that round-trips (``pools:``, ``volumes:`` and
    ``quotas:`` only when there are)."""
    data: dict[str, Any] = {"leases": [s.to_yaml_dict() for s in specs]}
    pool_items = [p.to_yaml_dict() for p in pools]
    if pool_items:
        data["pools"] = pool_items
    volume_items = [v.model_dump() for v in volumes]
    if volume_items:
        data["volumes"] = volume_items
    quota_items = [q.to_yaml_dict() for q in quotas]
    if quota_items:
        data["quotas"] = quota_items
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# -- pools -------------------------------------------------------------------------------------------

POOL_NAME_MAX = 54  # room for "-" and an 8-character member id within a lease name's 63
MEMBER_ID_LENGTH = 8
_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> int:
    """Seconds from ``90``, ``"90s"``, ``"15m"``, ``"2h"`` or ``"1d"``; ValueError otherwise (or <= 0)."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int):
        seconds = value
    else:
        match = _DURATION_RE.fullmatch(str(value))
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use e.g. 90, 90s, 15m, 2h, 1d)")
        seconds = int(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return seconds


def format_duration(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class PoolSpec(BaseModel):
    """One warm pool: a lease template and its sizes (``max_size`` None = no cap)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    template: dict[str, Any] = Field(default_factory=dict)
    min_ready: int = Field(default=0, ge=0, strict=True)
    max_size: int | None = Field(default=None, ge=1, strict=True)
    claim_ttl: int | None = Field(default=None, description="seconds; YAML also takes 15m, 2h, ...")
    schedule: dict[str, Any] | None = None  # {timezone, entries: [{cron, min_ready}]}

    @field_validator("schedule", mode="before")
    @classmethod
    def _schedule(cls, value: Any) -> dict[str, Any] | None:
        try:
            parsed = pool_schedule(value)
        except ScheduleError as exc:
            raise FieldRuleError(_schedule_field(exc), str(exc)) from None
        return None if parsed is None else parsed.to_data()

    @field_validator("name")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not NAME_RE.fullmatch(value) or len(value) > POOL_NAME_MAX:
            raise ValueError(
                f"must be a lowercase slug of 1-{POOL_NAME_MAX} characters (letters a-z, digits, dashes, "
                "not starting or ending with a dash): members are named <pool>-<8 characters>"
            )
        return value

    @field_validator("claim_ttl", mode="before")
    @classmethod
    def _ttl(cls, value: Any) -> int | None:
        return None if value is None else parse_duration(value)

    @field_validator("template")
    @classmethod
    def _template(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in ("name", "state"):
            if key in value:
                raise ValueError(f"a template has no {key!r}: members are named and run by the pool")
        if "schedule" in value:
            raise ValueError("a template has no 'schedule': give the pool a schedule of min_ready instead")
        try:
            LeaseSpec.model_validate({**value, "name": "member"})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ValueError(f"not a valid lease: {_field_path(first['loc'])}: {first['msg']}") from None
        return value

    @model_validator(mode="after")
    def _sizes(self) -> PoolSpec:
        if self.max_size is not None and self.min_ready > self.max_size:
            raise FieldRuleError(
                "min_ready", f"min_ready ({self.min_ready}) is larger than max_size ({self.max_size})"
            )
        for index, entry in enumerate((self.schedule or {}).get("entries", ())):
            if self.max_size is not None and entry["min_ready"] > self.max_size:
                raise FieldRuleError(
                    f"schedule.entries.{index}.min_ready",
                    f"min_ready ({entry['min_ready']}) is larger than max_size ({self.max_size})",
                )
        return self

    def owns_name(self, lease_name: str) -> bool:
        """Whether ``lease_name`` has the form of this pool's member names."""
        prefix = f"{self.name}-"
        rest = lease_name[len(prefix) :]
        return lease_name.startswith(prefix) and len(rest) == MEMBER_ID_LENGTH and "-" not in rest

    def member(self, member_name: str) -> LeaseSpec:
        """The lease of one member: the template, desired running."""
        return LeaseSpec.model_validate({**self.template, "name": member_name, "state": "running"})

    def template_hash(self) -> str:
        return spec_hash(self.member(f"{self.name}-{'0' * MEMBER_ID_LENGTH}").to_row())

    def to_row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "template": dict(self.template),
            "min_ready": self.min_ready,
            "max_size": self.max_size,
            "claim_ttl_seconds": self.claim_ttl,
            "schedule": self.schedule,
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> PoolSpec:
        return cls(
            name=row["name"],
            template=dict(row.get("template") or {}),
            min_ready=row.get("min_ready") or 0,
            max_size=row.get("max_size"),
            claim_ttl=row.get("claim_ttl_seconds"),
            schedule=row.get("schedule"),
        )

    def to_yaml_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "name": self.name,
            "template": dict(self.template),
            "min_ready": self.min_ready,
        }
        if self.max_size is not None:
            data["max_size"] = self.max_size
        if self.claim_ttl is not None:
            data["claim_ttl"] = format_duration(self.claim_ttl)
        if self.schedule is not None:
            data["schedule"] = self.schedule
        return data


@dataclass(frozen=True)
class Manifest:
    """What a set of lease files declares."""

    leases: list[LeaseSpec]
    pools: list[PoolSpec]
    volumes: list[VolumeSpec] = field(default_factory=list)
    quotas: list[QuotaSpec] | None = None  # None: no file has a ``quotas:`` key (apply leaves them)


def parse_volumes(data: Any, source: str) -> list[VolumeSpec]:
    """Validate the top-level ``volumes:`` list of one parsed file; errors name the source, the volume
    and the field."""
    if not isinstance(data, Mapping) or data.get("volumes") is None:
        return []
    return _parse_entries(data["volumes"], source, "volumes", "volume", VolumeSpec)


def parse_pools(data: Any, source: str) -> list[PoolSpec]:
    """Validate the ``pools:`` list of one parsed file; errors name the source, the pool and the field."""
    if not isinstance(data, Mapping) or data.get("pools") is None:
        return []
    return _parse_entries(data["pools"], source, "pools", "pool", PoolSpec)


_Entry = TypeVar("_Entry", bound=BaseModel)


def _parse_entries(
    items: Any, source: str, key: str, kind: str, model: type[_Entry], unknown_hint: str = ""
) -> list[_Entry]:
    """Validate the list under a top-level ``key`` (pools, volumes, quotas) as ``model`` entries; every
    problem is collected and raised at once as one SpecError naming source, entry and field. An
    entry is named by its ``name`` when it has one, else by its index."""
    if not isinstance(items, list):
        raise SpecError(f"{source}: {key!r} must be a list")
    entries: list[_Entry] = []
    problems: list[str] = []
    for index, item in enumerate(items):
        label = f"{key}[{index}]"
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            label = f"{kind} {item['name']!r}"
        if not isinstance(item, Mapping):
            problems.append(f"{source}: {label}: must be a mapping")
            continue
        try:
            entries.append(model.model_validate(dict(item)))
        except ValidationError as exc:
            for err in exc.errors():
                loc = err["loc"]
                rule = (err.get("ctx") or {}).get("error")
                if isinstance(rule, FieldRuleError):
                    loc = (rule.field,)
                message = str(rule) if isinstance(rule, FieldRuleError) else err["msg"]
                if unknown_hint and err["type"] == "extra_forbidden" and len(loc) == 1:
                    message = unknown_hint
                problems.append(f"{source}: {label}: {_field_path(loc)}: {message}")
    if problems:
        raise SpecError("\n".join(problems))
    return entries


# -- quotas ------------------------------------------------------------------------------------------

QUOTA_LIMITS = ("sandboxes", "cpu", "memory", "disk", "gpu")


class QuotaSpec(BaseModel):
    """One quota (controller.quotas): no ``label`` = the whole instance; ``label`` alone = every value
    of it on its own (each team); ``label`` and ``value`` = that value only. Limits are whole numbers
    >= 0 (memory and disk in GiB); a limit left out is no limit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str | None = Field(default=None, min_length=1, max_length=63)
    value: str | None = Field(default=None, min_length=1, max_length=255)
    sandboxes: int | None = Field(default=None, ge=0, le=INT_MAX, strict=True)
    cpu: int | None = Field(default=None, ge=0, le=INT_MAX, strict=True)
    memory: int | None = Field(default=None, ge=0, le=INT_MAX, strict=True, description="GiB")
    disk: int | None = Field(default=None, ge=0, le=INT_MAX, strict=True, description="GiB")
    gpu: int | None = Field(default=None, ge=0, le=INT_MAX, strict=True)

    @field_validator("label")
    @classmethod
    def _label(cls, value: str | None) -> str | None:
        if value is not None and value.startswith(RESERVED_LABEL_PREFIX):
            raise ValueError(f"label {value!r} uses the reserved prefix {RESERVED_LABEL_PREFIX!r}")
        return value

    @model_validator(mode="after")
    def _rules(self) -> QuotaSpec:
        if self.value is not None and self.label is None:
            raise FieldRuleError("value", "a value needs a label (e.g. label: team, value: ml)")
        if all(getattr(self, limit) is None for limit in QUOTA_LIMITS):
            raise FieldRuleError("(quota)", f"give at least one limit: {', '.join(QUOTA_LIMITS)}")
        return self

    @property
    def scope(self) -> str:
        if self.label is None:
            return "instance"
        return f"{self.label}={self.value}" if self.value is not None else f"{self.label}=*"

    def to_row(self) -> dict[str, Any]:
        return {
            "label": self.label or "",
            "value": self.value or "",
            **{limit: getattr(self, limit) for limit in QUOTA_LIMITS},
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> QuotaSpec:
        return cls(
            label=row.get("label") or None,
            value=row.get("value") or None,
            **{limit: row.get(limit) for limit in QUOTA_LIMITS},
        )

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def parse_quotas(data: Any, source: str) -> list[QuotaSpec] | None:
    """Validate the ``quotas:`` list of one parsed file (None when the file has no ``quotas:`` key)."""
    if not isinstance(data, Mapping) or "quotas" not in data:
        return None
    if data["quotas"] is None:
        return []
    hint = f"unknown field (a quota has label, value, {', '.join(QUOTA_LIMITS)})"
    return _parse_entries(data["quotas"], source, "quotas", "quota", QuotaSpec, hint)
