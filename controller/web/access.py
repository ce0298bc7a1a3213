"""Who may read the status page: loopback freely, anywhere else only with ``server.access_token``.

:func:`decide` is pure: given the listener's host, the configured token and what the request
carries, it says whether to serve, refuse (401) or set the session cookie and redirect. A request
proves the token with ``Authorization: Bearer TOKEN``, HTTP Basic (any user, the token as password:
the browser's own prompt, so it works without JavaScript), or once with ``?token=TOKEN``, which is
swapped for an HttpOnly cookie holding a digest of the token (never the token) and redirected to
the same URL without it, so the token stays out of history, links and Referer headers.

A token that is set is required on loopback too. A non-loopback listener without a token serves
no page at all (401 saying which setting to set); /healthz, /readyz and /metrics are not the page's
and are unaffected (whether the daemon may listen there at all is ``server.listen``'s business).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie

COOKIE_NAME = "leasectl_page"
REALM = "leasectl status"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs; anything else (``0.0.0.0``, ``""``, names) is not."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cookie_value(token: str) -> str:
    """What the session cookie holds: a digest of the token, so the cookie never is the token."""
    return hashlib.sha256(b"leasectl-status-page\0" + token.encode()).hexdigest()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""  # why not, for the 401 page (never contains the token)
    set_cookie: str | None = None  # serve a redirect that sets this cookie value


def _presented(headers: Mapping[str, str]) -> list[str]:
    found: list[str] = []
    auth = headers.get("authorization", "")
    scheme, _, credentials = auth.partition(" ")
    if scheme.lower() == "bearer" and credentials:
        found.append(credentials.strip())
    elif scheme.lower() == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            decoded = ""
        if ":" in decoded:
            found.append(decoded.split(":", 1)[1])
    return found


def _cookie(headers: Mapping[str, str]) -> str | None:
    raw = headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(COOKIE_NAME)
    return morsel.value if morsel is not None else None


def decide(
    listen_host: str, token: str | None, headers: Mapping[str, str], query_token: str | None
) -> Decision:
    """``headers`` keys are lower-case. ``query_token`` is the ``token`` query parameter, if any."""
    if not token:
        if is_loopback(listen_host):
            return Decision(True)
        return Decision(
            False,
            "the status page is served off loopback only with an access token: set "
            "server.access_token (or LEASECTL_SERVER__ACCESS_TOKEN)",
        )
    expected = token.encode()
    if any(hmac.compare_digest(p.encode(), expected) for p in _presented(headers)):
        return Decision(True)
    cookie = _cookie(headers)
    if cookie is not None and hmac.compare_digest(cookie.encode(), cookie_value(token).encode()):
        return Decision(True)
    if query_token is not None and hmac.compare_digest(query_token.encode(), expected):
        return Decision(True, set_cookie=cookie_value(token))
    return Decision(False, "an access token is required (server.access_token)")
