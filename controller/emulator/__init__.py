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

from .faults import FaultSettings
from .server import BackgroundEmulator, EmulatorConfig, run, start_background

__all__ = ["BackgroundEmulator", "EmulatorConfig", "FaultSettings", "run", "start_background"]
