"""Every index of the schema earns its writes: none is covered by another one's leading columns.

An index whose columns are the first columns of another index on the same table (or of the
primary key, or of a unique constraint) answers no lookup the other cannot, and costs an entry on
every insert and every update of an indexed column (on PostgreSQL, such an update is never
heap-only: each index gets a new entry). Migration 0010 dropped one such index (executions'
``lease_name``, covered by ``(lease_name, state)``), which each command through the queue updated
twice. A partial index covers only its rows, so it covers nothing here and is covered only by
another partial index with the same condition.
"""

from __future__ import annotations

import sqlalchemy as sa

from models import metadata


def _where(index: sa.Index) -> str | None:
    where = index.dialect_options["postgresql"].get("where")
    return None if where is None else str(where)


def _covering(table: sa.Table) -> list[tuple[str, tuple[str, ...], str | None]]:
    """(name, columns, partial condition) of what can answer a lookup by leading columns."""
    found = [("primary key", tuple(c.name for c in table.primary_key.columns), None)]
    found += [
        (str(c.name), tuple(col.name for col in c.columns), None)
        for c in table.constraints
        if isinstance(c, sa.UniqueConstraint)
    ]
    found += [(str(i.name), tuple(c.name for c in i.columns), _where(i)) for i in table.indexes]
    return found


def redundant_indexes(meta: sa.MetaData) -> list[str]:
    """``table.index (covered by other)`` for each non-unique index another one's prefix covers."""
    redundant = []
    for table in meta.sorted_tables:
        others = _covering(table)
        for index in table.indexes:
            if index.unique:
                continue  # a uniqueness rule, not only a lookup path
            columns, where = tuple(c.name for c in index.columns), _where(index)
            for name, covering, covering_where in others:
                if name != index.name and covering[: len(columns)] == columns and covering_where == where:
                    redundant.append(f"{table.name}.{index.name} (covered by {name})")
                    break
    return redundant


def test_no_index_is_covered_by_another() -> None:
    assert redundant_indexes(metadata) == []


def test_the_check_finds_a_covered_index() -> None:
    """The check itself: the index migration 0010 dropped is found, a partial one is not."""
    meta = sa.MetaData()
    sa.Table(
        "executions",
        meta,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("lease_name", sa.String, index=True),
        sa.Column("state", sa.String),
        sa.Column("created_at", sa.DateTime),
        sa.Index("ix_executions_lease_name_state", "lease_name", "state"),
        sa.Index("ix_queued_created", "created_at", postgresql_where=sa.text("state = 'queued'")),
        sa.Index("ix_created", "created_at"),
        sa.Index("ix_id_state", "id", "state"),
    )
    assert redundant_indexes(meta) == [
        "executions.ix_executions_lease_name (covered by ix_executions_lease_name_state)"
    ]
