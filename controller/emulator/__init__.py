"""A local Daytona-compatible API server ("local-daytona"): sandboxes as directories, real processes.

The official ``daytona`` SDK, unmodified, talks to it over HTTP (api_url ``http://HOST:PORT/api``).
It serves the REST API, the toolbox and admin endpoints for fault injection and request counters.
It imports nothing else of the project. Modules: ``errors`` (Daytona's error envelope), ``state``
(records + SQLite store), ``lifecycle`` (state machine), ``faults`` (fault settings, dice,
counters), ``toolbox`` (process and files), ``app`` (routes, middleware), ``server`` (run, background
thread), ``cli`` (the ``local-daytona`` command).

It is a development and test tool, NOT an isolation boundary: commands run as the invoking user on
the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .faults import FaultSettings

if TYPE_CHECKING:
    from .server import BackgroundEmulator, EmulatorConfig, run, start_background

# The server (aiohttp) is imported on first use: `leasectl --help` lists `local-daytona` through
# .cli without starting, or importing, a web server.
_FROM_SERVER = frozenset({"BackgroundEmulator", "EmulatorConfig", "run", "start_background"})


def __getattr__(name: str) -> Any:
    if name in _FROM_SERVER:
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BackgroundEmulator", "EmulatorConfig", "FaultSettings", "run", "start_background"]
