"""The read-only status page: routes, access, rendering and the static assets.

:class:`StatusPage` answers ``GET`` for ``/`` (fleet overview and lease table), ``/leases/NAME``
(one lease) and ``/static/FILE`` (the page's own stylesheet and script, listed in :data:`ASSETS`);
anything else is ``None`` so the daemon's HTTP handler can answer it (health, metrics, 404). It
knows nothing of sockets: :meth:`StatusPage.handle` takes a request target and headers and returns
a :class:`Response`, which the daemon writes and the tests read directly.

Reads go through ``db.session(readonly=True)``, the same sessions as the CLI; nothing writes. The
HTML comes from the Jinja2 templates beside this module (autoescaped); pages carry a
Content-Security-Policy that allows only this origin, so the page works offline and loads nothing
from elsewhere. Asset URLs carry a digest of the file (``?v=``), so a cached copy never outlives
an upgrade.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import jinja2
import sqlalchemy as sa

from controller import __version__
from controller.config import Settings
from controller.db import Database
from controller.web import access, queries
from controller.web.runtime import Runtime
from models import DESIRED_STATES, PHASES, utcnow

log = logging.getLogger(__name__)

REFRESH_SECONDS = 5
ASSETS: dict[str, str] = {
    "style.css": "text/css; charset=utf-8",
    "refresh.js": "text/javascript; charset=utf-8",
}
CSP = (
    "default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
CHALLENGE = f'Basic realm="{access.REALM}", charset="UTF-8"'
_PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PHASE_TONE = {
    "Ready": "ok",
    "Stopped": "rest",
    "Archived": "rest",
    "Deleted": "rest",
    "Idle": "rest",
    "Paused": "rest",
    "Pending": "busy",
    "Provisioning": "busy",
    "Stopping": "busy",
    "Archiving": "busy",
    "Deleting": "busy",
    "Blocked": "warn",
    "Error": "bad",
    "Failed": "bad",
}


_CALM_OUTCOMES = {"ok", "succeeded"}
_NEUTRAL_OUTCOMES = {"attempt", "reobserved", "skipped", "busy", "deferred", "queued", "running", "cancelled"}
_WAITING_OUTCOMES = {"capacity", "blocked", "rate_limited", "timed_out"}


def outcome_tone(outcome: str) -> str:
    """Colour of an event outcome or execution state: ok, busy (neutral), warn or bad."""
    if outcome in _CALM_OUTCOMES:
        return "ok"
    if outcome in _NEUTRAL_OUTCOMES:
        return "busy"
    return "warn" if outcome in _WAITING_OUTCOMES else "bad"


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/html; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


def _ago(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "—"
    seconds = (now - value).total_seconds()
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 60:
        text = f"{seconds:.0f}s"
    elif seconds < 3600:
        text = f"{seconds / 60:.0f}m"
    elif seconds < 86400:
        text = f"{seconds / 3600:.1f}h"
    else:
        text = f"{seconds / 86400:.1f}d"
    return f"in {text}" if future else f"{text} ago"


def _stamp(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else ""


class StatusPage:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        runtime: Callable[[], Runtime] | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.settings = settings
        self.runtime = runtime
        self.clock = clock
        self.listen_host = settings.server.listen.rpartition(":")[0]
        secret = settings.server.access_token
        self._token = secret.get_secret_value() if secret is not None else None
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader("controller.web", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        static = resources.files("controller.web") / "static"
        self._assets = {name: (static / name).read_bytes() for name in ASSETS}
        self._asset_versions = {
            name: hashlib.sha256(body).hexdigest()[:12] for name, body in self._assets.items()
        }
        self._env.globals.update(
            static=self.static_url,
            version=__version__,
            instance=settings.controller.instance,
            refresh_seconds=REFRESH_SECONDS,
            phases=PHASES,
            desired_states=DESIRED_STATES,
            tone=lambda phase: PHASE_TONE.get(phase, "busy"),
            outcome_tone=outcome_tone,
            stamp=_stamp,
        )

    def static_url(self, name: str) -> str:
        return f"/static/{name}?v={self._asset_versions[name]}"

    @property
    def protected(self) -> bool:
        """True when requests must carry the token (a token is set, or the listener is not loopback)."""
        return bool(self._token) or not access.is_loopback(self.listen_host)

    # -- routing ---------------------------------------------------------------------------------

    def handle(self, target: str, headers: Mapping[str, str]) -> Response | None:
        """Answer a GET for ``target`` (path and query); None when the path is not the page's."""
        parts = urlsplit(target)
        path = parts.path
        if path.startswith("/static/"):
            return self._asset(path.removeprefix("/static/"), dict(parse_qsl(parts.query)))
        if path != "/" and not path.startswith("/leases/"):
            return None
        params = dict(parse_qsl(parts.query))
        lowered = {k.lower(): v for k, v in headers.items()}
        decision = access.decide(self.listen_host, self._token, lowered, params.get("token"))
        if not decision.allowed:
            body = self._render("denied.html", reason=decision.reason, now=self.clock())
            headers = dict(_PAGE_HEADERS)
            if self._token:  # no prompt while no token is set: nothing could be typed into it
                headers["WWW-Authenticate"] = CHALLENGE
            return Response(401, body, headers=headers)
        if decision.set_cookie is not None:
            params.pop("token", None)
            location = path + ("?" + urlencode(params) if params else "")
            cookie = f"{access.COOKIE_NAME}={decision.set_cookie}; Path=/; HttpOnly; SameSite=Strict"
            return Response(303, b"", headers={**_PAGE_HEADERS, "Location": location, "Set-Cookie": cookie})
        params.pop("token", None)
        try:
            if path == "/":
                return self._index(params)
            return self._lease(path.removeprefix("/leases/"))
        except sa.exc.SQLAlchemyError as exc:
            log.warning("status page: database error: %s", str(exc).splitlines()[0])
            body = self._render("denied.html", reason="the database is not reachable", now=self.clock())
            return Response(503, body, headers=dict(_PAGE_HEADERS))

    # -- pages -----------------------------------------------------------------------------------

    def _render(self, template: str, **context: Any) -> bytes:
        now = context["now"]
        context.setdefault("ago", lambda value: _ago(value, now))
        return self._env.get_template(template).render(**context).encode("utf-8")

    def _index(self, params: Mapping[str, str]) -> Response:
        query = queries.parse_query(params)
        now = self.clock()
        with self.db.session(readonly=True) as session:
            fleet = queries.fleet(session, self.settings.controller.instance, now)
            page = queries.list_leases(session, query)
        runtime = self.runtime() if self.runtime is not None else None
        body = self._render(
            "index.html",
            now=now,
            fleet=fleet,
            page=page,
            query=page.query,
            runtime=runtime,
            pass_overdue=self._overdue(fleet.last_reconciled_at, now),
        )
        return Response(200, body, headers=dict(_PAGE_HEADERS))

    def _overdue(self, last: datetime | None, now: datetime) -> bool:
        interval = self.settings.controller.reconcile_interval_seconds
        return last is None or now - last > timedelta(seconds=3 * interval + 30)

    def _lease(self, name: str) -> Response:
        now = self.clock()
        with self.db.session(readonly=True) as session:
            detail = queries.lease_detail(session, name) if name else None
        if detail is None:
            body = self._render("missing.html", now=now, name=name)
            return Response(404, body, headers=dict(_PAGE_HEADERS))
        body = self._render("lease.html", now=now, lease=detail)
        return Response(200, body, headers=dict(_PAGE_HEADERS))

    def _asset(self, name: str, params: Mapping[str, str]) -> Response:
        if name not in self._assets:
            return Response(404, b"not found\n", "text/plain; charset=utf-8")
        pinned = params.get("v") == self._asset_versions[name]
        cache = "public, max-age=31536000, immutable" if pinned else "no-cache"
        return Response(
            200,
            self._assets[name],
            ASSETS[name],
            headers={"Cache-Control": cache, "X-Content-Type-Options": "nosniff"},
        )
