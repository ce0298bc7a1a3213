"""Secrets by reference (issue 15), end to end with the real SDK against the local Daytona API on
SQLite and PostgreSQL: a secret read from a file reaches the sandbox's environment and appears in no
table, no event and no log line of the run; a reference that cannot be resolved blocks the lease
with a message naming it, and no sandbox is created without it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import sqlalchemy as sa

from controller import db as dbmod
from tests.integration.test_reconcile_emulator import cli, converge, env, get, ours, reconcile
from tests.support.emulator import EmulatorProcess

__all__ = ["env"]

SECRET = "tok-9f2c1e7a-very-secret"


def _all_rows_text(database_url: str) -> str:
    database = dbmod.connect(database_url)
    try:
        meta = sa.MetaData()
        meta.reflect(database.engine)
        parts = []
        with database.engine.connect() as conn:
            for table in meta.sorted_tables:
                parts += [repr(tuple(row)) for row in conn.execute(sa.select(table))]
        return "\n".join(parts)
    finally:
        database.dispose()


def test_secret_from_a_file_reaches_the_sandbox_and_nothing_else(
    env: EmulatorProcess, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_file = tmp_path / "token"
    secret_file.write_text(SECRET + "\n")
    spec = tmp_path / "l.yaml"
    spec.write_text(
        f"leases:\n  - name: sec\n    env:\n      PLAIN: hello\n      TOKEN: {{from_file: {secret_file}}}\n"
    )
    code, out, err = cli(database_url, "apply", "-f", str(spec))
    assert code == 0, out + err
    outputs = [out, err]
    converge(database_url, {"sec": "Ready"})
    for args in (("get", "-o", "yaml"), ("export",), ("events", "sec", "-o", "json"), ("plan",)):
        code, out, err = cli(database_url, *args)
        outputs += [out, err]

    (sandbox,) = ours(env)
    full = env.client().get(sandbox.id)
    assert full.env is not None and full.env.get("TOKEN") == SECRET and full.env["PLAIN"] == "hello"
    assert full.process.exec('printf %s "$TOKEN"').result == SECRET

    assert SECRET not in _all_rows_text(database_url)
    assert SECRET not in "\n".join(outputs)
    assert SECRET not in caplog.text
    assert str(secret_file) in _all_rows_text(database_url)  # the reference is what is stored


def test_missing_references_block_the_lease_and_create_nothing(
    env: EmulatorProcess, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LEASECTL_TEST_UNSET", raising=False)
    spec = tmp_path / "l.yaml"
    spec.write_text(
        "leases:\n"
        "  - name: nofile\n    env: {TOKEN: {from_file: /nonexistent/token}}\n"
        "  - name: noenv\n    env: {KEY: {from_env: LEASECTL_TEST_UNSET}}\n"
        "  - name: fine\n"
    )
    assert cli(database_url, "apply", "-f", str(spec))[0] == 0
    reconcile(database_url)
    rows = get(database_url)
    assert rows["nofile"]["phase"] == "Blocked"
    assert "env.TOKEN: from_file /nonexistent/token cannot be read" in rows["nofile"]["message"]
    assert rows["noenv"]["phase"] == "Blocked"
    assert "env.KEY: from_env LEASECTL_TEST_UNSET is not set" in rows["noenv"]["message"]
    assert {s.labels["leasectl-lease"] for s in ours(env)} <= {"fine"}

    monkeypatch.setenv("LEASECTL_TEST_UNSET", "now-set")
    rows = converge(database_url, {"noenv": "Ready", "fine": "Ready"}, passes=20, pause=0.1)
    assert rows["nofile"]["phase"] == "Blocked"
