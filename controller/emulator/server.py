"""Running the emulator: its configuration, a blocking ``run`` and an in-process background server.

``run(config)`` serves until SIGINT/SIGTERM (used by the CLI); ``start_background(config)`` serves
from a daemon thread with its own event loop and returns a handle with the bound URL and
``stop()`` (used by in-process tests). With ``port=0`` the OS picks a port; the actual URL is
printed as ``local-daytona listening on http://HOST:PORT/api``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from aiohttp import web

from .app import build_app
from .faults import Faults, FaultSettings
from .state import Store

log = logging.getLogger(__name__)


@dataclass
class EmulatorConfig:
    """Where to listen, where to keep state, the API key and the initial faults."""

    api_key: str
    host: str = "127.0.0.1"
    port: int = 3986
    state_dir: Path = Path(".leasectl/daytona")
    faults: FaultSettings = field(default_factory=FaultSettings)
    announce: TextIO | None = None  # where the "listening on" line goes (stdout in the CLI)


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/api"


async def _serve(config: EmulatorConfig, ready: Callable[[str], None], stop: asyncio.Event) -> None:
    state_dir = Path(config.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(state_dir)
    app = build_app(store, Faults(config.faults), config.api_key)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        port = sockets[0].getsockname()[1] if sockets else config.port
        url = _url(config.host, port)
        log.info("local-daytona serving %d sandboxes from %s", store.count(), state_dir)
        if config.announce is not None:
            print(f"local-daytona listening on {url}", file=config.announce, flush=True)
        ready(url)
        await stop.wait()
    finally:
        await runner.cleanup()


def run(config: EmulatorConfig) -> None:
    """Serve until SIGINT or SIGTERM (blocking; call from the main thread)."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await _serve(config, lambda _url: None, stop)

    asyncio.run(main())


class BackgroundEmulator:
    """An emulator serving from a daemon thread; ``url`` is the API URL (``.../api``)."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="local-daytona", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await _serve(self.config, self._set_url, self._stop)

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to start()
            self._error = exc
        finally:
            self._ready.set()

    def _set_url(self, url: str) -> None:
        self.url = url
        self._ready.set()

    def start(self, timeout: float = 10.0) -> BackgroundEmulator:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("local-daytona did not start in time")
        if self._error is not None or not self.url:
            raise RuntimeError(f"local-daytona failed to start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_background(config: EmulatorConfig) -> BackgroundEmulator:
    """Start an in-process emulator (port 0 picks a free port); stop it with ``.stop()``."""
    return BackgroundEmulator(config).start()
