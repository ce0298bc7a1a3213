"""The soak's verdict (bench/soak.py): execution accounting, pool claims, lease convergence and the
kill choice.

These pure functions decide whether ``make soak`` exits 1, so they are tested on their own: a soak
that could not see a loss would prove nothing.
"""

from __future__ import annotations

import collections
import random

import pytest

from bench.soak import (
    LOSS_KEYS,
    SandboxSeen,
    account_executions,
    choose_victims,
    count_causes,
    count_pool_claims,
    execution_cause,
    lease_converged,
)

TOKEN_A = "a" * 32
TOKEN_B = "b" * 32
TOKEN_C = "c" * 32


def cmd(token: str, slow: bool = False) -> str:
    return f"{'sleep 1; ' if slow else ''}echo {token} >> /tmp/ran.log"


def test_every_execution_accounted_for_is_no_loss() -> None:
    rows = [("succeeded", cmd(TOKEN_A)), ("interrupted", cmd(TOKEN_B)), ("cancelled", cmd(TOKEN_C, True))]
    figures = account_executions(rows, {TOKEN_A: 1})
    assert figures["executions_lost"] == 0
    assert figures["executions_run_twice"] == 0
    assert figures["executions_by_state"] == {"cancelled": 1, "interrupted": 1, "succeeded": 1}
    assert figures["executions_unknown_states"] == {}


@pytest.mark.parametrize("state", ["queued", "running"])
def test_a_row_left_queued_or_running_is_lost(state: str) -> None:
    figures = account_executions([(state, cmd(TOKEN_A)), ("succeeded", cmd(TOKEN_B))], {TOKEN_B: 1})
    assert figures["executions_lost"] == 1


def test_succeeded_without_its_marker_is_lost() -> None:
    figures = account_executions([("succeeded", cmd(TOKEN_A))], {})
    assert figures["executions_lost"] == 1
    assert figures["executions_succeeded_without_marker"] == 1


def test_a_token_written_twice_is_run_twice() -> None:
    figures = account_executions([("succeeded", cmd(TOKEN_A))], {TOKEN_A: 2})
    assert figures["executions_run_twice"] == 1
    assert figures["executions_lost"] == 0


def test_a_state_the_soak_does_not_know_is_reported_not_counted() -> None:
    figures = account_executions([("someday", cmd(TOKEN_A)), ("someday", cmd(TOKEN_B))], {})
    assert figures["executions_lost"] == 0
    assert figures["executions_run_twice"] == 0
    assert figures["executions_unknown_states"] == {"someday": 2}


def test_unknown_is_a_known_end_state_neither_lost_nor_run_twice() -> None:
    figures = account_executions([("unknown", cmd(TOKEN_A))], {})
    assert (figures["executions_lost"], figures["executions_unknown_states"]) == (0, {})


@pytest.mark.parametrize(
    ("state", "attempts", "error", "cause"),
    [
        ("succeeded", 0, None, "ran: succeeded"),
        ("failed", 2, None, "ran: failed after retries"),
        ("error", 3, "not started after 3 attempt(s): 429", "error: never started (retries exhausted)"),
        (
            "error",
            0,
            "no such lease: 'x'",
            "error: refused before running (lease missing, not running or not ready; bad env)",
        ),
        ("unknown", 0, None, "unknown: may have run (answer lost after sending)"),
        ("cancelled", 0, None, "cancelled"),
    ],
)
def test_execution_causes(state: str, attempts: int, error: str | None, cause: str) -> None:
    assert execution_cause(state, attempts, error) == cause
    figures = count_causes([(state, attempts, error)], reattached=2)
    assert figures["executions_by_cause"] == {cause: 1} and figures["executions_reattached"] == 2
    assert figures["executions_not_started_error"] == (1 if cause.startswith("error: never") else 0)


def test_a_cancel_that_came_after_the_command_ran_is_reported() -> None:
    figures = account_executions([("cancelled", cmd(TOKEN_A, True))], {TOKEN_A: 1})
    assert figures["executions_cancelled_after_their_command_ran"] == 1
    assert figures["executions_lost"] == 0


def test_pool_claims_each_member_once_is_no_loss() -> None:
    got = [("soak-pool-aaaa0001", "soak-claim-0"), ("soak-pool-aaaa0002", "soak-claim-2")]
    events = [
        ("soak-pool-aaaa0001", "warm"),
        ("soak-pool-aaaa0003", "reserved"),  # a reservation hands nothing out
        ("soak-pool-aaaa0003", "cold"),
        ("soak-pool-aaaa0002", "warm"),
    ]
    ops = {"pool_claim": 2, "pool_claim_refused": 3, "pool_release": 1, "sql_insert_lease": 9}
    figures = count_pool_claims(got, events, ops)
    assert figures["pool_members_claimed_twice"] == 0
    made = (figures["pool_claims_made"], figures["pool_claims_refused"], figures["pool_releases"])
    assert made == (2, 3, 1)
    assert figures["pool_releases_refused"] == 0
    assert figures["pool_claim_events"] == 3 and figures["pool_claims_without_event"] == 0
    assert "pool_members_claimed_twice" in LOSS_KEYS


