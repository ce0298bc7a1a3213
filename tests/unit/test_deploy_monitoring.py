"""deploy/grafana-dashboard.json and deploy/prometheus-alerts.yaml: valid, and every query names
series and labels that leasectl's /metrics exposes (the exposition parsed, not a list kept by hand).
The daemon test (test_status_page_browser.py) checks the same names against a running daemon."""

from __future__ import annotations

import re

import pytest

from controller import errors
from controller.metrics import Metrics
from models import EXECUTION_STATES, PHASES
from tests.support import monitoring

PROMETHEUS_LABELS = {"job", "instance", "le"}


def labelnames(metrics: Metrics) -> dict[str, set[str]]:
    """Series name -> label names, from the registry's own collectors."""
    found: dict[str, set[str]] = {}
    for collector in vars(metrics).values():
        names = getattr(collector, "_labelnames", None)
        if names is None:
            continue
        for family in collector.collect():
            for suffix in ("", "_total", "_bucket", "_sum", "_count", "_created"):
                found[family.name + suffix] = set(names)
    return found


# What each label's values can be, from the code that sets them.
KNOWN_VALUES = {
    "phase": set(PHASES),
    "state": set(EXECUTION_STATES),
    "result": {"ok", "error", "reobserved"},
    "outcome": {"ok", "timeout"} | {name for name in vars(errors) if name.endswith("Error")},
}


def test_dashboard_is_a_grafana_dashboard() -> None:
    data = monitoring.dashboard()
    assert data["uid"] == "leasectl-fleet" and data["title"]
    assert isinstance(data["schemaVersion"], int)
    ids = [panel["id"] for panel in data["panels"]]
    assert len(ids) == len(set(ids))
    for panel in data["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert {t["refId"] for t in panel["targets"]} == {
                chr(65 + i) for i in range(len(panel["targets"]))
            }
            assert panel["datasource"]["uid"] == "${datasource}"
    titles = " ".join(p["title"].lower() for p in data["panels"])
    for subject in ("pass", "actions", "api", "throttl", "phase", "executions", "leader"):
        assert subject in titles, subject


def test_alert_rules_cover_what_an_operator_must_hear() -> None:
    rules = {rule["alert"]: rule for rule in monitoring.alert_rules()}
    for name in (
        "LeasectlLeaderMissing",
        "LeasectlPassesFailing",
        "LeasectlLeasesStuckNotReady",
        "LeasectlExecutionsFailing",
    ):
        assert name in rules
    for rule in rules.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"])


def test_every_query_names_series_and_labels_that_metrics_exposes() -> None:
    metrics = Metrics()
    exposed = monitoring.series_names(metrics.render().decode())
    labels = labelnames(metrics)
    queries = list(monitoring.queries())
    assert len(queries) > 20
    named: set[str] = set()
    for where, expr in queries:
        assert expr.count("(") == expr.count(")"), where
        found = list(monitoring.selectors(expr))
        assert found, f"{where}: names no leasectl series"
        for series, matchers in found:
            assert series in exposed, f"{where}: {series} is not on /metrics"
            named.add(series)
            for label, op, value in matchers:
                assert label in labels.get(series, set()) | PROMETHEUS_LABELS, (
                    f"{where}: {series} has no {label}"
                )
                if label in KNOWN_VALUES and op in ("=", "=~") and not value.startswith("$"):
                    values = set(value.split("|")) if op == "=~" else {value}
                    assert values <= KNOWN_VALUES[label], f"{where}: {label} {values - KNOWN_VALUES[label]}"
    # Every metric family leasectl exports is on the dashboard somewhere.
    families = {name for name in exposed if not name.endswith(("_created", "_sum", "_count"))}
    assert families <= named, families - named


def test_the_checker_rejects_what_is_not_exposed() -> None:
    """The check above can fail: a misspelt series or label is caught."""
    exposed = monitoring.series_names(Metrics().render().decode())
    assert "leasectl_passes_total" in exposed and "leasectl_pass_duration_seconds_bucket" in exposed
    assert "leasectl_pass_total" not in exposed
    [(series, matchers)] = list(monitoring.selectors('rate(leasectl_passes_total{reslt="ok"}[5m])'))
    assert series == "leasectl_passes_total" and matchers == [("reslt", "=", "ok")]
    assert "reslt" not in labelnames(Metrics())["leasectl_passes_total"]


@pytest.mark.parametrize("expr", ['leasectl_leases{phase=~"Ready|Errr"}'])
def test_unknown_label_values_are_caught(expr: str) -> None:
    [(_, [(label, _op, value)])] = list(monitoring.selectors(expr))
    assert not set(value.split("|")) <= KNOWN_VALUES[label]
