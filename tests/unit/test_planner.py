"""The pure planner (controller.planner): every (desired, observed state) pair, and the special cases."""

from __future__ import annotations

import re
from dataclasses import FrozenInstanceError, fields, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.planner import (
    STUCK_AFTER_SECONDS,
    Decision,
    LeaseView,
    Plan,
    StatusView,
    build_create_request,
    ownership_labels,
    plan,
    sandbox_name,
)
from controller.providers.base import (
    ALL_STATES,
    LABEL_INSTANCE,
    LABEL_LEASE,
    LABEL_SPEC,
    TRANSITIONAL_STATES,
    ObservedSandbox,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
INSTANCE = "test"
SPEC = "aaaaaaaaaaaaaaaa"
OLD_SPEC = "bbbbbbbbbbbbbbbb"


def lease(name: str = "web", desired: str = "running", spec: str = SPEC, **kw: Any) -> LeaseView:
    return LeaseView(
        name=name,
        desired_state=desired,
        spec_hash=spec,
        create=build_create_request(INSTANCE, name, spec, {"snapshot": "base", "labels": {"team": "a"}}),
        **kw,
    )


def sandbox(
    state: str,
    *,
    id: str = "sb-1",
    lease_name: str = "web",
    spec: str = SPEC,
    instance: str = INSTANCE,
    created: int = 0,
    **kw: Any,
) -> ObservedSandbox:
    return ObservedSandbox(
        id=id,
        name=f"name-{id}",
        state=state,
        labels=ownership_labels(instance, lease_name, spec),
        created_at=NOW - timedelta(hours=1) + timedelta(minutes=created),
        **kw,
    )


def one(
    the_lease: LeaseView,
    observed: list[ObservedSandbox],
    status: StatusView | None = None,
    now: datetime = NOW,
) -> tuple[str | None, str, Plan]:
    statuses = {the_lease.name: status} if status is not None else {}
    result = plan([the_lease], statuses, observed, now, instance=INSTANCE)
    assert len(result.actions) <= 1
    decision = result.decisions[the_lease.name]
    kind = decision.action.kind if decision.action else None
    assert result.actions == ((decision.action,) if decision.action else ())
    return kind, decision.phase, result


# -- the full (desired x observed) table ---------------------------------------------------------

STABLE = {
    "started",
    "stopped",
    "paused",
    "archived",
    "error",
    "build_failed",
    "destroyed",
    "destroying",
    "unknown",
}
OBSERVED = [None, *sorted(ALL_STATES), "some-new-state"]


def expected(desired: str, state: str | None) -> tuple[str | None, str]:
    if state in (None, "destroyed"):
        return {
            "running": ("create", "Provisioning"),
            "stopped": (None, "Stopped"),
            "archived": (None, "Archived"),
            "absent": (None, "Deleted"),
        }[desired]
    if state == "destroying":
        return None, "Deleting"
    if desired == "absent":
        return "delete", "Deleting"
    if state not in STABLE and state in TRANSITIONAL_STATES:
        return None, {"running": "Provisioning", "stopped": "Stopping", "archived": "Archiving"}[desired]
    if state not in STABLE or state == "unknown":
        return None, "Pending"  # tolerated: wait, phase kept (the default status is Pending)
    table: dict[str, dict[str, tuple[str | None, str]]] = {
        "running": {
            "started": ("realize_workspace", "Provisioning"),
            "stopped": ("start", "Provisioning"),
            "paused": ("start", "Provisioning"),
            "archived": ("start", "Provisioning"),
            "error": ("delete", "Error"),  # not recoverable: replace
            "build_failed": (None, "Failed"),
        },
        "stopped": {
            "started": ("stop", "Stopping"),
            "stopped": (None, "Stopped"),
            "paused": (None, "Stopped"),
            "archived": (None, "Stopped"),
            "error": (None, "Error"),
            "build_failed": (None, "Failed"),
        },
        "archived": {
            "started": ("stop", "Archiving"),
            "stopped": ("archive", "Archiving"),
            "paused": ("stop", "Archiving"),
            "archived": (None, "Archived"),
            "error": (None, "Error"),
            "build_failed": (None, "Failed"),
        },
    }
    return table[desired][state]


@pytest.mark.parametrize("state", OBSERVED, ids=lambda s: str(s))
@pytest.mark.parametrize("desired", ["running", "stopped", "archived", "absent"])
def test_every_desired_and_observed_pair(desired: str, state: str | None) -> None:
    observed = [] if state is None else [sandbox(state, error_reason="boom")]
    kind, phase, result = one(lease(desired=desired), observed)
    assert (kind, phase) == expected(desired, state)
    decision = result.decisions["web"]
    assert decision.message
    if state not in (None, "destroyed"):
        assert decision.observed_state == state
        assert decision.sandbox_id == "sb-1"
    if kind not in (None, "create"):
        assert decision.action is not None and decision.action.sandbox_id == "sb-1"
    if state in ("unknown", "some-new-state") and desired != "absent":
        assert "unknown state" in decision.message


def test_all_contract_states_are_covered() -> None:
    contract = (
        "creating, restoring, destroyed, destroying, started, stopped, starting, stopping, error, "
        "build_failed, pending_build, building_snapshot, unknown, pulling_snapshot, archived, archiving, "
        "resizing, snapshotting, forking, pausing, paused, resuming"
    )
    assert {s.strip() for s in contract.split(",")} <= set(OBSERVED)


# -- create, ready, workspace ------------------------------------------------------------------------


def test_create_carries_request_with_deterministic_name_and_labels() -> None:
    _, _, result = one(lease(), [])
    action = result.actions[0]
    assert action.create is not None
    assert action.sandbox_name == action.create.name == sandbox_name(INSTANCE, "web", SPEC)
    assert action.spec_hash == SPEC
    assert action.create.labels == {
        "team": "a",
        LABEL_INSTANCE: INSTANCE,
        LABEL_LEASE: "web",
        LABEL_SPEC: SPEC,
    }
    assert action.create.snapshot == "base"


def test_started_with_workspace_recorded_is_ready_and_resets_failures() -> None:
    status = StatusView(
        sandbox_id="sb-1", workspace_path="/home/daytona/workspace", phase="Provisioning", failures=3
    )
    kind, phase, result = one(lease(), [sandbox("started")], status)
    assert (kind, phase) == (None, "Ready")
    values = result.decisions["web"].status_values()
    assert values["workspace_path"] == "/home/daytona/workspace"
    assert values["ready_at"] == NOW
    assert values["failures"] == 0 and values["next_attempt_at"] is None


def test_ready_keeps_its_ready_at() -> None:
    earlier = NOW - timedelta(days=1)
    status = StatusView(sandbox_id="sb-1", workspace_path="/w", phase="Ready", ready_at=earlier)
    _, phase, result = one(lease(), [sandbox("started")], status)
    assert phase == "Ready" and result.decisions["web"].ready_at == earlier


def test_workspace_of_another_sandbox_is_not_reused() -> None:
    status = StatusView(sandbox_id="old", workspace_path="/w", phase="Ready")
    kind, phase, result = one(lease(workspace_dir="ws"), [sandbox("started")], status)
    assert (kind, phase) == ("realize_workspace", "Provisioning")
    assert result.actions[0].workspace_dir == "ws"
    assert result.decisions["web"].status_values()["workspace_path"] is None


def test_sandbox_adopted_from_a_create_attempt_clears_the_attempt() -> None:
    status = StatusView(create_attempt_name="name-sb-1", create_attempt_at=NOW)
    _, _, result = one(lease(), [sandbox("creating")], status)
    values = result.decisions["web"].status_values()
    assert values["create_attempt_name"] is None and values["sandbox_id"] == "sb-1"


# -- expired, paused -----------------------------------------------------------------------------


@pytest.mark.parametrize("desired", ["running", "stopped", "archived"])
def test_expired_lease_is_absent(desired: str) -> None:
    expired = lease(desired=desired, expires_at=NOW)
    kind, phase, result = one(expired, [sandbox("started")])
    assert (kind, phase) == ("delete", "Deleting")
    assert "expired" in result.actions[0].reason
    assert one(expired, [])[:2] == (None, "Deleted")
    not_yet = lease(desired=desired, expires_at=NOW + timedelta(seconds=1))
    assert one(not_yet, [sandbox("started")])[0] != "delete"


@pytest.mark.parametrize("state", [None, "started", "stopped", "error", "build_failed", "creating"])
@pytest.mark.parametrize("desired", ["running", "absent"])
def test_paused_lease_is_observed_never_acted_on(desired: str, state: str | None) -> None:
    observed = [] if state is None else [sandbox(state), sandbox(state, id="sb-2", spec=OLD_SPEC)]
    status = StatusView(sandbox_id="gone", create_attempt_name="x")
    kind, phase, result = one(lease(desired=desired, paused=True, expires_at=NOW), observed, status)
    assert (kind, phase) == (None, "Paused")
    assert result.decisions["web"].observed_state == state


# -- spec change ------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["started", "stopped", "archived", "paused", "error"])
def test_spec_change_replaces_a_running_lease(state: str) -> None:
    kind, phase, result = one(lease(), [sandbox(state, spec=OLD_SPEC, recoverable=True)])
    assert (kind, phase) == ("delete", "Provisioning")
    assert "spec changed" in result.actions[0].reason
    # once gone, the new sandbox gets a new name
    assert sandbox_name(INSTANCE, "web", SPEC) != sandbox_name(INSTANCE, "web", OLD_SPEC)


def test_spec_change_on_build_failed_replaces() -> None:
    status = StatusView(sandbox_id="sb-1", phase="Failed", failed_spec_hash=OLD_SPEC)
    kind, _, _ = one(lease(), [sandbox("build_failed", spec=OLD_SPEC)], status)
    assert kind == "delete"


@pytest.mark.parametrize(
    ("desired", "state", "want"), [("stopped", "started", "stop"), ("archived", "stopped", "archive")]
)
def test_spec_change_on_stopped_or_archived_lease_keeps_the_sandbox(
    desired: str, state: str, want: str
) -> None:
    assert one(lease(desired=desired), [sandbox(state, spec=OLD_SPEC)])[0] == want
    assert (
        one(
            lease(desired=desired),
            [sandbox("stopped" if desired == "stopped" else "archived", spec=OLD_SPEC)],
        )[0]
        is None
    )


def test_transitional_sandbox_with_old_spec_is_waited_for() -> None:
    assert one(lease(), [sandbox("starting", spec=OLD_SPEC)])[:2] == (None, "Provisioning")


# -- how long a sandbox has been in its state ---------------------------------------------------


def decided(status: StatusView | None, observed: list[ObservedSandbox], now: datetime = NOW) -> Decision:
    return one(lease(), observed, status, now)[2].decisions["web"]


def test_a_state_first_seen_is_observed_since_now_and_a_kept_one_since_then() -> None:
    first = decided(None, [sandbox("starting")])
    assert (first.observed_state, first.observed_since) == ("starting", NOW)
    later = NOW + timedelta(minutes=3)
    recorded = StatusView(sandbox_id="sb-1", observed_state="starting", observed_since=NOW)
    assert decided(recorded, [sandbox("starting")], later).observed_since == NOW
    changed = decided(recorded, [sandbox("started")], later)
    assert (changed.observed_state, changed.observed_since) == ("started", later)
    other = decided(recorded, [sandbox("starting", id="sb-2")], later)  # another sandbox, same state
    assert other.observed_since == later
    assert decided(recorded, [], later).observed_since is None  # no state, no since
    unknown = StatusView(sandbox_id="sb-1", observed_state="starting")  # recorded before 0012
    assert decided(unknown, [sandbox("starting")], later).observed_since == later


@pytest.mark.parametrize("state", sorted(TRANSITIONAL_STATES - {"destroying"}))
def test_a_transitional_state_past_the_limit_is_reported_stuck_and_still_waited_for(state: str) -> None:
    recorded = StatusView(sandbox_id="sb-1", observed_state=state, observed_since=NOW, phase="Provisioning")
    limit = timedelta(seconds=STUCK_AFTER_SECONDS)
    before = decided(recorded, [sandbox(state)], NOW + limit - timedelta(seconds=1))
    assert before.action is None and "is stuck" not in before.message
    assert before.message.endswith(f"is {state}; waiting")
    after = decided(recorded, [sandbox(state)], NOW + timedelta(minutes=75))
    assert after.action is None and after.phase == before.phase  # nothing to do but wait
    assert after.observed_since == NOW
    assert f"is stuck: {state} for 75 min (more than controller.stuck_after_seconds, 900 s)" in after.message
    days = decided(recorded, [sandbox(state)], NOW + timedelta(hours=26, minutes=5))
    assert f"{state} for 26 h 5 min" in days.message


def test_the_stuck_limit_is_the_callers() -> None:
    recorded = StatusView(sandbox_id="sb-1", observed_state="starting", observed_since=NOW)
    later = NOW + timedelta(seconds=30)
    result = plan([lease()], {"web": recorded}, [sandbox("starting")], later, instance=INSTANCE)
    assert "is stuck" not in result.decisions["web"].message
    result = plan(
        [lease()], {"web": recorded}, [sandbox("starting")], later, instance=INSTANCE, stuck_after_seconds=20
    )
    assert "is stuck: starting for 0 min (more than controller.stuck_after_seconds, 20 s)" in (
        result.decisions["web"].message
    )


# -- duplicates -----------------------------------------------------------------------------------


def test_duplicates_keep_the_recorded_one_and_delete_one_extra_per_pass() -> None:
    sbs = [
        sandbox("started", id="a", created=5),
        sandbox("stopped", id="b", created=1),
        sandbox("started", id="c"),
    ]
    kind, _, result = one(lease(), sbs, StatusView(sandbox_id="b"))
    action = result.actions[0]
    assert kind == "delete" and action.duplicate and action.sandbox_id == "a"
    assert result.decisions["web"].sandbox_id == "b"
    assert "duplicate" in result.decisions["web"].message


def test_duplicates_prefer_current_spec_then_started_then_newest() -> None:
    old = sandbox("started", id="old", spec=OLD_SPEC, created=9)
    stopped = sandbox("stopped", id="stopped", created=8)
    newer = sandbox("started", id="newer", created=5)
    older = sandbox("started", id="older", created=1)
    _, _, result = one(lease(), [old, stopped, newer, older])
    assert result.decisions["web"].sandbox_id == "newer"
    assert result.actions[0].sandbox_id != "newer" and result.actions[0].duplicate


def test_absent_with_duplicates_deletes_them_one_at_a_time() -> None:
    sbs = [sandbox("started", id="a"), sandbox("stopped", id="b")]
    kind, phase, result = one(lease(desired="absent"), sbs)
    assert (kind, phase) == ("delete", "Deleting")
    assert result.actions[0].duplicate


def test_destroying_sandboxes_are_not_duplicates() -> None:
    sbs = [sandbox("started", id="a"), sandbox("destroying", id="b"), sandbox("destroyed", id="c")]
    status = StatusView(sandbox_id="a", workspace_path="/w")
    assert one(lease(), sbs, status)[:2] == (None, "Ready")


def test_destroying_then_create() -> None:
    assert one(lease(), [sandbox("destroying")])[:2] == (None, "Deleting")
    assert one(lease(), [sandbox("destroyed")])[:2] == ("create", "Provisioning")


# -- lookup before create ----------------------------------------------------------------------------


@pytest.mark.parametrize("desired", ["running", "stopped", "archived", "absent"])
def test_recorded_sandbox_missing_from_list_is_looked_up_first(desired: str) -> None:
    status = StatusView(sandbox_id="sb-9", sandbox_name="n9", phase="Ready")
    kind, _, result = one(lease(desired=desired), [], status)
    assert kind == "lookup"
    action = result.actions[0]
    assert (action.sandbox_id, action.sandbox_name, action.lookup_name) == ("sb-9", "n9", None)


def test_create_attempt_missing_from_list_is_looked_up_by_name() -> None:
    name = sandbox_name(INSTANCE, "web", SPEC)
    status = StatusView(create_attempt_name=name, create_attempt_at=NOW - timedelta(hours=2))
    kind, phase, result = one(lease(), [], status)
    assert (kind, phase) == ("lookup", "Provisioning")
    assert result.actions[0].lookup_name == name and result.actions[0].sandbox_id is None


def test_recorded_sandbox_seen_destroyed_needs_no_lookup() -> None:
    status = StatusView(sandbox_id="sb-1", workspace_path="/w", phase="Ready")
    kind, _, result = one(lease(), [sandbox("destroyed")], status)
    assert kind == "create"
    values = result.decisions["web"].status_values()
    assert values["sandbox_id"] is None and values["workspace_path"] is None


def test_other_instances_and_unknown_leases_are_ignored() -> None:
    foreign = sandbox("started", id="f", instance="other")
    unlabelled = ObservedSandbox(id="u", name="u", state="started", labels={LABEL_LEASE: "web"})
    orphan = sandbox("started", id="o", lease_name="gone")
    kind, _, result = one(lease(), [foreign, unlabelled, orphan])
    assert kind == "create"
    assert set(result.ignored) == {"f", "u", "o"}
    # absent never deletes what is not ours
    kind, phase, result = one(lease(desired="absent"), [foreign, unlabelled, orphan])
    assert (kind, phase) == (None, "Deleted")


# -- backoff, failed, error ---------------------------------------------------------------------------


def test_backoff_holds_the_action_and_keeps_the_phase() -> None:
    until = NOW + timedelta(seconds=30)
    status = StatusView(sandbox_id="sb-1", phase="Error", failures=2, next_attempt_at=until)
    kind, phase, result = one(lease(), [sandbox("stopped")], status)
    assert (kind, phase) == (None, "Error")
    assert "backing off until" in result.decisions["web"].message
    assert "failures" not in result.decisions["web"].status_values()
    # at the due time the action comes back
    assert one(lease(), [sandbox("stopped")], status, now=until)[0] == "start"


def test_backoff_does_not_hide_convergence() -> None:
    status = StatusView(
        sandbox_id="sb-1", phase="Error", failures=2, next_attempt_at=NOW + timedelta(hours=1)
    )
    kind, phase, result = one(lease(desired="stopped"), [sandbox("stopped")], status)
    assert (kind, phase) == (None, "Stopped")
    assert result.decisions["web"].status_values()["failures"] == 0


def test_action_carries_failures_for_backoff() -> None:
    status = StatusView(sandbox_id="sb-1", failures=4, next_attempt_at=NOW - timedelta(seconds=1))
    _, _, result = one(lease(), [sandbox("stopped")], status)
    assert result.actions[0].failures == 4


def test_build_failed_never_loops_creating() -> None:
    kind, phase, result = one(lease(), [sandbox("build_failed", error_reason="bad dockerfile")])
    assert (kind, phase) == (None, "Failed")
    values = result.decisions["web"].status_values()
    assert values["failed_spec_hash"] == SPEC
    assert "bad dockerfile" in values["message"]
    # the sandbox was deleted by hand: still no create for the failed spec
    status = StatusView(sandbox_id="sb-1", phase="Failed", failed_spec_hash=SPEC)
    assert one(lease(), [sandbox("destroyed")], status)[:2] == (None, "Failed")
    assert one(lease(), [], StatusView(phase="Failed", failed_spec_hash=SPEC))[:2] == (None, "Failed")


def test_failed_spec_is_retried_once_the_spec_changes_even_while_backing_off() -> None:
    status = StatusView(phase="Failed", failed_spec_hash=OLD_SPEC, next_attempt_at=NOW + timedelta(hours=1))
    kind, phase, result = one(lease(), [], status)
    assert (kind, phase) == ("create", "Provisioning")
    assert result.decisions["web"].status_values()["failed_spec_hash"] is None


def test_error_recoverable_is_recovered() -> None:
    kind, phase, result = one(lease(), [sandbox("error", recoverable=True, error_reason="disk full")])
    assert (kind, phase) == ("recover", "Error")
    action = result.actions[0]
    assert action.penalize and "disk full" in action.reason


def test_error_not_recoverable_is_replaced_with_a_reason() -> None:
    kind, _, result = one(lease(), [sandbox("error", recoverable=False, error_reason="runner lost")])
    action = result.actions[0]
    assert kind == "delete" and action.penalize and not action.duplicate
    assert "not recoverable" in action.reason and "runner lost" in action.reason


@pytest.mark.parametrize("desired", ["stopped", "archived"])
def test_error_is_left_alone_unless_running_or_absent(desired: str) -> None:
    kind, phase, result = one(lease(desired=desired), [sandbox("error", recoverable=True)])
    assert (kind, phase) == (None, "Error")
    assert "left as is" in result.decisions["web"].message


# -- names ------------------------------------------------------------------------------------------


NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@pytest.mark.parametrize(
    ("instance", "lease_name"),
    [("default", "web"), ("a" * 32, "b" * 63), ("x", "y"), ("prod-eu", "agent-" + "9" * 57)],
)
def test_sandbox_name_is_a_dns_label(instance: str, lease_name: str) -> None:
    name = sandbox_name(instance, lease_name, "0123456789abcdef")
    assert len(name) <= 63 and NAME_RE.fullmatch(name), name
    assert sandbox_name(instance, lease_name, "0123456789abcdef") == name


def test_sandbox_names_differ_by_instance_lease_and_spec() -> None:
    names = {
        sandbox_name("a-b", "c", SPEC),
        sandbox_name("a", "b-c", SPEC),
        sandbox_name("a", "b-c", OLD_SPEC),
        sandbox_name("a" * 32, "b" * 62 + "c", SPEC),
        sandbox_name("a" * 32, "b" * 62 + "d", SPEC),
    }
    assert len(names) == 5


def test_reserved_user_labels_cannot_override_ownership() -> None:
    req = build_create_request("i", "l", SPEC, {"labels": {"leasectl-instance": "evil", "x": 1}, "env": None})
    assert req.labels == {"x": "1", **ownership_labels("i", "l", SPEC)}
    assert req.env == {}


def test_create_never_clears_the_create_attempt_it_is_about_to_record() -> None:
    _, _, result = one(lease(), [], StatusView(phase="Pending"))
    assert "create_attempt_name" not in result.decisions["web"].status_values()


def test_actions_carry_the_instance() -> None:
    _, _, result = one(lease(), [sandbox("stopped")])
    assert result.actions[0].instance == INSTANCE


# -- auto-stop (Idle), ephemeral, Blocked ------------------------------------------------------------


def lease_with(desired: str = "running", **spec: Any) -> LeaseView:
    return LeaseView(
        name="web",
        desired_state=desired,
        spec_hash=SPEC,
        create=build_create_request(INSTANCE, "web", SPEC, {"snapshot": "base", **spec}),
    )


def test_auto_stop_is_off_unless_the_lease_asks_for_it() -> None:
    assert build_create_request(INSTANCE, "web", SPEC, {}).auto_stop_interval == 0
    assert build_create_request(INSTANCE, "web", SPEC, {"auto_stop_interval": None}).auto_stop_interval == 0
    assert build_create_request(INSTANCE, "web", SPEC, {"auto_stop_interval": 30}).auto_stop_interval == 30


IDLE_TABLE = [
    # auto_stop, observed state, previous phase, same sandbox id -> action, phase
    (30, "stopped", "Ready", True, None, "Idle"),
    (30, "archived", "Idle", True, None, "Idle"),
    (30, "stopped", "Idle", True, None, "Idle"),
    (30, "stopped", "Stopped", True, "start", "Provisioning"),  # stopped because we were asked
    (30, "archived", "Archived", True, "start", "Provisioning"),
    (30, "stopped", "Ready", False, "start", "Provisioning"),  # not the sandbox that was Ready
    (30, "paused", "Ready", True, "start", "Provisioning"),
    (None, "stopped", "Ready", True, "start", "Provisioning"),  # no auto-stop asked: drift
    (0, "stopped", "Ready", True, "start", "Provisioning"),
    (30, "started", "Idle", True, None, "Ready"),  # started on demand: Ready again
]


@pytest.mark.parametrize(("auto_stop", "state", "phase", "same", "action", "new_phase"), IDLE_TABLE)
def test_idle_table(
    auto_stop: int | None, state: str, phase: str, same: bool, action: str | None, new_phase: str
) -> None:
    the_lease = lease_with(auto_stop_interval=auto_stop)
    status = StatusView(
        sandbox_id="sb-1" if same else "sb-0",
        phase=phase,
        spec_hash=SPEC,
        workspace_path="/home/daytona/workspace",
    )
    kind, got, result = one(the_lease, [sandbox(state)], status)
    assert (kind, got) == (action, new_phase)
    if got == "Idle":
        message = result.decisions["web"].message
        assert "30 idle minute(s)" in message and "on demand" in message
        assert result.decisions["web"].reset_failures


@pytest.mark.parametrize("desired", ["stopped", "archived"])
@pytest.mark.parametrize("state", ["started", "paused"])
def test_an_ephemeral_sandbox_is_never_stopped_or_archived(desired: str, state: str) -> None:
    kind, phase, result = one(lease_with(desired, auto_delete_interval=0), [sandbox(state)])
    assert kind is None and phase == "Failed"
    assert "ephemeral" in result.decisions["web"].message


def test_an_ephemeral_lease_is_deleted_and_run_as_usual() -> None:
    assert one(lease_with("absent", auto_delete_interval=0), [sandbox("started")])[0] == "delete"
    status = StatusView(sandbox_id="sb-1", phase="Provisioning")
    assert one(lease_with("running", auto_delete_interval=0), [sandbox("stopped")], status)[0] == "start"


def test_a_blocked_lease_stays_blocked_while_backing_off() -> None:
    status = StatusView(
        phase="Blocked",
        failures=3,
        last_error="create: Total disk limit exceeded. Maximum allowed: 30",
        next_attempt_at=NOW + timedelta(seconds=30),
    )
    kind, phase, result = one(lease_with(), [], status)
    assert (kind, phase) == (None, "Blocked")
    message = result.decisions["web"].message
    assert message.startswith("Blocked: create: Total disk limit exceeded") and "then: create" in message
    kind, phase, _ = one(lease_with(), [], status, now=NOW + timedelta(seconds=31))
    assert (kind, phase) == ("create", "Provisioning")


def test_actions_carry_the_state_they_were_planned_from() -> None:
    status = StatusView(sandbox_id="sb-1", phase="Ready", workspace_path="/w")
    _, _, result = one(lease_with("stopped"), [sandbox("started")], status)
    assert result.actions[0].from_state == "started"


def test_decisions_are_the_frozen_dataclass_their_fields_make() -> None:
    """The planner makes Decisions without the dataclass __init__ (speed, issue 14): each one must be
    exactly what ``Decision(**fields)`` makes: equal, same hash, frozen, ``replace`` and
    ``status_values`` alike, for every kind of decision the table produces."""
    desires = ("running", "stopped", "archived", "absent")
    leases = [lease(f"l{i}", desired) for i, desired in enumerate(desires)]
    states = ("started", "stopped", "archived", "error", "build_failed", "starting", "destroying")
    for state in states:
        observed = [sandbox(state, id=f"sb-{lv.name}", lease_name=lv.name) for lv in leases]
        the_plan = plan(leases, {}, observed, NOW, instance=INSTANCE)
        for decision in the_plan.decisions.values():
            made = Decision(**{f.name: getattr(decision, f.name) for f in fields(Decision)})
            assert type(decision) is Decision
            assert decision == made and hash(decision) == hash(made)
            assert vars(decision) == vars(made)  # no attribute beyond the fields, none missing
            assert decision.status_values() == made.status_values()
            assert replace(decision, phase="X") == replace(made, phase="X")
            with pytest.raises(FrozenInstanceError):
                decision.phase = "X"  # type: ignore[misc]
