"""Fuzzing `leasectl apply` (issue 17): any YAML either applies or exits 2 with a message; never a
traceback and never a partial write. On SQLite and PostgreSQL, a fixed seed and a bounded number of
examples (derandomized), so CI is repeatable."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from controller import db as dbmod
from controller.cli import app

_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
_scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    _text,
    st.datetimes(timezones=st.sampled_from([None, UTC])),
)
_any = st.recursive(
    _scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)
_name = st.one_of(st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True), _text)
_field = st.sampled_from(
    [
        "state",
        "snapshot",
        "image",
        "target",
        "language",
        "resources",
        "env",
        "labels",
        "auto_stop_interval",
        "auto_archive_interval",
        "auto_delete_interval",
        "expires_at",
        "paused",
        "bogus",
    ]
)
_plausible = {
    "state": st.sampled_from(["running", "stopped", "archived", "absent", "Running", ""]),
    "snapshot": _text,
    "image": st.one_of(_text, st.just("x" * 2000)),
    "target": _text,
    "language": st.sampled_from(["python", "typescript", "cobol"]),
    "resources": st.dictionaries(
        st.sampled_from(["cpu", "memory", "disk", "gpu", "tpu"]), st.integers(-5, 2**40), max_size=3
    ),
    "env": st.dictionaries(
        st.one_of(st.from_regex(r"[A-Z_]{1,5}", fullmatch=True), _text), _text, max_size=3
    ),
    "labels": st.dictionaries(_text, _text, max_size=3),
    "auto_stop_interval": st.integers(-2, 2**40),
    "auto_archive_interval": st.integers(-2, 2**40),
    "auto_delete_interval": st.integers(-2, 2**40),
    "expires_at": st.datetimes(timezones=st.sampled_from([None, UTC])),
    "paused": st.one_of(st.booleans(), _text),
    "bogus": _any,
}


@st.composite
def lease_item(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(_any)
    item: dict[str, Any] = {"name": draw(_name)}
    for key in draw(st.lists(_field, max_size=5, unique=True)):
        item[key] = draw(st.one_of(_plausible[key], _any) if draw(st.booleans()) else _plausible[key])
    return item


@st.composite
def document(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(max_size=200))  # anything at all, often not YAML
    if kind == 1:
        return yaml.safe_dump(draw(_any), allow_unicode=True)
    items = draw(st.lists(lease_item(), max_size=4))
    return yaml.safe_dump({"leases": items}, allow_unicode=True, sort_keys=False)


def leases_table(url: str) -> list[tuple[Any, ...]]:
    database = dbmod.connect(url)
    try:
        with database.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text("SELECT * FROM leases ORDER BY id"))]
    finally:
        database.dispose()


@pytest.fixture
def seeded_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    seed = tmp_path / "seed.yaml"
    seed.write_text("leases:\n  - name: keep-me\n    snapshot: s\n    env: {A: b}\n")
    result = CliRunner().invoke(app, ["--database-url", database_url, "apply", "-f", str(seed)])
    assert result.exit_code == 0, result.output
    yield database_url


@settings(
    max_examples=int(os.environ.get("LEASECTL_FUZZ_EXAMPLES", "60")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=document())
def test_apply_fuzz_applies_or_exits_2(seeded_url: str, tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    before = leases_table(seeded_url)
    result = CliRunner().invoke(app, ["--database-url", seeded_url, "apply", "-f", str(path)])
    after = leases_table(seeded_url)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"traceback for {text!r}") from result.exception
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 2), (result.exit_code, result.output, text)
    if result.exit_code == 2:
        assert "error:" in result.stderr
        assert after == before, "a refused apply wrote something"
    else:
        # applied: the rows that were there are still there (apply never deletes)
        assert {r[1] for r in before} <= {r[1] for r in after}


def test_apply_refuses_values_the_columns_cannot_hold(database_url: str, tmp_path: Path) -> None:
    """The same answer on both backends: refused by the spec rules, not by one database."""
    cases = {
        "nul": 'leases:\n  - name: a\n    snapshot: "x\\0y"\n',
        "long-image": f"leases:\n  - name: a\n    image: {'x' * 1025}\n",
        "huge-cpu": "leases:\n  - name: a\n    image: i\n    resources: {cpu: 3000000000}\n",
        "huge-interval": "leases:\n  - name: a\n    auto_stop_interval: 99999999999999999999999\n",
        "big-env": f"leases:\n  - name: a\n    env: {{BIG: {'x' * 70000}}}\n",
    }
    for label, text in cases.items():
        path = tmp_path / f"{label}.yaml"
        path.write_text(text)
        result = CliRunner().invoke(app, ["--database-url", database_url, "apply", "-f", str(path)])
        assert result.exit_code == 2, (label, result.output)
        assert "lease 'a'" in result.stderr, (label, result.stderr)
    assert leases_table(database_url) == []
