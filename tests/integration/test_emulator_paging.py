"""Listing N sandboxes page by page through the local API costs O(N), not O(N x pages) (issue 14).

The local API sorts the matching sandboxes once per list walk and finds each page's start with a
bisect, as long as nothing changed in between; the count of sort-key evaluations shows it (a sort of
the whole store per page would evaluate the key N times per page). A change between two pages is
seen by the next page, as the server's keyset cursor sees it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controller.emulator import EmulatorConfig, start_background
from controller.emulator import app as emulator_app
from controller.emulator.state import SandboxRecord, Store
from controller.providers.base import LABEL_INSTANCE
from controller.providers.daytona import PAGE_SIZE, DaytonaProvider

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

FLEET = 2_000  # ten pages of 200


def _seed(state_dir: Path, count: int) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    store = Store(state_dir)
    now = time.time()
    stamp = "2026-01-01T00:00:00.000Z"
    store.save_many(
        SandboxRecord(
            id=str(uuid.uuid4()),
            name=f"paged-{i:05d}",
            seq=store.next_seq(),
            created_ts=now + i,
            created_at=stamp,
            updated_at=stamp,
            labels={LABEL_INSTANCE: "paging", "code-toolbox-language": "python"},
        )
        for i in range(count)
    )
    store.close()


def test_a_list_walk_sorts_once_and_sees_a_change_between_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(tmp_path / "d", FLEET)
    calls = {"key": 0}
    original: Callable[[SandboxRecord], Any] = emulator_app.SORT_FIELDS["createdAt"]

    def counted(record: SandboxRecord) -> Any:
        calls["key"] += 1
        return original(record)

    monkeypatch.setitem(emulator_app.SORT_FIELDS, "createdAt", counted)
    config = EmulatorConfig(api_key="k", port=0, state_dir=tmp_path / "d")
    with start_background(config) as emu:
        provider = DaytonaProvider(emu.url, "k", target="local")
        pages = FLEET // PAGE_SIZE
        seen = provider.list_sandboxes({LABEL_INSTANCE: "paging"})
        assert [sb.name for sb in seen] == [f"paged-{i:05d}" for i in range(FLEET)]
        # One sort (key per row, then the key list) and one key per page for its cursor.
        assert calls["key"] <= 2 * FLEET + pages, calls
        calls["key"] = 0
        again = provider.list_sandboxes({LABEL_INSTANCE: "paging"})
        assert [sb.id for sb in again] == [sb.id for sb in seen]
        assert calls["key"] <= 2 * FLEET + pages, calls  # a new walk of an unchanged store

        # A sandbox that goes away between two pages is not listed by the pages after it.
        first, cursor = provider._list_page('{"leasectl-instance": "paging"}', None)
        gone = seen[PAGE_SIZE + 5]
        provider.delete(gone.id)
        rest: list[str] = [sb.id for sb in first]
        while cursor:
            items, cursor = provider._list_page('{"leasectl-instance": "paging"}', cursor)
            rest.extend(sb.id for sb in items)
        assert gone.id not in rest and len(rest) == FLEET - 1
        assert rest == [sb.id for sb in seen if sb.id != gone.id]
