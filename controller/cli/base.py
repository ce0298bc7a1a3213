"""The typer application, its global options and the context every command reads settings from.

Command modules (``db``, ``leases``, ``control``, ``executions``, ``gc``) register their commands on
:data:`app`; :mod:`controller.cli` imports them all and exposes ``main``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from controller import __version__
from controller import db as dbmod
from controller.cli.output import EXIT_INVALID, fail, out
from controller.config import Settings, load_settings
from controller.errors import ConfigError

app = typer.Typer(
    name="leasectl",
    help="Declarative lease controller for Daytona sandboxes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@dataclass
class CliContext:
    """What the global options said; settings are loaded on first use, once."""

    config: Path | None
    overrides: dict[str, Any] = field(default_factory=dict)
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            try:
                self._settings = load_settings(self.config, self.overrides)
            except ConfigError as exc:
                fail(str(exc), EXIT_INVALID)
            from controller import logs

            logs.configure(self._settings.logging.level, self._settings.logging.format)
        return self._settings

    def database(self) -> dbmod.Database:
        return dbmod.connect(self.settings.database_url)


def _version(value: bool) -> None:
    if value:
        out.print(f"leasectl {__version__}")
        raise typer.Exit()


def _set(overrides: dict[str, Any], dotted: str, value: Any) -> None:
    if value is None:
        return
    node = overrides
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


@app.callback()
def main_options(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Settings file (default: $LEASECTL_CONFIG or ./leasectl.yaml)."),
    ] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="SQLAlchemy URL of the database.")
    ] = None,
    instance: Annotated[str | None, typer.Option("--instance", help="Controller instance name.")] = None,
    api_url: Annotated[str | None, typer.Option("--api-url", help="Daytona API URL.")] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR.")] = None,
    log_format: Annotated[str | None, typer.Option("--log-format", help="text or json.")] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    overrides: dict[str, Any] = {}
    _set(overrides, "database_url", database_url)
    _set(overrides, "controller.instance", instance)
    _set(overrides, "daytona.api_url", api_url)
    _set(overrides, "logging.level", log_level)
    _set(overrides, "logging.format", log_format)
    ctx.obj = CliContext(config=config, overrides=overrides)


def context_of(ctx: typer.Context) -> CliContext:
    obj = ctx.find_root().obj
    assert isinstance(obj, CliContext)
    return obj
