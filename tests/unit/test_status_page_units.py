"""The status page's pure parts: query-string parsing and links, the access decision, request rates."""

from __future__ import annotations

import base64
from urllib.parse import parse_qsl

import pytest

from controller.metrics import Metrics
from controller.web import access
from controller.web.queries import DEFAULT_PER_PAGE, MAX_PER_PAGE, LeaseQuery, parse_query
from controller.web.runtime import THROTTLED_OUTCOME, RequestRates


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({}, LeaseQuery()),
        ({"phase": "Ready", "desired": "stopped"}, LeaseQuery(phase="Ready", desired="stopped")),
        ({"phase": "ready", "desired": "gone"}, LeaseQuery()),  # not a phase / desired state: ignored
        ({"sort": "phase", "order": "desc"}, LeaseQuery(sort="phase", order="desc")),
        ({"sort": "secret_column", "order": "sideways"}, LeaseQuery()),
        ({"page": "3", "per_page": "20"}, LeaseQuery(page=3, per_page=20)),
        ({"page": "0", "per_page": "100000"}, LeaseQuery(page=1, per_page=MAX_PER_PAGE)),
        ({"page": "x", "per_page": "-4"}, LeaseQuery(page=1, per_page=1)),
        ({"q": "  web  ", "label": " team=ml "}, LeaseQuery(q="web", label="team=ml")),
    ],
)
def test_parse_query(params: dict[str, str], expected: LeaseQuery) -> None:
    assert parse_query(params) == expected


def test_links_keep_filters_and_drop_defaults() -> None:
    query = LeaseQuery(phase="Error", label="team=ml", sort="phase", order="desc", page=4)
    assert dict(parse_qsl(query.params(page=5)[1:])) == {
        "phase": "Error",
        "label": "team=ml",
        "sort": "phase",
        "order": "desc",
        "page": "5",
    }
    assert LeaseQuery().params() == "?"
    assert LeaseQuery(per_page=DEFAULT_PER_PAGE).params(page=1) == "?"


def test_sort_link_flips_only_the_current_column_and_resets_the_page() -> None:
    query = LeaseQuery(sort="phase", order="asc", page=7)
    assert dict(parse_qsl(query.sort_link("phase")[1:])) == {"sort": "phase", "order": "desc"}
    assert dict(parse_qsl(query.sort_link("name")[1:])) == {}
    assert dict(parse_qsl(LeaseQuery(sort="phase", order="desc").sort_link("phase")[1:])) == {"sort": "phase"}


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("localhost", True),
        ("[::1]", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("", False),
        ("10.0.0.5", False),
        ("example.org", False),
        ("[::]", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert access.is_loopback(host) is loopback


def _basic(password: str, user: str = "me") -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


TOKEN = "t0ken-value-123"
GOOD_COOKIE = {"cookie": f"{access.COOKIE_NAME}={access.cookie_value(TOKEN)}"}
RAW_COOKIE = {"cookie": f"{access.COOKIE_NAME}={TOKEN}"}  # the raw token is not what the cookie holds
OTHER_COOKIE = {"cookie": f"{access.COOKIE_NAME}={access.cookie_value('other')}"}


@pytest.mark.parametrize(
    ("host", "token", "headers", "query_token", "allowed", "sets_cookie"),
    [
        ("127.0.0.1", None, {}, None, True, False),
        ("0.0.0.0", None, {}, None, False, False),  # off loopback without a token: no page at all
        ("0.0.0.0", None, {"authorization": "Bearer anything"}, "anything", False, False),
        ("0.0.0.0", TOKEN, {}, None, False, False),
        ("127.0.0.1", TOKEN, {}, None, False, False),  # a token that is set is required on loopback too
        ("0.0.0.0", TOKEN, {"authorization": f"Bearer {TOKEN}"}, None, True, False),
        ("0.0.0.0", TOKEN, {"authorization": "Bearer wrong"}, None, False, False),
        ("0.0.0.0", TOKEN, _basic(TOKEN), None, True, False),
        ("0.0.0.0", TOKEN, _basic("wrong"), None, False, False),
        ("0.0.0.0", TOKEN, {"authorization": "Basic !!notbase64"}, None, False, False),
        ("0.0.0.0", TOKEN, GOOD_COOKIE, None, True, False),
        ("0.0.0.0", TOKEN, RAW_COOKIE, None, False, False),
        ("0.0.0.0", TOKEN, OTHER_COOKIE, None, False, False),
        ("0.0.0.0", TOKEN, {}, TOKEN, True, True),
        ("0.0.0.0", TOKEN, {}, "wrong", False, False),
    ],
)
def test_access_decision(
    host: str,
    token: str | None,
    headers: dict[str, str],
    query_token: str | None,
    allowed: bool,
    sets_cookie: bool,
) -> None:
    decision = access.decide(host, token, headers, query_token)
    assert decision.allowed is allowed
    assert (decision.set_cookie is not None) is sets_cookie
    assert TOKEN not in decision.reason
    if decision.set_cookie is not None:
        assert decision.set_cookie == access.cookie_value(TOKEN) != TOKEN


def test_request_rates_per_minute_over_the_samples() -> None:
    metrics = Metrics()
    clock = [100.0]
    rates = RequestRates(metrics, monotonic=lambda: clock[0])
    first = rates.sample()
    assert first.requests_per_minute is None  # one sample is no rate
    for _ in range(30):
        metrics.record_request("list", "ok")
    for _ in range(6):
        metrics.record_request("create", THROTTLED_OUTCOME)
    clock[0] += 30.0
    later = rates.sample()
    assert later.requests_total == 36
    assert later.throttled_total == 6
    assert later.requests_per_minute == pytest.approx(72.0)
    assert later.throttled_per_minute == pytest.approx(12.0)


def test_request_rates_forget_samples_older_than_the_window() -> None:
    metrics = Metrics()
    clock = [0.0]
    rates = RequestRates(metrics, monotonic=lambda: clock[0])
    rates.sample()
    for _ in range(600):
        metrics.record_request("list", "ok")
    clock[0] = 200.0
    rates.sample()
    clock[0] = 560.0  # the first sample is now 560 s old, the second 360 s: only the second is kept
    quiet = rates.sample()
    assert quiet.requests_per_minute == pytest.approx(0.0)
    assert quiet.requests_total == 600
