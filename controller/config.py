"""Settings: every knob of leasectl, and where each value comes from.

Precedence, lowest first: built-in defaults < YAML file (``--config PATH``, env ``LEASECTL_CONFIG``,
else ``./leasectl.yaml`` if present) < the standard Daytona variables (``DAYTONA_API_KEY``,
``DAYTONA_API_URL``, ``DAYTONA_TARGET``) < ``LEASECTL_*`` environment variables (``__`` nests:
``LEASECTL_CONTROLLER__INSTANCE``) < command-line flags. :mod:`controller.config_sources` reads the
layers; this module merges and validates them. The CLI calls :func:`load_settings` once and passes
the result down (only ``get``, which needs the database URL alone, reads that one value through
:func:`controller.config_sources.peek` instead and never imports pydantic).

``daytona.api_key`` is a ``SecretStr``: it prints as ``**********`` and is never written anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from controller.config_sources import (
    DEFAULT_DATABASE_URL,
    ENV_PREFIX,
    _daytona_env,
    _deep_merge,
    _origin,
    read_config_file,
    resolve_config_path,
)
from controller.errors import ConfigError

LOCAL_DAYTONA_URL = "http://127.0.0.1:3986/api"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaytonaSettings(_Section):
    api_url: str = LOCAL_DAYTONA_URL
    api_key: SecretStr | None = None
    target: str | None = None
    request_timeout_seconds: float = Field(default=60.0, gt=0)


class ControllerSettings(_Section):
    instance: str = Field(default="default", pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
    reconcile_interval_seconds: float = Field(default=30.0, gt=0)
    gc_interval_seconds: float = Field(default=300.0, gt=0)
    orphan_grace_seconds: float = Field(default=600.0, ge=0)
    max_concurrent_actions: int = Field(default=8, ge=1, le=256)
    backoff_base_seconds: float = Field(default=5.0, gt=0)
    backoff_max_seconds: float = Field(default=600.0, gt=0)
    blocked_backoff_max_seconds: float = Field(default=60.0, gt=0)
    api_rate_per_second: float = Field(default=20.0, gt=0)
    create_rate_per_minute: float = Field(default=300.0, gt=0)
    action_timeout_seconds: float = Field(default=120.0, gt=0)
    stuck_after_seconds: float = Field(default=900.0, gt=0)
    workspace_dir: str = "workspace"
    leader_lease_seconds: float = Field(default=15.0, ge=1.0)  # renewed every lease/3: at least 1 s
    shutdown_timeout_seconds: float = Field(default=30.0, ge=0)
    event_retention_days: float = Field(default=30.0, gt=0)
    execution_retention_days: float = Field(default=7.0, gt=0)
    deleted_lease_retention_days: float | None = Field(default=None, gt=0)
    retention_batch_size: int = Field(default=1000, ge=1)
    max_prune_share: float = Field(default=0.5, gt=0, le=1)
    pool_creates_per_pass: int = Field(default=20, ge=0)
    pool_busy_interval_seconds: float = Field(default=0.3, gt=0)
    pool_headroom_factor: float = Field(default=2.0, ge=0)
    pool_claim_window_seconds: float = Field(default=60.0, gt=0)


class ExecSettings(_Section):
    max_output_bytes: int = Field(default=1_048_576, ge=1024)
    queue_wait_seconds: float = Field(default=300.0, ge=0)
    default_timeout_seconds: int = Field(default=600, ge=1)
    max_concurrent: int = Field(default=4, ge=1, le=256)
    poll_interval_seconds: float = Field(default=2.0, gt=0)
    idle_start_timeout_seconds: float = Field(default=120.0, gt=0)
    per_lease_concurrency: int = Field(default=1, ge=0)
    retry_backoff_seconds: float = Field(default=1.0, gt=0)
    retry_backoff_max_seconds: float = Field(default=30.0, gt=0)
    session_min_timeout_seconds: int = Field(default=60, ge=0)
    log_poll_seconds: float = Field(default=1.0, gt=0)


class ServerSettings(_Section):
    listen: str = "127.0.0.1:9464"
    # Health and metrics may be served on a non-loopback address only when this is true.
    allow_remote: bool = False
    # The status page (/) answers off loopback only with this token; when set, it is required on
    # loopback too. Health, readiness and metrics do not need it.
    access_token: SecretStr | None = None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:9464")
        return value


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class PriceSettings(_Section):
    """Prices per hour for ``leasectl usage``'s estimated cost (all 0 unless set)."""

    currency: str = "USD"
    sandbox_hour: float = Field(default=0.0, ge=0)
    cpu_hour: float = Field(default=0.0, ge=0)
    memory_gib_hour: float = Field(default=0.0, ge=0)
    disk_gib_hour: float = Field(default=0.0, ge=0)
    gpu_hour: float = Field(default=0.0, ge=0)


