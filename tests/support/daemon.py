"""Run `leasectl run` as a subprocess for integration tests, and a TCP proxy to cut its database.

``DaemonProcess`` starts the daemon with its own environment (database URL, local Daytona API,
short intervals, a free metrics port), waits for /healthz, and can SIGTERM or SIGKILL it.
``TcpProxy`` forwards a local port to PostgreSQL; ``cut()`` drops every connection and refuses new
ones until ``restore()``, which is a database outage as the daemon sees it, without stopping the
server other tests use.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class DaemonProcess:
    def __init__(
        self,
        log_path: Path,
        env: dict[str, str],
        *,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))},
            "LEASECTL_CONFIG": os.devnull,
            "LEASECTL_SERVER__LISTEN": f"127.0.0.1:{self.port}",
            "LEASECTL_CONTROLLER__RECONCILE_INTERVAL_SECONDS": "1",
            "LEASECTL_CONTROLLER__GC_INTERVAL_SECONDS": "5",
            "LEASECTL_CONTROLLER__LEADER_LEASE_SECONDS": "3",
            "LEASECTL_CONTROLLER__BACKOFF_BASE_SECONDS": "0.2",
            "LEASECTL_CONTROLLER__BACKOFF_MAX_SECONDS": "1",
            "LEASECTL_CONTROLLER__SHUTDOWN_TIMEOUT_SECONDS": "10",
            "LEASECTL_EXEC__POLL_INTERVAL_SECONDS": "0.5",
            **env,
        }
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop/kill
        self.process = subprocess.Popen(
            [sys.executable, "-m", "controller.cli", *self.extra_args, "run"],
            cwd=REPO_ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}: {self.log()}")
            if self.http("/healthz")[0] == 200:
                return self
            time.sleep(0.1)
        raise RuntimeError(f"daemon did not answer /healthz: {self.log()}")

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError:
            return 0, ""

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def dump_stacks(self) -> bool:
        """Ask a live daemon to write every thread's stack to its log (SIGUSR1); False if it is gone."""
        if self.process is None or self.process.poll() is not None:
            return False
        self.process.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
        return True

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        with contextlib.suppress(Exception):
            self._log.close()


class TcpProxy:
    """127.0.0.1:<port> -> target; cut() severs and refuses, restore() accepts again."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._up = threading.Event()
        self._up.set()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def start(self) -> TcpProxy:
        self._listen()
        self._thread.start()
        return self

    def _listen(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        server.settimeout(0.2)
        self._server = server

    def _serve(self) -> None:
        while not self._stop.is_set():
            server = self._server
            if server is None:
                time.sleep(0.1)
                continue
            try:
                client, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                readable, _, _ = select.select([a, b], [], [], 0.5)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except OSError:
            return
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        with self._lock:
            for s in self._conns:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
            self._conns.clear()

    def restore(self) -> None:
        self._listen()

    def stop(self) -> None:
        self._stop.set()
        self.cut()
