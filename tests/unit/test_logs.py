"""Log records carry the pass id and the lease name, also from the applier's worker threads."""

from __future__ import annotations

import json
import logging

import pytest

from controller import logs
from controller.applier import Applier
from controller.planner import Action
from controller.providers.base import CreateRequest
from controller.providers.memory import MemoryProvider


def test_json_records_of_a_pass_carry_pass_id_and_lease(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        logs.configure("INFO", "json")
        create = CreateRequest(name="sb-x", labels={"leasectl-instance": "default", "leasectl-lease": "x"})
        with logs.bound(pass_id="pass-1"):
            Applier(MemoryProvider()).apply(
                [Action(kind="create", lease_name="x", reason="new", sandbox_name="sb-x", create=create)]
            )
        records = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
        applier_records = [r for r in records if r["logger"] == "controller.applier"]
        assert applier_records
        assert all(r["pass_id"] == "pass-1" and r["lease"] == "x" for r in applier_records)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def test_text_format_appends_context() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.pass_id = "p9"
    record.lease = "box"
    line = logs.TextFormatter("%(message)s").format(record)
    assert line == "hello world [pass=p9 lease=box]"
