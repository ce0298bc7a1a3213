"""The disk guard (controller.disk_guard): archives the longest-stopped sandboxes until the stopped
disk is under the cap, only where the lease has nothing else to do, each with a reason."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from controller.disk_guard import guard
from controller.planner import LeaseView, StatusView, build_create_request, plan
from controller.providers.base import ObservedSandbox

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)


def lease(name: str, desired: str = "stopped", **spec: Any) -> LeaseView:
    values = {"image": "python:3.12", "disk": 10, **spec}
    return LeaseView(name, desired, "s" * 16, build_create_request("test", name, "s" * 16, values))


def sandbox(the_lease: LeaseView, state: str = "stopped", disk: int | None = None) -> ObservedSandbox:
    req = the_lease.create
    return ObservedSandbox(
        id=f"sb-{the_lease.name}", name=req.name, state=state, labels=dict(req.labels), disk=disk
    )


def guarded(
    leases: list[LeaseView], observed: list[ObservedSandbox], cap: int, since: dict[str, datetime]
) -> Any:
    statuses = {lease.name: StatusView(sandbox_id=f"sb-{lease.name}", phase="Stopped") for lease in leases}
    raw = plan(leases, statuses, observed, NOW, instance="test")
    return guard(raw, leases, observed, cap_gib=cap, since=since, instance="test")


def test_the_longest_stopped_are_archived_until_the_stopped_disk_fits() -> None:
    old, mid, new = lease("old"), lease("mid"), lease("new")
    since = {
        "sb-old": NOW - timedelta(days=3),
        "sb-mid": NOW - timedelta(days=2),
        "sb-new": NOW - timedelta(hours=1),
    }
    result = guarded([new, mid, old], [sandbox(new), sandbox(mid), sandbox(old)], cap=15, since=since)
    assert [(a.kind, a.lease_name) for a in result.actions] == [("archive", "old"), ("archive", "mid")]
    first = result.actions[0].reason
    assert first.startswith("disk guard: stopped sandboxes hold 30 GiB, over the cap of 15 GiB")
    assert "stopped since 2026-11-24T12:00:00+00:00" in first
    assert result.decisions["old"].action == result.actions[0]


def test_under_the_cap_nothing_happens_and_reported_disk_wins() -> None:
    a, b = lease("a"), lease("b")
    result = guarded([a, b], [sandbox(a, disk=3), sandbox(b, disk=3)], cap=6, since={})
    assert result.actions == ()


def test_paused_ephemeral_busy_and_foreign_sandboxes_are_left_alone() -> None:
    paused = LeaseView("paused", "stopped", "s" * 16, lease("paused").create, paused=True)
    ephemeral = lease("eph", desired="running", auto_delete_interval=0)
    wants_running = lease("run", desired="running")  # stopped, will be started this pass
    orphan = ObservedSandbox(id="sb-orphan", name="x", state="stopped", labels={}, disk=50)
    observed = [sandbox(paused), sandbox(ephemeral, "stopped"), sandbox(wants_running), orphan]
    result = guarded([paused, ephemeral, wants_running], observed, cap=0, since={})
    assert [a for a in result.actions if a.kind == "archive"] == []
    assert ("start", "run") in [(a.kind, a.lease_name) for a in result.actions]
