"""Start the local Daytona emulator (controller.emulator) as a subprocess for integration tests.

Usage::

    with EmulatorProcess(tmp_path / "daytona") as emu:      # or the ``emulator`` fixture
        client = emu.client()                               # an unmodified daytona.Daytona
        client.create()
        assert emu.stats()["create"] == 1
        emu.set_faults(fail_rate={"get": {"429": 1.0}})     # PATCH the live fault settings
        emu.set_faults(quota=2, time_scale=600)             # server-like knobs (docs/local-daytona.md)
        answer = emu.call("POST", "/api/sandbox/x/stop")    # status, headers, body; never raises
        emu.restart()                                       # same port, same state dir
        emu.kill()                                          # SIGKILL, for crash tests

The process runs ``python -m controller.emulator --port 0 --state-dir DIR --api-key KEY [args]``;
the bound URL is parsed from its ``local-daytona listening on http://...`` line. On restart it
binds the same port again, so clients made before keep working. Its stdout/stderr go to
``<state_dir>/../emulator-<port>.log``. Admin calls use the same bearer key as the API.
Fault settings use the snake_case keys of ``controller.emulator.faults.FaultSettings``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
_URL_LINE = re.compile(r"local-daytona listening on (http://\S+)")


class EmulatorError(RuntimeError):
    """The emulator did not start, or an admin call failed."""


@dataclass(frozen=True)
class Answer:
    """One HTTP answer of the emulator: status, headers and the decoded JSON body (or None)."""

    status: int
    headers: dict[str, str]
    body: Any


class EmulatorProcess:
    """One emulator subprocess; ``api_url`` ends in ``/api``, as DAYTONA_API_URL expects."""

    def __init__(
        self,
        state_dir: Path,
        api_key: str = "test-api-key",
        args: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 20.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.api_key = api_key
        self.args = list(args)
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.api_url = ""
        self.process: subprocess.Popen[str] | None = None
        self._log: Any = None

    # -- process control ----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://host:port`` (no ``/api``)."""
        return self.api_url.removesuffix("/api")

    @property
    def toolbox_url(self) -> str:
        return f"{self.base_url}/toolbox"

    def start(self) -> EmulatorProcess:
        if self.process is not None and self.process.poll() is None:
            raise EmulatorError("already running")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "controller.emulator",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state_dir),
            "--api-key",
            self.api_key,
            *self.args,
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("DAYTONA_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            command,
            cwd=str(REPO_ROOT),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(self.process, lines), daemon=True).start()
        seen: list[str] = []
        while True:
            try:
                line = lines.get(timeout=self.startup_timeout)
            except queue.Empty:
                self.kill()
                raise EmulatorError(f"emulator did not announce its URL in time: {seen}") from None
            if line is None:
                self.kill()
                raise EmulatorError(f"emulator exited during start-up: {''.join(seen)}")
            seen.append(line)
            match = _URL_LINE.search(line)
            if match:
                self.api_url = match.group(1)
                self.port = int(self.api_url.rsplit(":", 1)[1].split("/", 1)[0])
                return self

    def _pump(self, process: subprocess.Popen[str], lines: queue.Queue[str | None]) -> None:
        """Forward the announce line, then copy all output to a log file (never fills the pipe)."""
        assert process.stdout is not None
        announced = False
        log_path = self.state_dir.parent / f"emulator-{self.state_dir.name}.log"
        with open(log_path, "a", encoding="utf-8") as log:
            for line in process.stdout:
                log.write(line)
                log.flush()
                if not announced:
                    lines.put(line)
                    announced = bool(_URL_LINE.search(line))
        lines.put(None)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL if it does not exit in time)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL the emulator and every process it started (a crash)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)

    def restart(self, *, kill: bool = False) -> EmulatorProcess:
        """Stop (or kill) and start again on the same port and state dir."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def __enter__(self) -> EmulatorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- admin --------------------------------------------------------------------------------

    def call(self, method: str, path: str, body: Any = None) -> Answer:
        """An authorised JSON call that returns any answer, errors included (status, headers, body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                status, headers, raw = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            status, headers, raw = exc.code, dict(exc.headers), exc.read()
        return Answer(status, headers, json.loads(raw) if raw else None)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """An authorised JSON call to the emulator (``path`` from the root, e.g. ``/_emulator/stats``)."""
        answer = self.call(method, path, body)
        if answer.status >= 400:
            raise EmulatorError(f"{method} {path}: {answer.status} {answer.body!r}")
        return answer.body

    def stats(self) -> dict[str, int]:
        """Requests served per operation (list, get, create, ..., execute, upload, download)."""
        result: dict[str, int] = self.request("GET", "/_emulator/stats")["requests"]
        return result

    def reset_stats(self) -> None:
        self.request("POST", "/_emulator/stats/reset")

    def faults(self) -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", "/_emulator/faults")
        return result

    def set_faults(self, **settings: Any) -> dict[str, Any]:
        """Change the given fault settings, keep the others (e.g. ``list_lag=2``)."""
        result: dict[str, Any] = self.request("PATCH", "/_emulator/faults", settings)
        return result

    def replace_faults(self, **settings: Any) -> dict[str, Any]:
        """Replace all fault settings (keys not given return to 'no fault')."""
        result: dict[str, Any] = self.request("PUT", "/_emulator/faults", settings)
        return result

    def reset_faults(self) -> None:
        self.request("POST", "/_emulator/faults/reset")

    def force_state(
        self,
        id_or_name: str,
        state: str,
        *,
        recoverable: bool = False,
        error_reason: str | None = None,
        desired_state: str | None = None,
    ) -> dict[str, Any]:
        """Put a sandbox into any state (e.g. ``error``), cancelling a transition in progress.

        ``desired_state`` defaults to the state itself for started/stopped/archived/paused (else it
        is kept); e.g. ``force_state(x, "started", desired_state="stopped")`` lists as ``stopping``.
        """
        body: dict[str, Any] = {"state": state, "recoverable": recoverable}
        if error_reason is not None:
            body["errorReason"] = error_reason
        if desired_state is not None:
            body["desiredState"] = desired_state
        result: dict[str, Any] = self.request("POST", f"/_emulator/sandboxes/{id_or_name}/state", body)
        return result

    # -- clients ------------------------------------------------------------------------------

    def client(self, **config: Any) -> Any:
        """An unmodified sync ``daytona.Daytona`` pointed at this emulator (polling mode)."""
        from daytona import Daytona, DaytonaConfig

        options: dict[str, Any] = {
            "api_key": self.api_key,
            "api_url": self.api_url,
            "target": "local",
            "use_deprecated_polling": True,
        }
        options.update(config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # polling mode is "deprecated"
            return Daytona(DaytonaConfig(**options))


def point_leasectl_at(
    emulator: EmulatorProcess, monkeypatch: Any, instance: str, **controller: str
) -> EmulatorProcess:
    """Point leasectl (settings from the environment) at ``emulator`` as controller ``instance``;
    ``controller`` sets ``LEASECTL_CONTROLLER__<KEY>`` (e.g. ``backoff_base_seconds="0.01"``)."""
    monkeypatch.setenv("DAYTONA_API_URL", emulator.api_url)
    monkeypatch.setenv("DAYTONA_API_KEY", emulator.api_key)
    monkeypatch.setenv("LEASECTL_CONTROLLER__INSTANCE", instance)
    for key, value in controller.items():
        monkeypatch.setenv(f"LEASECTL_CONTROLLER__{key.upper()}", value)
    return emulator
