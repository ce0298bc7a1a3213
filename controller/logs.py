"""Logging setup: readable text or JSON lines, with the pass id and lease name in every record.

``pass_id`` and ``lease`` are context variables: the reconciler sets the pass id once per pass and
the lease name around per-lease work; a filter copies both onto every record, so callers keep using
plain ``logging.getLogger(__name__)`` with %-style arguments.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

pass_id_var: ContextVar[str | None] = ContextVar("leasectl_pass_id", default=None)
lease_var: ContextVar[str | None] = ContextVar("leasectl_lease", default=None)


@contextmanager
def bound(*, pass_id: str | None = None, lease: str | None = None) -> Iterator[None]:
    """Attach a pass id and/or a lease name to every record logged inside the block."""
    tokens = []
    if pass_id is not None:
        tokens.append((pass_id_var, pass_id_var.set(pass_id)))
    if lease is not None:
        tokens.append((lease_var, lease_var.set(lease)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "pass_id"):
            record.pass_id = pass_id_var.get()
        if not hasattr(record, "lease"):
            record.lease = lease_var.get()
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        ctx = [
            f"{key}={value}"
            for key, value in (
                ("pass", getattr(record, "pass_id", None)),
                ("lease", getattr(record, "lease", None)),
            )
            if value
        ]
        return f"{base} [{' '.join(ctx)}]" if ctx else base


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pass_id": getattr(record, "pass_id", None),
            "lease": getattr(record, "lease", None),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps({k: v for k, v in data.items() if v is not None}, default=str)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter stays at WARNING unless we debug.
    for noisy in ("urllib3", "httpx", "apscheduler", "alembic", "daytona", "socketio", "engineio"):
        logging.getLogger(noisy).setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
