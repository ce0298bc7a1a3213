"""Integration fixtures: ``emulator``, a local Daytona API server subprocess per test, and
``daemons``, the list a test appends its ``leasectl run`` processes to (all killed at the end; when
the test failed, each live daemon first writes every thread's stack to its log, whose tail is then
printed in the test's report).

See tests/support/emulator.py for its API (api_url, api_key, state_dir, client(), stats(),
reset_stats(), set_faults(), restart(), stop(), kill()).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item (``daemons`` reads whether the test failed)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def daemons(request: pytest.FixtureRequest) -> Iterator[list[DaemonProcess]]:
    """Daemons a test started; each is killed when the test ends, whatever happened. After a failed
    test, the live ones dump their threads' stacks first (SIGUSR1) and their logs' tails are printed:
    a daemon that stopped doing something shows where it waits."""
    started: list[DaemonProcess] = []
    yield started
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        for d in started:
            if d.dump_stacks():
                print(f"--- {d.log_path} (tail, with the daemon's thread stacks) ---\n{d.log()}")
    for d in started:
        d.kill()
