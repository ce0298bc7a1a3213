"""The pure orphan finder (controller.gc.find_orphans): table-driven cases and Hypothesis properties.

Properties: a sandbox without this instance's label (or with another instance's) is never selected;
nothing is deletable before the grace has passed since max(first sighting, creation); after it,
exactly the orphans are deletable; sightings keep their first time across passes.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.gc import OrphanReport, Sighting, apply_sightings, find_orphans
from controller.providers.base import LABEL_INSTANCE, LABEL_LEASE, LABEL_SPEC, ObservedSandbox

ME = "prod"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
GRACE = 600.0
LEASES = frozenset({"alpha", "beta"})


def sb(
    sid: str,
    *,
    instance: str | None = ME,
    lease: str | None = None,
    state: str = "started",
    created: datetime | None = None,
    extra: dict[str, str] | None = None,
) -> ObservedSandbox:
    labels: dict[str, str] = dict(extra or {})
    if instance is not None:
        labels[LABEL_INSTANCE] = instance
    if lease is not None:
        labels[LABEL_LEASE] = lease
        labels[LABEL_SPEC] = "abc123"
    return ObservedSandbox(id=sid, name=f"name-{sid}", state=state, labels=labels, created_at=created)


def seen(sid: str, first: datetime, lease: str | None = None) -> Sighting:
    return Sighting(sid, f"name-{sid}", lease, "earlier", first, first)


def run(
    observed: list[ObservedSandbox],
    sightings: dict[str, Sighting] | None = None,
    now: datetime = T0,
    grace: float = GRACE,
) -> OrphanReport:
    return find_orphans(observed, LEASES, sightings or {}, now, instance=ME, grace_seconds=grace)


# -- table-driven ---------------------------------------------------------------------------------

OLD = T0 - timedelta(days=1)

CASES = [
    # (id, sandbox, sighting first seen (seconds before now) or None, expected status or None)
    ("wanted lease", sb("a", lease="alpha", created=OLD), None, None),
    ("wanted lease, stale sighting", sb("a", lease="alpha", created=OLD), 10_000, None),
    ("no instance label", sb("b", instance=None, lease="gone", created=OLD), 10_000, None),
    ("other instance", sb("c", instance="other", lease="gone", created=OLD), 10_000, None),
    ("other instance, no lease", sb("c", instance="other", created=OLD), 10_000, None),
    ("instance label case differs", sb("c", instance="PROD", lease="gone", created=OLD), 10_000, None),
    ("unlabelled", sb("d", instance=None, created=OLD), None, None),
    ("deleted lease, first sight", sb("e", lease="gone", created=OLD), None, "in_grace"),
    ("deleted lease, in grace", sb("e", lease="gone", created=OLD), 599, "in_grace"),
    ("deleted lease, grace exactly", sb("e", lease="gone", created=OLD), 600, "deletable"),
    ("deleted lease, past grace", sb("e", lease="gone", created=OLD), 10_000, "deletable"),
    ("ghost without lease label", sb("f", created=OLD), 10_000, "deletable"),
    ("ghost without lease label, first sight", sb("f", created=OLD), None, "in_grace"),
    (
        "created after first sight (clock skew)",
        sb("g", lease="gone", created=T0 - timedelta(seconds=100)),
        10_000,
        "in_grace",
    ),
    ("created in the future", sb("g", lease="gone", created=T0 + timedelta(seconds=5)), 10_000, "in_grace"),
    ("created unknown", sb("h", lease="gone", created=None), 10_000, "deletable"),
    ("destroying", sb("i", lease="gone", state="destroying", created=OLD), 10_000, "deleting"),
    ("destroyed is gone", sb("j", lease="gone", state="destroyed", created=OLD), 10_000, None),
    ("in error, past grace", sb("k", lease="gone", state="error", created=OLD), 10_000, "deletable"),
    ("unknown state, past grace", sb("k", lease="gone", state="weird", created=OLD), 10_000, "deletable"),
]


@pytest.mark.parametrize(
    ("sandbox", "first_ago", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_table(sandbox: ObservedSandbox, first_ago: int | None, expected: str | None) -> None:
    sightings = {} if first_ago is None else {sandbox.id: seen(sandbox.id, T0 - timedelta(seconds=first_ago))}
    report = run([sandbox], sightings)
    if expected is None:
        assert report.orphans == ()
        assert report.sightings == ()
        assert report.dropped == tuple(sightings)
    else:
        [orphan] = report.orphans
        assert orphan.status == expected
        assert orphan.sandbox == sandbox
        assert report.dropped == ()
        assert [s.sandbox_id for s in report.sightings] == [sandbox.id]
        assert (report.new_sightings != ()) == (first_ago is None)


def test_reasons_name_the_problem() -> None:
    report = run([sb("x", lease="gone"), sb("y")])
    reasons = {o.sandbox.id: o.reason for o in report.orphans}
    assert reasons == {"x": "lease 'gone' does not exist", "y": f"no {LABEL_LEASE} label"}


def test_new_sighting_starts_now_and_known_keeps_first_seen() -> None:
    first = T0 - timedelta(seconds=30)
    report = run([sb("n", lease="gone"), sb("k", lease="gone")], {"k": seen("k", first, "gone")})
    by_id = {s.sandbox_id: s for s in report.sightings}
    assert by_id["n"].first_seen_at == T0 and by_id["n"].last_seen_at == T0
    assert by_id["k"].first_seen_at == first and by_id["k"].last_seen_at == T0
    assert [s.sandbox_id for s in report.new_sightings] == ["n"]
    assert by_id["k"].reason == "lease 'gone' does not exist"


def test_age_and_remaining() -> None:
    report = run([sb("a", lease="gone", created=OLD)], {"a": seen("a", T0 - timedelta(seconds=200))})
    [orphan] = report.orphans
    assert orphan.orphaned_seconds == 200
    assert orphan.remaining_seconds == 400
    assert orphan.first_seen_at == T0 - timedelta(seconds=200)


def test_grace_zero_deletes_at_first_sight() -> None:
    report = run([sb("a", lease="gone", created=OLD), sb("b", instance="other")], grace=0)
    assert [o.sandbox.id for o in report.deletable] == ["a"]


def test_sightings_dropped_when_gone_or_wanted_again() -> None:
    sightings = {sid: seen(sid, OLD) for sid in ("gone", "wanted", "still")}
    report = run([sb("wanted", lease="alpha"), sb("still", lease="zzz")], sightings)
    assert report.dropped == ("gone", "wanted")
    assert [o.sandbox.id for o in report.orphans] == ["still"]


def test_naive_created_at_is_taken_as_utc() -> None:
    naive = (T0 - timedelta(seconds=100)).replace(tzinfo=None)
    report = run([sb("a", lease="gone", created=naive)], {"a": seen("a", OLD)}, grace=50)
    assert report.orphans[0].deletable


def test_grace_respected_across_passes() -> None:
    """The clock persists through apply_sightings (what the database holds between passes)."""
    sandbox = sb("a", lease="gone", created=OLD)
    sightings: dict[str, Sighting] = {}
    for offset in (0, 100, 599):
        report = run([sandbox], sightings, now=T0 + timedelta(seconds=offset))
        assert report.deletable == ()
        sightings = apply_sightings(sightings, report)
        assert sightings["a"].first_seen_at == T0
    report = run([sandbox], sightings, now=T0 + timedelta(seconds=600))
    assert [o.sandbox.id for o in report.deletable] == ["a"]


def test_clock_restarts_after_the_sandbox_was_wanted_again() -> None:
    sandbox = sb("a", lease="gone", created=OLD)
    sightings = apply_sightings({}, run([sandbox]))
    # the lease is re-created: not an orphan; the sighting goes
    names_with_gone = LEASES | {"gone"}
    report = find_orphans(
        [sandbox], names_with_gone, sightings, T0 + timedelta(seconds=300), instance=ME, grace_seconds=GRACE
    )
    assert report.dropped == ("a",)
    sightings = apply_sightings(sightings, report)
    later = run([sandbox], sightings, now=T0 + timedelta(seconds=700))
    assert later.deletable == ()
    assert later.orphans[0].first_seen_at == T0 + timedelta(seconds=700)


def test_duplicates_of_an_existing_lease_are_not_orphans() -> None:
    report = run([sb("a", lease="alpha"), sb("b", lease="alpha")], grace=0)
    assert report.orphans == ()


def test_repeated_items_are_reported_once() -> None:
    report = run([sb("a", lease="gone"), sb("a", lease="gone")], grace=0)
    assert len(report.orphans) == 1 and len(report.sightings) == 1


# -- Hypothesis -----------------------------------------------------------------------------------

instances = st.sampled_from([ME, "other", None, "prod-2", ""])
lease_labels = st.sampled_from(["alpha", "beta", "gone", "ghost", None])
offsets = st.integers(min_value=-3_600, max_value=7 * 86_400)


@st.composite
def sandboxes(draw: st.DrawFn) -> ObservedSandbox:
    sid = draw(st.text("abcdef0123", min_size=1, max_size=4))
    created = draw(st.one_of(st.none(), offsets.map(lambda s: T0 - timedelta(seconds=s))))
    extra = draw(st.dictionaries(st.sampled_from(["team", "leasectl-other", "env"]), st.text(max_size=3)))
    return sb(
        sid,
        instance=draw(instances),
        lease=draw(lease_labels),
        state=draw(st.sampled_from(["started", "stopped", "error", "archived", "creating", "unknown"])),
        created=created,
        extra=extra,
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[ObservedSandbox], dict[str, Sighting], datetime, float]:
    observed = draw(st.lists(sandboxes(), max_size=12))
    ids = sorted({s.id for s in observed} | set(draw(st.lists(st.text("xyz", min_size=1, max_size=3)))))
    sightings = {}
    for sid in draw(st.lists(st.sampled_from(ids), unique=True)) if ids else []:
        first = T0 - timedelta(seconds=draw(offsets))
        sightings[sid] = Sighting(sid, None, None, "r", first, first)
    now = T0 + timedelta(seconds=draw(st.integers(min_value=0, max_value=86_400)))
    grace = float(draw(st.integers(min_value=0, max_value=3 * 86_400)))
    return observed, sightings, now, grace


def _is_orphan(s: ObservedSandbox) -> bool:
    return s.labels.get(LABEL_INSTANCE) == ME and s.labels.get(LABEL_LEASE) not in LEASES


@settings(max_examples=400)
@given(scenarios())
def test_never_selects_a_sandbox_that_is_not_ours(
    scenario: tuple[list[ObservedSandbox], dict[str, Sighting], datetime, float],
) -> None:
    observed, sightings, now, grace = scenario
    report = find_orphans(observed, LEASES, sightings, now, instance=ME, grace_seconds=grace)
    for orphan in report.orphans:
        assert orphan.sandbox.labels.get(LABEL_INSTANCE) == ME
        assert orphan.sandbox.labels.get(LABEL_LEASE) not in LEASES
    not_ours = {s.id for s in observed if s.labels.get(LABEL_INSTANCE) != ME}
    ours = {s.id for s in observed if s.labels.get(LABEL_INSTANCE) == ME}
    listed = {o.sandbox.id for o in report.orphans} | {s.sandbox_id for s in report.sightings}
    assert not (listed & (not_ours - ours))


@settings(max_examples=400)
@given(scenarios())
def test_never_deletable_before_grace(
    scenario: tuple[list[ObservedSandbox], dict[str, Sighting], datetime, float],
) -> None:
    observed, sightings, now, grace = scenario
    report = find_orphans(observed, LEASES, sightings, now, instance=ME, grace_seconds=grace)
    for orphan in report.deletable:
        known = sightings.get(orphan.sandbox.id)
        first = known.first_seen_at if known else now
        assert now - first >= timedelta(seconds=grace)
        created = orphan.sandbox.created_at
        if created is not None:
            assert now - created >= timedelta(seconds=grace)


@settings(max_examples=400)
@given(scenarios())
def test_selects_exactly_the_orphans_past_grace(
    scenario: tuple[list[ObservedSandbox], dict[str, Sighting], datetime, float],
) -> None:
    observed, sightings, now, grace = scenario
    report = find_orphans(observed, LEASES, sightings, now, instance=ME, grace_seconds=grace)
    # first occurrence of each id wins, as in a paginated list that repeated an item
    first_by_id: dict[str, ObservedSandbox] = {}
    for s in sorted(observed, key=lambda s: s.id):
        first_by_id.setdefault(s.id, s)
    expected_orphans = {sid for sid, s in first_by_id.items() if _is_orphan(s) and s.state != "destroyed"}
    assert {o.sandbox.id for o in report.orphans} == expected_orphans
    expected_deletable = set()
    for sid in expected_orphans:
        s = first_by_id[sid]
        start = sightings[sid].first_seen_at if sid in sightings else now
        if s.created_at is not None:
            start = max(start, s.created_at)
        if (now - start).total_seconds() >= grace:
            expected_deletable.add(sid)
    assert {o.sandbox.id for o in report.deletable} == expected_deletable
    # sighting bookkeeping: one per orphan, first_seen kept, the rest dropped
    assert {r.sandbox_id for r in report.sightings} == expected_orphans
    assert set(report.dropped) == set(sightings) - expected_orphans
    for recorded in report.sightings:
        assert recorded.last_seen_at == now
        assert recorded.first_seen_at == (
            sightings[recorded.sandbox_id].first_seen_at if recorded.sandbox_id in sightings else now
        )
    assert {r.sandbox_id for r in report.new_sightings} == expected_orphans - set(sightings)


@settings(max_examples=200)
@given(st.lists(sandboxes(), max_size=10), st.integers(min_value=1, max_value=3_600))
def test_first_pass_with_positive_grace_deletes_nothing(observed: list[ObservedSandbox], grace: int) -> None:
    report = find_orphans(observed, LEASES, {}, T0, instance=ME, grace_seconds=float(grace))
    assert report.deletable == ()


@settings(max_examples=200)
@given(
    st.lists(sandboxes(), max_size=10),
    st.integers(min_value=1, max_value=3_600),
    st.lists(st.integers(min_value=0, max_value=900), max_size=6),
)
def test_sightings_persist_across_passes(
    observed: list[ObservedSandbox], grace: int, steps: list[int]
) -> None:
    """Replaying passes through apply_sightings never makes anything deletable earlier."""
    sightings: dict[str, Sighting] = {}
    now = T0
    first_seen: dict[str, datetime] = {}
    for step in [0, *steps]:
        now += timedelta(seconds=step)
        report = find_orphans(observed, LEASES, sightings, now, instance=ME, grace_seconds=float(grace))
        for s in report.sightings:
            first_seen.setdefault(s.sandbox_id, s.first_seen_at)
            assert s.first_seen_at == first_seen[s.sandbox_id] == T0
        for orphan in report.deletable:
            assert now - first_seen[orphan.sandbox.id] >= timedelta(seconds=grace)
        sightings = apply_sightings(sightings, report)
