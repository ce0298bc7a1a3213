"""Volumes (issue 15), end to end with the real SDK against the local Daytona API on SQLite and
PostgreSQL: a declared volume is created before the leases that mount it, a file written by one
sandbox is read by the other, the volume is kept while mounted and deleted once declared absent and
unmounted; an undeclared volume Daytona does not have blocks the lease; bad mounts are exit 2."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_reconcile_emulator import cli, converge, env, get, ours, reconcile
from tests.support.emulator import EmulatorProcess

__all__ = ["env"]

TWO = """
volumes:
  - name: shared
    state: {state}
leases:
  - name: writer
    state: {leases}
    volumes: [{{volume: shared, mount_path: /data}}]
  - name: reader
    state: {leases}
    volumes: [{{volume: shared, mount_path: /mnt/in, subpath: sub}}]
"""


def test_a_volume_shared_by_two_leases_carries_a_file_and_outlives_its_mounts(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    spec = tmp_path / "v.yaml"
    spec.write_text(TWO.format(state="present", leases="running"))
    code, out, err = cli(database_url, "apply", "-f", str(spec))
    assert code == 0, out + err
    assert "volume/shared created" in out
    rows = converge(database_url, {"writer": "Ready", "reader": "Ready"})
    client = env.client()
    (volume,) = client.volume.list()
    assert volume.name == "shared" and volume.state == "ready"
    writer = client.get(rows["writer"]["sandbox_id"])
    reader = client.get(rows["reader"]["sandbox_id"])
    writer.fs.upload_file(b"hello from writer\n", "/data/sub/greeting.txt")
    assert reader.fs.download_file("/mnt/in/greeting.txt") == b"hello from writer\n"
    # leasectl exec: commands of the local API run on the host, so they reach /mnt/in under the
    # sandbox root (on Daytona it is /mnt/in itself)
    code, out, err = cli(
        database_url, "exec", "reader", "--", "sh", "-c", 'cat "$DAYTONA_SANDBOX_ROOT/mnt/in/greeting.txt"'
    )
    assert code == 0 and out == "hello from writer\n", out + err

    # Declared absent while the leases still mount it: refused at apply (exit 2, nothing written).
    spec.write_text(TWO.format(state="absent", leases="running"))
    code, _, err = cli(database_url, "apply", "-f", str(spec))
    assert code == 2 and "lease 'writer': volumes.0.volume: 'shared' is declared state: absent" in err, err
    assert [v.name for v in client.volume.list()] == ["shared"]

    # Leases and volume absent together: the sandboxes go first, then the volume.
    spec.write_text(TWO.format(state="absent", leases="absent"))
    assert cli(database_url, "apply", "-f", str(spec))[0] == 0
    converge(database_url, {"writer": "Deleted", "reader": "Deleted"}, passes=12, pause=0.1)
    reconcile(database_url)
    assert client.volume.list() == [] and ours(env) == []
    code, out, _ = cli(database_url, "export")
    assert "- name: shared\n  state: absent" in out, out


def test_undeclared_missing_volume_blocks_and_bad_mounts_are_refused(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    spec = tmp_path / "l.yaml"
    spec.write_text("leases:\n  - name: lonely\n    volumes: [{volume: nowhere, mount_path: /data}]\n")
    assert cli(database_url, "apply", "-f", str(spec))[0] == 0
    reconcile(database_url)
    row = get(database_url)["lonely"]
    assert row["phase"] == "Blocked", row
    assert "volume 'nowhere' does not exist at Daytona" in row["message"]
    assert ours(env) == []

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "leases:\n  - name: twice\n    volumes:\n"
        "      - {volume: a, mount_path: /data}\n      - {volume: b, mount_path: /data/}\n"
        "  - name: relative\n    volumes: [{volume: a, mount_path: data}]\n"
    )
    code, _, err = cli(database_url, "apply", "-f", str(bad))
    assert code == 2, err
    assert "lease 'twice': volumes: Value error, two volumes are mounted on /data" in err, err
    assert "lease 'relative': volumes.0.mount_path" in err and "absolute path" in err, err


def test_a_dockerfile_build_reaches_the_local_api_and_its_content_replaces(
    env: EmulatorProcess, database_url: str, tmp_path: Path
) -> None:
    """`build` (issue 15): the Dockerfile, read relative to the lease file at apply, is Daytona's
    build info; a change of its content replaces the sandbox; a missing file is exit 2."""
    (tmp_path / "img").mkdir()
    dockerfile = tmp_path / "img" / "Dockerfile"
    dockerfile.write_text("FROM python:3.12-slim\nRUN true\n")
    spec = tmp_path / "b.yaml"
    spec.write_text("leases:\n  - name: built\n    build: {dockerfile_path: img/Dockerfile}\n")
    assert cli(database_url, "apply", "-f", str(spec))[0] == 0
    first = converge(database_url, {"built": "Ready"})["built"]
    sandbox = env.client().get(first["sandbox_id"])
    assert sandbox.build_info is not None
    assert sandbox.build_info.dockerfile_content == "FROM python:3.12-slim\nRUN true\n"

    dockerfile.write_text("FROM python:3.13-slim\nRUN true\n")
    code, out, _ = cli(database_url, "apply", "-f", str(spec))
    assert code == 0 and "lease/built updated" in out, out
    code, out, _ = cli(database_url, "plan")
    assert "replace: build changed" in out, out
    after = converge(database_url, {"built": "Ready"}, passes=12)["built"]
    assert after["sandbox_id"] != first["sandbox_id"]
    assert env.client().get(after["sandbox_id"]).build_info.dockerfile_content.startswith("FROM python:3.13")

    dockerfile.unlink()
    code, _, err = cli(database_url, "apply", "-f", str(spec))
    assert code == 2, err
    assert f"{spec}: lease 'built': build.dockerfile_path: cannot read" in err, err
