"""The live suite (tests/live, ``make test-live``) runs here against the local Daytona API, so the
scenarios a user runs against their own organization are known to work, cleanup included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from daytona import ListSandboxesQuery

from tests.support.emulator import EmulatorProcess

ROOT = Path(__file__).resolve().parents[2]


def run_live_suite(tmp_path: Path, timeout: float, **env_vars: str) -> subprocess.CompletedProcess[str]:
    """``pytest tests/live`` in a child, with none of this process's DAYTONA_/LEASECTL_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DAYTONA_", "LEASECTL_"))}
    env.update(env_vars)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "tests/live",
            f"--basetemp={tmp_path}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_live_suite_passes_and_cleans_up_against_the_local_api(
    emulator: EmulatorProcess, tmp_path: Path
) -> None:
    instance = "livecheck"
    result = run_live_suite(
        tmp_path,
        240,
        DAYTONA_API_URL=emulator.api_url,
        DAYTONA_API_KEY=emulator.api_key,
        LEASECTL_LIVE_INSTANCE=instance,
        LEASECTL_LIVE_POLL="0.2",
        LEASECTL_LIVE_WAIT="60",
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout, result.stdout[-2000:]
    left = [
        sb
        for sb in emulator.client().list(
            ListSandboxesQuery(labels={"leasectl-instance": instance}, limit=200)
        )
        if sb.state not in ("destroying", "destroyed")
    ]
    assert left == []


def test_live_suite_skips_with_a_reason_without_credentials(tmp_path: Path) -> None:
    result = run_live_suite(tmp_path, 120)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "3 skipped" in result.stdout and "DAYTONA_API_KEY and DAYTONA_API_URL" in result.stdout
