"""Settings: every knob of leasectl, and where each value comes from.

Precedence, lowest first: built-in defaults < YAML file (``--config PATH``, env ``LEASECTL_CONFIG``,
else ``./leasectl.yaml`` if present) < the standard Daytona variables (``DAYTONA_API_KEY``,
``DAYTONA_API_URL``, ``DAYTONA_TARGET``) < ``LEASECTL_*`` environment variables (``__`` nests:
``LEASECTL_CONTROLLER__INSTANCE``) < command-line flags. The CLI calls :func:`load_settings` once
and passes the result down; nothing else reads the environment for settings.

``daytona.api_key`` is a ``SecretStr``: it prints as ``**********`` and is never written anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from controller.errors import ConfigError

DEFAULT_CONFIG_FILE = "leasectl.yaml"
CONFIG_ENV_VAR = "LEASECTL_CONFIG"
ENV_PREFIX = "LEASECTL_"
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
    workspace_dir: str = "workspace"
    leader_lease_seconds: float = Field(default=15.0, gt=0)
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


class Settings(BaseSettings):
    """All settings. Build it with :func:`load_settings`, not directly."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    database_url: str = "sqlite:///leasectl.db"
    daytona: DaytonaSettings = DaytonaSettings()
    controller: ControllerSettings = ControllerSettings()
    exec: ExecSettings = ExecSettings()
    server: ServerSettings = ServerSettings()
    logging: LoggingSettings = LoggingSettings()
    policy: PolicySettings = PolicySettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest priority first: CLI flags (init kwargs), LEASECTL_* env, then the lower layers
        # (DAYTONA_* env over the YAML file) that load_settings put in _LOWER_LAYERS.
        return (init_settings, env_settings, _LowerLayers(settings_cls))


_LOWER_LAYERS: ContextVar[Mapping[str, Any] | None] = ContextVar("leasectl_lower_settings", default=None)


class _LowerLayers(PydanticBaseSettingsSource):
    """The YAML file merged with DAYTONA_* variables, below LEASECTL_* in precedence."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return (_LOWER_LAYERS.get() or {}).get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(_LOWER_LAYERS.get() or {})


def _deep_merge(low: Mapping[str, Any], high: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(low)
    for key, value in high.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def resolve_config_path(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The YAML file to read: --config, else $LEASECTL_CONFIG, else ./leasectl.yaml if present."""
    if explicit is not None:
        return explicit
    if environ.get(CONFIG_ENV_VAR):
        return Path(environ[CONFIG_ENV_VAR])
    default = Path(DEFAULT_CONFIG_FILE)
    return default if default.is_file() else None


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror or exc}") from exc
    import yaml  # only with a settings file: a command without one starts without PyYAML

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return data


def _daytona_env(environ: Mapping[str, str]) -> dict[str, Any]:
    section: dict[str, Any] = {}
    for var, key in (
        ("DAYTONA_API_URL", "api_url"),
        ("DAYTONA_API_KEY", "api_key"),
        ("DAYTONA_TARGET", "target"),
    ):
        if environ.get(var):
            section[key] = environ[var]
    return {"daytona": section} if section else {}


def _dotted_has(data: Mapping[str, Any], loc: tuple[str | int, ...]) -> bool:
    node: Any = data
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _origin(
    loc: tuple[str | int, ...],
    path: Path | None,
    file_data: Mapping[str, Any],
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
) -> str:
    if _dotted_has(cli, loc):
        return "command line"
    env_name = ENV_PREFIX + "__".join(str(p) for p in loc).upper()
    if env_name in environ:
        return f"environment variable {env_name}"
    if loc and loc[0] == "daytona" and len(loc) > 1:
        std = {"api_url": "DAYTONA_API_URL", "api_key": "DAYTONA_API_KEY", "target": "DAYTONA_TARGET"}
        var = std.get(str(loc[1]))
        if var and var in environ:
            return f"environment variable {var}"
    if path is not None and _dotted_has(file_data, loc[:1]):
        return str(path)
    return "settings"


def load_settings(
    config_file: Path | None = None, cli_overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build Settings from every layer; raise ConfigError naming the file or variable and the key."""
    env = os.environ
    cli = dict(cli_overrides or {})
    path = resolve_config_path(config_file, env)
    file_data = read_config_file(path) if path is not None else {}
    lower = _deep_merge(file_data, _daytona_env(env))
    token = _LOWER_LAYERS.set(lower)
    try:
        return Settings(**cli)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(err["loc"])
            key = ".".join(str(p) for p in loc)
            problems.append(f"{_origin(loc, path, file_data, cli, env)}: {key}: {err['msg']}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(problems)) from None
    finally:
        _LOWER_LAYERS.reset(token)


def describe_origin(
    key: str, config_file: Path | None = None, cli_overrides: Mapping[str, Any] | None = None
) -> str:
    """Where the value of the dotted setting ``key`` came from, for messages: ``command line``,
    ``environment variable NAME``, ``config file PATH`` or ``built-in default``."""
    loc = tuple(key.split("."))
    path = resolve_config_path(config_file, os.environ)
    try:
        file_data = read_config_file(path) if path is not None else {}
    except ConfigError:
        file_data = {}
    if path is not None and not _dotted_has(file_data, loc):
        path = None
    origin = _origin(loc, path, file_data, dict(cli_overrides or {}), os.environ)
    if origin == "settings":
        return "built-in default"
    if path is not None and origin == str(path):
        return f"config file {path}"
    return origin


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
