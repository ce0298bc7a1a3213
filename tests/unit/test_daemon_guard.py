"""The daemon's job guard (controller.daemon.Daemon._guard): a failing job never stops the daemon;
an expected failure (the API, the database) is one line, a bug comes with its traceback, and a
refused key says which setting to check."""

from __future__ import annotations

import logging

import pytest

from controller.config import load_settings
from controller.daemon import Daemon
from controller.db import Database
from controller.errors import AuthError, TransientError
from controller.providers.memory import MemoryProvider


def _daemon(db: Database, database_url: str) -> Daemon:
    settings = load_settings(None, {"database_url": database_url, "server": {"listen": "127.0.0.1:0"}})
    daemon = Daemon(settings, db, MemoryProvider())
    daemon.job_housekeeping()  # the schema check: jobs run only on a current schema
    return daemon


def _fails(exc: Exception) -> None:
    raise exc


def test_a_bug_in_a_job_is_logged_with_its_traceback(
    db: Database, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = _daemon(db, database_url)
    with caplog.at_level(logging.ERROR, logger="controller.daemon"):
        daemon._guard("reconcile", lambda: _fails(NameError("name 'observed' is not defined")))()
        daemon._guard("gc", lambda: _fails(TransientError("list sandboxes: connection reset")))()
    bug, expected = [r for r in caplog.records if "failed" in r.getMessage()]
    assert "NameError" in bug.getMessage() and bug.exc_info is not None
    assert "connection reset" in expected.getMessage() and not expected.exc_info
    assert daemon.health.last_pass_error is not None and "observed" in daemon.health.last_pass_error


def test_a_refused_key_in_a_job_says_which_setting_to_check(
    db: Database, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = _daemon(db, database_url)
    with caplog.at_level(logging.ERROR, logger="controller.daemon"):
        daemon._guard("reconcile", lambda: _fails(AuthError("list sandboxes: HTTP 401: Unauthorized")))()
    [record] = [r for r in caplog.records if "failed" in r.getMessage()]
    assert "HTTP 401" in record.getMessage() and "DAYTONA_API_KEY" in record.getMessage()
    assert not record.exc_info
