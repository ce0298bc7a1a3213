"""GC end to end: `leasectl gc` with the real SDK (controller.providers.daytona) against the local
Daytona API, on SQLite and PostgreSQL.

The fleet: a sandbox of an existing lease, one whose lease row is deleted with SQL, a ghost with our
labels naming no lease, one of ours with no lease label, another instance's and an unlabelled one.
`gc --dry-run` changes nothing; `gc --grace 0` removes exactly this instance's orphans; with a grace
the first run only records sightings, and the clock survives a restart of both processes.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from controller import db as dbmod
from controller.cli import app
from controller.config import load_settings
from controller.gc import GC_DELETE_ACTION, collect_garbage
from controller.providers.base import LABEL_INSTANCE, LABEL_LEASE, LABEL_SPEC, CreateRequest
from controller.providers.daytona import DaytonaProvider
from models import Event, Lease, OrphanSighting, metadata
from tests.support.emulator import EmulatorProcess, point_leasectl_at

INSTANCE = "gcitest"
GONE_STATES = ("destroying", "destroyed")


@pytest.fixture
def env(emulator: EmulatorProcess, monkeypatch: pytest.MonkeyPatch) -> EmulatorProcess:
    return point_leasectl_at(emulator, monkeypatch, INSTANCE, leader_lease_seconds="5")


@pytest.fixture
def provider(env: EmulatorProcess) -> DaytonaProvider:
    return DaytonaProvider(env.api_url, env.api_key, request_timeout=30)


def cli(database_url: str, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--database-url", database_url, *args])
    return result.exit_code, result.stdout + result.stderr


def cli_json(database_url: str, *args: str) -> Any:
    result = CliRunner().invoke(app, ["--database-url", database_url, *args, "-o", "json"])
    assert result.exit_code == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def ours(lease: str | None) -> dict[str, str]:
    labels = {LABEL_INSTANCE: INSTANCE}
    if lease is not None:
        labels |= {LABEL_LEASE: lease, LABEL_SPEC: "0123abcd"}
    return labels


def create(provider: DaytonaProvider, labels: dict[str, str]) -> str:
    return provider.create(CreateRequest(name=f"gc-{uuid.uuid4().hex[:10]}", labels=labels)).id


@pytest.fixture
def fleet(database_url: str, provider: DaytonaProvider) -> dict[str, str]:
    database = dbmod.connect(database_url)
    try:
        with database.session() as session:
            session.add_all([Lease(name="kept", desired_state="running"), Lease(name="dropped")])
        ids = {
            "kept": create(provider, ours("kept")),
            "dropped": create(provider, ours("dropped")),
            "ghost": create(provider, ours("ghost")),
            "nolease": create(provider, ours(None)),
            "foreign": create(provider, {LABEL_INSTANCE: "other", LABEL_LEASE: "dropped", LABEL_SPEC: "x"}),
            "unlabelled": create(provider, {"team": "data"}),
        }
        with database.engine.begin() as conn:  # the operator deletes a lease row behind our back
            conn.execute(sa.text("DELETE FROM leases WHERE name = 'dropped'"))
    finally:
        database.dispose()
    return ids


def existing(provider: DaytonaProvider) -> set[str]:
    return {s.id for s in provider.list_sandboxes({}) if s.state not in GONE_STATES}


def wait_for_existing(provider: DaytonaProvider, expected: set[str], timeout: float = 15.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = existing(provider)
        if found == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def snapshot(database_url: str) -> dict[str, list[Any]]:
    database = dbmod.connect(database_url)
    try:
        with database.session() as session:
            return {
                name: sorted(
                    (tuple(r) for r in session.execute(sa.select(metadata.tables[name])).all()), key=repr
                )
                for name in ("leases", "lease_status", "events", "orphan_sightings", "executions")
            }
    finally:
        database.dispose()


def orphans_of_this_instance(fleet: dict[str, str]) -> set[str]:
    return {fleet["dropped"], fleet["ghost"], fleet["nolease"]}


def test_dry_run_changes_nothing_and_gc_removes_exactly_our_orphans(
    database_url: str, provider: DaytonaProvider, fleet: dict[str, str], env: EmulatorProcess
) -> None:
    before = snapshot(database_url)
    env.reset_stats()
    listed = {
        row["sandbox_id"]: row for row in cli_json(database_url, "gc", "--dry-run", "--grace", "0")["orphans"]
    }
    assert set(listed) == orphans_of_this_instance(fleet)
    assert {row["status"] for row in listed.values()} == {"would delete"}
    assert listed[fleet["dropped"]]["lease_label"] == "dropped"
    assert "does not exist" in listed[fleet["ghost"]]["reason"]
    code, output = cli(database_url, "gc", "--dry-run", "--grace", "0")
    assert code == 0, output
    assert "3 orphan(s) would be deleted" in output and "dry run: nothing changed" in output
    assert snapshot(database_url) == before
    assert existing(provider) == set(fleet.values())
    stats = env.stats()
    assert stats.get("delete", 0) == 0 and stats.get("create", 0) == 0

    # the default grace marks them as in grace, still without writing anything
    code, output = cli(database_url, "gc", "--dry-run")
    assert code == 0, output
    assert "in grace" in output
    assert snapshot(database_url) == before

    code, output = cli(database_url, "gc", "--grace", "0")
    assert code == 0, output
    expected_left = {fleet["kept"], fleet["foreign"], fleet["unlabelled"]}
    assert wait_for_existing(provider, expected_left) == expected_left
    database = dbmod.connect(database_url)
    try:
        with database.session() as session:
            events = list(session.scalars(sa.select(Event).where(Event.action == GC_DELETE_ACTION)))
            assert {e.sandbox_id for e in events} == orphans_of_this_instance(fleet)
            assert {e.outcome for e in events} == {"ok"}
            assert {e.lease_name for e in events} == {"dropped", "ghost", None}
            assert session.scalars(sa.select(OrphanSighting)).all() == []
    finally:
        database.dispose()

    # nothing left to do: a second run deletes nothing
    env.reset_stats()
    code, output = cli(database_url, "gc", "--grace", "0")
    assert code == 0, output
    assert env.stats().get("delete", 0) == 0
    assert existing(provider) == expected_left


def test_grace_is_respected_across_a_restart(
    database_url: str, provider: DaytonaProvider, fleet: dict[str, str], env: EmulatorProcess
) -> None:
    code, output = cli(database_url, "gc", "--grace", "300")
    assert code == 0, output
    assert "0 orphan(s) deleted" in output and "3 in grace" in output
    assert existing(provider) == set(fleet.values())
    database = dbmod.connect(database_url)
    try:
        with database.session() as session:
            first_seen = {r.sandbox_id: r.first_seen_at for r in session.scalars(sa.select(OrphanSighting))}
    finally:
        database.dispose()
    assert set(first_seen) == orphans_of_this_instance(fleet)

    # both processes restart: the emulator (same state) and the controller (new connection)
    env.restart()
    code, output = cli(database_url, "gc", "--grace", "300")
    assert code == 0, output
    assert "0 orphan(s) deleted" in output
    assert existing(provider) == set(fleet.values())

    settings = load_settings(None, {"database_url": database_url})
    assert settings.controller.instance == INSTANCE
    start = max(first_seen.values())
    database = dbmod.connect(database_url)
    try:
        with database.session() as session:  # the clock was not reset by the second run
            again = {r.sandbox_id: r.first_seen_at for r in session.scalars(sa.select(OrphanSighting))}
        assert again == first_seen
        early = collect_garbage(
            database, provider, settings, dry_run=False, now=start + timedelta(seconds=299), grace_seconds=300
        )
        assert early.deleted == ()
        late = collect_garbage(
            database, provider, settings, dry_run=False, now=start + timedelta(seconds=301), grace_seconds=300
        )
        assert {o.sandbox.id for o in late.deleted} == orphans_of_this_instance(fleet)
    finally:
        database.dispose()
    expected_left = {fleet["kept"], fleet["foreign"], fleet["unlabelled"]}
    assert wait_for_existing(provider, expected_left) == expected_left
