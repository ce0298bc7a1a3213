"""Schedules: a list of cron entries in an IANA time zone, and the value in force at any moment.

Owns the ``schedule:`` of a lease (entries carry a ``state``) and of a pool (entries carry a
``min_ready``): parsing and validation (:func:`parse_schedule`, used by ``controller.specs`` at apply
and by ``controller.lease_rows`` for rows written with SQL) and the pure arithmetic the planner and
the pool step call with ``now`` (:func:`in_force`). Nothing here reads a clock or does I/O.

Rules (issue 16):

* The value in force at ``now`` is that of the entry that fired last (at or before ``now``). Entries
  firing at the same instant: the one later in the list wins.
* Before any entry has fired (none fired in the last :data:`LOOKBACK`), the lease's own ``state``
  (or the pool's ``min_ready``) holds.
* Cron arithmetic is APScheduler 3's ``CronTrigger`` (5 fields: minute hour day month weekday), in
  the schedule's zone. The weekday field is read as classic cron (0 or 7 = Sunday, 1 = Monday;
  :func:`weekdays` translates it, APScheduler itself counts from Monday = 0). When both day of month
  and weekday are restricted, both must match (APScheduler's rule; classic cron takes either).
* Across DST: a local time that does not exist (02:30 on the spring-forward night in Europe) fires
  once, an hour later by the wall clock (03:30 summer time); a local time that occurs twice (the
  autumn night) fires at both instants, which changes nothing for a state.
* The next change is the first later fire that yields a different value.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.cron import CronTrigger

LOOKBACK: Final = timedelta(days=8 * 366)  # Feb 29 may be 8 years away (2096 -> 2104)
_LOOKBACK_STEPS: Final = (
    timedelta(hours=1),
    timedelta(days=1),
    timedelta(days=8),
    timedelta(days=32),
    timedelta(days=367),
    LOOKBACK,
)
_MAX_CHANGE_STEPS: Final = 2000  # fires examined when looking for the next change


class ScheduleError(ValueError):
    """A schedule that cannot be used; ``field`` is the path inside ``schedule`` (``entries.1.cron``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Entry:
    """One entry: a 5-field cron expression and the value it sets (a state, or a min_ready)."""

    cron: str
    value: Any


@dataclass(frozen=True)
class Schedule:
    """A validated schedule. ``key`` names what the entries set (``state`` or ``min_ready``)."""

    timezone: str
    entries: tuple[Entry, ...]
    key: str = "state"

    def to_data(self) -> dict[str, Any]:
        """The YAML / JSON-column form."""
        return {
            "timezone": self.timezone,
            "entries": [{"cron": e.cron, self.key: e.value} for e in self.entries],
        }


@dataclass(frozen=True)
class InForce:
    """What a schedule says at one moment: the value, since when (None: no entry fired yet, the
    fallback holds), and the next change (None: none found)."""

    value: Any
    since: datetime | None
    next_change: datetime | None
    next_value: Any


_DAY_NAMES: Final = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # classic cron: 0 (and 7) = Sunday


def _weekday(token: str) -> int:
    token = token.strip().lower()
    if token in _DAY_NAMES:
        return _DAY_NAMES.index(token)
    if token.isdigit() and 0 <= int(token) <= 7:
        return int(token) % 7
    raise ValueError(f"weekday {token!r} is not 0-7 or sun..sat")


def weekdays(field: str) -> str:
    """The classic cron weekday field (0 or 7 = Sunday, 1 = Monday) as APScheduler day names.

    APScheduler 3 counts Monday as 0, so ``1-5`` handed over as is would mean Tuesday to Saturday;
    the field is expanded here (lists, ranges, steps, names) and given as an explicit list."""
    days: set[int] = set()
    for item in field.split(","):
        part, _, step_text = item.partition("/")
        if step_text and not (step_text.isdigit() and int(step_text) > 0):
            raise ValueError(f"weekday step {step_text!r} must be a positive number")
        step = int(step_text) if step_text else 1
        if part == "*":
            first, last = 0, 6
        elif "-" in part:
            low, _, high = part.partition("-")
            first, last = _weekday(low), _weekday(high)
            if high.strip() == "7":
                last = 7
            if last < first:
                raise ValueError(f"weekday range {part!r} runs backwards")
        else:
            first = _weekday(part)
            last = 6 if step_text else first
        days.update(d % 7 for d in range(first, last + 1, step))
    return ",".join(_DAY_NAMES[d] for d in sorted(days))


@functools.lru_cache(maxsize=4096)
def _trigger(cron: str, timezone: str) -> CronTrigger:
    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(
            f"wrong number of fields: got {len(fields)}, expected 5 (minute hour day month weekday)"
        )
    minute, hour, day, month, weekday = fields
    return CronTrigger(
        minute=minute,
        hour=hour,
        day=day,
        month=month,
        day_of_week=weekdays(weekday),
        timezone=ZoneInfo(timezone),
    )


def _next_fire(trigger: CronTrigger, start: datetime) -> datetime | None:
    """The first fire at or after ``start`` (whole seconds), in UTC."""
    fire = trigger.get_next_fire_time(None, start)
    return fire.astimezone(UTC) if fire is not None else None


_recent: dict[tuple[str, str], tuple[datetime, datetime]] = {}  # (cron, zone) -> (now, last fire)


def last_fire(cron: str, timezone: str, now: datetime) -> datetime | None:
    """The latest fire at or before ``now`` within :data:`LOOKBACK` (None: none).

    Memoized: the answer for an earlier ``now`` is reused when at most a few fires happened since
    (the common case from one pass to the next); the result is the same as a fresh search.
    """
    trigger = _trigger(cron, timezone)
    known = _recent.get((cron, timezone))
    if known is not None and known[0] <= now and now - known[1] <= LOOKBACK:
        fire = known[1]
        for _ in range(4):
            following = _after(trigger, fire)
            if following is None or following > now:
                _recent[(cron, timezone)] = (now, fire)
                return fire
            fire = following
    found = _search_last_fire(trigger, now)
    if found is not None:
        if len(_recent) > 4096:
            _recent.clear()
        _recent[(cron, timezone)] = (now, found)
    return found


def _search_last_fire(trigger: CronTrigger, now: datetime) -> datetime | None:
    """The latest fire at or before ``now`` within :data:`LOOKBACK`, searched afresh.

    A growing window finds a start whose next fire is not after ``now``; a bisection on whole
    seconds then finds the last such start, whose next fire is the answer (next-fire is monotone
    in the start), so the cost is bounded whatever the frequency of the expression."""
    lo: datetime | None = None
    for step in _LOOKBACK_STEPS:
        start = now - step
        fire = _next_fire(trigger, start)
        if fire is not None and fire <= now:
            lo = start
            break
    if lo is None:
        return None
    hi = now + timedelta(seconds=1)
    while (hi - lo) > timedelta(seconds=1):
        mid = lo + (hi - lo) / 2
        fire = _next_fire(trigger, mid)
        if fire is not None and fire <= now:
            lo = mid
        else:
            hi = mid
    return _next_fire(trigger, lo)


def _after(trigger: CronTrigger, moment: datetime) -> datetime | None:
    """The first fire after ``moment``. Searching from a start just after a spring-forward gap skips
    the fire of a local time inside the gap (fired an hour late when seen from before the gap), so
    a search from an hour earlier is compared too."""
    direct = _next_fire(trigger, moment + timedelta(seconds=1))
    early = _next_fire(trigger, moment - timedelta(hours=1))
    if early is not None and early > moment and (direct is None or early < direct):
        return early
    return direct


@functools.lru_cache(maxsize=4096)
def in_force(schedule: Schedule, now: datetime, fallback: Any) -> InForce:
    """The value in force at ``now`` and the next change (pure; cached per (schedule, now))."""
    now = now.astimezone(UTC)
    best: tuple[datetime, int] | None = None
    for index, entry in enumerate(schedule.entries):
        fired = last_fire(entry.cron, schedule.timezone, now)
        if fired is not None and (best is None or (fired, index) >= best):
            best = (fired, index)
    value = schedule.entries[best[1]].value if best is not None else fallback
    since = best[0] if best is not None else None
    # Walk the coming fires in time order until one yields another value.
    triggers = [_trigger(e.cron, schedule.timezone) for e in schedule.entries]
    upcoming: list[datetime | None] = [_after(t, now) for t in triggers]
    for _ in range(_MAX_CHANGE_STEPS):
        pending = [f for f in upcoming if f is not None]
        if not pending:
            break
        at = min(pending)
        firing = [i for i, f in enumerate(upcoming) if f == at]
        new = schedule.entries[firing[-1]].value
        if new != value:
            return InForce(value, since, at, new)
        for i in firing:
            upcoming[i] = _after(triggers[i], at)
    return InForce(value, since, None, None)


def earliest(*moments: datetime | None) -> datetime | None:
    """The earliest of the given moments that are not None (None when all are)."""
    known = [m for m in moments if m is not None]
    return min(known) if known else None


# -- parsing -----------------------------------------------------------------------------------------


def _check_cron(cron: Any, timezone: str, where: str) -> str:
    if not isinstance(cron, str) or not cron.strip():
        raise ScheduleError(where, "must be a cron expression such as '0 9 * * 1-5'")
    cron = " ".join(cron.split())
    try:
        trigger = _trigger(cron, timezone)
    except ValueError as exc:
        raise ScheduleError(where, f"invalid cron expression {cron!r}: {exc}") from None
    # An expression that never fires (31 February) is refused: it would never change anything.
    if trigger.get_next_fire_time(None, datetime(2000, 1, 1, tzinfo=UTC)) is None:
        raise ScheduleError(where, f"cron expression {cron!r} never fires (impossible date)")
    return str(cron)


def parse_schedule(data: Any, *, key: str, check: Any = None) -> Schedule:
    """Validate the ``schedule:`` of a lease (``key`` ``state``) or pool (``key`` ``min_ready``).

    ``check(value)`` validates one entry's value and raises ValueError with the reason. Raises
    :class:`ScheduleError` naming the field inside the schedule."""
    if isinstance(data, Schedule):
        return data
    if not isinstance(data, Mapping):
        raise ScheduleError("", "must be a mapping with 'timezone' and 'entries'")
    unknown = sorted(set(map(str, data)) - {"timezone", "entries"})
    if unknown:
        raise ScheduleError(unknown[0], "unknown field (a schedule has 'timezone' and 'entries')")
    zone = data.get("timezone")
    if not isinstance(zone, str) or not zone:
        raise ScheduleError("timezone", "required: an IANA time zone such as 'Europe/Berlin' or 'UTC'")
    try:
        ZoneInfo(zone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ScheduleError(
            "timezone", f"unknown time zone {zone!r} (use an IANA name such as 'Europe/Berlin')"
        ) from None
    items = data.get("entries")
    if not isinstance(items, Sequence) or isinstance(items, str) or not items:
        raise ScheduleError("entries", f"must be a non-empty list of {{cron, {key}}} entries")
    entries: list[Entry] = []
    for index, item in enumerate(items):
        where = f"entries.{index}"
        if not isinstance(item, Mapping):
            raise ScheduleError(where, f"must be a mapping with 'cron' and '{key}'")
        extra = sorted(set(map(str, item)) - {"cron", key})
        if extra:
            raise ScheduleError(f"{where}.{extra[0]}", f"unknown field (an entry has 'cron' and '{key}')")
        cron = _check_cron(item.get("cron"), zone, f"{where}.cron")
        if key not in item:
            raise ScheduleError(f"{where}.{key}", "required")
        value = item[key]
        if check is not None:
            try:
                value = check(value)
            except ValueError as exc:
                raise ScheduleError(f"{where}.{key}", str(exc)) from None
        entries.append(Entry(cron=cron, value=value))
    return Schedule(timezone=zone, entries=tuple(entries), key=key)


LEASE_STATES: Final = ("running", "stopped", "archived", "absent")


def check_state(value: Any) -> str:
    if value not in LEASE_STATES:
        raise ValueError(f"must be one of {', '.join(LEASE_STATES)}, not {value!r}")
    return str(value)


def check_min_ready(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number >= 0, not {value!r}")
    return value


def lease_schedule(data: Any) -> Schedule | None:
    return None if data is None else parse_schedule(data, key="state", check=check_state)


def pool_schedule(data: Any) -> Schedule | None:
    return None if data is None else parse_schedule(data, key="min_ready", check=check_min_ready)


def describe(result: InForce, zone: str) -> str:
    """``running (scheduled); stopped at 2026-11-27 18:00 CET``, for ``get`` and messages."""
    if result.next_change is None:
        return f"{result.value} (scheduled; no change ahead)"
    local = result.next_change.astimezone(ZoneInfo(zone))
    return f"{result.value} (scheduled); {result.next_value} at {local:%Y-%m-%d %H:%M %Z}"
