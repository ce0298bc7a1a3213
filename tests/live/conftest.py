"""Fixtures of the live suite (``make test-live``): leasectl against a real Daytona organization.

The suite runs only when ``DAYTONA_API_KEY`` and ``DAYTONA_API_URL`` are set; otherwise every test
skips and says why. The variables are read when this module is imported, before the autouse fixture
of tests/conftest.py hides ``DAYTONA_*`` from each test. Every run uses its own instance label
(``live-<random>``, or ``LEASECTL_LIVE_INSTANCE``), and the session's last step deletes every sandbox
that carries it, whether the tests passed or not; what it could not delete is printed.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from controller.errors import ProviderError
from controller.providers.base import LABEL_INSTANCE
from controller.providers.daytona import DaytonaProvider

API_KEY = os.environ.get("DAYTONA_API_KEY", "")
API_URL = os.environ.get("DAYTONA_API_URL", "")
TARGET = os.environ.get("DAYTONA_TARGET", "")
INSTANCE = os.environ.get("LEASECTL_LIVE_INSTANCE") or f"live-{uuid.uuid4().hex[:8]}"
# Seconds between observations while waiting; Daytona needs seconds to minutes per transition.
POLL = float(os.environ.get("LEASECTL_LIVE_POLL", "3"))
WAIT = float(os.environ.get("LEASECTL_LIVE_WAIT", "300"))
SKIP_REASON = (
    "live Daytona tests need DAYTONA_API_KEY and DAYTONA_API_URL (e.g. https://app.daytona.io/api); "
    "run `make test-live` with both set"
)


@dataclass(frozen=True)
class Live:
    api_url: str
    api_key: str
    target: str
    instance: str
    poll: float
    wait: float

    def provider(self) -> DaytonaProvider:
        return DaytonaProvider(self.api_url, self.api_key, target=self.target or None)


def cleanup(live: Live) -> list[str]:
    """Delete every sandbox of the run's instance; return what could not be deleted."""
    provider = live.provider()
    left: list[str] = []
    deadline = time.monotonic() + live.wait
    while time.monotonic() < deadline:
        try:
            mine = provider.list_sandboxes({LABEL_INSTANCE: live.instance})
        except ProviderError as exc:
            left = [f"cannot list: {exc}"]
            time.sleep(live.poll)
            continue
        left = []
        for sb in mine:
            if sb.state in ("destroying", "destroyed"):
                continue
            try:
                provider.delete(sb.id)
            except ProviderError as exc:
                left.append(f"{sb.name} ({sb.id}, {sb.state}): {exc}")
        if not mine:
            return []
        time.sleep(live.poll)
    return left or [f"sandboxes of instance {live.instance} still listed after {live.wait:.0f}s"]


@pytest.fixture(scope="session")
def live() -> Iterator[Live]:
    if not (API_KEY and API_URL):
        pytest.skip(SKIP_REASON)
    config = Live(API_URL, API_KEY, TARGET, INSTANCE, POLL, WAIT)
    try:
        yield config
    finally:
        left = cleanup(config)
        if left:
            print(f"\nlive cleanup: could not delete (instance {config.instance}):\n  " + "\n  ".join(left))
