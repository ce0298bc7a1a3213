"""CLI start-up: ``leasectl --help``, ``get``, ``events`` and ``exec`` against ``python -c pass``.

Each command is run ROUNDS times as a fresh process, interleaved with ``python -c pass`` in the
same loop (so a busy moment of the machine hits baseline and command alike); the figure is the
median wall time of each and its ratio to the baseline's median. ``get`` reads a SQLite database of
10 leases; ``events`` its last 50 events (those of the passes that made the leases Ready); ``exec``
runs ``true`` on a lease made Ready by real reconcile passes against the local Daytona API (a
subprocess), through the whole path (execution row, login-shell script, one toolbox request,
result row and event); ``exec --stdin`` also uploads a small file, feeds it to ``cat``
and deletes it. Targets (issue 14): ``--help`` <= 6x, ``get`` <= 10x, ``exec`` <= 15x (the
issue names ``get`` and ``exec`` alone; ``events`` and ``exec --stdin`` are held to the same).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import API_KEY, INSTANCE, Output, database, log, ratio, start_emulator, table, workdir

ROUNDS = 10
LEASES = 10
TARGETS = {"help": 6.0, "get": 10.0, "events": 10.0, "exec": 15.0, "exec_stdin": 15.0}


def leasectl_argv() -> list[str]:
    """The installed console script beside this interpreter (what an operator runs)."""
    script = Path(sys.executable).with_name("leasectl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "controller.cli"]


def _env(url: str, api_url: str) -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE (set in some shells) would make every run compile leasectl's modules
    # from source; an installed leasectl has its .pyc files, which the warm-up run writes here.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LEASECTL_", "DAYTONA_")) and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(
        {
            "LEASECTL_DATABASE_URL": url,
            "LEASECTL_CONTROLLER__INSTANCE": INSTANCE,
            "DAYTONA_API_URL": api_url,
            "DAYTONA_API_KEY": API_KEY,
            "DAYTONA_TARGET": "local",
        }
    )
    return env


def _time(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"cli bench: {argv[1:]} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return elapsed


def _fill(url: str, ready: int) -> None:
    """Stopped leases beside the Ready ones, up to LEASES rows."""
    from models import Lease, utcnow

    now = utcnow()
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Lease),
            [
                {
                    "name": f"idle-{i}",
                    "desired_state": "stopped",
                    "env": {},
                    "labels": {},
                    "paused": False,
                    "created_at": now,
                    "updated_at": now,
                }
                for i in range(LEASES - ready)
            ],
        )
    engine.dispose()


def run(out: Output, *, quick: bool, pg_admin_url: str, rounds: int = ROUNDS) -> list[dict[str, Any]]:
    from bench.execution import _ready_fleet

    leasectl = leasectl_argv()
    samples: dict[str, list[float]] = {name: [] for name in ("baseline", *TARGETS)}
    with workdir("cli") as tmp:
        emu = start_emulator(tmp / "daytona")
        try:
            with database("sqlite", tmp, pg_admin_url) as url:
                fleet = _ready_fleet(url, emu.api_url)
                _fill(url, len(fleet))
                lease = sorted(fleet)[0]
                env = _env(url, emu.api_url)
                (tmp / "stdin.txt").write_bytes(b"fed in\n")
                commands = {
                    "baseline": [sys.executable, "-c", "pass"],
                    "help": [*leasectl, "--help"],
                    "get": [*leasectl, "get"],
                    "events": [*leasectl, "events"],
                    "exec": [*leasectl, "exec", lease, "--", "true"],
                    "exec_stdin": [*leasectl, "exec", lease, "--stdin", "stdin.txt", "--", "cat"],
                }
                log(f"cli: {rounds} rounds of {', '.join(commands)} ({' '.join(leasectl)})")
                for argv in commands.values():  # one warm-up each: .pyc files, page cache
                    _time(argv, env, tmp)
                for _ in range(rounds):
                    for name, argv in commands.items():
                        samples[name].append(_time(argv, env, tmp))
        finally:
            emu.kill()
    baseline = statistics.median(samples["baseline"])
    records = []
    for name in TARGETS:
        median = statistics.median(samples[name])
        figures = {
            "median_seconds": round(median, 4),
            "min_seconds": round(min(samples[name]), 4),
            "baseline_median_seconds": round(baseline, 4),
            "baseline_min_seconds": round(min(samples["baseline"]), 4),
            "ratio_to_baseline": ratio(median, baseline),
            "target_ratio": TARGETS[name],
            "within_target": median <= TARGETS[name] * baseline,
        }
        parameters = {
            "command": " ".join(["leasectl", *commands[name][len(leasectl) :]]),
            "baseline": "python -c pass",
            "rounds": rounds,
            "database": "sqlite",
            "leases": LEASES,
        }
        records.append(out.emit("cli", {"case": name, **parameters}, figures))
    print()
    print("cli: start-up against `python -c pass` (medians of the same rounds)")
    print(
        table(
            ["command", "median s", "baseline s", "ratio", "target"],
            [
                [
                    r["parameters"]["command"],
                    r["figures"]["median_seconds"],
                    r["figures"]["baseline_median_seconds"],
                    r["figures"]["ratio_to_baseline"],
                    f"<= {r['figures']['target_ratio']:g}x",
                ]
                for r in records
            ],
        )
    )
    print()
    return records


if __name__ == "__main__":
    from bench.common import DEFAULT_PG_ADMIN_URL

    run(Output(None), quick=True, pg_admin_url=DEFAULT_PG_ADMIN_URL)
