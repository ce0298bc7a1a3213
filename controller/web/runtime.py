"""What the status page shows that is not in the database: this replica's last pass and API traffic.

The daemon fills a :class:`Runtime` on each request (:meth:`controller.daemon.Daemon.runtime`): the
summary of the last pass this replica ran, whether it leads, the current 429 pauses, and request
rates from :class:`RequestRates`, which samples the ``leasectl_api_requests`` counter and turns two
samples into a per-minute rate. The clock is injected, so the rate is tested without sleeping.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from controller.metrics import Metrics

THROTTLED_OUTCOME = "RateLimitedError"
RATE_WINDOW_SECONDS = 300.0


@dataclass(frozen=True)
class PassSummary:
    """One reconcile pass as the page shows it."""

    pass_id: str
    finished_at: datetime
    duration_seconds: float
    leases: int
    actions: int
    errors: int


@dataclass(frozen=True)
class Rates:
    requests_per_minute: float | None  # None until two samples exist
    throttled_per_minute: float | None
    requests_total: float
    throttled_total: float


@dataclass(frozen=True)
class Runtime:
    holder: str
    leading: bool
    last_pass: PassSummary | None = None
    last_pass_error: str | None = None
    rates: Rates | None = None
    paused: dict[str, float] = field(default_factory=dict)  # scope -> seconds left of a 429 pause


class RequestRates:
    """Samples the API request counter; the rate is over the oldest sample kept (up to 5 minutes)."""

    def __init__(self, metrics: Metrics, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._monotonic = monotonic
        self._samples: deque[tuple[float, float, float]] = deque()
        self._lock = threading.Lock()

    def _totals(self) -> tuple[float, float]:
        total = throttled = 0.0
        for family in self._metrics.api_requests.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                total += sample.value
                if sample.labels.get("outcome") == THROTTLED_OUTCOME:
                    throttled += sample.value
        return total, throttled

    def sample(self) -> Rates:
        """Take a sample now and return the rates since the oldest kept sample."""
        now = self._monotonic()
        total, throttled = self._totals()
        with self._lock:
            while len(self._samples) > 1 and now - self._samples[1][0] >= RATE_WINDOW_SECONDS:
                self._samples.popleft()
            if not self._samples or now - self._samples[-1][0] >= 1.0:
                self._samples.append((now, total, throttled))
            first_at, first_total, first_throttled = self._samples[0]
        elapsed = now - first_at
        if elapsed < 1.0:
            return Rates(None, None, total, throttled)
        per_minute = 60.0 / elapsed
        return Rates(
            requests_per_minute=(total - first_total) * per_minute,
            throttled_per_minute=(throttled - first_throttled) * per_minute,
            requests_total=total,
            throttled_total=throttled,
        )
