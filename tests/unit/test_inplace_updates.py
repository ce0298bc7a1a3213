"""In-place updates (issue 15): which spec fields replace a sandbox and which Daytona changes on the
live sandbox, the planner's ``update`` action, its messages, and the upgrade from sandboxes labelled
with the old all-fields hash (they are relabelled, never replaced)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller import planner
from controller.applier import Applier, ApplierConfig
from controller.planner import StatusView, ownership_labels, plan
from controller.providers.base import (
    LABEL_SETTINGS,
    LABEL_SPEC,
    NetworkSettings,
    ObservedSandbox,
    SandboxUpdate,
)
from controller.providers.memory import MemoryProvider
from controller.reconciler import lease_view
from controller.schedules import lease_schedule
from controller.specs import (
    ADDED_COLUMNS,
    IN_PLACE_COLUMNS,
    LEGACY_SPEC_COLUMNS,
    REPLACING_COLUMNS,
    SPEC_COLUMNS,
    LeaseSpec,
    field_digests,
    legacy_spec_hash,
    settings_hash,
    spec_hash,
)

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
INSTANCE = "test"


def row(**fields: Any) -> dict[str, Any]:
    return LeaseSpec.model_validate({"name": "web", "snapshot": "base", **fields}).to_row()


class _Row:
    """What ``lease_view`` reads from a validated row."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.name = values["name"]
        self.desired_state = values["desired_state"]
        self.paused = False
        self.expires_at = None
        self.rollout_requested_at = None
        self.spec = {col: values.get(col) for col in SPEC_COLUMNS}
        self.schedule = lease_schedule(values.get("schedule"))
        self.created_at = None


def view(**fields: Any) -> planner.LeaseView:
    return lease_view(_Row(row(**fields)), INSTANCE, "workspace")  # type: ignore[arg-type]


def observed(lease: planner.LeaseView, state: str = "started", **labels: str) -> ObservedSandbox:
    return ObservedSandbox(id="sb-1", name="sb-one", state=state, labels={**lease.create.labels, **labels})


def recorded(lease: planner.LeaseView, **kw: Any) -> StatusView:
    return StatusView(
        sandbox_id="sb-1",
        phase="Ready",
        spec_hash=lease.spec_hash,
        workspace_path="/w",
        ready_at=NOW,
        spec_fields=dict(lease.fields),
        **kw,
    )


def decide(
    lease: planner.LeaseView, sb: ObservedSandbox, status: StatusView | None = None
) -> planner.Decision:
    result = plan([lease], {lease.name: status} if status else {}, [sb], NOW, instance=INSTANCE)
    return result.decisions[lease.name]


# -- classification ------------------------------------------------------------------------------


def test_every_spec_column_is_classified_once() -> None:
    assert set(REPLACING_COLUMNS) | set(IN_PLACE_COLUMNS) == set(SPEC_COLUMNS)
    assert not set(REPLACING_COLUMNS) & set(IN_PLACE_COLUMNS)
    assert tuple(planner.IN_PLACE_FIELDS) == IN_PLACE_COLUMNS
    # every in-place field has a setter of the provider boundary, and every setter serves a field
    assert set(planner.SETTER_OF) == set(IN_PLACE_COLUMNS)
    assert set(planner.SETTER_OF.values()) == set(SandboxUpdate.__dataclass_fields__)
    assert set(ADDED_COLUMNS) <= set(SPEC_COLUMNS)


@pytest.mark.parametrize("col", IN_PLACE_COLUMNS)
def test_in_place_fields_move_only_the_settings_hash(col: str) -> None:
    base = row(labels={"a": "1"}, auto_stop_interval=5, auto_archive_interval=60, auto_delete_interval=120)
    changed = {**base, col: {"a": "2"} if col == "labels" else 7}
    assert spec_hash(changed) == spec_hash(base)
    assert settings_hash(changed) != settings_hash(base)


@pytest.mark.parametrize("col", REPLACING_COLUMNS)
def test_replacing_fields_move_the_spec_hash(col: str) -> None:
    base = row()
    value: Any = {"K": "v"} if col == "env" else "python" if col == "language" else 3
    if col in ("snapshot", "image", "target"):
        value = "other"
    assert spec_hash({**base, col: value}) != spec_hash(base)


