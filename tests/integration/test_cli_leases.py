"""`leasectl db upgrade / apply / get / export` against SQLite and PostgreSQL, as an operator uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from controller import db as dbmod
from controller.cli import app

VALID = """\
leases:
  - name: web-1
    snapshot: daytona-small
    env: {FOO: bar, EMPTY: ""}
    labels: {team: a}
    auto_stop_interval: 15
  - name: build-box
    state: stopped
    image: python:3.12-slim
    resources: {cpu: 2, memory: 4, disk: 10}
    expires_at: 2030-12-31T18:00:00Z
  - name: idle
    state: archived
    paused: true
"""


def run(database_url: str, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["--database-url", database_url, *args])
    return result.exit_code, result.stdout, result.stderr


def leases_table(database_url: str) -> list[tuple[object, ...]]:
    database = dbmod.connect(database_url)
    try:
        with database.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text("SELECT * FROM leases ORDER BY name"))]
    finally:
        database.dispose()


def test_apply_get_export_round_trip(database_url: str, tmp_path: Path) -> None:
    src = tmp_path / "leases.yaml"
    src.write_text(VALID)
    code, out, _ = run(database_url, "apply", "-f", str(src))
    assert code == 0, out
    assert "3 created, 0 updated, 0 unchanged, 0 pruned" in out

    code, out, _ = run(database_url, "apply", "-f", str(src))
    assert "0 created, 0 updated, 3 unchanged" in out

    code, out, _ = run(database_url, "get", "-o", "json")
    assert code == 0
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"web-1", "build-box", "idle"}
    for r in rows.values():
        assert {"name", "desired_state", "phase", "observed_state", "sandbox_id", "message"} <= set(r)
    assert rows["build-box"]["desired_state"] == "stopped"
    assert rows["web-1"]["phase"] == "Pending"

    exported = tmp_path / "exported.yaml"
    code, _, _ = run(database_url, "export", "-o", str(exported))
    assert code == 0
    before = leases_table(database_url)
    code, out, _ = run(database_url, "apply", "-f", str(exported))
    assert "0 created, 0 updated, 3 unchanged, 0 pruned" in out
    assert leases_table(database_url) == before

    code, out, _ = run(database_url, "get")
    assert code == 0 and "web-1" in out and "archived (paused)" in out


def test_update_prune_and_dry_run(database_url: str, tmp_path: Path) -> None:
    src = tmp_path / "leases.yaml"
    src.write_text(VALID)
    run(database_url, "apply", "-f", str(src))
    changed = tmp_path / "changed.yaml"
    changed.write_text("leases:\n  - name: web-1\n    snapshot: daytona-large\n")

    before = leases_table(database_url)
    # 2 of 3 live leases is more than the default max_prune_share (0.5): refused, dry run or not.
    for dry in (("--dry-run",), ()):
        code, _, err = run(database_url, "apply", "-f", str(changed), "--prune", *dry)
        assert code == 2 and "refusing to prune 2 of 3" in err and "--prune-all" in err
        assert leases_table(database_url) == before

    code, out, _ = run(database_url, "apply", "-f", str(changed), "--prune", "--prune-all", "--dry-run")
    assert code == 0
    assert "0 created, 1 updated, 0 unchanged, 2 pruned (dry run" in out
    assert leases_table(database_url) == before

    code, out, _ = run(database_url, "apply", "-f", str(changed), "--prune", "--prune-all")
    assert "lease/build-box pruned" in out and "lease/idle pruned" in out
    _, out, _ = run(database_url, "get", "-o", "json")
    states = {r["name"]: r["desired_state"] for r in json.loads(out)}
    assert states == {"web-1": "running", "build-box": "absent", "idle": "absent"}


INVALID = {
    "bad name": ("leases:\n  - name: Web_1\n", "name"),
    "snapshot and image": ("leases:\n  - name: a\n    snapshot: s\n    image: i\n", "snapshot or image"),
    "resources without image": ("leases:\n  - name: a\n    resources: {cpu: 1}\n", "resources"),
    "zero cpu": ("leases:\n  - name: a\n    image: i\n    resources: {cpu: 0}\n", "resources.cpu"),
    "negative interval": ("leases:\n  - name: a\n    auto_stop_interval: -5\n", "auto_stop_interval"),
    "auto delete below -1": ("leases:\n  - name: a\n    auto_delete_interval: -2\n", "auto_delete_interval"),
    "env key": ("leases:\n  - name: a\n    env: {'X Y': v}\n", "env"),
    "reserved label": ("leases:\n  - name: a\n    labels: {leasectl-spec: v}\n", "reserved"),
    "unknown key": ("leases:\n  - name: a\n    colour: red\n", "colour"),
    "duplicate": ("leases:\n  - name: a\n  - name: a\n", "duplicate"),
    "bad state": ("leases:\n  - name: a\n    state: on\n", "state"),
    "not yaml": ("leases: [\n", "YAML"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_input_exits_2_and_changes_nothing(database_url: str, tmp_path: Path, case: str) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    run(database_url, "apply", "-f", str(good))
    before = leases_table(database_url)

    text, needle = INVALID[case]
    bad = tmp_path / "bad.yaml"
    # A valid change in the same run must not land either: one transaction or nothing.
    bad.write_text(text + "  - name: brand-new\n" if "duplicate" not in case else text)
    code, _, err = run(database_url, "apply", "-f", str(good), "-f", str(bad), "--prune")
    assert code == 2
    assert "bad.yaml" in err and needle in err
    assert leases_table(database_url) == before


def test_sql_edits_show_in_get_and_typos_are_refused(database_url: str, tmp_path: Path) -> None:
    src = tmp_path / "leases.yaml"
    src.write_text(VALID)
    run(database_url, "apply", "-f", str(src))
    database = dbmod.connect(database_url)
    try:
        with database.engine.begin() as conn:
            conn.execute(sa.text("UPDATE leases SET desired_state='stopped' WHERE name='web-1'"))
        _, out, _ = run(database_url, "get", "web-1", "-o", "json")
        assert json.loads(out)[0]["desired_state"] == "stopped"

        for statement in (
            "UPDATE leases SET desired_state='stoped' WHERE name='web-1'",
            "UPDATE leases SET cpu=0 WHERE name='build-box'",
            "UPDATE leases SET cpu=2 WHERE name='web-1'",  # resources need an image
            "UPDATE leases SET auto_delete_interval=-2 WHERE name='web-1'",
            "INSERT INTO leases (name, snapshot, image) VALUES ('x', 's', 'i')",
            "INSERT INTO leases (name) VALUES ('web-1')",
            "INSERT INTO executions (lease_name, command, state) VALUES ('web-1', 'true', 'queud')",
        ):
            with pytest.raises(sa.exc.IntegrityError), database.engine.begin() as conn:
                conn.execute(sa.text(statement))

        with database.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO executions (lease_name, command) VALUES ('box', 'echo hi')"))
            row = conn.execute(sa.text("SELECT state, output_truncated, created_at FROM executions")).one()
        assert row.state == "queued" and not row.output_truncated and row.created_at is not None
    finally:
        database.dispose()


def test_get_unknown_lease_exits_2(database_url: str) -> None:
    code, _, err = run(database_url, "get", "nope")
    assert code == 2 and "no such lease: nope" in err


def test_db_upgrade_is_idempotent(database_url: str) -> None:
    for _ in range(2):
        code, out, _ = run(database_url, "db", "upgrade")
        assert code == 0 and "at revision" in out


def test_version_and_help() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("leasectl ")
    for cmd in (
        ["--help"],
        ["apply", "--help"],
        ["get", "--help"],
        ["export", "--help"],
        ["db", "upgrade", "--help"],
    ):
        assert CliRunner().invoke(app, cmd).exit_code == 0, cmd


SCHEDULED = """\
leases:
  - name: office
    snapshot: daytona-small
    state: stopped
    schedule:
      timezone: Europe/Berlin
      entries:
        - {cron: "0 9 * * 1-5", state: running}
        - {cron: "0 18 * * 1-5", state: stopped}
