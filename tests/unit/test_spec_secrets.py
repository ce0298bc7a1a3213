"""Secret references in lease env (controller.secrets, controller.specs): validation, resolution, and
that the stored row, the spec hash and the create action carry only the reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.errors import SpecError
from controller.lease_rows import InvalidLeaseRow, LeaseRow, validate_row
from controller.planner import build_create_request
from controller.secrets import SecretError, resolve
from controller.specs import LeaseSpec, dump_leases, parse_leases, spec_hash


def test_references_are_validated_naming_file_lease_and_field() -> None:
    bad = [
        ({"T": {"from_file": "relative/path"}}, "absolute path"),
        ({"T": {"from_env": ""}}, "non-empty"),
        ({"T": {"from_vault": "x"}}, "exactly one key"),
        ({"T": {"from_env": "A", "from_file": "/b"}}, "exactly one key"),
    ]
    for env, needle in bad:
        with pytest.raises(SpecError) as info:
            parse_leases({"leases": [{"name": "box", "env": env}]}, "f.yaml")
        text = str(info.value)
        assert "f.yaml" in text and "lease 'box'" in text and "env" in text and needle in text, text


def test_reference_round_trips_through_row_and_export() -> None:
    spec = LeaseSpec.model_validate({"name": "box", "env": {"T": {"from_file": "/run/secrets/t"}, "P": "x"}})
    assert LeaseSpec.from_row(spec.to_row()) == spec
    assert "/run/secrets/t" in dump_leases([spec])
    raw = {**spec.to_row(), "env": '{"T": {"from_file": "/run/secrets/t"}}', "labels": "{}"}
    assert isinstance(validate_row(raw), LeaseRow)
    broken = {**raw, "env": '{"T": {"nope": 1}}'}
    assert isinstance(validate_row(broken), InvalidLeaseRow)


def test_hash_and_create_request_carry_the_reference_not_the_value(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("one\n")
    row = LeaseSpec.model_validate({"name": "box", "env": {"T": {"from_file": str(path)}}}).to_row()
    before = spec_hash(row)
    path.write_text("two\n")
    assert spec_hash(row) == before  # rotation is `leasectl rollout` (README), not a re-read per pass
    req = build_create_request("i", "box", before, row)
    assert req.env == {} and req.secret_refs == {"T": {"from_file": str(path)}}


def test_resolve(tmp_path: Path) -> None:
    path = tmp_path / "t"
    path.write_text("v4lue\n")
    assert resolve({"A": {"from_file": str(path)}, "B": {"from_env": "X"}}, {"X": "y"}) == {
        "A": "v4lue",
        "B": "y",
    }
    with pytest.raises(SecretError, match=r"env.B: from_env X is not set"):
        resolve({"B": {"from_env": "X"}}, {})
    with pytest.raises(SecretError, match=r"env.A: from_file /nonexistent cannot be read"):
        resolve({"A": {"from_file": "/nonexistent"}})
