"""Fault injection settings, the seeded dice that apply them, and the request counters.

``FaultSettings`` is plain data, set from CLI flags at start and replaced or patched at run time
through ``/_emulator/faults`` (JSON with the same snake_case keys as the dataclass fields). Keys of
the per-operation maps are operation names (``OPERATIONS``) or ``"*"`` for every operation.

- ``latency``: seconds to wait before answering a request of that operation;
- ``transition_latency``: seconds a lifecycle operation (create, start, stop, archive, recover,
  delete) keeps its transitional state before reaching the final one (0: final at once);
- ``fail_rate``: ``{op: {kind: probability}}`` with kinds ``429`` (Daytona's named throttler
  headers, ``Retry-After-<name>`` = ``retry_after``), ``500``, ``503`` and ``timeout`` (the
  operation happens, then the answer hangs ``hang_seconds`` and is a 504);
- ``sandbox_error``: ``{op: probability}`` that create/start/recover ends in state ``error``
  (``recoverable`` per ``error_recoverable``);
- ``build_failed``: probability that a create ends in state ``build_failed``;
- ``stuck_starting``: ``{op: probability}`` that create/start/recover stays in ``starting`` for good;
- ``no_runners``: probability that a create or start answers 400 "No available runners";
- ``list_lag``: the list shows every sandbox as it was this many seconds ago (creates, deletes and
  state changes); get stays consistent;
- ``quota``: the maximum number of live sandboxes; ``quota_cpu``/``quota_memory``/``quota_disk``:
  resource totals (see ``lifecycle``); over any of them create/start answer 400, as Daytona does;
- ``start_wait_seconds``: how long create/start/recover wait for ``started`` before answering;
- ``time_scale``: how many times faster than real time the auto-stop/archive/delete minutes pass;
- ``seed``: seeds the dice so that a run of faults can be repeated.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

OPERATIONS = (
    "list",
    "get",
    "create",
    "start",
    "stop",
    "archive",
    "recover",
    "delete",
    "labels",
    "toolbox_proxy_url",
    "settings",
    "network_settings",
    "secrets",
    "list_volumes",
    "create_volume",
    "get_volume",
    "get_volume_by_name",
    "delete_volume",
    "config",
    "execute",
    "work_dir",
    "home_dir",
    "folder",
    "upload",
    "download",
    "delete_file",
    "session_create",
    "session_get",
    "session_execute",
    "session_command",
    "session_logs",
    "session_delete",
)
FAIL_KINDS = ("429", "500", "503", "timeout")
LIFECYCLE = ("create", "start", "stop", "archive", "recover", "delete")

# Daytona's named throttlers (app.module.ts) and the operations each one guards.
THROTTLE_CREATE = "sandbox-create"
THROTTLE_LIFECYCLE = "sandbox-lifecycle"
THROTTLE_AUTHENTICATED = "authenticated"
_LIFECYCLE_THROTTLED = frozenset(
    {"start", "stop", "archive", "recover", "delete", "labels", "settings", "network_settings", "secrets"}
)
# The limits we print in X-RateLimit-Limit-<name> (per minute; the create figure is Daytona's
# tier-1 creation limit, the others are our guess and only informative).
THROTTLE_LIMITS = {THROTTLE_CREATE: 300, THROTTLE_LIFECYCLE: 10_000, THROTTLE_AUTHENTICATED: 10_000}


def throttler_for(op: str) -> str:
    """The name of the Daytona throttler that answers an operation's 429."""
    if op == "create":
        return THROTTLE_CREATE
    if op in _LIFECYCLE_THROTTLED:
        return THROTTLE_LIFECYCLE
    return THROTTLE_AUTHENTICATED


@dataclass
class FaultSettings:
    """Every fault knob; all default to 'no fault' (and the server's own timings)."""

    latency: dict[str, float] = field(default_factory=dict)
    transition_latency: dict[str, float] = field(default_factory=dict)
    fail_rate: dict[str, dict[str, float]] = field(default_factory=dict)
    sandbox_error: dict[str, float] = field(default_factory=dict)
    error_recoverable: bool = True
    build_failed: float = 0.0
    stuck_starting: dict[str, float] = field(default_factory=dict)
    no_runners: float = 0.0
    list_lag: float = 0.0
    quota: int | None = None
    quota_cpu: int | None = None
    quota_memory: int | None = None
    quota_disk: int | None = None
    start_wait_seconds: float = 30.0
    time_scale: float = 1.0
    retry_after: int = 1
    hang_seconds: float = 5.0
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def patched(self, patch: dict[str, Any]) -> FaultSettings:
        """A copy with the given keys replaced; unknown keys or bad values raise ValueError."""
        merged = self.to_json()
        merged.update(patch)
        return validate(merged)


def _op_map(value: Any, name: str, keys: tuple[str, ...] = ("*", *OPERATIONS)) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object of operation -> number")
    result: dict[str, float] = {}
    for op, number in value.items():
        if op not in keys:
            raise ValueError(f"{name}: unknown key {op!r}")
        if isinstance(number, bool) or not isinstance(number, int | float) or number < 0:
            raise ValueError(f"{name}: {op} must be a non-negative number")
        result[op] = float(number)
    return result