"""


def test_apply_refuses_a_bad_schedule_and_get_shows_the_state_in_force(
    database_url: str, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(SCHEDULED.replace("0 18 * * 1-5", "0 18 * *").replace("Europe/Berlin", "Europe/Nowhere"))
    code, out, err = run(database_url, "apply", "-f", str(bad))
    assert code == 2, out + err
    assert f"{bad}:5: lease 'office': schedule.timezone: unknown time zone 'Europe/Nowhere'" in err
    assert leases_table(database_url) == []  # nothing written

    good = tmp_path / "good.yaml"
    good.write_text(SCHEDULED)
    code, out, err = run(database_url, "apply", "-f", str(good))
    assert code == 0, out + err
    code, out, _ = run(database_url, "get", "-o", "json")
    (row,) = json.loads(out)
    assert row["scheduled_state"] in ("running", "stopped")
    assert row["next_state"] in ("running", "stopped") and row["next_state"] != row["scheduled_state"]
    assert row["next_change"] is not None and row["schedule_timezone"] == "Europe/Berlin"
    code, out, _ = run(database_url, "get")
    assert f"{row['scheduled_state']} (schedule; {row['next_state']} at " in out
    code, out, _ = run(database_url, "export")
    assert "0 9 * * 1-5" in out and "Europe/Berlin" in out
