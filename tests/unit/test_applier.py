"""The applier (controller.applier) against the memory provider: limits, exclusivity, 429, back-off, hooks."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.applier import Applier, ApplierConfig, Outcome, TokenBucket
from controller.errors import (
    ConflictError,
    NotFoundError,
    NotLeaderError,
    PermanentError,
    RateLimitedError,
    TransientError,
)
from controller.planner import Action, build_create_request, ownership_labels
from controller.providers.memory import MemoryProvider

INSTANCE = "t"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


class FakeClock:
    """Monotonic seconds and a matching UTC wall clock; ``sleep`` advances both at once."""

    def __init__(self) -> None:
        self.t = 0.0
        self.lock = threading.Lock()
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        with self.lock:
            return self.t

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.monotonic())

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.sleeps.append(seconds)
            self.t += seconds


def applier(provider: MemoryProvider, clock: FakeClock | None = None, **cfg: Any) -> Applier:
    clock = clock or FakeClock()
    return Applier(
        provider,
        ApplierConfig(**cfg),
        clock=clock.now,
        monotonic=clock.monotonic,
        sleep=clock.sleep,
        rng=random.Random(7),
    )


def seed(provider: MemoryProvider, lease: str, state: str = "stopped") -> str:
    return provider.add_sandbox(f"sb-{lease}", ownership_labels(INSTANCE, lease, "s"), state).id


def replace_failures(action: Action, failures: int) -> Action:
    return dataclasses.replace(action, failures=failures)


def act(kind: str, lease: str, sandbox_id: str | None = None, **kw: Any) -> Action:
    return Action(
        kind=kind, lease_name=lease, reason=f"{kind} {lease}", sandbox_id=sandbox_id, instance=INSTANCE, **kw
    )


def create_action(lease: str, failures: int = 0) -> Action:
    req = build_create_request(INSTANCE, lease, "s", {"snapshot": "base"})
    return act("create", lease, sandbox_name=req.name, create=req, spec_hash="s", failures=failures)


# -- the happy paths -----------------------------------------------------------------------------


def test_every_kind_against_the_provider() -> None:
    p = MemoryProvider(work_dir="/home/daytona")
    a = applier(p)
    stopped, started, errored, doomed = (
        seed(p, n, s) for n, s in [("a", "stopped"), ("b", "started"), ("c", "error"), ("d", "started")]
    )
    p.fall_into_error(errored, recoverable=True)
    outcomes = a.apply(
        [
            act("start", "a", stopped),
            act("realize_workspace", "b", started, workspace_dir="workspace"),
            act("recover", "c", errored, penalize=True, failures=1),
            act("delete", "d", doomed),
            create_action("e"),
        ]
    )
    assert all(o.ok for o in outcomes), [o.message for o in outcomes]
    assert p.sandboxes[stopped].state == "started"
    assert p.sandboxes[started].dirs == {"/home/daytona/workspace"}
    assert outcomes[1].workspace_path == "/home/daytona/workspace"
    assert outcomes[1].status_values()["phase"] == "Ready"
    assert p.sandboxes[errored].state == "started"
    assert outcomes[2].failures == 2 and outcomes[2].next_attempt_at is not None  # penalized
    assert doomed not in p.sandboxes
    assert outcomes[4].sandbox is not None and outcomes[4].sandbox_id == outcomes[4].sandbox.id
    values = outcomes[4].status_values()
    assert values["sandbox_id"] == outcomes[4].sandbox.id and values["spec_hash"] == "s"
    assert values["failures"] == 0 and values["next_attempt_at"] is None


def test_absolute_workspace_dir_skips_work_dir_call() -> None:
    p = MemoryProvider()
    sid = seed(p, "a", "started")
    [o] = applier(p).apply([act("realize_workspace", "a", sid, workspace_dir="/srv/ws/")])
    assert o.workspace_path == "/srv/ws" and p.counters["work_dir"] == 0


def test_delete_not_found_is_success() -> None:
    p = MemoryProvider()
    p.fail_next("delete", NotFoundError("gone"))
    [o] = applier(p).apply([act("delete", "a", "sb-x")])
    assert o.ok and "already gone" in (o.message or "")
    assert o.status_values()["sandbox_id"] is None


def test_duplicate_delete_keeps_the_record() -> None:
    p = MemoryProvider()
    sid = seed(p, "a")
    [o] = applier(p).apply([act("delete", "a", sid, duplicate=True)])
    assert o.ok and "sandbox_id" not in o.status_values()


def test_lookup_by_id_then_name_and_never_adopts_foreign() -> None:
    p = MemoryProvider()
    ours = seed(p, "a")
    [found] = applier(p).apply([act("lookup", "a", "missing-id", lookup_name="sb-a")])
    assert found.ok and found.sandbox is not None and found.sandbox.id == ours
    assert found.status_values()["create_attempt_name"] is None
    assert p.calls[-2:] == [("get", "missing-id"), ("get", "sb-a")]
    p.add_sandbox("foreign", {"leasectl-instance": "other", "leasectl-lease": "b"})
    [none] = applier(p).apply([act("lookup", "b", None, lookup_name="foreign")])
    assert none.ok and none.sandbox is None
    assert none.status_values()["sandbox_id"] is None


# -- errors and back-off ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (TransientError("503"), "transient"),
        (ConflictError("busy"), "conflict"),
        (PermanentError("400"), "permanent"),
        (NotFoundError("404"), "not_found"),
        (RuntimeError("bug"), "error"),
    ],
)
def test_errors_become_outcomes(error: Exception, kind: str) -> None:
    p = MemoryProvider()
    sid = seed(p, "a")
    p.fail_next("start", error)
    [o] = applier(p).apply([act("start", "a", sid, failures=2)])
    assert (o.ok, o.error_kind, o.failures) == (False, kind, 3)
    assert o.next_attempt_at is not None and o.next_attempt_at > o.finished_at
    values = o.status_values()
    assert values["phase"] == "Error" and values["failures"] == 3 and kind in values["message"]


def test_permanent_create_failure_marks_the_spec_failed() -> None:
    p = MemoryProvider()
    p.fail_next("create", PermanentError("snapshot not found"))
    [o] = applier(p).apply([create_action("a")])
    assert o.permanent
    values = o.status_values()
    assert values["phase"] == "Failed" and values["failed_spec_hash"] == "s"
    assert values["create_attempt_name"] is None


def test_create_whose_answer_was_lost_is_found_by_name_and_adopted() -> None:
    p = MemoryProvider()
    p.fail_next("create", TransientError("timed out"), after_effect=True)
    [o] = applier(p).apply([create_action("a")])
    [sb] = p.sandboxes.values()
    assert o.ok and o.sandbox is not None and o.sandbox.id == sb.id
    assert p.calls[-1] == ("get", sb.name)  # one lookup by the deterministic name
    values = o.status_values()
    assert values["sandbox_id"] == sb.id and values["failures"] == 0


def test_transient_create_failure_keeps_the_create_attempt_when_the_lookup_fails_too() -> None:
    p = MemoryProvider()
    p.fail_next("create", TransientError("timed out"), after_effect=True)
    p.fail_next("get", TransientError("connection reset"))
    [o] = applier(p).apply([create_action("a")])
    assert not o.ok and "create_attempt_name" not in o.status_values()
    assert len(p.sandboxes) == 1  # it exists: the next pass looks it up by name


def test_create_that_fails_late_records_the_errored_sandbox_and_counts_a_failure() -> None:
    p = MemoryProvider()
    p.script_create("error", reason="image pull failed", recoverable=False)
    [o] = applier(p).apply([create_action("a")])
    [sb] = p.sandboxes.values()
    assert not o.ok and o.error_kind == "start_failed" and o.failures == 1
    values = o.status_values()
    assert values["sandbox_id"] == sb.id and values["create_attempt_name"] is None
    assert values["phase"] == "Error" and "recovered or replaced" in values["message"]
    assert len(p.sandboxes) == 1


def test_create_name_taken_by_another_lease_is_a_failure() -> None:
    p = MemoryProvider()
    req = build_create_request(INSTANCE, "a", "s", {})
    p.add_sandbox(req.name, ownership_labels(INSTANCE, "other", "s"))
    [o] = applier(p).apply([create_action("a")])
    assert not o.ok and o.error_kind == "conflict" and o.sandbox is None
    assert o.status_values()["failures"] == 1


def test_capacity_error_blocks_with_a_capped_backoff() -> None:
    p = MemoryProvider()
    p.quota = 0
    a = applier(p, backoff_base_seconds=5, backoff_max_seconds=600, blocked_backoff_max_seconds=30)
    [o] = a.apply([replace_failures(create_action("a"), 9)])
    assert o.error_kind == "blocked" and o.failures == 10
    assert o.next_attempt_at is not None and (o.next_attempt_at - o.finished_at).total_seconds() <= 30
    values = o.status_values()
    assert values["phase"] == "Blocked" and values["message"].startswith("Blocked: ")
    assert "limit exceeded" in values["message"]
    assert "failed_spec_hash" not in values  # never Failed: it clears by itself


def test_refused_repeat_from_a_stale_list_is_reobserved_not_a_failure() -> None:
    p = MemoryProvider()
    sid = seed(p, "a", "stopped")  # the list said started; it is stopped already
    [o] = applier(p).apply([act("stop", "a", sid, from_state="started", failures=2)])
    assert o.ok and o.reobserved and o.sandbox is not None and o.sandbox.state == "stopped"
    assert o.failures == 2 and "failures" not in o.status_values()
    assert [c[0] for c in p.calls] == ["stop", "get"]


def test_refusal_by_the_state_planned_from_is_a_failure() -> None:
    p = MemoryProvider()
    sid = seed(p, "a", "stopped")
    [o] = applier(p).apply([act("stop", "a", sid, from_state="stopped")])
    assert not o.ok and o.error_kind == "conflict" and o.failures == 1


def test_delete_of_a_sandbox_gone_meanwhile_is_fine() -> None:
    p = MemoryProvider()
    sid = seed(p, "a", "started")
    p.stick(sid, "destroying")
    p.sandboxes[sid].pending_state = "destroyed"
    [o] = applier(p).apply([act("delete", "a", sid, from_state="started")])
    assert o.ok and o.reobserved and o.sandbox is not None and o.sandbox.state == "destroying"


def test_named_429_pauses_only_its_scope() -> None:
    clock = FakeClock()
    p = MemoryProvider()
    sid = seed(p, "a", "stopped")
    a = applier(p, clock, api_rate_per_second=1000, create_rate_per_minute=60000)
    p.fail_next("create", RateLimitedError("429", 30, "create", {"create": 30.0}))
    [o] = a.apply([create_action("b")])
    assert o.error_kind == "rate_limited"
    assert a.paused_until("create") == pytest.approx(clock.t + 30)
    assert a.paused_until("all") == float("-inf")
    before = clock.t
    [o] = a.apply([act("start", "a", sid)])
    assert o.ok and clock.t - before < 1  # a lifecycle call does not wait for the create pause
    [o] = a.apply([create_action("c")])
    assert o.ok and clock.t - before >= 29  # the next create waited


def test_authenticated_429_pauses_every_call() -> None:
    clock = FakeClock()
    p = MemoryProvider()
    sid = seed(p, "a", "stopped")
    a = applier(p, clock, api_rate_per_second=1000)
    p.fail_next("start", RateLimitedError("429", 20, "all", {"all": 20.0}))
    a.apply([act("start", "a", sid)])
    before = clock.t
    [o] = a.apply([act("start", "a", sid)])
    assert o.ok and clock.t - before >= 19


def test_retry_after_extends_the_backoff() -> None:
    p = MemoryProvider()
    sid = seed(p, "a")
    p.fail_next("start", TransientError("503", retry_after=900))
    [o] = applier(p, backoff_base_seconds=1, backoff_max_seconds=10).apply([act("start", "a", sid)])
    assert o.next_attempt_at is not None
    assert (o.next_attempt_at - o.finished_at).total_seconds() >= 900


def test_backoff_grows_to_the_cap_and_resets_on_success() -> None:
    p = MemoryProvider()
    a = applier(p, backoff_base_seconds=5, backoff_max_seconds=60)
    for n, ceiling in [(1, 5), (2, 10), (3, 20), (4, 40), (5, 60), (30, 60), (500, 60)]:
        delays = [a.backoff_seconds(n) for _ in range(200)]
        assert all(5 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.9  # jitter spreads over the whole range
    sid = seed(p, "a")
    grows = []
    failures = 0
    for _ in range(4):
        p.fail_next("start", TransientError("503"))
        [o] = a.apply([act("start", "a", sid, failures=failures)])
        failures = o.failures
        grows.append(failures)
    assert grows == [1, 2, 3, 4]
    [ok] = a.apply([act("start", "a", sid, failures=failures)])
    assert ok.ok and ok.failures == 0 and ok.next_attempt_at is None
    assert ok.status_values()["failures"] == 0


# -- hooks ------------------------------------------------------------------------------------------


def test_before_create_failure_prevents_the_create() -> None:
    p = MemoryProvider()

    def refuse(action: Action) -> None:
        raise RuntimeError("database is locked")

    [o] = applier(p).apply([create_action("a")], before_create=refuse)
    assert not o.ok and o.error_kind == "before_create" and not o.ran
    assert p.counters["create"] == 0 and p.sandboxes == {}


def test_before_create_runs_before_the_create_call() -> None:
    p = MemoryProvider()
    order: list[str] = []
    p.on_call = lambda op, key: order.append(op)
    seen: list[Outcome] = []
    a = applier(p)
    a.on_outcome = seen.append
    a.apply([create_action("a")], before_create=lambda action: order.append(f"record {action.sandbox_name}"))
    assert order == [f"record {create_action('a').sandbox_name}", "create"]
    assert len(seen) == 1 and seen[0].ok


# -- concurrency ---------------------------------------------------------------------------------


def test_concurrency_bound_is_respected() -> None:
    lock = threading.Lock()
    running = [0]
    peak = [0]

    def on_call(op: str, key: str) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02)
        with lock:
            running[0] -= 1

    p = MemoryProvider(on_call=on_call)
    ids = [seed(p, f"l{i}") for i in range(24)]
    a = applier(p, max_concurrent_actions=4, api_rate_per_second=1e6)
    outcomes = a.apply([act("start", f"l{i}", sid) for i, sid in enumerate(ids)])
    assert all(o.ok for o in outcomes)
    assert peak[0] == 4


def test_one_action_per_lease_at_once_across_calls() -> None:
    entered = threading.Event()
    release = threading.Event()

    def on_call(op: str, key: str) -> None:
        if op == "start":
            entered.set()
            release.wait(5)

    p = MemoryProvider(on_call=on_call)
    sid = seed(p, "a")
    a = applier(p)
    first: list[Outcome] = []
    t = threading.Thread(target=lambda: first.extend(a.apply([act("start", "a", sid)])))
    t.start()
    assert entered.wait(5)
    assert a.in_flight() == {"a"}
    [busy] = a.apply([act("stop", "a", sid)])
    release.set()
    t.join(5)
    assert busy.error_kind == "busy" and not busy.ran
    assert "failures" not in busy.status_values()
    assert first[0].ok and p.counters["stop"] == 0
    # within one batch only the first action of a lease runs
    out = a.apply([act("stop", "a", sid), act("start", "a", sid)])
    assert [o.error_kind for o in out] == [None, "busy"]


def test_429_pauses_every_call() -> None:
    clock = FakeClock()
    calls: list[tuple[str, float]] = []
    p = MemoryProvider(on_call=lambda op, key: calls.append((key, clock.monotonic())))
    ids = [seed(p, n) for n in "abc"]
    p.fail_next("start", RateLimitedError("429", retry_after=30))
    a = applier(p, clock, max_concurrent_actions=1, api_rate_per_second=1000)
    outcomes = a.apply([act("start", n, sid) for n, sid in zip("abc", ids, strict=True)])
    assert [o.error_kind for o in outcomes] == ["rate_limited", None, None]
    assert outcomes[0].next_attempt_at is not None
    assert outcomes[0].next_attempt_at >= outcomes[0].finished_at + timedelta(seconds=30)
    assert calls[0][1] == 0 and calls[1][1] >= 30 and calls[2][1] >= 30


def test_pause_beyond_the_action_timeout_defers() -> None:
    clock = FakeClock()
    p = MemoryProvider()
    ids = [seed(p, n) for n in "ab"]
    p.fail_next("start", RateLimitedError("429", retry_after=500))
    a = applier(p, clock, max_concurrent_actions=1, action_timeout_seconds=60)
    outcomes = a.apply([act("start", n, sid) for n, sid in zip("ab", ids, strict=True)])
    assert [o.error_kind for o in outcomes] == ["rate_limited", "deferred"]
    assert p.counters["start"] == 1
    assert outcomes[1].status_values() == {"message": outcomes[1].status_values()["message"]}


def test_create_rate_limit() -> None:
    clock = FakeClock()
    times: list[float] = []
    p = MemoryProvider(on_call=lambda op, key: times.append(clock.monotonic()) if op == "create" else None)
    a = applier(p, clock, max_concurrent_actions=1, create_rate_per_minute=60, api_rate_per_second=1000)
    outcomes = a.apply([create_action(f"l{i}") for i in range(6)])
    assert all(o.ok for o in outcomes)
    assert times == pytest.approx([0, 1, 2, 3, 4, 5])


def test_api_rate_limit_counts_every_call() -> None:
    clock = FakeClock()
    p = MemoryProvider()
    ids = [seed(p, f"l{i}") for i in range(10)]
    a = applier(p, clock, max_concurrent_actions=1, api_rate_per_second=2)
    a.apply([act("start", f"l{i}", sid) for i, sid in enumerate(ids)])
    assert clock.t == pytest.approx(4.0)  # burst of 2, then 8 more at 2 per second


def test_token_bucket() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 2.0, lambda: now[0])
    assert [bucket.reserve() for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]
    now[0] = 10.0
    assert bucket.reserve() == 0.0


def test_shutdown_lets_in_flight_finish_and_takes_nothing_new() -> None:
    entered = threading.Event()
    release = threading.Event()

    def on_call(op: str, key: str) -> None:
        entered.set()
        release.wait(5)

    p = MemoryProvider(on_call=on_call)
    sid = seed(p, "a")
    a = Applier(p, ApplierConfig())
    result: list[Outcome] = []
    t = threading.Thread(target=lambda: result.extend(a.apply([act("start", "a", sid)])))
    t.start()
    assert entered.wait(5)
    a.stop()
    [skipped] = a.apply([act("stop", "b", "x")])
    assert skipped.error_kind == "skipped"
    threading.Timer(0.05, release.set).start()
    assert a.shutdown(timeout=5)
    t.join(5)
    assert result[0].ok and p.sandboxes[sid].state == "started"


# -- fencing (issue 17) ---------------------------------------------------------------------------


class Leadership:
    """A fence that stops passing once the clock reaches ``lost_at`` (leadership moved on)."""

    def __init__(self, clock: FakeClock, lost_at: float) -> None:
        self.clock = clock
        self.lost_at = lost_at
        self.checks: list[float] = []

    def __call__(self) -> None:
        now = self.clock.monotonic()
        self.checks.append(now)
        if now >= self.lost_at:
            raise NotLeaderError("term moved on")


@pytest.mark.parametrize("kind", ["delete", "start", "stop", "archive", "recover"])
def test_fence_is_checked_after_the_wait_and_stops_the_call(kind: str) -> None:
    """Planned while leading, then a 429 pause; leadership is lost during the wait: nothing is sent."""
    clock = FakeClock()
    p = MemoryProvider()
    state = {"start": "stopped", "stop": "started", "archive": "stopped", "recover": "error"}.get(
        kind, "started"
    )
    busy = seed(p, "busy", "stopped")
    target = seed(p, "target", state)
    if kind == "recover":
        p.fall_into_error(target, recoverable=True)
    p.fail_next("start", RateLimitedError("429", retry_after=30))
    a = applier(p, clock, max_concurrent_actions=1, api_rate_per_second=1000)
    a.apply([act("start", "busy", busy)])  # sets the 30 s pause
    fence = Leadership(clock, lost_at=10)
    before = {sid: sb.state for sid, sb in p.sandboxes.items()}
    counted = p.counters[kind]
    [outcome] = a.apply([act(kind, "target", target, failures=2)], fence=fence)
    assert outcome.error_kind == "fenced" and not outcome.ran and not outcome.ok
    assert fence.checks and fence.checks[-1] >= 30  # checked after the pause, not at planning time
    assert p.counters[kind] == counted  # never sent
    assert {sid: sb.state for sid, sb in p.sandboxes.items()} == before
    values = outcome.status_values()
    assert set(values) == {"message"}  # not a failure: failures and back-off untouched
    assert outcome.failures == 2


def test_fence_before_create_runs_after_the_attempt_is_recorded() -> None:
    clock = FakeClock()
    p = MemoryProvider()
    order: list[str] = []

    def fence() -> None:
        order.append("fence")
        raise NotLeaderError("deposed")

    a = applier(p, clock)
    [outcome] = a.apply([create_action("new")], before_create=lambda _a: order.append("attempt"), fence=fence)
    assert order == ["attempt", "fence"]
    assert outcome.error_kind == "fenced"
    assert p.sandboxes == {} and p.counters["create"] == 0


def test_fence_is_not_consulted_for_reads() -> None:
    p = MemoryProvider()
    sid = seed(p, "a", "started")

    def fence() -> None:
        raise NotLeaderError("deposed")

    outcomes = applier(p).apply(
        [act("lookup", "a", sid), act("realize_workspace", "b", sid, workspace_dir="w")], fence=fence
    )
    assert [o.ok for o in outcomes] == [True, True]


def test_a_passing_fence_lets_every_call_through() -> None:
    p = MemoryProvider()
    sid = seed(p, "a", "started")
    checks: list[int] = []
    [outcome] = applier(p).apply([act("delete", "a", sid)], fence=lambda: checks.append(1))
    assert outcome.ok and checks == [1] and sid not in p.sandboxes
