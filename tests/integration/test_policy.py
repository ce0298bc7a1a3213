"""Policy from the command line (issue 16): quotas applied from lease files and shown by `leasectl
quotas`, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import sqlalchemy as sa
from typer.testing import CliRunner

from controller import db as dbmod
from controller.cli import app

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
