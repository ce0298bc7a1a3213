"""bench.report's scale section: the baseline (first record of a case) and the growth table."""

from __future__ import annotations

from typing import Any

from bench import report

MACHINE = {
    "hostname": "h",
    "cpus": 2,
    "cpu_model": "c",
    "platform": "p",
    "python": "3.11",
    "sqlite": "3",
    "postgres": None,
}


def _scale(leases: int, cpu: float, at: str, **extra: Any) -> dict[str, Any]:
    figures = {
        "wall_s": cpu * 2,
        "cpu_s": cpu,
        "peak_rss_mib": 100.0 + leases / 1000,
        "pass_alloc_peak_mib": 1.0,
        "db_queries": 8,
        "api_requests": -(-leases // 200),
        "imperative_api_requests": leases,
        "imperative_wall_s": leases / 1000,
        "ratio_api_requests": 200.0,
        "ratio_wall": 3.0,
        **extra,
    }
    params = {"leases": leases, "backend": "sqlite", "imperative_concurrency": 8, "api": "local"}
    return {"name": "scale", "parameters": params, "figures": figures, "machine": MACHINE, "at": at}


def test_scale_rows_show_the_first_record_as_before_and_the_growth() -> None:
    old = _scale(10_000, 1.4, "2026-11-26T10:00:00Z")
    new = [
        _scale(1_000, 0.04, "2026-11-27T10:00:00Z", cold_pass_cpu_s=0.1),
        _scale(10_000, 0.4, "2026-11-27T10:01:00Z", cold_pass_cpu_s=1.0),
        _scale(
            100_000,
            5.0,
            "2026-11-27T10:02:00Z",
            cold_pass_cpu_s=12.0,
            imperative_sequential=False,
            imperative_parallel_wall_s=50.0,
            ratio_wall=None,
            ratio_wall_parallel=10.0,
        ),
    ]
    text = report.render([old, *new], "x.jsonl")
    row = next(line for line in text.splitlines() if line.startswith("| 10,000 | sqlite"))
    assert "1.4 (2026-11-26)" in row and "3.5x" in row  # before, and before / now
    row = next(line for line in text.splitlines() if line.startswith("| 100,000 | sqlite"))
    assert "50.0 (C=8)" in row and "| - |" in row  # no earlier record of this case
    growth = [line for line in text.splitlines() if line.startswith("| sqlite |")]
    assert len(growth) == 3
    assert growth[1].split("|")[5].strip() == "1.0"  # 0.04 -> 0.4 for 10x the leases: linear
    assert growth[2].split("|")[5].strip() == "1.25"  # 0.4 -> 5.0: a quarter worse than linear
