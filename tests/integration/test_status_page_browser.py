"""The status page in a real browser: headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright; `make venv` installs both) against `leasectl run` and the local Daytona API.

One daemon, one fleet: the page lists the leases with the phases the database holds, the filter
form narrows them, a lease's page shows its sandbox and an execution's output, the page refreshes
in place (no navigation) when the database changes, works with JavaScript off, and the token is
asked for and kept in a cookie. The daemon's /metrics is parsed and every dashboard and alert query
must name series it serves. The screenshot goes to the test's directory, and to docs/ with
``UPDATE_SCREENSHOTS=1`` (``make screenshots``), which is where the README shows it.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.integration.test_daemon import apply, daemon_env, phases, query, wait_for
from tests.support import monitoring
from tests.support.daemon import DaemonProcess
from tests.support.emulator import EmulatorProcess

CHROMIUM = "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[2] / "docs"
TOKEN = "browser-test-token-5150"
ENV_SECRET = "browser-env-secret-8080"

FLEET = f"""\
leases:
  - name: web-frontend
    labels: {{team: web, tier: gold}}
    env: {{SESSION_KEY: {ENV_SECRET}}}
  - name: web-api
    labels: {{team: web}}
  - name: ml-train
    labels: {{team: ml}}
  - name: ml-eval
    labels: {{team: ml}}
    state: stopped
  - name: ci-runner-1
    labels: {{team: ci}}
  - name: ci-runner-2
    labels: {{team: ci}}
  - name: scratch
    state: archived
quotas:
  - {{label: team, value: ci, sandboxes: 1}}
"""
SETTLED = {"Ready", "Stopped", "Archived", "Blocked"}


@pytest.fixture
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        if IN_CI:
            pytest.fail(f"CI=true and {CHROMIUM} is missing: `make venv` installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} missing (make venv installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: the tests run as root in CI, where Chromium's sandbox refuses to start.
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def shot(page: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=False)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 20_000, "an empty or blank screenshot"
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(path, DOCS / name)
    return path


def table(page: Any) -> dict[str, str]:
    """Lease name -> phase, as the page's table shows them."""
    rows = page.locator("tr[data-lease]")
    return {
        rows.nth(i).get_attribute("data-lease"): rows.nth(i).locator("[data-phase]").inner_text()
        for i in range(rows.count())
    }


