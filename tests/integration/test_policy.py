"""Policy from the command line (issue 16): quotas applied from lease files and shown by `leasectl
quotas`, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from typer.testing import CliRunner

from controller import db as dbmod
from controller import usage
from controller.cli import app
from controller.providers.base import LABEL_INSTANCE, LABEL_LEASE, LABEL_SPEC, ObservedSandbox

QUOTAS = """\
leases:
  - name: ml-1
    image: python:3.12-slim
    resources: {cpu: 2, memory: 4, disk: 10}
    labels: {team: ml}
quotas:
  - {label: team, sandboxes: 2, cpu: 4}
  - {label: team, value: ml, gpu: 0}
  - {label: project, sandboxes: 1}
  - {cpu: 100}
"""


def run(url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["--database-url", url, *args])
    return result.exit_code, result.stdout, result.stderr


def quota_rows(url: str) -> list[tuple[object, ...]]:
    database = dbmod.connect(url)
    try:
        with database.engine.connect() as conn:
            query = "SELECT label, value, sandboxes, cpu, memory, disk, gpu FROM quotas ORDER BY label, value"
            return [tuple(r) for r in conn.execute(sa.text(query))]
    finally:
        database.dispose()


def test_quotas_apply_show_export_and_prune(database_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUOTAS.replace("cpu: 4}", "cpu: -4}").replace("sandboxes: 1}", "sandboxes: lots}"))
    code, out, err = run(database_url, "apply", "-f", str(bad))
    assert code == 2, out + err
    assert f"{bad}: quotas[0]: cpu: Input should be greater than or equal to 0" in err
    assert f"{bad}: quotas[2]: sandboxes: Input should be a valid integer" in err
    assert quota_rows(database_url) == []

    good = tmp_path / "good.yaml"
    good.write_text(QUOTAS)
    code, out, err = run(database_url, "apply", "-f", str(good))
    assert code == 0, out + err
    assert "quota/team=* created" in out and "quota/instance created" in out
    assert quota_rows(database_url) == [
        ("", "", None, 100, None, None, None),
        ("project", "", 1, None, None, None, None),
        ("team", "", 2, 4, None, None, None),
        ("team", "ml", None, None, None, None, 0),
    ]
    code, out, err = run(database_url, "quotas", "-o", "json")
    assert code == 0, err
    lines = {(d["quota"], d["scope"]): d for d in json.loads(out)}
    assert lines[("project=*", "project=*")]["note"] == "matches no lease"
    assert lines[("team=*", "team=ml")]["leases"] == 1
    assert lines[("team=*", "team=ml")]["use"]["cpu"] == 0  # nothing observed running yet
    code, out, _ = run(database_url, "quotas")
    assert "matches no lease" in out and "0/4" in out

    code, out, _ = run(database_url, "export")
    assert "quotas:" in out and "label: project" in out
    again = tmp_path / "again.yaml"
    again.write_text(out)
    code, out, err = run(database_url, "apply", "-f", str(again))
    assert code == 0 and "quota/team=ml unchanged" in out, out + err

    # A file without `quotas:` leaves them alone even with --prune; one with a shorter list prunes.
    only = tmp_path / "only.yaml"
    only.write_text(QUOTAS.split("quotas:")[0])
    code, out, err = run(database_url, "apply", "--prune", "-f", str(only))
    assert code == 0, out + err
    assert len(quota_rows(database_url)) == 4
    only.write_text(QUOTAS.split("quotas:")[0] + "quotas:\n  - {cpu: 50}\n")
    code, out, err = run(database_url, "apply", "--prune", "-f", str(only))
    assert code == 0, out + err
    assert "quota/project=* pruned" in out
    assert quota_rows(database_url) == [("", "", None, 50, None, None, None)]


# -- usage: a scripted fleet history and hand-computed totals ------------------------------------------

T0 = datetime(2026, 11, 2, 10, 0, tzinfo=UTC)


def _sb(sid: str, lease: str, team: str, state: str, cpu: int, memory: int, disk: int) -> ObservedSandbox:
    labels = {LABEL_INSTANCE: "default", LABEL_LEASE: lease, LABEL_SPEC: "s", "team": team}
    return ObservedSandbox(id=sid, name=sid, state=state, labels=labels, cpu=cpu, memory=memory, disk=disk)


def a1(state: str) -> ObservedSandbox:
    return _sb("sb-a1", "a1", "a", state, 2, 4, 10)


def b1(state: str) -> ObservedSandbox:
    return _sb("sb-b1", "b1", "b", state, 1, 1, 3)


# (minutes after T0, what the pass observed)
HISTORY: list[tuple[int, list[ObservedSandbox]]] = [
    (0, [a1("started"), b1("started")]),
    (30, [a1("started"), b1("started")]),
    (60, [a1("stopped"), b1("started")]),  # a1 ran 10:00-11:00
    (90, [a1("stopped")]),  # b1 gone: it ran 10:00-11:30
    (120, [a1("archived")]),  # a1 stopped 11:00-12:00
    (180, [a1("archived")]),  # 60 minutes without a pass (gap > 45 min): 12:00-13:00 not billed
    (190, [a1("started")]),  # archived 13:00-13:10 holds no disk; started from 13:10, 0 h so far
]


def test_usage_of_a_scripted_fleet_history_matches_hand_computed_totals(
    db: dbmod.Database, database_url: str, tmp_path: Path
) -> None:
    for minutes, seen in HISTORY:
        with db.session() as session:
            usage.record(session, seen, {}, T0 + timedelta(minutes=minutes), timedelta(minutes=45))
    with db.engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT COUNT(*) FROM usage")).scalar()
    assert rows == 6  # one row per change of state, not per pass (7 passes, 2 sandboxes)

    code, out, err = run(database_url, "usage", "--by", "team", "-o", "json")
    assert code == 0, err
    lines = {d["group"]: d for d in json.loads(out)["lines"]}
    assert lines["a"] == {
        "group": "a",
        "sandbox_hours": 1.0,
        "cpu_hours": 2.0,
        "memory_gib_hours": 4.0,
        "disk_gib_hours": 20.0,  # 1 h started + 1 h stopped, 10 GiB
        "gpu_hours": 0.0,
    }
    assert lines["b"] == {
        "group": "b",
        "sandbox_hours": 1.5,
        "cpu_hours": 1.5,
        "memory_gib_hours": 1.5,
        "disk_gib_hours": 4.5,
        "gpu_hours": 0.0,
    }
    assert lines["TOTAL"]["sandbox_hours"] == 2.5 and lines["TOTAL"]["disk_gib_hours"] == 24.5

    code, out, err = run(database_url, "usage", "--by", "team", "--since", "2026-11-02T10:30Z", "-o", "csv")
    assert code == 0, err
    assert out.splitlines() == [
        "team,sandbox_hours,cpu_hours,memory_gib_hours,disk_gib_hours,gpu_hours",
        "a,0.5,1.0,2.0,15.0,0.0",
        "b,1.0,1.0,1.0,3.0,0.0",
        "TOTAL,1.5,2.0,3.0,18.0,0.0",
    ]

    config = tmp_path / "prices.yaml"
    config.write_text(
        "policy:\n  prices: {currency: EUR, cpu_hour: 0.1, memory_gib_hour: 0.01, disk_gib_hour: 0.001}\n"
    )
    code, out, err = run(database_url, "--config", str(config), "usage", "--by", "team", "-o", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["currency"] == "EUR"
    costs = {d["group"]: d["cost"] for d in report["lines"]}
    assert costs == {"a": 0.26, "b": 0.1695, "TOTAL": 0.4295}

    code, out, err = run(database_url, "usage")
    assert code == 0 and "a1" in out and "b1" in out, err
    code, _, err = run(database_url, "usage", "--since", "yesterday")
    assert code == 2 and "--since: not an ISO 8601 time" in err


def test_a_pass_reads_open_segments_without_their_labels_or_start(db: dbmod.Database) -> None:
    """The usage step of every pass reads each open segment: only what it compares (issue 14: decoding
    every segment's labels and parsing its timestamps cost a 10,000-lease pass 0.2 s), the gap check
    answered by the database."""
    seen = [a1("started"), b1("started")]
    with db.session() as session:
        usage.record(session, seen, {}, T0, timedelta(minutes=45))
    selects: list[str] = []

    def capture(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "usage" in statement:
            selects.append(statement)

    sa.event.listen(db.engine, "before_cursor_execute", capture)
    try:
        with db.session() as session:
            changes = usage.record(session, seen, {}, T0 + timedelta(minutes=1), timedelta(minutes=45))
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", capture)
    assert len(changes.extend) == 2 and not changes.open and not changes.close_now
    assert len(selects) == 1
    columns = selects[0].split("FROM")[0]
    assert "sandbox_id" in columns and "state" in columns and "ended_at >=" in columns
    assert "labels" not in columns and "started_at" not in columns and "lease_name" not in columns


def test_a_first_pass_over_many_sandboxes_opens_every_segment_in_chunks(db: dbmod.Database) -> None:
    """More new segments than one INSERT takes (usage._INSERT_CHUNK): all of them, once."""
    seen = [_sb(f"sb-{i}", f"lease-{i}", "a", "started", 1, 1, 3) for i in range(2 * usage._INSERT_CHUNK + 3)]
    with db.session() as session:
        changes = usage.record(session, seen, {}, T0, timedelta(minutes=45))
    assert len(changes.open) == len(seen)
    with db.session() as session:
        again = usage.record(session, seen, {}, T0 + timedelta(minutes=1), timedelta(minutes=45))
    assert len(again.extend) == len(seen) and not again.open
    with db.engine.connect() as conn:
        count, sandboxes = conn.execute(
            sa.text("SELECT COUNT(*), COUNT(DISTINCT sandbox_id) FROM usage")
        ).one()
    assert count == sandboxes == len(seen)
