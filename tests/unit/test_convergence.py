"""Property: plan -> apply -> observe against the memory provider converges, touching only what is ours.

The loop below stands in for ``controller.reconciler`` (status rows in a dict, merged the way the
reconciler merges ``Decision.status_values()`` and ``Outcome.status_values()``, with the create attempt
recorded in ``before_create``). The clock moves by more than the back-off cap between passes, so a
back-off delays an action by exactly one pass.

Bound: every live sandbox that must go costs one pass (a delete), two with list lag (the list still
shows it for one pass after the delete; the second delete is a harmless no-op). Bringing a lease to
Ready then costs at most create + lookup (only with lag: the new sandbox is missing from the list) +
realize_workspace, and one final pass finds nothing to do: 4. So with at most ``n`` pre-existing
sandboxes per lease (leases progress in parallel): passes <= 2 * n + 4, plus two per injected
transient fault (the failed pass, and one more in case the retry lands in a pass the lease would
otherwise have used for its next step). Back-off never costs more: the clock outruns the cap.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.applier import Applier, ApplierConfig
from controller.errors import TransientError
from controller.planner import (
    Action,
    LeaseView,
    StatusView,
    build_create_request,
    ownership_labels,
    plan,
    sandbox_name,
)
from controller.providers.base import LABEL_INSTANCE, ObservedSandbox
from controller.providers.memory import MemoryProvider

INSTANCE = "me"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
STEP = 10.0  # seconds between passes: more than the back-off cap below
SPECS = ("spec0000aaaa", "spec1111bbbb")
SEED_STATES = (
    "started",
    "stopped",
    "archived",
    "paused",
    "error",
    "error-recoverable",
    "build_failed",
    "starting",
    "unknown",
)
FAULT_OPS = ("create", "start", "stop", "archive", "delete", "get", "work_dir", "make_dir", "recover")
STATUS_FIELDS = {f.name for f in dataclasses.fields(StatusView)}


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def monotonic(self) -> float:
        return self.t

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.t)

    def sleep(self, seconds: float) -> None:
        self.t += seconds


lease_st = st.fixed_dictionaries(
    {
        "desired": st.sampled_from(["running", "stopped", "archived", "absent"]),
        "spec": st.sampled_from(SPECS),
        "paused": st.booleans(),
        "expiry": st.sampled_from([None, None, "past", "future"]),
        "seeds": st.lists(st.tuples(st.sampled_from(SEED_STATES), st.sampled_from(SPECS)), max_size=3),
        "foreign": st.sampled_from([None, "other-instance", "unlabelled"]),
    }
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    leases=st.lists(lease_st, min_size=1, max_size=6),
    orphans=st.integers(0, 2),
    lag=st.booleans(),
    faults=st.lists(st.sampled_from(FAULT_OPS), max_size=3),
    build_fails=st.integers(0, 1),
    seed=st.integers(0, 2**16),
)
def test_converges_and_never_touches_foreign_sandboxes(
    leases: list[dict[str, Any]], orphans: int, lag: bool, faults: list[str], build_fails: int, seed: int
) -> None:
    clock = Clock()
    provider = MemoryProvider(clock=clock.monotonic, list_lag=1.5 * STEP if lag else 0.0)
    applier = Applier(
        provider,
        ApplierConfig(backoff_base_seconds=1, backoff_max_seconds=STEP / 2, api_rate_per_second=1e9),
        clock=clock.now,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        rng=random.Random(seed),
    )
    views: list[LeaseView] = []
    foreign_ids: set[str] = set()
    paused_ids: set[str] = set()
    n = 0
    for i, spec in enumerate(leases):
        name = f"lease-{i}"
        expires = {None: None, "past": T0 - timedelta(hours=1), "future": T0 + timedelta(days=1)}[
            spec["expiry"]
        ]
        views.append(
            LeaseView(
                name=name,
                desired_state=spec["desired"],
                spec_hash=spec["spec"],
                paused=spec["paused"],
                expires_at=expires,
                create=build_create_request(INSTANCE, name, spec["spec"], {"snapshot": "base"}),
            )
        )
        for state, sb_spec in spec["seeds"]:
            n += 1
            real_state = state.removesuffix("-recoverable")
            sb = provider.add_sandbox(
                f"seed-{n}",
                ownership_labels(INSTANCE, name, sb_spec),
                real_state,
                created_at=-1000.0 - n,  # long before the list lag
                recoverable=state.endswith("-recoverable"),
                error_reason="seeded" if real_state in ("error", "build_failed") else None,
            )
            if spec["paused"]:
                paused_ids.add(sb.id)
        if spec["foreign"] == "other-instance":
            foreign_ids.add(
                provider.add_sandbox(f"other-{i}", ownership_labels("other", name, spec["spec"])).id
            )
        elif spec["foreign"] == "unlabelled":
            foreign_ids.add(provider.add_sandbox(f"plain-{i}", {"leasectl-lease": name}, "stopped").id)
    orphan_ids = {
        provider.add_sandbox(f"orphan-{k}", ownership_labels(INSTANCE, f"gone-{k}", SPECS[0])).id
        for k in range(orphans)
    }
    for op in faults:
        provider.fail_next(op, TransientError(f"injected {op} failure"))
    provider.script_create("build_failed", reason="scripted", times=build_fails)

    statuses: dict[str, StatusView] = {}

    def record_attempt(action: Action) -> None:
        old = statuses.get(action.lease_name, StatusView())
        statuses[action.lease_name] = dataclasses.replace(
            old, create_attempt_name=action.sandbox_name, create_attempt_at=clock.now(), phase="Provisioning"
        )

    per_lease = max((len(s["seeds"]) for s in leases), default=0)
    bound = 2 * per_lease + 4 + 2 * len(faults)
    by_name = {v.name: v for v in views}
    passes = 0
    while True:
        assert passes <= bound, f"not converged after {bound} passes: {statuses}"
        passes += 1
        observed = provider.list_sandboxes({LABEL_INSTANCE: INSTANCE})
        the_plan = plan(views, statuses, observed, clock.now(), instance=INSTANCE)
        if not the_plan.actions:
            break
        assert len({a.lease_name for a in the_plan.actions}) == len(the_plan.actions)
        outcomes = {
            o.action.lease_name: o for o in applier.apply(the_plan.actions, before_create=record_attempt)
        }
        for name, decision in the_plan.decisions.items():
            values = decision.status_values()
            if name in outcomes:
                values.update(outcomes[name].status_values(by_name[name]))
            old = statuses.get(name, StatusView())
            statuses[name] = dataclasses.replace(
                old, **{k: v for k, v in values.items() if k in STATUS_FIELDS}
            )
        clock.t += STEP

    # Never touched: every call names one of ours (or a name we were about to create).
    ours = {"me"}
    for op, key in provider.calls:
        if op == "list":
            continue
        target = provider.find_any(key)
        if target is None:
            continue  # a lookup of a recorded name that does not exist
        assert target.labels.get(LABEL_INSTANCE) in ours, (op, key)
        assert target.id not in foreign_ids | orphan_ids | paused_ids, (op, key)
    for sid in foreign_ids | orphan_ids:
        assert sid in provider.sandboxes  # still there, untouched

    # Converged: the fleet matches the desired state (where the planner may act at all).
    live = list(provider.sandboxes.values())
    final = {
        d.lease_name: d
        for d in plan(
            views, statuses, provider.list_sandboxes({}), clock.now(), instance=INSTANCE
        ).decisions.values()
    }
    for view in views:
        mine = [
            sb
            for sb in live
            if sb.labels.get("leasectl-lease") == view.name and sb.labels.get(LABEL_INSTANCE) == INSTANCE
        ]
        phase = final[view.name].phase
        if view.paused:
            assert phase == "Paused"
            continue
        waiting = any(sb.state in ("starting", "unknown") for sb in mine)
        desired = (
            "absent" if view.expires_at is not None and view.expires_at <= clock.now() else view.desired_state
        )
        if desired == "absent":
            assert mine == [] and phase == "Deleted"
        elif waiting:
            assert len(mine) == 1  # duplicates go even while one waits
        elif desired == "running":
            assert len(mine) == 1, mine
            sb = mine[0]
            if phase == "Failed":
                assert sb.state == "build_failed"
            else:
                assert (phase, sb.state, sb.labels["leasectl-spec"]) == ("Ready", "started", view.spec_hash)
                assert sb.name == sandbox_name(INSTANCE, view.name, view.spec_hash) or sb.name.startswith(
                    "seed-"
                )
                assert statuses[view.name].workspace_path in sb.dirs
        else:
            assert len(mine) <= 1
            if mine:
                sb = mine[0]
                ok = {"stopped": {"stopped", "paused", "archived"}, "archived": {"archived"}}[desired]
                assert sb.state in ok | {"error", "build_failed"}, (desired, sb.state)
            assert phase in {"Stopped", "Archived", "Error", "Failed"}


def test_a_converged_fleet_makes_only_list_calls() -> None:
    clock = Clock()
    provider = MemoryProvider(clock=clock.monotonic)
    applier = Applier(provider, clock=clock.now, monotonic=clock.monotonic, sleep=clock.sleep)
    views = [
        LeaseView(f"l{i}", d, "s", build_create_request(INSTANCE, f"l{i}", "s", {}))
        for i, d in enumerate(["running", "stopped", "archived", "absent"] * 5)
    ]
    statuses: dict[str, StatusView] = {}
    for _ in range(8):
        the_plan = plan(
            views,
            statuses,
            provider.list_sandboxes({LABEL_INSTANCE: INSTANCE}),
            clock.now(),
            instance=INSTANCE,
        )
        outcomes = {o.action.lease_name: o for o in applier.apply(the_plan.actions)}
        for name, decision in the_plan.decisions.items():
            values = decision.status_values()
            if name in outcomes:
                values.update(outcomes[name].status_values())
            statuses[name] = dataclasses.replace(statuses.get(name, StatusView()), **values)
        clock.t += 60
    before = len(provider.calls)
    observed: list[ObservedSandbox] = provider.list_sandboxes({LABEL_INSTANCE: INSTANCE})
    assert not plan(views, statuses, observed, clock.now(), instance=INSTANCE).actions
    assert provider.calls[before:] == [("list", "")]
    assert sorted(sb.state for sb in observed) == ["started"] * 5
