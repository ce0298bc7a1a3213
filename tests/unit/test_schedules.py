"""Schedules (controller.schedules): the state in force and the next change as a pure function of
``now``, across DST in Europe and America; validation errors at apply; the planner and pools using it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.errors import SpecError
from controller.planner import LeaseView, build_create_request, plan
from controller.pool_sync import effective_min_ready
from controller.providers.base import ObservedSandbox
from controller.schedules import (
    _search_last_fire,
    _trigger,
    in_force,
    last_fire,
    lease_schedule,
    pool_schedule,
    weekdays,
)
from controller.specs import parse_leases, parse_pools


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def office(zone: str, start: str = "0 9 * * 1-5", stop: str = "0 18 * * 1-5") -> Any:
    return lease_schedule(
        {
            "timezone": zone,
            "entries": [{"cron": start, "state": "running"}, {"cron": stop, "state": "stopped"}],
        }
    )


BERLIN = office("Europe/Berlin")
NEW_YORK = office("America/New_York", stop="0 17 * * 1-5")

# (schedule, now, state in force, since, next change, state then)
CASES = [
    # Europe: summer time (UTC+2) until Sun 25 Oct 2026 03:00, then UTC+1.
    (BERLIN, utc(2026, 10, 23, 12), "running", utc(2026, 10, 23, 7), utc(2026, 10, 23, 16), "stopped"),
    (BERLIN, utc(2026, 10, 24, 12), "stopped", utc(2026, 10, 23, 16), utc(2026, 10, 26, 8), "running"),
    # Mon 26 Oct 07:30 UTC is 08:30 CET: still stopped, although 07:30 UTC was 09:30 the week before.
    (BERLIN, utc(2026, 10, 26, 7, 30), "stopped", utc(2026, 10, 23, 16), utc(2026, 10, 26, 8), "running"),
    (BERLIN, utc(2026, 10, 26, 8), "running", utc(2026, 10, 26, 8), utc(2026, 10, 26, 17), "stopped"),
    # Spring: winter time until Sun 29 Mar 2026 02:00, then UTC+2.
    (BERLIN, utc(2026, 3, 27, 7, 30), "stopped", utc(2026, 3, 26, 17), utc(2026, 3, 27, 8), "running"),
    (BERLIN, utc(2026, 3, 30, 7, 30), "running", utc(2026, 3, 30, 7), utc(2026, 3, 30, 16), "stopped"),
    # America: EST (UTC-5) until Sun 8 Mar 2026, EDT (UTC-4) until Sun 1 Nov 2026.
    (NEW_YORK, utc(2026, 3, 6, 13, 30), "stopped", utc(2026, 3, 5, 22), utc(2026, 3, 6, 14), "running"),
    (NEW_YORK, utc(2026, 3, 9, 13, 30), "running", utc(2026, 3, 9, 13), utc(2026, 3, 9, 21), "stopped"),
    (NEW_YORK, utc(2026, 11, 2, 13, 30), "stopped", utc(2026, 10, 30, 21), utc(2026, 11, 2, 14), "running"),
    (NEW_YORK, utc(2026, 11, 2, 14), "running", utc(2026, 11, 2, 14), utc(2026, 11, 2, 22), "stopped"),
]


@pytest.mark.parametrize(("schedule", "now", "state", "since", "change", "then"), CASES)
def test_state_in_force_and_next_change_across_dst(
    schedule: Any, now: datetime, state: str, since: datetime, change: datetime, then: str
) -> None:
    result = in_force(schedule, now, "running")
    assert (result.value, result.since, result.next_change, result.next_value) == (state, since, change, then)


def test_a_local_time_that_does_not_exist_fires_once_an_hour_later() -> None:
    """02:30 on 29 Mar 2026 does not exist in Berlin: the entry fires at 03:30 CEST (01:30 UTC)."""
    night = lease_schedule(
        {
            "timezone": "Europe/Berlin",
            "entries": [
                {"cron": "30 2 * * *", "state": "running"},
                {"cron": "0 12 * * *", "state": "stopped"},
            ],
        }
    )
    assert night is not None
    before = in_force(night, utc(2026, 3, 29, 1), "stopped")
    assert (before.value, before.next_change) == ("stopped", utc(2026, 3, 29, 1, 30))
    assert in_force(night, utc(2026, 3, 29, 1, 30), "stopped").value == "running"


def test_a_local_time_that_occurs_twice_fires_at_both_instants() -> None:
    assert last_fire("30 2 * * *", "Europe/Berlin", utc(2026, 10, 25, 1)) == utc(2026, 10, 25, 0, 30)
    assert last_fire("30 2 * * *", "Europe/Berlin", utc(2026, 10, 25, 1, 45)) == utc(2026, 10, 25, 1, 30)


def test_the_weekday_field_is_classic_cron() -> None:
    """APScheduler 3 counts Monday as 0; 1-5 must still mean Monday to Friday."""
    assert weekdays("1-5") == "mon,tue,wed,thu,fri"
    assert weekdays("0") == weekdays("7") == "sun"
    assert weekdays("*/2") == "sun,tue,thu,sat"
    assert weekdays("sat,sun") == "sun,sat"
    assert weekdays("5-7") == "sun,fri,sat"
    # Saturday 28 Nov 2026: a weekday schedule does not start.
    assert in_force(BERLIN, utc(2026, 11, 28, 9), "running").value == "stopped"


def test_entries_firing_together_the_later_one_wins_and_same_state_fires_are_no_change() -> None:
    tie = lease_schedule(
        {
            "timezone": "UTC",
            "entries": [
                {"cron": "0 9 * * *", "state": "stopped"},
                {"cron": "0 9 * * *", "state": "running"},
                {"cron": "0 12 * * *", "state": "running"},
                {"cron": "0 18 * * *", "state": "archived"},
            ],
        }
    )
    assert tie is not None
    result = in_force(tie, utc(2026, 11, 27, 10), "stopped")
    assert result.value == "running"
    assert (result.next_change, result.next_value) == (
        utc(2026, 11, 27, 18),
        "archived",
    )  # 12:00 is no change


def test_before_any_entry_fired_the_fallback_holds() -> None:
    """Feb 29 on a Monday (both fields must match): 2016, then 2044 - nothing in the last 8 years."""
    rare = lease_schedule({"timezone": "UTC", "entries": [{"cron": "0 0 29 2 1", "state": "running"}]})
    assert rare is not None
    result = in_force(rare, utc(2026, 11, 27), "stopped")
    assert (result.value, result.since) == ("stopped", None)
    assert (result.next_change, result.next_value) == (utc(2044, 2, 29), "running")


@settings(max_examples=60, deadline=None)
@given(
    minute=st.sampled_from(["0", "*/15", "5,35", "59"]),
    hour=st.sampled_from(["*", "9", "0-6", "*/5", "22"]),
    weekday=st.sampled_from(["*", "1-5", "0,6", "3"]),
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]),
    offset=st.integers(min_value=0, max_value=400 * 24 * 60),
    later=st.integers(min_value=0, max_value=3 * 24 * 60),
)
def test_last_fire_matches_walking_forward(
    minute: str, hour: str, weekday: str, zone: str, offset: int, later: int
) -> None:
    """The bisection (and its memo across a later ``now``) agrees with walking the fires forward."""
    cron = f"{minute} {hour} * * {weekday}"
    trigger = _trigger(cron, zone)

    def walked(now: datetime) -> datetime:
        fire = trigger.get_next_fire_time(None, now - timedelta(days=8))
        last = None
        while fire is not None and fire <= now:
            last = fire
            fire = trigger.get_next_fire_time(fire, fire + timedelta(seconds=1))
        assert last is not None
        return last.astimezone(UTC)

    now = utc(2026, 1, 1) + timedelta(minutes=offset, seconds=17)
    assert _search_last_fire(trigger, now) == walked(now)
    assert last_fire(cron, zone, now) == walked(now)
    then = now + timedelta(minutes=later)
    assert last_fire(cron, zone, then) == walked(then)


# -- validation at apply ------------------------------------------------------------------------------


def _lease_with(schedule: Any, **kw: Any) -> dict[str, Any]:
    return {"leases": [{"name": "web", "snapshot": "base", "schedule": schedule, **kw}]}


@pytest.mark.parametrize(
    ("schedule", "field", "words"),
    [
        (
            {"timezone": "UTC", "entries": [{"cron": "0 9 * *", "state": "running"}]},
            "entries.0.cron",
            "fields",
        ),
        (
            {"timezone": "UTC", "entries": [{"cron": "0 25 * * *", "state": "running"}]},
            "entries.0.cron",
            "23",
        ),
        (
            {
                "timezone": "UTC",
                "entries": [
                    {"cron": "0 9 * * *", "state": "running"},
                    {"cron": "0 0 31 2 *", "state": "stopped"},
                ],
            },
            "entries.1.cron",
            "never fires",
        ),
        (
            {"timezone": "UTC", "entries": [{"cron": "0 9 * * 9", "state": "running"}]},
            "entries.0.cron",
            "weekday",
        ),
        (
            {"timezone": "Mars/Olympus", "entries": [{"cron": "0 9 * * *", "state": "running"}]},
            "timezone",
            "unknown time zone",
        ),
        ({"entries": [{"cron": "0 9 * * *", "state": "running"}]}, "timezone", "required"),
        ({"timezone": "UTC", "entries": [{"cron": "0 9 * * *", "state": "on"}]}, "entries.0.state", "one of"),
        ({"timezone": "UTC", "entries": [{"cron": "0 9 * * *"}]}, "entries.0.state", "required"),
        ({"timezone": "UTC", "entries": []}, "entries", "non-empty"),
        (
            {"timezone": "UTC", "entries": [{"cron": "0 9 * * *", "state": "running", "when": 1}]},
            "entries.0.when",
            "unknown",
        ),
        ("weekdays", "schedule", "mapping"),
    ],
)
def test_a_bad_schedule_names_file_lease_and_field(schedule: Any, field: str, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_leases(_lease_with(schedule), "fleet.yaml")
    message = str(caught.value)
    assert message.startswith("fleet.yaml: lease 'web': ")
    expected = "schedule" if field == "schedule" else f"schedule.{field}"
    assert f": {expected}: " in message
    assert words in message


def test_an_ephemeral_lease_cannot_be_scheduled_to_stop() -> None:
    schedule = {"timezone": "UTC", "entries": [{"cron": "0 18 * * *", "state": "stopped"}]}
    with pytest.raises(SpecError, match=r"schedule\.entries\.0\.state: the lease is ephemeral"):
        parse_leases(_lease_with(schedule, auto_delete_interval=0), "fleet.yaml")


def test_a_valid_schedule_is_stored_normalized_and_round_trips() -> None:
    schedule = {"timezone": "Europe/Berlin", "entries": [{"cron": " 0  9 * * 1-5 ", "state": "running"}]}
    (spec,) = parse_leases(_lease_with(schedule), "fleet.yaml")
    assert spec.schedule == {
        "timezone": "Europe/Berlin",
        "entries": [{"cron": "0 9 * * 1-5", "state": "running"}],
    }
    assert spec.to_row()["schedule"] == spec.schedule
    assert spec.to_yaml_dict()["schedule"] == spec.schedule


def test_a_pool_schedule_sets_min_ready_within_max_size() -> None:
    entries = [{"cron": "0 9 * * 1-5", "min_ready": 5}, {"cron": "0 18 * * 1-5", "min_ready": 0}]
    (pool,) = parse_pools(
        {
            "pools": [
                {
                    "name": "agents",
                    "min_ready": 1,
                    "schedule": {"timezone": "Europe/Berlin", "entries": entries},
                }
            ]
        },
        "p.yaml",
    )
    assert effective_min_ready(pool, utc(2026, 11, 27, 10)) == 5  # Friday 11:00 CET
    assert effective_min_ready(pool, utc(2026, 11, 28, 10)) == 0  # Saturday
    assert effective_min_ready(pool, None) == 1
    with pytest.raises(
        SpecError, match=r"pool 'agents': schedule\.entries\.0\.min_ready: min_ready \(5\) is larger"
    ):
        parse_pools(
            {
                "pools": [
                    {"name": "agents", "max_size": 3, "schedule": {"timezone": "UTC", "entries": entries}}
                ]
            },
            "p.yaml",
        )
    bad = {"timezone": "UTC", "entries": [{"cron": "0 9 * * *", "min_ready": -1}]}
    with pytest.raises(SpecError, match=r"schedule\.entries\.0\.min_ready: must be a whole number"):
        parse_pools({"pools": [{"name": "agents", "schedule": bad}]}, "p.yaml")


def test_pool_schedule_parser_refuses_a_state() -> None:
    with pytest.raises(ValueError, match="unknown field"):
        pool_schedule({"timezone": "UTC", "entries": [{"cron": "0 9 * * *", "state": "running"}]})


# -- the planner --------------------------------------------------------------------------------------


def _lease(desired: str = "running", schedule: Any = BERLIN) -> LeaseView:
    return LeaseView(
        name="web",
        desired_state=desired,
        spec_hash="s" * 16,
        create=build_create_request("test", "web", "s" * 16, {"snapshot": "base"}),
        schedule=schedule,
    )


def _started() -> ObservedSandbox:
    req = _lease().create
    return ObservedSandbox(id="sb-1", name=req.name, state="started", labels=dict(req.labels))


def test_the_planner_follows_the_schedule_at_the_now_it_is_given() -> None:
    sandbox = _started()
    evening = plan([_lease()], {}, [sandbox], utc(2026, 11, 27, 17, 0, 1), instance="test")
    assert [a.kind for a in evening.actions] == ["stop"]
    assert evening.decisions["web"].desired_state == "stopped"
    morning = plan([_lease()], {}, [], utc(2026, 11, 30, 8, 0, 1), instance="test")
    assert [a.kind for a in morning.actions] == ["create"]


def test_absent_wins_over_the_schedule() -> None:
    result = plan([_lease("absent")], {}, [_started()], utc(2026, 11, 27, 10), instance="test")
    assert [a.kind for a in result.actions] == ["delete"]
