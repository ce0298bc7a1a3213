"""The volume step's pure decisions (controller.volume_sync): create what is declared present and
missing, delete what is declared absent only when no lease mounts it, never touch the rest."""

from __future__ import annotations

from controller.planner import LeaseView, StatusView, build_create_request
from controller.providers.base import ObservedVolume
from controller.volume_sync import mounted_volumes, plan_volumes


def _lease(name: str, desired: str, *volumes: str) -> LeaseView:
    spec = {"volumes": [{"volume": v, "mount_path": f"/m/{i}"} for i, v in enumerate(volumes)]}
    return LeaseView(
        name=name,
        desired_state=desired,
        spec_hash="h",
        create=build_create_request("inst", name, "h", spec),
    )


def test_decisions() -> None:
    observed = [
        ObservedVolume("v1", "kept", "ready"),
        ObservedVolume("v2", "doomed", "ready"),
        ObservedVolume("v3", "busy", "ready"),
        ObservedVolume("v4", "leaving", "deleting"),
        ObservedVolume("v5", "foreign", "ready"),
    ]
    declared = {
        "kept": "present",
        "new": "present",
        "doomed": "absent",
        "busy": "absent",
        "leaving": "absent",
        "gone": "absent",
    }
    decisions = {d.name: d for d in plan_volumes(declared, observed, {"busy": ["web"]})}
    assert {n: d.kind for n, d in decisions.items()} == {
        "kept": None,
        "new": "create",
        "doomed": "delete",
        "busy": None,
        "leaving": None,
        "gone": None,
    }
    assert decisions["doomed"].volume_id == "v2"
    assert "still mounted by web" in decisions["busy"].reason
    assert "foreign" not in decisions  # a volume no row names is never touched


def test_absent_leases_mount_only_while_they_still_have_a_sandbox() -> None:
    leases = [
        _lease("running", "running", "a"),
        _lease("leaving", "absent", "b"),
        _lease("gone", "absent", "c"),
    ]
    statuses = {"leaving": StatusView(sandbox_id="sb-1"), "gone": StatusView(sandbox_id=None)}
    assert mounted_volumes(leases, statuses) == {"a": ["running"], "b": ["leaving"]}
