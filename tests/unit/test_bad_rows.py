"""One bad ``leases`` row never stops the fleet (issue 17), on SQLite and PostgreSQL.

Rows are written with plain SQL, as an operator would, including values the lease rules refuse but
the database accepts. Every pass must still converge every good lease (memory provider); the bad row
gets phase ``Failed`` with a message that says what is wrong, and nothing is done to Daytona for it.
``plan``, ``get``, ``export`` and the execution queue read the same rows without failing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller import db as dbmod
from controller.config import Settings, load_settings
from controller.execution import check_runnable
from controller.lease_rows import INVALID_PREFIX, load_lease_rows
from controller.leases import overview, read_specs
from controller.providers.memory import MemoryProvider
from controller.reconciler import build_reconciler
from controller.specs import MAX_ENV_BYTES, LeaseSpec
from models import DESIRED_STATES, LANGUAGES, Event, Execution, LeaseStatus
from tests.conftest import truncate_all

ME = "rows"
GOOD = ("good-a", "good-b", "good-c")


def make_settings() -> Settings:
    return load_settings(None, {"controller": {"instance": ME, "backoff_base_seconds": 0.01}})


def insert_raw(db: dbmod.Database, **values: Any) -> None:
    """INSERT one leases row the way an operator would with SQL (JSON and timestamps as text)."""
    pg = not db.is_sqlite
    cols, params = [], []
    bind: dict[str, Any] = {}
    for i, (col, value) in enumerate(values.items()):
        key = f"p{i}"
        cols.append(col)
        bind[key] = value
        if pg and col in ("env", "labels"):
            params.append(f"CAST(:{key} AS json)")
        elif pg and col == "expires_at":
            params.append(f"CAST(:{key} AS timestamptz)")
        else:
            params.append(f":{key}")
    sql = f"INSERT INTO leases ({', '.join(cols)}) VALUES ({', '.join(params)})"
    with db.engine.begin() as conn:
        conn.execute(sa.text(sql), bind)


def add_good(db: dbmod.Database) -> None:
    for name in GOOD:
        insert_raw(db, name=name, desired_state="running", env='{"A": "1"}', labels='{"team": "x"}')


def statuses(db: dbmod.Database) -> dict[str, LeaseStatus]:
    with db.session() as session:
        return {row.lease_name: row for row in session.scalars(sa.select(LeaseStatus))}


def run_passes(db: dbmod.Database, provider: MemoryProvider, passes: int = 3) -> None:
    reconciler = build_reconciler(db, provider, make_settings())
    try:
        for _ in range(passes):
            reconciler.run_pass()
    finally:
        reconciler.applier.shutdown(timeout=5)


def assert_good_ready(db: dbmod.Database) -> None:
    rows = statuses(db)
    for name in GOOD:
        assert rows[name].phase == "Ready", (name, rows[name].phase, rows[name].message)


# -- table: one bad row of each kind -------------------------------------------------------------

BAD_ROWS: list[tuple[str, dict[str, Any], str]] = [
    ("env-string", {"env": '"oops"'}, "env must be a JSON object of strings"),
    ("env-list", {"env": '["A", "B"]'}, "env must be a JSON object of strings"),
    ("env-number-value", {"env": '{"A": 1}'}, "env must be a JSON object of strings"),
    ("env-bad-key", {"env": '{"1A": "x"}'}, "invalid variable name"),
    ("env-huge", {"env": json.dumps({"BIG": "x" * 300_000})}, f"at most {MAX_ENV_BYTES} bytes"),
    ("labels-list", {"labels": '["a"]'}, "labels must be a JSON object of strings"),
    ("labels-reserved", {"labels": '{"leasectl-lease": "other"}'}, "reserved prefix"),
    ("Bad_Name", {}, "name: Value error, must be a lowercase slug"),
    ("-dash", {}, "must be a lowercase slug"),
    ("ünïcødé", {}, "must be a lowercase slug"),
    ("empty-snapshot", {"snapshot": ""}, "snapshot"),
]


@pytest.mark.parametrize(("name", "columns", "expected"), BAD_ROWS, ids=[r[0] for r in BAD_ROWS])
def test_one_bad_row_is_failed_and_the_fleet_converges(
    db: dbmod.Database, name: str, columns: dict[str, Any], expected: str
) -> None:
    add_good(db)
    row = {"name": name, "desired_state": "running", "env": "{}", "labels": "{}", **columns}
    insert_raw(db, **row)
    provider = MemoryProvider()
    run_passes(db, provider)
    assert_good_ready(db)
    bad = statuses(db)[name]
    assert bad.phase == "Failed"
    assert bad.message is not None and bad.message.startswith(INVALID_PREFIX), bad.message
    assert expected in bad.message
    assert bad.sandbox_id is None
    # nothing was created for it: only the good leases have sandboxes
    assert sorted(sb.labels["leasectl-lease"] for sb in provider.sandboxes.values()) == sorted(GOOD)
    # one event when the verdict was reached, not one per pass
    with db.session() as session:
        events = session.scalars(sa.select(Event).where(Event.lease_name == name)).all()
    assert [(e.action, e.outcome) for e in events] == [("validate", "invalid")]


def test_a_fixed_row_converges(db: dbmod.Database) -> None:
    insert_raw(db, name="typo", desired_state="running", env='"oops"', labels="{}")
    provider = MemoryProvider()
    run_passes(db, provider, passes=1)
    assert statuses(db)["typo"].phase == "Failed"
    with db.engine.begin() as conn:
        value = "CAST('{}' AS json)" if not db.is_sqlite else "'{}'"
        conn.execute(sa.text(f"UPDATE leases SET env = {value} WHERE name = 'typo'"))
    run_passes(db, provider)
    assert statuses(db)["typo"].phase == "Ready"


def test_a_bad_row_keeps_its_sandbox_untouched(db: dbmod.Database) -> None:
    """A row that turns bad after its sandbox exists: no delete, no replace, no GC; record kept."""
    insert_raw(db, name="was-good", desired_state="running", env="{}", labels="{}")
    provider = MemoryProvider()
    run_passes(db, provider)
    before = statuses(db)["was-good"]
    assert before.phase == "Ready"
    with db.engine.begin() as conn:
        value = "CAST('[1]' AS json)" if not db.is_sqlite else "'[1]'"
        conn.execute(sa.text(f"UPDATE leases SET labels = {value} WHERE name = 'was-good'"))
    calls = len(provider.calls)
    run_passes(db, provider)
    after = statuses(db)["was-good"]
    assert after.phase == "Failed"
    assert after.sandbox_id == before.sandbox_id
    assert [op for op, _ in provider.calls[calls:]] == ["list"] * 3
    assert provider.sandboxes[before.sandbox_id].state == "started"


def test_sqlite_type_confusion(tmp_path: Any) -> None:
    """SQLite stores what it is given: text in integer columns, JSON that does not parse, a
    timestamp that is not one. None of it may fail a pass, ``get``, ``export`` or the queue."""
    url = f"sqlite:///{tmp_path / 'x.db'}"
    db = dbmod.connect(url)
    dbmod.upgrade(db)
    add_good(db)
    insert_raw(db, name="bad-json", desired_state="running", env="{not json", labels="{}")
    insert_raw(db, name="bad-cpu", desired_state="running", image="x", cpu="lots", env="{}", labels="{}")
    insert_raw(db, name="bad-time", desired_state="running", expires_at="soon", env="{}", labels="{}")
    insert_raw(db, name="bad-float", desired_state="running", image="x", memory=1.5, env="{}", labels="{}")
    insert_raw(
        db,
        name="naive-time",
        desired_state="running",
        expires_at="2999-01-01 00:00:00",
        env="{}",
        labels="{}",
    )
    with db.session() as session:
        session.add(Execution(lease_name="bad-json", command="true"))
    provider = MemoryProvider()
    run_passes(db, provider)
    assert_good_ready(db)
    rows = statuses(db)
    assert rows["naive-time"].phase == "Ready"  # naive is UTC, as SQLite stores every timestamp
    for name, what in (
        ("bad-json", "env is not valid JSON"),
        ("bad-cpu", "cpu"),
        ("bad-time", "expires_at"),
        ("bad-float", "memory"),
    ):
        assert rows[name].phase == "Failed"
        assert rows[name].message is not None and what in rows[name].message, rows[name].message
    with db.session() as session:
        listed = {r["name"]: r for r in overview(session)}
        assert listed["bad-time"]["expires_at"] == "soon"
        assert listed["bad-json"]["phase"] == "Failed"
        invalid: list[Any] = []
        specs = read_specs(session, invalid=invalid)
        assert {s.name for s in specs} == {*GOOD, "naive-time"}
        assert {b.name for b in invalid} == {"bad-json", "bad-cpu", "bad-time", "bad-float"}
        check_runnable(session, "bad-json")  # desired running: waits (never Ready), no crash
    db.dispose()


def test_valid_rows_hash_as_applied(db: dbmod.Database) -> None:
    """Rows read raw hash exactly as the specs that wrote them: no sandbox is replaced by the change."""
    from controller.leases import apply_specs
    from controller.specs import spec_hash

    spec = LeaseSpec.model_validate(
        {
            "name": "full",
            "image": "python:3.12",
            "resources": {"cpu": 2, "memory": 4},
            "env": {"A": "é"},
            "labels": {"team": "ü"},
            "auto_stop_interval": 0,
            "auto_delete_interval": -1,
            "expires_at": "2999-01-01T00:00:00+02:00",
        }
    )
    apply_specs(db, [spec])
    with db.session() as session:
        rows, invalid = load_lease_rows(session)
    assert invalid == []
    assert spec_hash(rows[0].spec) == spec_hash(spec.to_row())
    assert rows[0].lease == spec


# -- fuzz: random rows among good ones ------------------------------------------------------------

_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=40)
_json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)
_json_column = st.one_of(
    st.dictionaries(st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True), _text, max_size=3),
    st.dictionaries(_text, _text, max_size=3),
    _json_value,
    st.just({"BIG": "x" * 300_000}),
).map(json.dumps)
_int4 = st.integers(-(2**31), 2**31 - 1)


@st.composite
def bad_row(draw: st.DrawFn, index: int) -> dict[str, Any]:
    name = draw(
        st.one_of(
            st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True),
            st.text(
                st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                min_size=1,
                max_size=50,
            ),
        )
    )
    row: dict[str, Any] = {
        "name": f"{name[:55]}~{index}" if draw(st.booleans()) else f"r{index}-{name}"[:63],
        "desired_state": draw(st.sampled_from(DESIRED_STATES)),
        "env": draw(_json_column),
        "labels": draw(_json_column),
        "paused": draw(st.booleans()),
    }
    source = draw(st.sampled_from(["snapshot", "image", None]))
    if source is not None:
        row[source] = draw(st.one_of(st.just(""), _text))
    if source == "image":
        for col in ("cpu", "memory", "disk", "gpu"):
            if draw(st.booleans()):
                row[col] = draw(st.integers(1, 2**31 - 1))
    if draw(st.booleans()):
        row["language"] = draw(st.sampled_from(LANGUAGES))
    if draw(st.booleans()):
        row["target"] = draw(_text.map(lambda t: t[:64]))
    for col, low in (("auto_stop_interval", 0), ("auto_archive_interval", 0), ("auto_delete_interval", -1)):
        if draw(st.booleans()):
            row[col] = draw(st.integers(low, 2**31 - 1))
    if draw(st.booleans()):
        row["expires_at"] = draw(
            st.sampled_from(["2999-01-01 00:00:00", "2999-01-01T00:00:00+05:00", "2000-01-01 00:00:00"])
        )
    return row


@pytest.fixture
def fuzz_db(database_url: str) -> Iterator[dbmod.Database]:
    database = dbmod.connect(database_url)
    yield database
    database.dispose()


@settings(
    max_examples=int(os.environ.get("LEASECTL_FUZZ_EXAMPLES", "15")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
def test_fuzzed_rows_never_stop_the_fleet(fuzz_db: dbmod.Database, data: st.DataObject) -> None:
    db = fuzz_db
    if db.is_sqlite:
        with db.engine.begin() as conn:
            for table in ("events", "lease_status", "leases"):
                conn.execute(sa.text(f"DELETE FROM {table}"))
    else:
        truncate_all(db)
    add_good(db)
    count = data.draw(st.integers(1, 4))
    written: list[str] = []
    for index in range(count):
        row = data.draw(bad_row(index))
        try:
            insert_raw(db, **row)
        except sa.exc.IntegrityError:
            continue  # the database's own constraints refused it: nothing to survive
        except sa.exc.DataError:
            continue  # e.g. PostgreSQL refusing a string too long for its column
        written.append(row["name"])
    provider = MemoryProvider()
    run_passes(db, provider)
    assert_good_ready(db)
    with db.session() as session:
        valid, invalid = load_lease_rows(session)
    rows = statuses(db)
    for bad in invalid:
        assert rows[bad.name].phase == "Failed"
        assert rows[bad.name].message == bad.message
        assert bad.message.startswith(INVALID_PREFIX)
    bad_names = {b.name for b in invalid}
    for sb in provider.sandboxes.values():
        assert sb.labels["leasectl-lease"] not in bad_names
    assert {v.name for v in valid} | bad_names == {*GOOD, *written}


def test_apply_replaces_a_bad_row_and_prunes_past_it(db: dbmod.Database) -> None:
    from controller.leases import apply_specs

    insert_raw(db, name="typo", desired_state="running", env='"oops"', labels="{}")
    if db.is_sqlite:  # JSON the ORM could not even load
        insert_raw(db, name="garbled", desired_state="running", env="{nope", labels="{}")
    spec = LeaseSpec.model_validate({"name": "typo", "env": {"A": "b"}})
    result = apply_specs(db, [spec], prune=True)
    assert result.updated == ["typo"]
    assert result.pruned == (["garbled"] if db.is_sqlite else [])
    with db.session() as session:
        valid, invalid = load_lease_rows(session)
    assert [r.lease for r in valid] == [spec]
    assert [b.name for b in invalid] == (["garbled"] if db.is_sqlite else [])
    assert apply_specs(db, [spec]).unchanged == ["typo"]
