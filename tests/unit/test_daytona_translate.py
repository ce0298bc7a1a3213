"""The Daytona provider's error translation: vendor exceptions -> the project's error tree."""

from __future__ import annotations

import pytest
import urllib3
from daytona import DaytonaError
from daytona_api_client.exceptions import ApiException

from controller.errors import (
    ConflictError,
    NotFoundError,
    PermanentError,
    ProviderError,
    RateLimitedError,
    TransientError,
)
from controller.providers.daytona import translate


def api_error(
    status: int, headers: dict[str, str] | None = None, body: str = '{"message": "nope"}'
) -> ApiException:
    exc = ApiException(status=status, reason="R")
    exc.headers = headers or {}
    exc.body = body
    return exc


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, PermanentError),
        (422, PermanentError),
        (401, TransientError),
        (403, TransientError),
        (404, NotFoundError),
        (408, TransientError),
        (409, ConflictError),
        (429, RateLimitedError),
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
    ],
)
def test_status_mapping(status: int, expected: type[ProviderError]) -> None:
    error = translate(api_error(status), "get sandbox x")
    assert type(error) is expected
    assert "get sandbox x" in str(error) and f"HTTP {status}" in str(error) and "nope" in str(error)


def test_retry_after_is_honoured() -> None:
    error = translate(api_error(429, {"Retry-After": "7"}), "list")
    assert isinstance(error, RateLimitedError) and error.retry_after == 7.0
    assert translate(api_error(503, {"retry-after": "2"}), "x").retry_after == 2.0  # type: ignore[attr-defined]
    assert translate(api_error(429, {"Retry-After": "soon"}), "x").retry_after is None  # type: ignore[attr-defined]


def test_no_http_answer_is_transient() -> None:
    assert type(translate(urllib3.exceptions.MaxRetryError(None, "/x"), "list")) is TransientError  # type: ignore[arg-type]
    assert type(translate(ConnectionRefusedError(), "list")) is TransientError
    assert type(translate(DaytonaError("socket closed"), "exec")) is TransientError


def test_sdk_errors_map_by_status() -> None:
    exc = DaytonaError("gone", status_code=404)
    assert type(translate(exc, "get")) is NotFoundError
