"""The reconciler reads lease_status as plain rows: the column order it relies on (issue 14)."""

from __future__ import annotations

import dataclasses

from controller import reconciler
from controller.planner import StatusView
from models import LeaseStatus


def test_status_fields_are_status_views_fields_in_order() -> None:
    """StatusView(*row[1:1 + len(STATUS_FIELDS)]) builds the view positionally."""
    names = tuple(f.name for f in dataclasses.fields(StatusView))
    assert names[: len(reconciler.STATUS_FIELDS)] == reconciler.STATUS_FIELDS
    assert reconciler._STATUS_KEYS[reconciler._STATUS_VIEW] == reconciler.STATUS_FIELDS


def test_every_status_column_a_decision_may_write_is_compared() -> None:
    """All columns but the two every pass moves, so a status written by a decision is compared with
    what is stored (a column left out would be written on every pass, or never)."""
    columns = {column.key for column in LeaseStatus.__table__.columns}
    assert set(reconciler._STATUS_KEYS) == columns - {"updated_at", "last_reconciled_at"}
    assert reconciler._STATUS_KEYS[0] == "lease_name"


def test_leases_of_one_spec_share_their_field_digests() -> None:
    """Each lease view keeps a digest per spec field; leases made from the same spec share one dict
    (at 100,000 leases a dict each was about 115 MiB of a pass's peak), different specs do not."""
    from models import Lease

    def view(name: str, image: str) -> reconciler.LeaseView:
        lease = Lease(name=name, desired_state="running", image=image, env={}, labels={}, paused=False)
        return reconciler.lease_view(lease, "default", "workspace")

    a, b, c = view("a", "python:3.12"), view("b", "python:3.12"), view("c", "python:3.13")
    assert a.fields == b.fields and a.fields is b.fields
    assert c.fields != a.fields and "image" in c.fields
