"""Quotas (controller.quotas): the gate after the planner, its order, and the property that what runs
never exceeds a quota whatever the order of passes; quota validation at apply (controller.specs)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.errors import SpecError
from controller.planner import BLOCKED, LeaseView, StatusView, build_create_request, plan
from controller.providers.base import LABEL_LEASE, ObservedSandbox
from controller.quotas import DIMENSIONS, GROWING, QuotaView, Resources, gate, runs, usage
from controller.specs import parse_quotas

NOW = datetime(2026, 11, 27, 12, tzinfo=UTC)
INSTANCE = "test"


def lease(name: str, team: str = "a", *, age: int = 0, cpu: int = 1, desired: str = "running") -> LeaseView:
    spec = {"image": "python:3.12", "cpu": cpu, "memory": 1, "disk": 3, "labels": {"team": team}}
    return LeaseView(
        name=name,
        desired_state=desired,
        spec_hash="s" * 16,
        create=build_create_request(INSTANCE, name, "s" * 16, spec),
        created_at=NOW - timedelta(minutes=100 - age),
    )


def sandbox(the_lease: LeaseView, state: str = "started") -> ObservedSandbox:
    req = the_lease.create
    return ObservedSandbox(id=f"sb-{the_lease.name}", name=req.name, state=state, labels=dict(req.labels))


def gated(
    leases: list[LeaseView], observed: list[ObservedSandbox], quotas: list[QuotaView], statuses: Any = None
) -> Any:
    statuses = statuses or {}
    raw = plan(leases, statuses, observed, NOW, instance=INSTANCE)
    return gate(raw, leases, statuses, observed, quotas, lease_label=LABEL_LEASE)


def grown(result: Any) -> list[tuple[str, str]]:
    return [(a.kind, a.lease_name) for a in result.actions if a.kind in GROWING]


def test_the_third_lease_of_a_team_waits_with_the_quota_and_its_use_named() -> None:
    one, two, three = lease("one", age=1), lease("two", age=2), lease("three", age=3)
    result = gated([one, two, three], [sandbox(one), sandbox(two)], [QuotaView("team", "a", sandboxes=2)])
    assert grown(result) == []
    decision = result.decisions["three"]
    assert decision.phase == BLOCKED
    assert decision.message == "Blocked: quota team=a sandboxes: 2/2 in use, this lease needs 1; then: create"
    # When the first stops, the third goes.
    one = lease("one", age=1, desired="stopped")
    after = gated(
        [one, two, three], [sandbox(one, "stopped"), sandbox(two)], [QuotaView("team", "a", sandboxes=2)]
    )
    assert grown(after) == [("create", "three")]


def test_oldest_lease_first_and_later_ones_wait_behind_it() -> None:
    big = lease("zz-big", age=1, cpu=4)
    small = lease("aa-small", age=2, cpu=1)
    running = lease("run", age=0, cpu=2)
    quotas = [QuotaView("team", "", cpu=4)]
    result = gated([big, small, running], [sandbox(running)], quotas)
    # big (older) does not fit 2 + 4 > 4; small would fit but waits behind it: no starvation of big.
    assert grown(result) == []
    assert "cpu: 2/4 CPU in use, this lease needs 4" in result.decisions["zz-big"].message
    assert "waiting behind zz-big" in result.decisions["aa-small"].message


def test_a_lease_that_can_never_fit_does_not_hold_the_line() -> None:
    huge = lease("huge", age=1, cpu=16)
    small = lease("small", age=2, cpu=1)
    result = gated([huge, small], [], [QuotaView(cpu=8)])
    assert [a.lease_name for a in result.actions] == ["small"]
    assert "needs 16 CPU, more than the limit of 8" in result.decisions["huge"].message


def test_each_value_of_a_label_has_its_own_quota_and_the_instance_one_applies_to_all() -> None:
    leases = [lease(f"{team}{i}", team, age=i) for team in ("a", "b") for i in range(3)]
    quotas = [QuotaView("team", "", sandboxes=2), QuotaView(sandboxes=3)]
    result = gated(leases, [], quotas)
    # a0, b0, a1, b1 by age order: a0 (age 0), b0 (age 0), a1, b1... instance allows 3.
    admitted = [a.lease_name for a in result.actions]
    assert len(admitted) == 3
    per_team = {t: sum(1 for n in admitted if n.startswith(t)) for t in "ab"}
    assert max(per_team.values()) <= 2


def test_a_create_the_list_does_not_show_yet_counts() -> None:
    one, two = lease("one", age=1), lease("two", age=2)
    statuses = {"one": StatusView(create_attempt_name=one.create.name, phase="Provisioning")}
    result = gated([one, two], [], [QuotaView("team", "a", sandboxes=1)], statuses)
    assert result.actions[0].kind == "lookup"  # one is looked up, not created again
    assert result.decisions["two"].phase == BLOCKED


def test_stopping_is_never_gated_and_unlabelled_leases_ignore_label_quotas() -> None:
    one = lease("one", desired="stopped")
    other = lease("other", team="b")
    result = gated([one, other], [sandbox(one)], [QuotaView("team", "a", sandboxes=0)])
    assert sorted((a.kind, a.lease_name) for a in result.actions) == [("create", "other"), ("stop", "one")]


# -- the property ----------------------------------------------------------------------------------

QUOTAS = [
    QuotaView("team", "", sandboxes=2, cpu=5),
    QuotaView("team", "a", memory=3),
    QuotaView(cpu=9, sandboxes=5),
]


def _applies(quota: QuotaView, scope: str) -> bool:
    if not quota.label:
        return scope == "instance"
    return scope.startswith(f"{quota.label}=") and (
        not quota.value or scope == f"{quota.label}={quota.value}"
    )


def _check(observed: dict[str, ObservedSandbox], leases: dict[str, LeaseView]) -> None:
    running = [sb for sb in observed.values() if runs(sb.state)]
    use = usage(QUOTAS, list(leases.values()), {}, running, lease_label=LABEL_LEASE)
    for quota in QUOTAS:
        for scope, held in use.items():
            if not _applies(quota, scope):
                continue
            for dim in DIMENSIONS:
                limit = quota.limit(dim)
                assert limit is None or held.get(dim) <= limit, (quota, scope, dim, held)


@settings(max_examples=60, deadline=None)
@given(
    specs=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(1, 4)), min_size=1, max_size=9),
    steps=st.lists(
        st.tuples(st.sampled_from(["pass", "flip", "settle", "crash"]), st.integers(0, 8), st.randoms()),
        max_size=40,
    ),
)
def test_what_runs_never_exceeds_a_quota_whatever_the_order_of_passes(specs: Any, steps: Any) -> None:
    """Passes in any order with desired states flipping, sandboxes settling late (creating/starting
    count), actions lost before they ran and actions run in any order within a pass."""
    leases = {f"l{i}": lease(f"l{i}", team, age=i, cpu=cpu) for i, (team, cpu) in enumerate(specs)}
    observed: dict[str, ObservedSandbox] = {}
    for kind, index, rnd in steps:
        name = f"l{index % len(leases)}"
        if kind == "flip":
            current = leases[name]
            leases[name] = LeaseView(
                name=current.name,
                desired_state="stopped" if current.desired_state == "running" else "running",
                spec_hash=current.spec_hash,
                create=current.create,
                created_at=current.created_at,
            )
        elif kind == "settle":
            for key, sb in list(observed.items()):
                if sb.state in ("creating", "starting"):
                    observed[key] = ObservedSandbox(sb.id, sb.name, "started", sb.labels)
                elif sb.state == "stopping":
                    observed[key] = ObservedSandbox(sb.id, sb.name, "stopped", sb.labels)
        else:
            result = gated(list(leases.values()), list(observed.values()), QUOTAS)
            actions = list(result.actions)
            rnd.shuffle(actions)
            for action in actions:
                if kind == "crash" and rnd.random() < 0.5:
                    continue  # lost: the process died before the call
                the_lease = leases[action.lease_name]
                if action.kind == "create":
                    observed[action.lease_name] = sandbox(the_lease, "creating")
                elif action.kind == "start":
                    observed[action.lease_name] = sandbox(the_lease, "starting")
                elif action.kind == "stop":
                    observed[action.lease_name] = sandbox(the_lease, "stopping")
        _check(observed, leases)
        for sb in observed.values():  # what runs is exactly what passes admitted
            assert sb.state in ("creating", "starting", "started", "stopping", "stopped")


# -- validation at apply ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"label": "team", "cpu": -1}, "quotas[0]: cpu: Input should be greater than or equal to 0"),
        ({"label": "team", "cpu": "8"}, "quotas[0]: cpu: Input should be a valid integer"),
        ({"label": "team", "sandboxes": True}, "quotas[0]: sandboxes: Input should be a valid integer"),
        ({"value": "ml", "cpu": 1}, "quotas[0]: value: a value needs a label"),
        ({"label": "team"}, "quotas[0]: (quota): give at least one limit"),
        ({"label": "leasectl-lease", "cpu": 1}, "quotas[0]: label: Value error, label 'leasectl-lease' uses"),
        ({"label": "team", "cpus": 1}, "quotas[0]: cpus: unknown field"),
    ],
)
def test_bad_quotas_are_refused_naming_file_entry_and_field(item: dict[str, Any], expected: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_quotas({"quotas": [item]}, "q.yaml")
    assert str(caught.value).startswith(f"q.yaml: {expected}")


def test_quotas_parse_into_scopes() -> None:
    quotas = parse_quotas({"quotas": [{"label": "team", "value": "ml", "gpu": 0}, {"cpu": 100}]}, "q.yaml")
    assert quotas is not None
    assert [q.scope for q in quotas] == ["team=ml", "instance"]
    assert parse_quotas({"leases": []}, "q.yaml") is None
    assert Resources(1, 2, 3, 4, 5) + Resources(1, 1, 1, 1, 1) == Resources(2, 3, 4, 5, 6)
