"""Issue 15 end to end: the real SDK against the local Daytona API, on SQLite and PostgreSQL.

A label or interval change is applied in place (same sandbox id, new labels and settings at the
server), an image change replaces the sandbox, and `plan` says which it will be."""

from __future__ import annotations

import time
from pathlib import Path

from tests.integration.test_reconcile_emulator import INSTANCE, cli, converge, env, ours, reconcile, sql
from tests.support.emulator import EmulatorProcess

__all__ = ["env"]  # the fixture, shared with test_reconcile_emulator


def _write(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def test_label_change_updates_in_place_and_image_change_replaces(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    spec = tmp_path / "l.yaml"
    _write(spec, "leases:\n  - name: web\n    image: python:3.11\n    labels: {team: a}\n")
    assert cli(database_url, "apply", "-f", str(spec))[0] == 0
    first = converge(database_url, {"web": "Ready"})["web"]

    _write(
        spec,
        "leases:\n  - name: web\n    image: python:3.11\n    labels: {team: b}\n    auto_stop_interval: 45\n",
    )
    assert cli(database_url, "apply", "-f", str(spec))[0] == 0
    code, out, _ = cli(database_url, "plan")
    assert "update labels, auto_stop_interval in place" in out, out
    env.reset_stats()
    after = converge(database_url, {"web": "Ready"})["web"]
    assert after["sandbox_id"] == first["sandbox_id"]
    (sandbox,) = ours(env)
    assert sandbox.id == first["sandbox_id"]
    assert sandbox.labels["team"] == "b"
    assert sandbox.auto_stop_interval == 45
    assert env.stats().get("delete", 0) == 0 and env.stats().get("create", 0) == 0
    assert reconcile(database_url) == 0  # converged: no second update
    code, out, _ = cli(database_url, "plan", "--detailed-exitcode")
    assert code == 0, out

    _write(
        spec,
        "leases:\n  - name: web\n    image: python:3.12\n    labels: {team: b}\n    auto_stop_interval: 45\n",
    )
    assert cli(database_url, "apply", "-f", str(spec))[0] == 0
    code, out, _ = cli(database_url, "plan")
    assert "replace: image changed" in out, out
    replaced = converge(database_url, {"web": "Ready"})["web"]
    assert replaced["sandbox_id"] != first["sandbox_id"]
    assert [s.id for s in ours(env)] == [replaced["sandbox_id"]]


def test_sandboxes_of_an_older_leasectl_are_adopted_without_replacement(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    """Upgrade: sandboxes labelled with the old all-fields hash are relabelled, not replaced."""
    from controller.planner import ownership_labels
    from controller.specs import LeaseSpec, legacy_spec_hash

    spec = _write(tmp_path / "l.yaml", "leases:\n  - name: old\n    labels: {team: a}\n")
    assert cli(database_url, "apply", "-f", str(spec))[0] == 0
    before = converge(database_url, {"old": "Ready"})["old"]
    # Make the sandbox look as an older leasectl left it: the old hash, no settings label.
    row = LeaseSpec.model_validate({"name": "old", "labels": {"team": "a"}}).to_row()
    legacy = legacy_spec_hash(row)
    assert legacy is not None
    client = env.client()
    sandbox = client.get(before["sandbox_id"])
    labels = {**{k: v for k, v in sandbox.labels.items() if not k.startswith("leasectl-")}}
    sandbox.set_labels({**labels, **ownership_labels(INSTANCE, "old", legacy)})
    sql(database_url, f"UPDATE lease_status SET spec_hash = '{legacy}', spec_fields = NULL")

    after = converge(database_url, {"old": "Ready"})["old"]
    assert after["sandbox_id"] == before["sandbox_id"]
    (now,) = ours(env)
    assert now.labels["leasectl-spec"] != legacy and "leasectl-settings" in now.labels
    assert reconcile(database_url) == 0


def test_rollout_replaces_once_by_command_and_by_sql(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    spec = _write(tmp_path / "l.yaml", "leases:\n  - name: a\n  - name: b\n")
    assert cli(database_url, "apply", "-f", str(spec))[0] == 0
    first = converge(database_url, {"a": "Ready", "b": "Ready"})

    code, _, err = cli(database_url, "rollout", "a", "nope")
    assert code == 2 and "nope" in err
    assert reconcile(database_url) == 0  # nothing was requested: converged, no action

    code, out, _ = cli(database_url, "rollout", "a")
    assert code == 0, out
    code, out, _ = cli(database_url, "plan")
    assert "replace: rollout requested" in out, out
    after = converge(database_url, {"a": "Ready", "b": "Ready"})
    assert after["a"]["sandbox_id"] != first["a"]["sandbox_id"]
    assert after["b"]["sandbox_id"] == first["b"]["sandbox_id"]
    # satisfied by the new sandbox: no second replacement
    assert converge(database_url, {"a": "Ready"})["a"]["sandbox_id"] == after["a"]["sandbox_id"]
    code, _, _ = cli(database_url, "plan", "--detailed-exitcode")
    assert code == 0

    # SQLite's CURRENT_TIMESTAMP has whole seconds: a sandbox created earlier in the same second is
    # not "created before" the request. The passes above can take less than a second in all.
    time.sleep(1.1)
    sql(database_url, "UPDATE leases SET rollout_requested_at = CURRENT_TIMESTAMP WHERE name = 'b'")
    again = converge(database_url, {"b": "Ready"})
    assert again["b"]["sandbox_id"] != first["b"]["sandbox_id"]
    assert sorted(s.labels["leasectl-lease"] for s in ours(env)) == ["a", "b"]
