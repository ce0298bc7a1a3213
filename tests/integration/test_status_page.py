"""The status page as HTML, without a browser, on SQLite and PostgreSQL.

Calls ``StatusPage.handle`` directly (the daemon's HTTP handler only writes what it returns; the
browser test goes through the real listener). Checks status codes, the fleet summary, filters,
sorting and pagination, the lease page, the access token, that no secret reaches any page, and that
a page of a 10,000-lease fleet costs a fixed handful of SQL statements with the lease query
paginated in SQL (the time is printed, not asserted).
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from html.parser import HTMLParser
from typing import Any

import pytest
import sqlalchemy as sa

from controller import db as dbmod
from controller.config import Settings, load_settings
from controller.web import access
from controller.web.page import StatusPage
from controller.web.runtime import PassSummary, Rates, Runtime
from models import Event, Execution, LeaderElection, Lease, LeaseStatus, Pool, utcnow

ENV_SECRET = "env-value-do-not-show-4711"
EXEC_ENV_SECRET = "exec-env-value-do-not-show-0815"
STDIN_SECRET = "stdin-value-do-not-show-2342"
TOKEN = "page-token-do-not-show-9001"
API_KEY = "api-key-do-not-show-1234"


def settings(listen: str = "127.0.0.1:9464", token: str | None = None) -> Settings:
    server: dict[str, Any] = {"listen": listen}
    if token is not None:
        server["access_token"] = token
    return load_settings(cli_overrides={"server": server, "daytona": {"api_key": API_KEY}})


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src") and value and not value.startswith(("http:", "https:", "//")):
                self.links.append(value)


def links_of(body: bytes) -> list[str]:
    parser = Links()
    parser.feed(body.decode())
    return parser.links


def lease_names(body: bytes) -> list[str]:
    return re.findall(r'data-lease="([^"]+)"', body.decode())


def get(page: StatusPage, target: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    response = page.handle(target, headers or {})
    assert response is not None, target
    return response.status, response.body.decode()


def seed(db: dbmod.Database) -> None:
    now = utcnow()
    with db.session() as s:
        s.add_all(
            [
                Lease(name="web-1", env={"API_TOKEN": ENV_SECRET}, labels={"team": "web", "tier": "gold"}),
                Lease(name="web-2", labels={"team": "web"}),
                Lease(name="ml-train", labels={"team": "ml"}, desired_state="stopped"),
                Lease(name="ml_odd-name", labels={}),
                Lease(name="batch-9", desired_state="absent"),
            ]
        )
        s.add_all(
            [
                LeaseStatus(
                    lease_name="web-1",
                    phase="Ready",
                    sandbox_id="sb-web-1",
                    sandbox_name="leasectl-default-web-1",
                    observed_state="started",
                    message="ready",
                    last_reconciled_at=now,
                ),
                LeaseStatus(lease_name="web-2", phase="Error", message="create failed: quota", failures=3),
                LeaseStatus(lease_name="ml-train", phase="Stopped", observed_state="stopped"),
                # a status whose lease row an operator deleted: its page still answers
                LeaseStatus(lease_name="gone-lease", phase="Deleting", sandbox_id="sb-gone"),
            ]
        )
        s.add(Event(lease_name="web-1", action="create", outcome="ok", message="created sandbox sb-web-1"))
        s.add(Event(lease_name="web-1", action="start", outcome="ok", message="started"))
        s.add(
            Execution(
                lease_name="web-1",
                command="python -c 'print(42)'",
                state="succeeded",
                exit_code=0,
                output="42\n",
                created_at=now - timedelta(minutes=2),
                finished_at=now - timedelta(minutes=1),
            )
        )
        s.add(
            Execution(  # queued: still carries its env and stdin
                lease_name="web-1",
                command="make deploy",
                state="queued",
                env={"DEPLOY_KEY": EXEC_ENV_SECRET},
                stdin=STDIN_SECRET.encode(),
            )
        )
        s.add(
            LeaderElection(
                instance="default",
                holder="host-a:123",
                term=7,
                renewed_at=now,
                expires_at=now + timedelta(seconds=15),
            )
        )


def test_index_shows_the_fleet_and_the_leases(db: dbmod.Database) -> None:
    seed(db)
    runtime = Runtime(
        holder="host-a:123",
        leading=True,
        last_pass=PassSummary("abc", utcnow(), 0.42, 5, 3, 1),
        rates=Rates(120.0, 6.0, 1000.0, 12.0),
        paused={"sandbox-create": 12.0},
    )
    page = StatusPage(db, settings(), lambda: runtime)
    status, body = get(page, "/")
    assert status == 200
    assert sorted(lease_names(body.encode())) == ["batch-9", "ml-train", "ml_odd-name", "web-1", "web-2"]
    assert 'id="total-leases">5<' in body
    for phase, count in {"Ready": 1, "Error": 1, "Stopped": 1, "Pending": 2}.items():
        assert re.search(rf'data-phase="{phase}">.*?<strong>{count}</strong>', body, re.S), phase
    assert "Deleting" not in re.findall(r'data-phase="(\w+)"', body)  # the orphaned status is no lease
    assert "host-a:123" in body and "term 7" in body
    assert "0.42 s" in body and "3 actions" in body and "1 failed" in body
    assert "120 <span" in body and "6.0/min" in body and "paused 12 s: sandbox-create" in body
    assert "1\u20135 of 5 leases" in body


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/?phase=Ready", ["web-1"]),
        ("/?phase=Pending", ["batch-9", "ml_odd-name"]),
        ("/?desired=stopped", ["ml-train"]),
        ("/?label=team%3Dweb", ["web-1", "web-2"]),
        ("/?label=tier", ["web-1"]),
        ("/?label=team%3Dnobody", []),
        ("/?q=ml", ["ml-train", "ml_odd-name"]),
        ("/?q=_", ["ml_odd-name"]),  # LIKE wildcards are literal
        ("/?q=%25", []),
        ("/?q=WEB", ["web-1", "web-2"]),
        ("/?phase=Pending&desired=absent", ["batch-9"]),
        ("/?sort=name&order=desc", ["web-2", "web-1", "ml_odd-name", "ml-train", "batch-9"]),
        ("/?sort=phase", ["web-2", "batch-9", "ml_odd-name", "web-1", "ml-train"]),
        ("/?sort=observed", ["web-1", "ml-train", "batch-9", "ml_odd-name", "web-2"]),
        ("/?per_page=2", ["batch-9", "ml-train"]),
        ("/?per_page=2&page=3", ["web-2"]),
        ("/?per_page=2&page=99", ["web-2"]),  # past the end: the last page
    ],
)
def test_filters_sorting_and_pages(db: dbmod.Database, target: str, expected: list[str]) -> None:
    seed(db)
    status, body = get(StatusPage(db, settings()), target)
    assert status == 200
    assert lease_names(body.encode()) == expected


def test_pager_links_keep_the_filters(db: dbmod.Database) -> None:
    seed(db)
    _, body = get(StatusPage(db, settings()), "/?label=team%3Dweb&per_page=1&sort=name&order=desc")
    assert "page 1 of 2" in body
    next_link = re.search(r'href="([^"]+)" rel="next"', body)
    assert next_link is not None
    _, second = get(StatusPage(db, settings()), "/" + next_link.group(1).replace("&amp;", "&"))
    assert lease_names(second.encode()) == ["web-1"]
    assert "page 2 of 2" in second


def test_lease_page(db: dbmod.Database) -> None:
    seed(db)
    page = StatusPage(db, settings())
    status, body = get(page, "/leases/web-1")
    assert status == 200
    assert 'id="phase">Ready<' in body
    assert "sb-web-1" in body and "leasectl-default-web-1" in body and "started" in body
    assert "API_TOKEN" in body and ENV_SECRET not in body  # the name, never the value
    assert "created sandbox sb-web-1" in body
    assert "python -c &#39;print(42)&#39;" in body and "exit 0" in body
    assert re.search(r'<pre class="output">42\n</pre>', body)
    assert "make deploy" in body and "queued" in body

    status, body = get(page, "/leases/gone-lease")
    assert status == 200 and "Deleting" in body and "The lease row is gone" in body
    assert get(page, "/leases/no-such-lease")[0] == 404
    assert get(page, "/leases/")[0] == 404
    assert page.handle("/healthz", {}) is None  # not the page's: the daemon answers it
    assert page.handle("/favicon.ico", {}) is None


def test_long_output_shows_its_tail(db: dbmod.Database) -> None:
    seed(db)
    with db.session() as s:
        output = "x" * 40_000 + "END"
        s.add(Execution(lease_name="ml-train", command="yes", state="failed", exit_code=1, output=output))
    _, body = get(StatusPage(db, settings()), "/leases/ml-train")
    assert "last 16384 of 40003 characters" in body
    assert "xEND</pre>" in body


def test_html_is_escaped(db: dbmod.Database) -> None:
    with db.session() as s:
        s.add(Lease(name="esc", labels={"note": "<script>alert(1)</script>"}))
        s.add(LeaseStatus(lease_name="esc", phase="Error", message="<img src=x onerror=alert(1)>"))
    page = StatusPage(db, settings())
    for target in ("/", "/leases/esc"):
        _, body = get(page, target)
        assert "<script>alert" not in body and "<img src=x" not in body
        assert "&lt;img src=x" in body


def test_pages_are_read_only_and_carry_safe_headers(db: dbmod.Database) -> None:
    seed(db)
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.lstrip().split()[0].upper())

    sa.event.listen(db.engine, "before_cursor_execute", record)
    try:
        page = StatusPage(db, settings())
        for target in ("/", "/?phase=Ready&sort=phase", "/leases/web-1", "/leases/nope"):
            response = page.handle(target, {})
            assert response is not None
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            assert response.headers["Cache-Control"] == "no-store"
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", record)
    assert set(statements) <= {"SELECT", "BEGIN"}, statements


def test_static_assets_are_local_and_pinned(db: dbmod.Database) -> None:
    page = StatusPage(db, settings(token=TOKEN))
    _, body = get(page, "/", {"authorization": f"Bearer {TOKEN}"})
    assets = [link for link in links_of(body.encode()) if link.startswith("/static/")]
    assert sorted(a.split("?")[0] for a in assets) == ["/static/refresh.js", "/static/style.css"]
    assert not re.search(r'(src|href)="(https?:)?//', body), "nothing may load from another origin"
    for link in assets:
        response = page.handle(link, {})  # assets need no token: they hold nothing of the fleet
        assert response is not None and response.status == 200
        assert "immutable" in response.headers["Cache-Control"]
        assert b"http://" not in response.body and b"https://" not in response.body
    stale = page.handle("/static/style.css?v=old", {})
    assert stale is not None and stale.headers["Cache-Control"] == "no-cache"
    assert get(page, "/static/../page.py")[0] == 404
    assert get(page, "/static/nope.js")[0] == 404


def test_token_off_loopback(db: dbmod.Database) -> None:
    seed(db)
    no_token = StatusPage(db, settings(listen="0.0.0.0:9464"))
    status, body = get(no_token, "/")
    assert status == 401 and "server.access_token" in body and "web-1" not in body
    refused = no_token.handle("/", {"Authorization": "Bearer anything"})
    assert refused is not None and refused.status == 401 and "WWW-Authenticate" not in refused.headers
    assert get(no_token, "/leases/web-1")[0] == 401

    page = StatusPage(db, settings(listen="0.0.0.0:9464", token=TOKEN))
    for target in ("/", "/leases/web-1", "/?token=wrong"):
        response = page.handle(target, {})
        assert response is not None and response.status == 401, target
        assert response.headers["WWW-Authenticate"].startswith("Basic ")
        assert b"web-1" not in response.body
    assert get(page, "/", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    assert get(page, "/leases/web-1", {"Authorization": f"Basic {basic}"})[0] == 200

    redirect = page.handle(f"/?phase=Ready&token={TOKEN}", {})
    assert redirect is not None and redirect.status == 303
    assert redirect.headers["Location"] == "/?phase=Ready"  # the token leaves the URL
    cookie = redirect.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    name_value = cookie.split(";")[0]
    status, body = get(page, "/?phase=Ready", {"Cookie": name_value})
    assert status == 200 and lease_names(body.encode()) == ["web-1"]
    assert get(page, "/", {"Cookie": f"{access.COOKIE_NAME}=forged"})[0] == 401


def test_a_token_that_is_set_is_required_on_loopback_too(db: dbmod.Database) -> None:
    page = StatusPage(db, settings(token=TOKEN))
    assert page.protected
    assert get(page, "/")[0] == 401
    assert get(page, "/", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert not StatusPage(db, settings()).protected


def test_no_secret_in_any_page(db: dbmod.Database) -> None:
    """Crawl every link from the index (both listeners), read every page: no secret anywhere."""
    seed(db)
    secrets = [ENV_SECRET, EXEC_ENV_SECRET, STDIN_SECRET, TOKEN, API_KEY]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    page = StatusPage(db, settings(listen="0.0.0.0:9464", token=TOKEN), lambda: Runtime("h", True))
    seen: set[str] = set()
    todo = ["/", "/?phase=Error", "/leases/web-1", "/leases/gone-lease", "/leases/nope", f"/?token={TOKEN}"]
    while todo:
        target = todo.pop().replace("&amp;", "&")
        if target in seen or target.startswith("#"):
            continue
        seen.add(target)
        if not target.startswith("/"):
            target = "/" + target
        for headers in (auth, {}):
            response = page.handle(target, headers)
            assert response is not None, target
            text = response.body.decode() + repr(response.headers)
            for secret in secrets:
                assert secret not in text, (target, secret)
            if response.status == 200 and headers and "html" in response.content_type:
                todo.extend(links_of(response.body))
    assert len(seen) > 20  # the crawl reached the sort, filter, lease and asset links


N_LEASES = 10_000


def bulk_fleet(db: dbmod.Database, n: int) -> None:
    phases = ["Ready", "Ready", "Ready", "Provisioning", "Stopped", "Error", "Blocked", "Idle"]
    now = utcnow()
    with db.session() as s:
        s.execute(
            sa.insert(Lease),
            [
                {"name": f"lease-{i:05d}", "labels": {"team": f"t{i % 10}"}, "env": {"K": ENV_SECRET}}
                for i in range(n)
            ],
        )
        s.execute(
            sa.insert(LeaseStatus),
            [
                {
                    "lease_name": f"lease-{i:05d}",
                    "phase": phases[i % len(phases)],
                    "sandbox_id": f"sb-{i:05d}",
                    "observed_state": "started",
                    "last_reconciled_at": now,
                }
                for i in range(n)
                if i % 50  # every 50th lease has no status row yet: Pending
            ],
        )


@contextmanager
def recorded(engine: sa.Engine) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def test_ten_thousand_leases_a_page_is_a_few_paginated_statements(db: dbmod.Database) -> None:
    bulk_fleet(db, N_LEASES)
    page = StatusPage(db, settings())
    get(page, "/")  # warm the template cache and the connection pool
    cases = {
        "/": 50,
        "/?sort=phase&order=desc&page=120": 50,
        "/?label=team%3Dt3&q=lease-0&per_page=200&page=2": 200,
        f"/?per_page=200&page={N_LEASES // 200}": 200,
    }
    for target, rows in cases.items():
        with recorded(db.engine) as statements:
            started = time.perf_counter()
            status, body = get(page, target)
            elapsed = time.perf_counter() - started
        print(f"{db.engine.dialect.name} {target}: {elapsed * 1000:.1f} ms, {len(statements)} statements")
        assert status == 200
        assert len(lease_names(body.encode())) == rows
        selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
        # fleet: by phase, leader row, latest pass, pools (none here); table: count, page
        assert len(selects) == 6, selects
        page_query = [s for s in selects if "LIMIT" in s.upper()]
        assert len(page_query) == 1 and "OFFSET" in page_query[0].upper()
        assert ENV_SECRET not in body
    _, body = get(page, "/")
    assert f'id="total-leases">{N_LEASES}<' in body
    assert re.search(r'data-phase="Pending">.*?<strong>200</strong>', body, re.S)
    assert "1\u201350 of 10000 leases" in body
    with recorded(db.engine) as statements:
        assert get(page, "/leases/lease-04242")[0] == 200
    assert len(statements) <= 6, statements


def test_pools_card_counts_members_as_leasectl_pools_does(db: dbmod.Database) -> None:
    page = StatusPage(db, settings())
    _, body = get(page, "/")
    assert "<h2>Pools</h2>" not in body  # no pools: no card
    now = utcnow()
    with db.session() as session:
        session.add(Pool(name="agents", template={}, min_ready=3, max_size=5, created_at=now, updated_at=now))
        session.add(
            Pool(name="empty", template={}, min_ready=1, max_size=None, created_at=now, updated_at=now)
        )
        for name, phase, claimed in [
            ("agents-aaaaaaaa", "Ready", None),
            ("agents-bbbbbbbb", "Ready", "ci-run-7"),
            ("agents-cccccccc", "Provisioning", None),
            ("agents-dddddddd", "Ready", None),
        ]:
            session.add(
                Lease(name=name, pool="agents", claimed_by=claimed, claimed_at=now if claimed else None)
            )
            session.add(LeaseStatus(lease_name=name, phase=phase, failures=0))
    _, body = get(page, "/")
    assert "<h2>Pools</h2>" in body
    rows = re.findall(r"<tr><td>(agents|empty)</td><td>(\d+) / (\d+)</td><td>(\d+)</td><td>(\d+)</td>", body)
    assert rows == [("agents", "2", "3", "1", "1"), ("empty", "0", "1", "0", "0")]
