"""Where settings come from, read and merged without validating them (no pydantic imported).

The layers, lowest first: built-in defaults < YAML file (``--config PATH``, env ``LEASECTL_CONFIG``,
else ``./leasectl.yaml`` if present) < the standard Daytona variables (``DAYTONA_API_KEY``,
``DAYTONA_API_URL``, ``DAYTONA_TARGET``) < ``LEASECTL_*`` environment variables < command-line
flags. :mod:`controller.config` validates the merged whole; this module also answers, for
messages, where a value came from (:func:`describe_origin`), and gives a read-only command that needs
one top-level value and nothing else (``get`` needs the database URL) that value through the same
layers (:func:`peek`) without paying for pydantic and the validation of every other setting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from controller.errors import ConfigError

DEFAULT_CONFIG_FILE = "leasectl.yaml"
CONFIG_ENV_VAR = "LEASECTL_CONFIG"
ENV_PREFIX = "LEASECTL_"
DEFAULT_DATABASE_URL = "sqlite:///leasectl.db"


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


def env_value(environ: Mapping[str, str], name: str) -> str | None:
    """The variable ``name`` (upper case), matched without regard to case as settings are."""
    if name in environ:
        return environ[name]
    return next((v for k, v in environ.items() if k.upper() == name), None)


def peek(key: str, config_file: Path | None, cli_overrides: Mapping[str, Any]) -> Any:
    """The unvalidated value of the top-level setting ``key`` (not a section) through every layer,
    None when no layer sets it. Raises ConfigError for a settings file that cannot be read."""
    if key in cli_overrides:
        return cli_overrides[key]
    from_env = env_value(os.environ, ENV_PREFIX + key.upper())
    if from_env is not None:
        return from_env
    path = resolve_config_path(config_file, os.environ)
    return read_config_file(path).get(key) if path is not None else None


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
