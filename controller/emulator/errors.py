"""Daytona's error envelope and JSON responses, shared by the REST routes and the toolbox.

Every non-2xx answer of the emulator is ``{statusCode, message, error, code?, source?, path,
timestamp}`` with ``Content-Type: application/json``, which is what the SDK reads to pick its
exception class (contract §7). Handlers raise :class:`ApiError`; the middleware in ``app.py`` turns
it into the envelope.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

from aiohttp import web

SOURCE_API = "DAYTONA_API"
SOURCE_DAEMON = "DAYTONA_DAEMON"
SOURCE_PROXY = "DAYTONA_PROXY"


class ApiError(Exception):
    """An error answered with Daytona's envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        source: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.source = source
        self.headers = headers or {}


def now_iso() -> str:
    """The current UTC time as Daytona prints it (ISO 8601, milliseconds, ``Z``)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def json_response(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response with the exact content type the Python SDK accepts."""
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def envelope(status: int, message: str, path: str, code: str | None = None, source: str | None = None) -> Any:
    """The JSON body of an error, as Daytona's API (NestJS filter) and daemon send it."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body: dict[str, Any] = {
        "statusCode": status,
        "message": message,
        "error": phrase,
        "path": path,
        "timestamp": now_iso(),
    }
    if code is not None:
        body["code"] = code
    if source is not None:
        body["source"] = source
    return body


def error_response(error: ApiError, path: str) -> web.Response:
    return json_response(
        envelope(error.status, error.message, path, error.code, error.source),
        status=error.status,
        headers=error.headers or None,
    )
