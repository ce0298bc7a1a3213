"""The benchmarks still run: the smallest size of scale, convergence and execution, on SQLite.

Asserts the shape of the JSON lines (name, parameters, figures, machine) and that the runs did what
they claim (every lease Ready, every command succeeded), never a duration: benchmarks are not timed
tests. The chaos soak is left out: its shortest meaningful run (daemon restarts, a settle period)
takes about a minute; run it with ``python -m bench.soak --quick``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import common, convergence, execution, scale, soak
from tests.conftest import PG_ADMIN_URL, require_postgres

pytestmark = pytest.mark.timeout(120)

MACHINE_KEYS = {"hostname", "cpus", "cpu_model", "python", "sqlite", "postgres"}


def _check_shape(path: Path, stdout: str, name: str, count: int) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    printed = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert lines == printed
    assert len(lines) == count
    for record in lines:
        assert record["name"] == name
        assert isinstance(record["parameters"], dict)
        assert isinstance(record["figures"], dict)
        assert set(record["machine"]) >= MACHINE_KEYS
    return lines


def test_bench_functions_print_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    jsonl = tmp_path / "bench.jsonl"
    out = common.Output(None, jsonl)

    scale.run(out, quick=True, pg_admin_url="", sizes=[20], backends=("sqlite",))
    (rec,) = _check_shape(jsonl, capsys.readouterr().out, "scale", 1)
    figures = rec["figures"]
    assert isinstance(figures, dict)
    assert figures["actions"] == 0 and figures["phases"] == {"Ready": 20}
    assert figures["api_requests"] == 1 and figures["imperative_api_requests"] == 20
    for key in ("wall_s", "cpu_s", "peak_rss_mib", "db_queries", "ratio_api_requests", "ratio_wall"):
        assert key in figures

    jsonl.unlink()
    convergence.run(out, quick=True, pg_admin_url="", n=8, concurrency=4, latency=0.05, rate=600)
    records = _check_shape(jsonl, capsys.readouterr().out, "convergence", 2)
    for record in records:
        figures = record["figures"]
        assert isinstance(figures, dict)
        assert figures["converged"] is True and figures["ready"] == 8
        assert "ratio" in figures and "bound_s" in figures

    jsonl.unlink()
    execution.run(out, quick=True, pg_admin_url="", m=8, concurrency=2)
    records = _check_shape(jsonl, capsys.readouterr().out, "execution", 3)  # drain, poll, session
    for record in records:
        figures = record["figures"]
        assert isinstance(figures, dict)
        assert figures["dispatcher_states"] == {"succeeded": 8}
        assert "ratio_throughput_direct_over_dispatcher" in figures


@pytest.mark.timeout(360)
@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_soak_short_form_loses_nothing(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if backend == "postgres":
        require_postgres()
    jsonl = tmp_path / "soak.jsonl"
    out = common.Output(None, jsonl)
    record = soak.soak(
        out,
        drive_seconds=20.0 if backend == "postgres" else 12.0,
        settle_seconds=120.0,
        backend=backend,
        pg_admin_url=PG_ADMIN_URL,
        seed=17,
        outage_seconds=5.0,
        kill_every=(2.0, 4.0),
    )
    (rec,) = _check_shape(jsonl, capsys.readouterr().out, "soak", 1)
    figures = record["figures"]
    assert rec["figures"] == figures
    losses = {k: figures[k] for k in soak.LOSS_KEYS}
    assert not soak.failed(record), (losses, figures["not_converged_leases"], figures.get("logs_kept_in"))
    assert figures["sigkills"] >= 2
    assert figures["executions_queued_total"] > 0
    # the pool step ran (claims tried every POOL_EVERY_SECONDS); members claimed twice is a loss key
    assert figures["pool_claims_made"] + figures["pool_claims_refused"] > 0
    if backend == "postgres":
        assert record["parameters"]["replicas"] == 2
        assert figures["database_outage_seconds"] >= 5
    else:
        assert record["parameters"]["replicas"] == 1
        assert figures["database_outage_seconds"] == 0


def test_pool_bench_prints_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import pools

    jsonl = tmp_path / "bench.jsonl"
    out = common.Output(None, jsonl)
    pools.run(
        out,
        quick=True,
        pg_admin_url="",
        backends=("sqlite",),
        ready=2,
        claims=3,
        cold=1,
        rows=0,
        latency=0.2,
        cli_runs=1,
    )
    (record,) = _check_shape(jsonl, capsys.readouterr().out, "pools", 1)
    figures = record["figures"]
    assert isinstance(figures, dict)
    assert figures["warm"]["claims"] + figures["warm_misses"]["claims"] == 3
    assert figures["cold"]["claims"] == 1 and figures["refilled_after"] is True
    assert figures["cli_claim"]["p50_ms"] is not None
    sampled = figures["ready_sampled"]  # the Ready count read through the warm phase
    assert sampled["samples"] >= 2 and 0 <= sampled["min"] <= 2
    assert 0 <= sampled["below_min_ready_s"] <= sampled["span_s"]


def test_cli_bench_prints_json_lines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """One round of each start-up case: every command ran to exit 0 (else the bench raises)."""
    from bench import cli

    jsonl = tmp_path / "bench.jsonl"
    cli.run(common.Output(None, jsonl), quick=True, pg_admin_url="", rounds=1)
    records = _check_shape(jsonl, capsys.readouterr().out, "cli", 5)
    assert [r["parameters"]["case"] for r in records] == ["help", "get", "events", "exec", "exec_stdin"]
    for record in records:
        figures = record["figures"]
        assert isinstance(figures, dict)
        assert figures["baseline_median_seconds"] > 0 and figures["ratio_to_baseline"] > 0