def test_a_member_the_soak_got_twice_is_claimed_twice_even_without_events() -> None:
    got = [("soak-pool-aaaa0001", "soak-claim-0"), ("soak-pool-aaaa0001", "soak-claim-1")]
    figures = count_pool_claims(got, [], {})
    assert figures["pool_members_claimed_twice"] == 1
    assert figures["pool_members_claimed_twice_in_record"] == ["soak-pool-aaaa0001"]
    assert figures["pool_members_claimed_twice_in_events"] == []
    assert figures["pool_claims_without_event"] == 1


def test_two_claim_events_for_one_member_are_claimed_twice_and_sources_are_not_added_up() -> None:
    events: list[tuple[str | None, str]] = [
        ("soak-pool-aaaa0001", "warm"),
        ("soak-pool-aaaa0001", "cold"),
        ("soak-pool-aaaa0002", "warm"),
        ("soak-pool-aaaa0002", "warm"),
        (None, "warm"),
    ]
    only_events = count_pool_claims([("soak-pool-aaaa0003", "soak-claim-0")], events, {})
    assert only_events["pool_members_claimed_twice_in_events"] == ["soak-pool-aaaa0001", "soak-pool-aaaa0002"]
    assert only_events["pool_members_claimed_twice"] == 2
    got = [("soak-pool-aaaa0001", "soak-claim-0"), ("soak-pool-aaaa0001", "soak-claim-1")]
    both = count_pool_claims(got, events, {})
    assert both["pool_members_claimed_twice"] == 2  # aaaa0001 seen by both sources counts once


def sb(state: str, spec: str | None = "h1") -> SandboxSeen:
    return SandboxSeen("default-x", state, spec)


@pytest.mark.parametrize(
    ("desired", "parks", "phase", "group", "expected"),
    [
        ("running", False, "Ready", [sb("started")], (True, False)),
        ("running", False, "Ready", [sb("started", "old")], (False, False)),
        ("running", False, "Ready", [sb("started"), sb("started")], (False, False)),
        ("running", False, "Ready", [], (False, False)),
        ("running", False, "Provisioning", [sb("starting")], (False, False)),
        ("running", False, "Idle", [sb("stopped")], (False, False)),
        ("running", True, "Idle", [sb("stopped")], (True, False)),
        ("running", True, "Ready", [sb("stopped")], (False, False)),
        ("stopped", False, "Stopped", [], (True, False)),
        ("stopped", False, "Stopped", [sb("stopped")], (True, False)),
        ("stopped", False, "Stopped", [sb("started")], (False, False)),
        # archived before the lease asked for stopped: the planner leaves it (an archived sandbox
        # is stopped too), so does the verdict (a CI run of the soak failed on exactly this)
        ("stopped", False, "Stopped", [sb("archived")], (True, False)),
        ("stopped", False, "Stopped", [sb("paused")], (True, False)),
        ("stopped", False, "Stopping", [sb("archived")], (False, False)),
        ("stopped", False, "Stopped", [sb("archiving")], (False, False)),
        ("stopped", False, "Error", [sb("error")], (True, True)),
        ("archived", False, "Failed", [sb("build_failed")], (True, True)),
        ("archived", False, "Archived", [sb("archived")], (True, False)),
        ("archived", False, "Archived", [sb("stopped")], (False, False)),
        ("absent", False, "Deleted", [], (True, False)),
        ("absent", False, "Deleted", [sb("stopped")], (False, False)),
        ("absent", False, "Deleting", [], (False, False)),
    ],
)
def test_lease_converged(
    desired: str, parks: bool, phase: str, group: list[SandboxSeen], expected: tuple[bool, bool]
) -> None:
    assert lease_converged(desired, parks, "h1", phase, group) == expected


def test_the_killer_takes_the_leader_most_often_and_sometimes_both() -> None:
    rng = random.Random(7)
    kinds: collections.Counter[str] = collections.Counter()
    for _ in range(2000):
        kind, victims = choose_victims(rng, 2, leader=1)
        kinds[kind] += 1
        expected = {"leader": [1], "both": [0, 1], "follower": [0]}[kind]
        assert victims == expected
    assert kinds["leader"] > kinds["both"] + kinds["follower"]
    assert kinds["both"] > 0 and kinds["follower"] > 0


def test_with_one_replica_the_killer_takes_it() -> None:
    assert choose_victims(random.Random(1), 1, leader=0) == ("leader", [0])
    assert choose_victims(random.Random(1), 1, leader=None) == ("only", [0])
