"""Fault injection settings, the seeded dice that apply them, and the request counters.

``FaultSettings`` is plain data, set from CLI flags at start and replaced or patched at run time
through ``/_emulator/faults`` (JSON with the same snake_case keys as the dataclass fields). Keys of
the per-operation maps are operation names (``OPERATIONS``) or ``"*"`` for every operation.

- ``latency``: seconds to wait before answering a request of that operation;
- ``transition_latency``: seconds a lifecycle operation (create, start, stop, archive, recover,
  delete) keeps its transitional state before reaching the final one (0: final at once);
- ``fail_rate``: ``{op: {kind: probability}}`` with kinds ``429`` (with ``Retry-After``), ``500``,
  ``503`` and ``timeout`` (hang ``hang_seconds``, then answer 504);
- ``sandbox_error``: ``{op: probability}`` that create/start/recover ends in state ``error``
  (``recoverable`` per ``error_recoverable``);
- ``stuck_starting``: ``{op: probability}`` that create/start/recover stays in ``starting`` for good;
- ``list_lag``: list results show creates and deletes only this many seconds after they happened;
- ``quota``: the maximum number of sandboxes (create over it answers 403, as Daytona's quota does);
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
    "config",
    "execute",
    "work_dir",
    "home_dir",
    "folder",
    "upload",
    "download",
    "delete_file",
)
FAIL_KINDS = ("429", "500", "503", "timeout")
LIFECYCLE = ("create", "start", "stop", "archive", "recover", "delete")


@dataclass
class FaultSettings:
    """Every fault knob; all default to 'no fault'."""

    latency: dict[str, float] = field(default_factory=dict)
    transition_latency: dict[str, float] = field(default_factory=dict)
    fail_rate: dict[str, dict[str, float]] = field(default_factory=dict)
    sandbox_error: dict[str, float] = field(default_factory=dict)
    error_recoverable: bool = True
    stuck_starting: dict[str, float] = field(default_factory=dict)
    list_lag: float = 0.0
    quota: int | None = None
    retry_after: int = 1
    hang_seconds: float = 5.0
    seed: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def patched(self, patch: dict[str, Any]) -> FaultSettings:
        """A copy with the given keys replaced; unknown keys or bad values raise ValueError."""
        known = {f.name for f in fields(self)}
        unknown = set(patch) - known
        if unknown:
            raise ValueError(f"unknown fault settings: {', '.join(sorted(unknown))}")
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


def validate(raw: dict[str, Any]) -> FaultSettings:
    fail_rate: dict[str, dict[str, float]] = {}
    for op, kinds in dict(raw.get("fail_rate") or {}).items():
        if op != "*" and op not in OPERATIONS:
            raise ValueError(f"fail_rate: unknown operation {op!r}")
        parsed = _op_map(kinds, f"fail_rate.{op}", FAIL_KINDS) if isinstance(kinds, dict) else None
        if parsed is None or any(p > 1 for p in parsed.values()):
            raise ValueError(f"fail_rate.{op} must map {'/'.join(FAIL_KINDS)} to probabilities")
        fail_rate[op] = parsed
    quota = raw.get("quota")
    if quota is not None and (isinstance(quota, bool) or not isinstance(quota, int) or quota < 0):
        raise ValueError("quota must be a non-negative integer or null")
    seed = raw.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError("seed must be an integer or null")
    return FaultSettings(
        latency=_op_map(raw.get("latency") or {}, "latency"),
        transition_latency=_op_map(raw.get("transition_latency") or {}, "transition_latency"),
        fail_rate=fail_rate,
        sandbox_error=_op_map(raw.get("sandbox_error") or {}, "sandbox_error"),
        error_recoverable=bool(raw.get("error_recoverable", True)),
        stuck_starting=_op_map(raw.get("stuck_starting") or {}, "stuck_starting"),
        list_lag=float(raw.get("list_lag") or 0.0),
        quota=quota,
        retry_after=int(raw.get("retry_after", 1)),
        hang_seconds=float(raw.get("hang_seconds", 5.0)),
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

    def stuck_starting(self, op: str) -> bool:
        return self.roll(self._lookup(self.settings.stuck_starting, op))

    def count(self, op: str) -> None:
        self.requests[op] += 1

    def stats(self) -> dict[str, Any]:
        requests = {op: self.requests.get(op, 0) for op in OPERATIONS}
        requests.update(self.requests)
        return {"requests": requests, "total": sum(self.requests.values())}

    def reset_stats(self) -> None:
        self.requests.clear()
