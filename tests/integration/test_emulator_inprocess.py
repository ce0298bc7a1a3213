"""The in-process variant (controller.emulator.start_background) and a clean SIGTERM stop."""

from __future__ import annotations

from pathlib import Path

import pytest
from daytona import Daytona, DaytonaConfig

from controller.emulator import EmulatorConfig, FaultSettings, start_background
from tests.support.emulator import EmulatorProcess

pytestmark = [pytest.mark.timeout(60), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_background_thread_server(tmp_path: Path) -> None:
    config = EmulatorConfig(api_key="k", port=0, state_dir=tmp_path / "d", faults=FaultSettings(quota=5))
    with start_background(config) as emu:
        assert emu.url.startswith("http://127.0.0.1:") and emu.url.endswith("/api")
        client = Daytona(
            DaytonaConfig(api_key="k", api_url=emu.url, target="local", use_deprecated_polling=True)
        )
        sandbox = client.create(timeout=10)
        assert sandbox.process.exec("echo in-process").result == "in-process\n"


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    emu = EmulatorProcess(tmp_path / "d").start()
    emu.stop()
    assert emu.process is not None and emu.process.returncode == 0
