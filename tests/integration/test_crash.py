"""Crash safety of create: `leasectl reconcile --once` SIGKILLed at random moments during creates,
restarted, converges with exactly one sandbox per lease and none left over. Some creates also
"time out" at the client while the server carries them out (the emulator's timeout fault)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from daytona import ListSandboxesQuery
from typer.testing import CliRunner

from controller.cli import app
from tests.support.daemon import REPO_ROOT
from tests.support.emulator import EmulatorProcess

LEASES = 20


def _env(emulator: EmulatorProcess, database_url: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("LEASECTL_", "DAYTONA_"))},
        "LEASECTL_CONFIG": os.devnull,
        "LEASECTL_DATABASE_URL": database_url,
        "DAYTONA_API_URL": emulator.api_url,
        "DAYTONA_API_KEY": emulator.api_key,
        "LEASECTL_DAYTONA__REQUEST_TIMEOUT_SECONDS": "2",
        "LEASECTL_CONTROLLER__LEADER_LEASE_SECONDS": "1",
        "LEASECTL_CONTROLLER__BACKOFF_BASE_SECONDS": "0.05",
        "LEASECTL_CONTROLLER__BACKOFF_MAX_SECONDS": "0.2",
        "LEASECTL_CONTROLLER__MAX_CONCURRENT_ACTIONS": "4",
    }


def _reconcile(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "reconcile", "--once"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_sigkill_during_creates_never_leaves_a_second_sandbox(
    emulator: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    leases = tmp_path / "leases.yaml"
    leases.write_text("leases:\n" + "".join(f"  - name: crash-{i:02d}\n" for i in range(LEASES)))
    result = CliRunner().invoke(app, ["--database-url", database_url, "apply", "-f", str(leases)])
    assert result.exit_code == 0, result.stdout
    # Creates take a while, and one in five is carried out by the server while the client's
    # request times out (the answer is lost), and the list lags 2 s behind: the next pass must find
    # the recorded attempt by name instead of creating again.
    emulator.set_faults(
        latency={"create": 0.15}, fail_rate={"create": {"timeout": 0.2}}, hang_seconds=3, seed=11
    )
    env = _env(emulator, database_url)
    rng = random.Random(1234)

    kills = 0
    for _ in range(8):
        proc = _reconcile(env)
        time.sleep(rng.uniform(0.6, 2.0))  # start-up is ~0.5 s; kill somewhere in the creates
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait(timeout=10)
        time.sleep(1.1)  # the killed process's leader lease expires
    assert kills >= 4

    emulator.reset_faults()
    for _ in range(10):
        proc = _reconcile(env)
        proc.wait(timeout=120)
        sandboxes = list(emulator.client().list(ListSandboxesQuery(labels={"leasectl-instance": "default"})))
        per_lease: dict[str, int] = {}
        for sandbox in sandboxes:
            per_lease[sandbox.labels["leasectl-lease"]] = (
                per_lease.get(sandbox.labels["leasectl-lease"], 0) + 1
            )
        if proc.returncode == 0 and per_lease == {f"crash-{i:02d}": 1 for i in range(LEASES)}:
            states = {s.state for s in sandboxes}
            if states == {"started"}:
                break
        time.sleep(1.1)
    assert per_lease == {f"crash-{i:02d}": 1 for i in range(LEASES)}
    assert emulator.stats().get("create", 0) >= LEASES