def _number(raw: dict[str, Any], key: str, default: float, *, positive: bool = False) -> float:
    value = raw.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{key} must be {'positive' if positive else 'non-negative'}")
    return float(value)


def _probability(raw: dict[str, Any], key: str) -> float:
    value = raw.get(key, 0.0)
    if isinstance(value, bool):  # ``no_runners: true`` means always
        return 1.0 if value else 0.0
    number = _number(raw, key, 0.0)
    if number > 1:
        raise ValueError(f"{key} must be a probability between 0 and 1")
    return number


def _limit(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"{key} must be a non-negative integer or null")
    return value


def validate(raw: dict[str, Any]) -> FaultSettings:
    known = {f.name for f in fields(FaultSettings)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
    fail_rate: dict[str, dict[str, float]] = {}
    for op, kinds in dict(raw.get("fail_rate") or {}).items():
        if op != "*" and op not in OPERATIONS:
            raise ValueError(f"fail_rate: unknown operation {op!r}")
        parsed = _op_map(kinds, f"fail_rate.{op}", FAIL_KINDS) if isinstance(kinds, dict) else None
        if parsed is None or any(p > 1 for p in parsed.values()):
            raise ValueError(f"fail_rate.{op} must map {'/'.join(FAIL_KINDS)} to probabilities")
        fail_rate[op] = parsed
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError("seed must be an integer or null")
    retry_after = raw.get("retry_after", 1)
    if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
        raise ValueError("retry_after must be a non-negative integer")
    error_recoverable = raw.get("error_recoverable", True)
    if not isinstance(error_recoverable, bool):
        raise ValueError("error_recoverable must be a boolean")
    return FaultSettings(
        latency=_op_map(raw.get("latency") or {}, "latency"),
        transition_latency=_op_map(raw.get("transition_latency") or {}, "transition_latency"),
        fail_rate=fail_rate,
        sandbox_error=_op_map(raw.get("sandbox_error") or {}, "sandbox_error"),
        error_recoverable=error_recoverable,
        build_failed=_probability(raw, "build_failed"),
        stuck_starting=_op_map(raw.get("stuck_starting") or {}, "stuck_starting"),
        no_runners=_probability(raw, "no_runners"),
        list_lag=_number(raw, "list_lag", 0.0),
        quota=_limit(raw, "quota"),
        quota_cpu=_limit(raw, "quota_cpu"),
        quota_memory=_limit(raw, "quota_memory"),
        quota_disk=_limit(raw, "quota_disk"),
        start_wait_seconds=_number(raw, "start_wait_seconds", 30.0),
        time_scale=_number(raw, "time_scale", 1.0, positive=True),
        retry_after=retry_after,
        hang_seconds=_number(raw, "hang_seconds", 5.0),
        seed=seed,
    )


class Faults:
    """The live settings, the seeded random source and the per-operation request counters."""

    def __init__(self, settings: FaultSettings | None = None) -> None:
        self.requests: Counter[str] = Counter()
        self.settings = FaultSettings()
        self.rng = random.Random()
        self.replace(settings or FaultSettings())

    def replace(self, settings: FaultSettings) -> None:
        self.settings = settings
        self.rng = random.Random(settings.seed)

    def _lookup(self, table: dict[str, float], op: str) -> float:
        return table.get(op, table.get("*", 0.0))

    def latency(self, op: str) -> float:
        return self._lookup(self.settings.latency, op)

    def transition_latency(self, op: str) -> float:
        return self._lookup(self.settings.transition_latency, op)

    def roll(self, probability: float) -> bool:
        return probability > 0 and self.rng.random() < probability

    def failure(self, op: str) -> str | None:
        """The injected failure kind for this request, if the dice say so."""
        kinds = self.settings.fail_rate.get(op) or self.settings.fail_rate.get("*") or {}
        for kind in FAIL_KINDS:
            if self.roll(kinds.get(kind, 0.0)):
                return kind
        return None

    def sandbox_error(self, op: str) -> bool:
        return self.roll(self._lookup(self.settings.sandbox_error, op))

    def build_failed(self) -> bool:
        return self.roll(self.settings.build_failed)

    def stuck_starting(self, op: str) -> bool:
        return self.roll(self._lookup(self.settings.stuck_starting, op))

    def no_runners(self) -> bool:
        return self.roll(self.settings.no_runners)

    def minutes(self, minutes: float) -> float:
        """Seconds of real time that ``minutes`` of server time take (``time_scale``)."""
        return minutes * 60.0 / self.settings.time_scale

    def count(self, op: str) -> None:
        self.requests[op] += 1

    def stats(self) -> dict[str, Any]:
        requests = {op: self.requests.get(op, 0) for op in OPERATIONS}
        requests.update(self.requests)
        return {"requests": requests, "total": sum(self.requests.values())}

    def reset_stats(self) -> None:
        self.requests.clear()
