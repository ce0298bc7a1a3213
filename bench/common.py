"""Shared plumbing of the benchmarks: machine facts, JSON lines and tables, databases, the local
Daytona API as a subprocess, settings, a reconciler, and a SQL statement counter.

Every figure a benchmark prints comes from a measurement made in that run; nothing here holds a
figure. Traffic goes only to 127.0.0.1 (the emulator subprocess and PostgreSQL).
"""

from __future__ import annotations

import json
import os
import platform
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from controller import db as dbmod
from controller.config import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG_ADMIN_URL = os.environ.get(
    "LEASECTL_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
API_KEY = "bench-api-key"
INSTANCE = "bench"

Record = dict[str, Any]


# -- machine -------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_PG_VERSION: dict[str, str | None] = {}


def postgres_version(admin_url: str | None) -> str | None:
    if not admin_url:
        return None
    if admin_url not in _PG_VERSION:
        try:
            engine = sa.create_engine(dbmod.normalize_url(admin_url), connect_args={"connect_timeout": 5})
            with engine.connect() as conn:
                _PG_VERSION[admin_url] = str(conn.execute(sa.text("SHOW server_version")).scalar())
            engine.dispose()
        except Exception:
            _PG_VERSION[admin_url] = None
    return _PG_VERSION[admin_url]


def machine(pg_admin_url: str | None = None) -> dict[str, Any]:
    """Where the figures come from."""
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "postgres": postgres_version(pg_admin_url),
    }


# -- output --------------------------------------------------------------------------------------


class Output:
    """Prints one JSON object per line (and appends it to ``jsonl`` if given), then tables."""

    def __init__(self, pg_admin_url: str | None, jsonl: Path | None = None) -> None:
        self.machine = machine(pg_admin_url)
        self.jsonl = jsonl
        self.records: list[Record] = []

    def emit(self, name: str, parameters: Mapping[str, Any], figures: Mapping[str, Any]) -> Record:
        record: Record = {
            "name": name,
            "parameters": dict(parameters),
            "figures": dict(figures),
            "machine": self.machine,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        line = json.dumps(record, sort_keys=False)
        print(line, flush=True)
        if self.jsonl is not None:
            with open(self.jsonl, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        self.records.append(record)
        return record


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def log(message: str) -> None:
    """Progress for the human, on stderr (stdout carries the JSON lines and tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- databases -----------------------------------------------------------------------------------


def pg_reachable(admin_url: str) -> str | None:
    """None when PostgreSQL answers at ``admin_url``, else why not."""
    try:
        engine = sa.create_engine(dbmod.normalize_url(admin_url), connect_args={"connect_timeout": 5})
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:
        return f"PostgreSQL not reachable at {dbmod.redact_url(admin_url)}: {str(exc).splitlines()[0]}"
    return None


def _pg_admin(admin_url: str, statement: str) -> None:
    engine = sa.create_engine(dbmod.normalize_url(admin_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sa.text(statement))
    engine.dispose()


@contextmanager
def database(backend: str, workdir: Path, pg_admin_url: str) -> Iterator[str]:
    """A fresh database migrated to head, dropped afterwards; yields its URL."""
    if backend == "sqlite":
        path = workdir / f"leasectl-{uuid.uuid4().hex[:8]}.db"
        url = f"sqlite:///{path}"
        _migrate(url)
        yield url
        return
    name = f"leasectl_bench_{uuid.uuid4().hex[:10]}"
    _pg_admin(pg_admin_url, f'CREATE DATABASE "{name}"')
    url = (
        sa.make_url(dbmod.normalize_url(pg_admin_url))
        .set(database=name)
        .render_as_string(hide_password=False)
    )
    try:
        _migrate(url)
        yield url
    finally:
        _pg_admin(pg_admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _migrate(url: str) -> None:
    db = dbmod.connect(url)
    try:
        dbmod.upgrade(db)
    finally:
        db.dispose()


class QueryCounter:
    """Counts SQL statements sent on an engine (``before_cursor_execute``), per thread-safe counter."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._engine = engine
        sa.event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, *_args: Any) -> None:
        with self._lock:
            self.count += 1

    def take(self) -> int:
        with self._lock:
            value, self.count = self.count, 0
        return value

    def close(self) -> None:
        sa.event.remove(self._engine, "before_cursor_execute", self._on_execute)


# -- the local Daytona API -----------------------------------------------------------------------


def start_emulator(state_dir: Path, args: Sequence[str] = (), startup_timeout: float = 60) -> Any:
    """The local Daytona API in a subprocess (its CPU and memory are not the controller's)."""
    from tests.support.emulator import EmulatorProcess

    emulator = EmulatorProcess(state_dir, api_key=API_KEY, args=list(args), startup_timeout=startup_timeout)
    return emulator.start()


def bench_settings(database_url: str, api_url: str, **controller: Any) -> Settings:
    """Settings as the CLI would build them, with no config file and no environment surprises."""
    overrides: dict[str, Any] = {
        "database_url": database_url,
        "daytona": {"api_url": api_url, "api_key": API_KEY, "target": "local"},
        "controller": {"instance": INSTANCE, **controller},
        "logging": {"level": "WARNING"},
    }
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("LEASECTL_", "DAYTONA_"))}
    try:
        return load_settings(Path(os.devnull), overrides)
    finally:
        os.environ.update(saved)


def make_reconciler(settings: Settings, db: dbmod.Database, provider: Any) -> Any:
    """A Reconciler wired as ``leasectl reconcile`` wires one (no elector: the bench is alone)."""
    from controller.reconciler import build_reconciler

    return build_reconciler(db, provider, settings)


@contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"leasectl-{prefix}-") as tmp:
        yield Path(tmp)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


class EmulatorAdmin:
    """The admin endpoints of a running local Daytona API, from its API URL (``.../api``)."""

    def __init__(self, api_url: str, api_key: str = API_KEY) -> None:
        self.base_url = api_url.removesuffix("/api")
        self.api_key = api_key

    def request(self, method: str, path: str, body: Any = None) -> Any:
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.base_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def stats(self) -> dict[str, int]:
        requests: dict[str, int] = self.request("GET", "/_emulator/stats")["requests"]
        return {op: n for op, n in requests.items() if n}

    def reset_stats(self) -> None:
        self.request("POST", "/_emulator/stats/reset")

    def set_faults(self, **settings: Any) -> None:
        self.request("PATCH", "/_emulator/faults", settings)

    def reset_faults(self) -> None:
        self.request("POST", "/_emulator/faults/reset")