def test_status_page_in_a_browser(
    emulator: EmulatorProcess, tmp_path: Path, browser: Any, daemons: list[DaemonProcess]
) -> None:
    url = f"sqlite:///{tmp_path / 'leasectl.db'}"
    from controller import db as dbmod

    database = dbmod.connect(url)
    dbmod.upgrade(database)
    database.dispose()
    apply(url, tmp_path, FLEET)
    # leasectl's quota of one running sandbox for team=ci: ci-runner-2 waits Blocked (the quota order
    # is oldest lease first, then name, so which one waits is known; Daytona's own quota would refuse
    # whichever create came last)
    env = {**daemon_env(emulator, url), "LEASECTL_SERVER__ACCESS_TOKEN": TOKEN}
    d = DaemonProcess(tmp_path / "daemon.log", env).start()
    daemons.append(d)
    settled = wait_for(
        lambda: (
            (p := phases(url))
            and len(p) == 7
            and set(p.values()) <= SETTLED
            and p.get("ci-runner-2") == "Blocked"
            and p
        ),
        timeout=90,
        what="the fleet settles with one lease Blocked by the quota",
    )
    query(
        url, "INSERT INTO executions (lease_name, command) VALUES ('web-frontend', 'uname -s; echo built ok')"
    )
    wait_for(
        lambda: query(url, "SELECT state FROM executions WHERE state = 'succeeded'"),
        timeout=30,
        what="the execution finished",
    )

    # The token: the listener asks for it; ?token= once sets a cookie and leaves the URL.
    assert d.http("/")[0] == 401
    assert d.http("/healthz")[0] == 200  # probes and metrics need no token
    assert d.http("/no-such-path")[0] == 404
    context = browser.new_context(viewport={"width": 1366, "height": 860}, color_scheme="dark")
    page = context.new_page()
    assert context.request.get(f"http://127.0.0.1:{d.port}/").status == 401  # (a browser would prompt)
    page.goto(f"http://127.0.0.1:{d.port}/?token={TOKEN}")
    assert page.url == f"http://127.0.0.1:{d.port}/"
    assert TOKEN not in page.content()

    # The fleet and the table show what the database holds.
    assert table(page) == settled
    assert page.locator("#total-leases").inner_text() == "7"
    for phase in set(settled.values()):
        count = sum(1 for p in settled.values() if p == phase)
        assert page.locator(f'.legend [data-phase="{phase}"] strong').inner_text() == str(count)
    assert "term" in page.locator("#fleet").inner_text()  # the leader card

    def fleet_text() -> str:
        page.reload()
        return str(page.locator("#fleet").inner_text())

    wait_for(lambda: "actions" in fleet_text(), what="a pass summary")
    shot(page, tmp_path, "status-page.png")

    # Filters: the form (a GET, works with or without JavaScript) narrows the table on the server.
    page.select_option("select[name=phase]", "Ready")
    page.click("button[type=submit]")
    assert set(table(page)) == {name for name, phase in settled.items() if phase == "Ready"}
    assert "phase=Ready" in page.url
    page.goto(f"http://127.0.0.1:{d.port}/")
    page.fill("input[name=label]", "team=ml")
    page.press("input[name=label]", "Enter")
    assert set(table(page)) == {"ml-train", "ml-eval"}
    page.fill("input[name=q]", "eval")
    page.press("input[name=q]", "Enter")
    assert set(table(page)) == {"ml-eval"}
    page.click("text=clear")
    assert len(table(page)) == 7
    page.click("th >> text=Phase")
    assert list(table(page).values()) == sorted(settled.values())

    # A lease's page: status, sandbox, spec without env values, the execution and its output.
    page.click("a[href='/leases/web-frontend']")
    assert page.url.endswith("/leases/web-frontend")
    assert page.locator("#phase").inner_text() == "Ready"
    sandbox_id = query(url, "SELECT sandbox_id FROM lease_status WHERE lease_name = 'web-frontend'")[0][0]
    assert sandbox_id in page.locator("#status").inner_text()
    assert "SESSION_KEY" in page.locator("#spec").inner_text()
    assert ENV_SECRET not in page.content()
    output = page.locator("#executions pre.output").first.inner_text()
    assert "built ok" in output and "Linux" in output
    assert page.locator("#events tbody tr").count() >= 1
    shot(page, tmp_path, "status-page-lease.png")

    # In-place refresh: the page changes when the database does, without navigating.
    page.goto(f"http://127.0.0.1:{d.port}/")
    page.evaluate("window.__notReloaded = true")
    query(url, "UPDATE leases SET desired_state = 'stopped' WHERE name = 'web-api'")
    wait_for(
        lambda: page.locator('tr[data-lease="web-api"] [data-phase]').inner_text() == "Stopped",
        timeout=30,
        what="web-api shown Stopped without a reload",
    )
    assert page.evaluate("window.__notReloaded") is True

    # Without JavaScript: plain HTML with a meta refresh; the cookie still works.
    plain = browser.new_context(java_script_enabled=False)
    plain.add_cookies(context.cookies())
    no_js = plain.new_page()
    no_js.goto(f"http://127.0.0.1:{d.port}/?sort=name&order=desc")
    assert list(table(no_js)) == sorted(settled, reverse=True)
    assert no_js.locator("noscript").count() >= 1
    assert re.search(r'http-equiv="refresh" content="\d+"', no_js.content())
    plain.close()
    context.close()

    # The daemon's /metrics serves every series the dashboard and the alert rules query.
    served = monitoring.series_names(d.http("/metrics")[1])
    for where, expr in monitoring.queries():
        for series, _ in monitoring.selectors(expr):
            assert series in served, f"{where}: {series} is not on the daemon's /metrics"
    assert d.terminate(timeout=20) == 0
