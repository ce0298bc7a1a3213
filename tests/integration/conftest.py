"""Integration fixtures: ``emulator``, a local Daytona API server subprocess per test, and
``daemons``, the list a test appends its ``leasectl run`` processes to (all killed at the end).

See tests/support/emulator.py for its API (api_url, api_key, state_dir, client(), stats(),
reset_stats(), set_faults(), restart(), stop(), kill()).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess
from tests.support.emulator import EmulatorProcess


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[EmulatorProcess]:
    """A started emulator on 127.0.0.1 (free port) with its state in ``tmp_path/daytona``."""
    emu = EmulatorProcess(tmp_path / "daytona").start()
    try:
        yield emu
    finally:
        emu.kill()


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemons a test started; each is killed when the test ends, whatever happened."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.kill()
