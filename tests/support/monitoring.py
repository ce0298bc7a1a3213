"""Reading deploy/'s Grafana dashboard and Prometheus rules, and checking them against /metrics.

``series_names(text)`` parses a Prometheus exposition (what /metrics serves) into the series names a
query can use, families without samples included (a counter ``x`` gives ``x_total``, a histogram its
``_bucket``, ``_sum`` and ``_count``). ``queries()`` yields every PromQL expression of the dashboard
and the alert rules, and ``selectors(expr)`` the ``leasectl_*`` series each names with its matchers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = REPO_ROOT / "deploy" / "grafana-dashboard.json"
ALERTS = REPO_ROOT / "deploy" / "prometheus-alerts.yaml"

_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}
_SELECTOR = re.compile(r"\b(leasectl_[a-z0-9_]+)\b(\{([^}]*)\})?")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*')


def series_names(exposition: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every dashboard target, templating query and alert rule."""
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["definition"]
    for rule in alert_rules():
        yield f"alert {rule['alert']}", rule["expr"]


def selectors(expr: str) -> Iterator[tuple[str, list[tuple[str, str, str]]]]:
    """(series name, [(label, op, value), ...]) for each ``leasectl_*`` series the expression names."""
    for match in _SELECTOR.finditer(expr):
        body = match.group(3) or ""
        matchers = [(m.group(1), m.group(2), m.group(3)) for m in _MATCHER.finditer(body)]
        yield match.group(1), matchers
