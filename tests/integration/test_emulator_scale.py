"""local-daytona with 10,000 sandboxes on disk: start-up takes seconds, listing them all is fast."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from daytona import ListSandboxesQuery

from controller.emulator.state import SandboxRecord, Store
from tests.support.emulator import EmulatorProcess

pytestmark = pytest.mark.timeout(120)

FLEET = 10_000


def seed_fleet(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(state_dir)
    now = time.time()
    records = []
    for i in range(FLEET):
        stamp = "2026-01-01T00:00:00.000Z"
        records.append(
            SandboxRecord(
                id=str(uuid.uuid4()),
                name=f"fleet-{i:05d}",
                seq=store.next_seq(),
                created_ts=now,
                created_at=stamp,
                updated_at=stamp,
                state="started" if i % 3 else "stopped",
                labels={
                    "leasectl-instance": "bench" if i % 2 == 0 else "other",
                    "code-toolbox-language": "python",
                },
            )
        )
    store.save_many(records)
    store.close()


def test_ten_thousand_sandboxes(tmp_path: Path) -> None:
    state_dir = tmp_path / "daytona"
    seed_fleet(state_dir)
    started = time.monotonic()
    with EmulatorProcess(state_dir) as emu:
        startup = time.monotonic() - started
        assert startup < 10, f"start-up took {startup:.1f}s"
        client = emu.client()
        started = time.monotonic()
        names = [s.name for s in client.list(ListSandboxesQuery(limit=200))]
        elapsed = time.monotonic() - started
        assert len(names) == FLEET and len(set(names)) == FLEET
        assert emu.stats()["list"] == FLEET // 200
        assert elapsed < 30, f"listing took {elapsed:.1f}s"
        mine = list(client.list(ListSandboxesQuery(limit=200, labels={"leasectl-instance": "bench"})))
        assert len(mine) == FLEET // 2
        assert client.get("fleet-00042").labels["leasectl-instance"] == "bench"
        print(f"start-up {startup:.2f}s, list of {FLEET} in {elapsed:.2f}s")