def test_a_schedule_change_neither_replaces_nor_updates_the_sandbox() -> None:
    """A schedule (issue 16) drives the desired state, not the sandbox: it is no spec column, so it
    moves neither hash nor any field digest, and a Ready sandbox whose lease only gained (or changed)
    a schedule is left as it is while the schedule keeps it running."""
    assert "schedule" not in SPEC_COLUMNS
    daily = {
        "timezone": "UTC",
        "entries": [{"cron": "0 8 * * *", "state": "running"}, {"cron": "0 18 * * *", "state": "stopped"}],
    }
    base, scheduled = row(), row(schedule=daily)
    assert scheduled["schedule"] is not None
    assert spec_hash(scheduled) == spec_hash(base)
    assert settings_hash(scheduled) == settings_hash(base)
    assert field_digests(scheduled) == field_digests(base)
    assert legacy_spec_hash(scheduled) == legacy_spec_hash(base)
    before, after = view(), view(schedule=daily)
    assert after.schedule is not None and before.schedule is None
    assert (after.spec_hash, after.settings_hash, after.fields) == (
        before.spec_hash,
        before.settings_hash,
        before.fields,
    )
    # Created under the old lease (no schedule), observed under the scheduled one: nothing to do at
    # 12:00, when the schedule keeps it running (08:00 fired last).
    decision = decide(after, observed(before), recorded(before))
    assert decision.action is None, decision
    assert decision.phase == "Ready"


