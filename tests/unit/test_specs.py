"""LeaseSpec validation, row round trip and the spec hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from controller.errors import SpecError
from controller.specs import LeaseSpec, dump_leases, load_lease_files, parse_leases, settings_hash, spec_hash


def _one(**fields: object) -> LeaseSpec:
    return parse_leases({"leases": [{"name": "box", **fields}]}, "f.yaml")[0]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"name": "Box"}, "name"),
        ({"name": "-box"}, "name"),
        ({"name": "a" * 64}, "name"),
        ({"name": "box_1"}, "name"),
        ({"state": "paused"}, "state"),
        ({"snapshot": "s", "image": "i"}, "either snapshot or image"),
        ({"resources": {"cpu": 1}}, "only be set together with image"),
        ({"image": "i", "resources": {"cpu": 0}}, "resources.cpu"),
        ({"image": "i", "resources": {"memory": -1}}, "resources.memory"),
        ({"image": "i", "resources": {"cpu": "2"}}, "resources.cpu"),
        ({"image": "i", "resources": {"ram": 2}}, "resources.ram"),
        ({"auto_stop_interval": -1}, "auto_stop_interval"),
        ({"auto_archive_interval": -1}, "auto_archive_interval"),
        ({"auto_delete_interval": -2}, "auto_delete_interval"),
        ({"env": {"1BAD": "x"}}, "env"),
        ({"env": {"A-B": "x"}}, "env"),
        ({"env": {"A\n": "x"}}, "env"),
        ({"name": "box\n"}, "name"),
        ({"labels": {"leasectl-lease": "x"}}, "reserved prefix"),
        ({"colour": "red"}, "colour"),
        ({"expires_at": "2026-01-01T00:00:00"}, "time zone"),
        ({"language": "rust"}, "language"),
    ],
)
def test_invalid_fields_name_file_lease_and_field(fields: dict[str, object], needle: str) -> None:
    item = {"name": "box", **fields}
    with pytest.raises(SpecError) as info:
        parse_leases({"leases": [item]}, "f.yaml")
    message = str(info.value)
    assert message.startswith("f.yaml: ")
    assert needle in message
    assert f"lease {item['name']!r}" in message


def test_valid_lease_defaults() -> None:
    spec = _one()
    assert spec.state == "running" and spec.paused is False and spec.env == {}
    assert _one(auto_delete_interval=-1).auto_delete_interval == -1


def test_duplicates_across_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("leases:\n  - name: x\n")
    b.write_text("leases:\n  - name: x\n")
    with pytest.raises(SpecError, match=r"b\.yaml: lease 'x': name: duplicate \(also defined in .*a\.yaml\)"):
        load_lease_files([a, b])


@pytest.mark.parametrize(
    "text", ["leases: {name: x}\n", "- name: x\n", "leasez: []\n", "leases: [\n", "leases:\n  - 3\n"]
)
def test_bad_file_shapes(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match=r"bad\.yaml"):
        load_lease_files([path])


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_lease_files([tmp_path / "nope.yaml"])


def test_row_and_yaml_round_trip(tmp_path: Path) -> None:
    data = {
        "leases": [
            {
                "name": "full",
                "state": "stopped",
                "image": "python:3.12-slim",
                "target": "us",
                "language": "typescript",
                "resources": {"cpu": 2, "memory": 4, "disk": 10},
                "env": {"A": "1", "B": "two words"},
                "labels": {"team": "a"},
                "auto_stop_interval": 0,
                "auto_archive_interval": 60,
                "auto_delete_interval": -1,
                "expires_at": "2030-01-02T03:04:05Z",
                "paused": True,
            },
            {"name": "mini"},
        ]
    }
    specs = parse_leases(data, "x")
    assert [LeaseSpec.from_row(s.to_row()) for s in specs] == specs
    path = tmp_path / "out.yaml"
    path.write_text(dump_leases(specs))
    assert load_lease_files([path]) == specs
    assert yaml.safe_load(path.read_text())["leases"][1] == {"name": "mini", "state": "running"}


def test_spec_hash_tracks_spec_columns_only() -> None:
    base = _one(snapshot="s", env={"A": "1"}).to_row()
    h = spec_hash(base)
    assert spec_hash(dict(base)) == h
    for col, value in [("desired_state", "stopped"), ("paused", True), ("expires_at", "2030-01-01")]:
        assert spec_hash({**base, col: value}) == h, col
    for col, value in [("snapshot", "t"), ("env", {"A": "2"}), ("target", "eu"), ("image", "py")]:
        assert spec_hash({**base, col: value}) != h, col
    # In-place fields move the settings hash, never the spec hash (no replacement).
    s = settings_hash(base)
    for col, value in [("labels", {"x": "y"}), ("auto_stop_interval", 5), ("auto_delete_interval", -1)]:
        assert spec_hash({**base, col: value}) == h, col
        assert settings_hash({**base, col: value}) != s, col
    # key order of JSON columns does not matter
    assert spec_hash({**base, "env": {"B": "2", "A": "1"}}) == spec_hash(
        {**base, "env": {"A": "1", "B": "2"}}
    )


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"state": "stopped", "auto_delete_interval": 0}, "cannot be kept stopped"),
        ({"state": "archived", "auto_delete_interval": 0}, "cannot be kept archived"),
        ({"image": "python:3.12", "resources": {"gpu": 1}}, "GPU sandbox must be ephemeral"),
        (
            {"image": "python:3.12", "resources": {"gpu": 1}, "auto_delete_interval": -1},
            "GPU sandbox must be ephemeral",
        ),
    ],
)
def test_ephemeral_rules_name_the_field(fields: dict[str, object], needle: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_leases({"leases": [{"name": "eph", **fields}]}, "f.yaml")
    assert str(info.value).startswith("f.yaml: lease 'eph': auto_delete_interval: ")
    assert needle in str(info.value)


@pytest.mark.parametrize(
    "fields",
    [
        {"state": "running", "auto_delete_interval": 0},
        {"state": "absent", "auto_delete_interval": 0},
        {"state": "stopped", "auto_delete_interval": 60},
        {"image": "python:3.12", "resources": {"gpu": 1}, "auto_delete_interval": 0},
    ],
)
def test_ephemeral_leases_that_daytona_accepts(fields: dict[str, object]) -> None:
    [spec] = parse_leases({"leases": [{"name": "eph", **fields}]}, "f.yaml")
    assert spec.name == "eph"


# -- pools -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [(90, 90), ("90", 90), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400)]
)
def test_durations(text: object, seconds: int) -> None:
    from controller.specs import format_duration, parse_duration

    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("bad", [0, -5, "soon", "5w", True, "1.5h"])
def test_bad_durations(bad: object) -> None:
    from controller.specs import parse_duration

    with pytest.raises(ValueError):
        parse_duration(bad)


def test_pool_files_round_trip_and_members_follow_the_template(tmp_path: Path) -> None:
    from controller.specs import load_manifest, parse_pools

    data = {
        "pools": [
            {
                "name": "agents",
                "template": {"image": "python:3.12-slim", "resources": {"cpu": 2}, "env": {"A": "1"}},
                "min_ready": 2,
                "max_size": 4,
                "claim_ttl": "30m",
            }
        ]
    }
    (pool,) = parse_pools(data, "f.yaml")
    member = pool.member("agents-0123abcd")
    assert member.name == "agents-0123abcd" and member.state == "running" and member.resources is not None
    assert spec_hash(member.to_row()) == pool.template_hash()
    path = tmp_path / "p.yaml"
    path.write_text(dump_leases([], [pool]))
    assert load_manifest([path]).pools == [pool]


def test_a_lease_named_like_pool_members_is_refused(tmp_path: Path) -> None:
    from controller.specs import load_manifest

    path = tmp_path / "f.yaml"
    path.write_text("leases:\n  - name: agents-0123abcd\n  - name: agents-web\npools:\n  - name: agents\n")
    with pytest.raises(SpecError, match="matches the member names of pool 'agents'"):
        load_manifest([path])