class PolicySettings(_Section):
    # Keep the disk held by stopped sandboxes of the instance at or under this many GiB by archiving
    # the longest-stopped ones first (controller.disk_guard); None: no guard.
    disk_guard_gib: int | None = Field(default=None, ge=0)
    # A pass this long after the previous one does not bill the time between (controller.usage).
    usage_max_gap_seconds: float = Field(default=600.0, gt=0)
    prices: PriceSettings | None = None


class Settings(_Section):
    """All settings. Build it with :func:`load_settings`, not directly."""

    database_url: str = DEFAULT_DATABASE_URL
    daytona: DaytonaSettings = DaytonaSettings()
    controller: ControllerSettings = ControllerSettings()
    exec: ExecSettings = ExecSettings()
    server: ServerSettings = ServerSettings()
    logging: LoggingSettings = LoggingSettings()
    policy: PolicySettings = PolicySettings()


def _leasectl_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``LEASECTL_*`` variables that name a setting, nested at ``__`` (names are not case
    sensitive); others (``LEASECTL_CONFIG``, ``LEASECTL_DEBUG``, ...) are not settings. A value for
    a section, a mapping or a list is JSON (``LEASECTL_POLICY__PRICES='{"cpu_hour": 0.1}'``)."""
    found: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.upper().startswith(ENV_PREFIX):
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in Settings.model_fields or "" in path:
            continue
        node = found
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):  # a JSON value above a nested one: the JSON wins
                break
            node = child
        else:
            node[path[-1]] = _json_if_structured(path, value)
    return found


def _json_if_structured(path: list[str], value: str) -> Any:
    """``value`` decoded from JSON when the setting at ``path`` is a section, mapping or list."""
    node: Any = Settings
    options: tuple[Any, ...] = ()
    for part in path:
        fields = node.model_fields if isinstance(node, type) and issubclass(node, BaseModel) else {}
        if part not in fields:
            return value  # not a known setting: validation names it
        annotation = fields[part].annotation
        options = (annotation, *get_args(annotation))  # X | None: X
        node = next((a for a in options if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if node is not None or any(a in (dict, list) or get_origin(a) in (dict, list) for a in options):
        try:
            return json.loads(value)
        except ValueError:
            return value  # validation says what is wrong with it
    return value


def load_settings(
    config_file: Path | None = None, cli_overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build Settings from every layer; raise ConfigError naming the file or variable and the key."""
    env = os.environ
    cli = dict(cli_overrides or {})
    path = resolve_config_path(config_file, env)
    file_data = read_config_file(path) if path is not None else {}
    merged = _deep_merge(_deep_merge(_deep_merge(file_data, _daytona_env(env)), _leasectl_env(env)), cli)
    try:
        return Settings.model_validate(merged)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc)
            problems.append(f"{_origin(loc, path, file_data, cli, env)}: {key}: {err['msg']}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from None


def redacted(settings: Settings) -> dict[str, Any]:
    """Settings as a plain dict with secrets masked, for `doctor` and debug logs."""
    from controller.db import redact_url

    data = settings.model_dump(mode="json")
    if settings.daytona.api_key is not None:
        data["daytona"]["api_key"] = "**********"
    data["database_url"] = redact_url(settings.database_url)
    if settings.server.access_token is not None:
        data["server"]["access_token"] = "**********"
    return data