def test_legacy_hash_is_the_old_all_columns_hash() -> None:
    import hashlib
    import json

    values = row(labels={"a": "1"}, env={"E": "x"}, auto_stop_interval=5)
    canonical = json.dumps(
        {col: values.get(col) for col in LEGACY_SPEC_COLUMNS},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    assert legacy_spec_hash(values) == hashlib.sha256(canonical.encode()).hexdigest()[:16]


def test_field_digests_never_hold_values() -> None:
    digests = field_digests(row(env={"TOKEN": "s3cret-value"}))
    assert set(digests) == set(SPEC_COLUMNS) - ADDED_COLUMNS  # added columns only when set
    assert "s3cret" not in repr(digests)


# -- planner ---------------------------------------------------------------------------------------


def test_label_change_is_an_update_in_place() -> None:
    old = view(labels={"team": "a"})
    new = view(labels={"team": "b"})
    sb = observed(old)
    decision = decide(new, sb, recorded(old))
    action = decision.action
    assert action is not None and action.kind == "update"
    assert action.reason.startswith("update labels in place")
    assert action.update is not None and action.update.setters == ("labels",)
    assert action.update.labels is not None
    assert action.update.labels["team"] == "b"
    assert action.update.labels[LABEL_SETTINGS] == new.settings_hash
    assert action.update.labels[LABEL_SPEC] == new.spec_hash
    assert decision.phase == "Ready"


def test_interval_change_calls_only_its_setter() -> None:
    old = view(auto_stop_interval=5)
    new = view(auto_stop_interval=30)
    action = decide(new, observed(old), recorded(old)).action
    assert action is not None and action.kind == "update"
    assert action.reason.startswith("update auto_stop_interval in place")
    assert action.update == SandboxUpdate(
        labels=action.update.labels if action.update else None, auto_stop_interval=30
    )


def test_unknown_record_sets_every_setter_with_daytona_defaults() -> None:
    old = view(auto_delete_interval=60)
    new = view()
    action = decide(new, observed(old)).action
    assert action is not None and action.kind == "update"
    assert action.update is not None
    assert action.update.setters == (
        "auto_stop_interval",
        "auto_archive_interval",
        "auto_delete_interval",
        "public",
        "network",
        "labels",
    )
    assert (action.update.auto_stop_interval, action.update.auto_archive_interval) == (0, 10080)
    assert action.update.auto_delete_interval == -1
    assert action.update.public is False and action.update.network == NetworkSettings()


def test_unset_added_fields_leave_every_hash_as_before() -> None:
    """Fields added by issue 15 that a lease does not set change no hash: an upgrade replaces nothing."""
    import hashlib
    import json

    values = row(labels={"a": "1"}, env={"E": "x"}, auto_stop_interval=5)

    def old(columns: tuple[str, ...]) -> str:
        kept = {c: values.get(c) for c in columns if c not in ADDED_COLUMNS}
        canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    assert spec_hash(values) == old(REPLACING_COLUMNS)
    assert settings_hash(values) == old(IN_PLACE_COLUMNS)
    assert not set(field_digests(values)) & ADDED_COLUMNS
    assert spec_hash({**values, "os_user": "agent"}) != spec_hash(values)
    assert settings_hash({**values, "public": False}) != settings_hash(values)


def test_public_and_network_changes_are_updates_with_their_setters() -> None:
    old = view()
    new = view(public=True, network_allow_list=["10.0.0.0/8"], domain_allow_list=["pypi.org"])
    action = decide(new, observed(old), recorded(old)).action
    assert action is not None and action.kind == "update", action
    assert action.reason.startswith("update public, network_allow_list, domain_allow_list in place")
    assert action.update is not None and action.update.setters == ("public", "network", "labels")
    assert action.update.public is True
    assert action.update.network == NetworkSettings(
        block_all=False, allow_list=("10.0.0.0/8",), domain_allow_list=("pypi.org",)
    )
    # and back: no policy is an unrestricted network, not "leave as is"
    back = decide(old, observed(new), recorded(new)).action
    assert back is not None and back.update is not None
    assert back.update.network == NetworkSettings() and back.update.public is False


def test_ephemeral_is_the_auto_delete_setter_and_pause_is_ordered_against_stop() -> None:
    old = view(auto_stop_interval=30)
    new = view(auto_pause_interval=60, ephemeral=False)
    action = decide(new, observed(old), recorded(old)).action
    assert action is not None and action.update is not None
    # stop goes to 0 before pause becomes non-zero (Daytona refuses both non-zero)
    assert action.update.setters == (
        "auto_stop_interval",
        "auto_pause_interval",
        "auto_delete_interval",
        "labels",
    )
    assert (action.update.auto_stop_interval, action.update.auto_pause_interval) == (0, 60)
    eph = decide(view(ephemeral=True), observed(old), recorded(old)).action
    assert eph is not None and eph.update is not None and eph.update.auto_delete_interval == 0
    assert view(ephemeral=True).ephemeral  # the planner's ephemeral rules apply


@pytest.mark.parametrize(
    ("field", "value"),
    [("os_user", "agent"), ("secrets", {"API_KEY": "prod-key"})],
)
def test_added_replacing_fields_replace_and_say_so(field: str, value: Any) -> None:
    old = view()
    new = view(**{field: value})
    action = decide(new, observed(old), recorded(old)).action
    assert action is not None and action.kind == "delete"
    assert action.reason.startswith(f"replace: {field} changed"), action.reason


def test_create_carries_daytonas_own_ttl_rounded_up_with_a_margin() -> None:
    lease = dataclasses.replace(view(), expires_at=NOW + timedelta(minutes=90, seconds=20))
    (action,) = plan([lease], {}, [], NOW, instance=INSTANCE).actions
    assert action.kind == "create" and action.create is not None
    assert action.create.ttl_minutes == 91 + planner.TTL_MARGIN_MINUTES
    assert plan([view()], {}, [], NOW, instance=INSTANCE).actions[0].create.ttl_minutes is None  # type: ignore[union-attr]


def test_image_change_replaces_and_says_so() -> None:
    old = view(image="python:3.11", snapshot=None)
    new = view(image="python:3.12", snapshot=None, labels={"x": "y"})
    action = decide(new, observed(old), recorded(old)).action
    assert action is not None and action.kind == "delete"
    assert action.reason.startswith("replace: image changed")


def test_platform_language_label_survives_an_update() -> None:
    old = view()
    new = view(labels={"k": "v"})
    action = decide(new, observed(old, **{"code-toolbox-language": "typescript"}), recorded(old)).action
    assert action is not None and action.update is not None and action.update.labels is not None
    assert action.update.labels["code-toolbox-language"] == "typescript"


@pytest.mark.parametrize("state", ["stopped", "archived"])
def test_update_applies_to_parked_sandboxes_too(state: str) -> None:
    old = view(labels={"team": "a"}, state="stopped")
    new = view(labels={"team": "b"}, state="stopped")
    action = decide(new, observed(old, state=state), recorded(old)).action
    assert action is not None and action.kind == "update"


def test_transitional_and_error_sandboxes_are_not_updated() -> None:
    old = view(labels={"team": "a"})
    new = view(labels={"team": "b"})
    for state in ("starting", "error"):
        action = decide(new, observed(old, state=state), recorded(old)).action
        assert action is None or action.kind != "update", state


def test_converged_sandbox_gets_no_update() -> None:
    lease = view(labels={"team": "a"}, auto_stop_interval=5)
    decision = decide(lease, observed(lease), recorded(lease))
    assert decision.action is None and decision.phase == "Ready"


# -- the upgrade from the all-fields hash ------------------------------------------------------


def _legacy_sandbox(lease: planner.LeaseView) -> ObservedSandbox:
    assert lease.legacy_spec_hash is not None
    user = {k: v for k, v in lease.create.labels.items() if not k.startswith("leasectl-")}
    labels = {**user, **ownership_labels(INSTANCE, lease.name, lease.legacy_spec_hash)}
    return ObservedSandbox(id="sb-1", name="sb-one", state="started", labels=labels)


def test_sandbox_of_an_older_leasectl_is_relabelled_not_replaced() -> None:
    lease = view(labels={"team": "a"}, env={"A": "1"}, auto_stop_interval=5)
    old_status = StatusView(
        sandbox_id="sb-1", phase="Ready", spec_hash=lease.legacy_spec_hash, workspace_path="/w"
    )
    decision = decide(lease, _legacy_sandbox(lease), old_status)
    action = decision.action
    assert action is not None and action.kind == "update", decision.message
    assert action.update is not None and action.update.setters == ("labels",)
    assert "older leasectl" in action.reason


def test_sandbox_of_an_older_leasectl_with_another_spec_is_replaced() -> None:
    before = view(image="python:3.11", snapshot=None)
    after = view(image="python:3.12", snapshot=None)
    action = decide(after, _legacy_sandbox(before)).action
    assert action is not None and action.kind == "delete"


def test_upgrade_end_to_end_with_the_memory_provider() -> None:
    """A fleet labelled by the old hash: one pass relabels every sandbox (same ids), the next is quiet."""
    provider = MemoryProvider()
    leases = [
        lease_view(
            _Row({**row(labels={"n": str(i)}, auto_stop_interval=i + 1), "name": f"web{i}"}), INSTANCE, "w"
        )  # type: ignore[arg-type]
        for i in range(3)
    ]
    for lease in leases:
        provider.create(dataclasses.replace(lease.create, labels=_legacy_sandbox(lease).labels))
    ids = {sb.id for sb in provider.sandboxes.values()}
    applier = Applier(provider, ApplierConfig())
    try:
        statuses: dict[str, StatusView] = {}
        first = plan(leases, statuses, provider.list_sandboxes({}), NOW, instance=INSTANCE)
        assert sorted(a.kind for a in first.actions) == ["update"] * 3
        outcomes = applier.apply(list(first.actions))
        assert all(o.ok for o in outcomes), [o.message for o in outcomes]
        second = plan(leases, statuses, provider.list_sandboxes({}), NOW, instance=INSTANCE)
        assert all(a.kind != "update" and a.kind != "delete" for a in second.actions)
    finally:
        applier.shutdown()
    assert {sb.id for sb in provider.sandboxes.values()} == ids
    assert provider.counters["delete"] == 0 and provider.counters["update"] == 3


# -- rollout -----------------------------------------------------------------------------------------


def test_rollout_replaces_a_sandbox_created_before_the_request_only() -> None:
    lease = dataclasses.replace(view(), rollout_requested_at=NOW)
    older = dataclasses.replace(observed(lease), created_at=NOW - timedelta(minutes=1))
    newer = dataclasses.replace(observed(lease), created_at=NOW + timedelta(seconds=1))
    action = decide(lease, older, recorded(lease)).action
    assert action is not None and action.kind == "delete" and action.reason.startswith("replace: rollout")
    assert decide(lease, newer, recorded(lease)).action is None
    stopped = dataclasses.replace(lease, desired_state="stopped")
    assert decide(stopped, dataclasses.replace(older, state="stopped"), recorded(lease)).action is None


def test_a_new_expires_at_re_anchors_daytonas_ttl_in_place() -> None:
    """Extending a lease must not let Daytona destroy the sandbox at the old ttl."""
    end = NOW + timedelta(hours=1)
    old = dataclasses.replace(view(expires_at=end), expires_at=end)
    later = NOW + timedelta(hours=5, seconds=1)
    new = dataclasses.replace(view(expires_at=later), expires_at=later)
    assert new.spec_hash == old.spec_hash and new.settings_hash != old.settings_hash
    action = decide(new, observed(old), recorded(old)).action
    assert action is not None and action.kind == "update"
    assert action.reason.startswith("update expires_at in place")
    assert action.update is not None and action.update.setters == ("ttl_minutes", "labels")
    assert action.update.ttl_minutes == 5 * 60 + 1 + planner.TTL_MARGIN_MINUTES
    gone = decide(view(), observed(old), recorded(old)).action  # no end any more: ttl off
    assert gone is not None and gone.update is not None and gone.update.ttl_minutes == 0
