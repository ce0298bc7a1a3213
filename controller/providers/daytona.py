"""The Daytona provider: the ONLY module that imports the Daytona SDK.

Lifecycle calls (list, get, create, start, stop, archive, recover, delete) go through the SDK's
generated REST client (``daytona_api_client``) so that each is exactly one bounded HTTP request and
returns as soon as Daytona accepted it: the reconciler observes progress on its next pass instead of
blocking a worker in the high-level client's wait loops. ``exec``, the hot path of ``leasectl
exec`` and the execution queue, and the session calls go through the generated toolbox client
too, and so do the upload and deletion of a command's stdin file (the calls of its ``ProcessApi``
and two of its file-system calls, sent by :class:`Toolbox` and aimed at the sandbox's toolbox proxy
URL from one ``get_sandbox``): the same requests the high-level client sends, without importing
it. The workspace's folder and work-dir calls use the high-level ``daytona.Daytona`` client with
event-socket polling disabled, so an unreachable socket can neither slow nor break anything; it is
made on first use, because importing it (OpenTelemetry, aiohttp, socketio, every generated model)
takes seconds that ``plan``, ``gc`` and ``exec`` never need; so are the volumes and object-storage
APIs, which ``exec`` never needs either (``leasectl exec`` starts in a fraction of a second:
tests/unit/test_cli_imports.py lists what it imports).

Every vendor exception is translated into ``controller.errors`` by ``classify`` and raised ``from``
the original; only vendor exceptions are (:func:`is_vendor_failure`: the SDK's ``ApiException`` and
``DaytonaError``, urllib3, httpx, object-storage, http.client and OS errors, an answer that cannot
be read): anything else raised inside a call (a NameError, a TypeError of ours or of the SDK)
propagates unchanged, a bug and not a transient failure. Daytona's server decides much with 400
(quota, capacity, "failed to start", a state that refuses the call), so the message and the call
matter, not only the status:
429 -> RateLimitedError scoped by the ``Retry-After-<throttler>`` headers; 408, 5xx, network errors
-> TransientError; 401/403 (wrong key, suspended org, missing permission: fixed without touching the
spec) -> AuthError, a TransientError that one-shot commands do not retry (a toolbox 403
``FILE_ACCESS_DENIED`` is a refused path, not credentials: TransientError); quota/capacity ->
CapacityError; create/start/recover "failed to start" -> StartFailedError; a lifecycle call its state
refuses (400/409) -> StateConflictError; create 409 -> ConflictError (name taken); 404 ->
NotFoundError; any other 4xx (a spec Daytona refuses) -> PermanentError. The list is walked in
creation order (``sort=createdAt&order=asc``): Daytona's default order, last activity first, can make
a cursor skip a sandbox that sees activity while we page. urllib3's own retries are off: backoff
belongs to the applier, which sees every failure.
"""

from __future__ import annotations

import copy
import functools
import http.client
import json
import logging
import re
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import urllib3.exceptions

# Submodules, not the packages' lazy top levels: exactly what the provider uses gets imported.
from daytona.internal.urllib3_retry import RemoteDisconnectedRetry
from daytona_api_client.api_client import ApiClient
from daytona_api_client.configuration import Configuration
from daytona_api_client.exceptions import ApiException
from daytona_api_client.rest import RESTResponse
from daytona_toolbox_api_client.api_client import ApiClient as ToolboxApiClient
from daytona_toolbox_api_client.configuration import Configuration as ToolboxConfiguration
from daytona_toolbox_api_client.exceptions import ApiException as ToolboxApiException
from daytona_toolbox_api_client.models.create_session_request import CreateSessionRequest
from daytona_toolbox_api_client.models.execute_request import ExecuteRequest
from daytona_toolbox_api_client.models.session_execute_request import SessionExecuteRequest
from pydantic import ValidationError

from controller.errors import (
    SCOPE_ALL,
    SCOPE_CREATE,
    SCOPE_LIFECYCLE,
    AuthError,
    CapacityError,
    ConflictError,
    NotFoundError,
    NotSentError,
    PermanentError,
    ProviderError,
    RateLimitedError,
    StartFailedError,
    StateConflictError,
    TransientError,
)
from controller.providers.base import (
    CreateRequest,
    ExecResult,
    NetworkSettings,
    ObservedSandbox,
    ObservedVolume,
    SandboxUpdate,
    SessionCommand,
    observed_sandbox,
)

if TYPE_CHECKING:
    from daytona_api_client.api.sandbox_api import SandboxApi
    from daytona_api_client.api.volumes_api import VolumesApi
    from daytona_api_client.models.create_build_info import CreateBuildInfo

log = logging.getLogger(__name__)

PAGE_SIZE = 200  # Daytona's maximum page size
SANDBOX_CACHE_SIZE = 1024
LANGUAGE_LABEL = "code-toolbox-language"
T = TypeVar("T")


# What a 400/409 means depends on its message and on the call (Daytona's server, read from its source:
# ../shared/reference/daytona-server-semantics.md). Checked in this order; docs/architecture.md has
# the table.
_CAPACITY = re.compile(
    r"limit exceeded|quota|no available runners?|insufficient (resources|capacity)|capacity", re.I
)
_START_FAILED = re.compile(r"failed to start|failed to (create|recover)", re.I)
_STATE_REFUSED = re.compile(
    r"not in a stoppable state|is not stopped|not in (a )?valid state|errored state|"
    r"state change in progress|is not recoverable|another operation is in progress|cannot (start|stop|"
    r"archive|recover)",
    re.I,
)
FILE_ACCESS_DENIED = "FILE_ACCESS_DENIED"  # the toolbox's 403 for a path it refuses: not credentials
LIFECYCLE_OPERATIONS = frozenset({"start", "stop", "archive", "recover", "delete"})
_THROTTLER_SCOPES = {
    "authenticated": SCOPE_ALL,
    "sandbox-create": SCOPE_CREATE,
    "sandbox-lifecycle": SCOPE_LIFECYCLE,
}


def rate_limit_pauses(headers: Mapping[str, str] | None) -> dict[str, float]:
    """Scope -> seconds from ``Retry-After`` (every call) and Daytona's ``Retry-After-<throttler>``.

    Unknown throttler names pause every call (the safe reading); the largest value per scope wins.
    """
    pauses: dict[str, float] = {}
    for key, value in (headers or {}).items():
        lowered = key.lower()
        if lowered == "retry-after":
            scope = SCOPE_ALL
        elif lowered.startswith("retry-after-"):
            scope = _THROTTLER_SCOPES.get(lowered.removeprefix("retry-after-"), SCOPE_ALL)
        else:
            continue
        try:
            seconds = max(0.0, float(value))
        except (TypeError, ValueError):
            continue
        pauses[scope] = max(seconds, pauses.get(scope, 0.0))
    return pauses


def classify(
    status: int | None,
    detail: str,
    operation: str,
    headers: Mapping[str, str] | None = None,
    message: str | None = None,
    code: str | None = None,
) -> ProviderError:
    """The project error for an HTTP answer ``status`` with Daytona's error ``detail`` to ``operation``.

    ``message`` is the text of the error (defaults to ``detail``); ``code`` is the ``code`` of
    Daytona's error body, if any. Pure: the unit tables of tests/unit/test_daytona_translate.py cover
    every row.
    """
    text = message if message is not None else detail
    if not status:  # no HTTP answer: connection refused, reset, time-out, unparseable body
        return TransientError(text)
    if status == 429:
        pauses = rate_limit_pauses(headers)
        if not pauses:
            return RateLimitedError(text, None, SCOPE_ALL)
        scope = max(pauses, key=lambda s: (pauses[s], s == SCOPE_ALL))
        return RateLimitedError(text, max(pauses.values()), scope, pauses)
    if status == 404:
        return NotFoundError(text)
    retry_after = rate_limit_pauses(headers).get(SCOPE_ALL)
    if status == 401 or (status == 403 and code != FILE_ACCESS_DENIED):
        return AuthError(text, retry_after)
    if status in (403, 408) or status >= 500:
        return TransientError(text, retry_after)
    if _CAPACITY.search(detail):
        return CapacityError(text, retry_after)
    if status == 409:
        return StateConflictError(text) if operation in LIFECYCLE_OPERATIONS else ConflictError(text)
    if status == 400 and operation in ("create", "start", "recover") and _START_FAILED.search(detail):
        return StartFailedError(text, retry_after)
    if status == 400 and operation in LIFECYCLE_OPERATIONS and _STATE_REFUSED.search(detail):
        return StateConflictError(text)
    return PermanentError(text)


class UnreadableAnswerError(ValueError):
    """An answer of the API that is not what the call expects (not JSON, a field of another type):
    a vendor failure like a 5xx (transient), raised by the readers of this module."""


# Failures of the vendor's API or of the way to it; what ``translate`` maps. pydantic's
# ValidationError is how the SDK's generated models refuse an answer they cannot read (a body of
# another shape than the model); the request models this module builds are made before the call,
# outside ``_call``, so that their own validation errors propagate as the bugs they are.
_VENDOR_FAILURES: tuple[type[BaseException], ...] = (
    ApiException,
    ToolboxApiException,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    OSError,  # sockets, refused and reset connections, time-outs, TLS
    UnreadableAnswerError,
    json.JSONDecodeError,
    msgspec.DecodeError,
    ValidationError,
)


def is_vendor_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the API or of the way to it, which :func:`translate` maps,
    rather than a programming error (ours or the SDK's), which must propagate unchanged.

    The high-level client wraps whatever its call raised in a ``DaytonaError`` (``raise ... from``):
    one with an HTTP status, or that the SDK raised on its own (a time-out of its wait), is a vendor
    failure; one wrapping another exception is what that exception is (a NameError inside the SDK
    stays a bug; so does the generated client's ``ApiTypeError`` on an argument it refuses).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _VENDOR_FAILURES) or _is_lazy_transport_error(current):
            return True
        if not _is_daytona_error(current):
            return False
        if getattr(current, "status_code", None) or current.__cause__ is None:
            return True
        current = current.__cause__
    return False


# Transport errors of the clients the high-level SDK brings (httpx: file transfers; obstore: the
# upload of a build context to object storage; aiohttp: its async side), by their modules' base
# classes: without the module imported there can be none, and importing them here would slow
# ``leasectl exec`` (tests/unit/test_cli_imports.py).
_LAZY_TRANSPORT_ERRORS = (
    ("httpx", "HTTPError"),
    ("obstore.exceptions", "BaseError"),
    ("aiohttp", "ClientError"),
)


def _is_lazy_transport_error(exc: BaseException) -> bool:
    for module_name, class_name in _LAZY_TRANSPORT_ERRORS:
        module = sys.modules.get(module_name)
        base = getattr(module, class_name, None) if module is not None else None
        if isinstance(base, type) and isinstance(exc, base):
            return True
    return False


def _error_code(exc: BaseException) -> str | None:
    """The ``code`` of Daytona's error body (e.g. ``FILE_ACCESS_DENIED``), when the answer had one."""
    if isinstance(exc, ApiException | ToolboxApiException):
        body = exc.body
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        try:
            code = json.loads(body or "{}").get("code")
        except (ValueError, AttributeError):
            return None
        return code if isinstance(code, str) else None
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) else None


def translate(exc: BaseException, what: str, operation: str = "") -> ProviderError:
    """Map an SDK, HTTP or network exception to the project's error tree (see ``classify``).

    Only for what :func:`is_vendor_failure` accepts: callers let anything else propagate.
    """
    status: int | None = None
    headers: Mapping[str, str] | None = None
    if isinstance(exc, ApiException | ToolboxApiException):
        status, headers = exc.status, exc.headers
    elif _is_daytona_error(exc):
        status = getattr(exc, "status_code", None)
        headers = getattr(exc, "headers", None)
    detail = _short(exc)
    if not status and never_sent(exc):
        return NotSentError(f"{what}: {detail}")
    error = classify(status, detail, operation, headers, f"{what}: {detail}", _error_code(exc))
    error.status = status or None
    return error


def _aimed(configuration: ToolboxConfiguration, host: str) -> ToolboxConfiguration:
    """A copy of the toolbox client's configuration whose requests go to ``host``."""
    aimed = copy.deepcopy(configuration)
    aimed.host = host
    return aimed


def _is_daytona_error(exc: BaseException) -> bool:
    """An error of the high-level client; without that client imported there can be none."""
    errors = sys.modules.get("daytona.common.errors")
    return errors is not None and isinstance(exc, errors.DaytonaError)


def not_sent(exc: ProviderError, what: str) -> TransientError:
    """The failure of a step before ``what`` (the sandbox lookup) as "``what`` was never sent".

    A refusal of the credentials stays an :class:`AuthError` (it was not sent either: the server
    refused the key), so that a one-shot caller still recognises it."""
    kind = AuthError if isinstance(exc, AuthError) else NotSentError
    error = kind(f"{what} not sent: {exc}", getattr(exc, "retry_after", None))
    error.status = exc.status
    return error


def never_sent(exc: BaseException) -> bool:
    """Whether the failure happened before a connection existed (refused, unresolvable host), so the
    request provably never reached the server. A time-out or a reset is not: it may have."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if "Timeout" in type(current).__name__ or isinstance(current, TimeoutError):
            return False
        if type(current).__name__ == "NewConnectionError" or isinstance(
            current, ConnectionRefusedError | socket.gaierror
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def _short(exc: BaseException) -> str:
    if isinstance(exc, ApiException | ToolboxApiException):
        body = exc.body
        if isinstance(body, bytes):
            body = body.decode("utf-8", "replace")
        try:
            detail = json.loads(body or "{}").get("message") or exc.reason
        except (ValueError, AttributeError):
            detail = body or exc.reason
        return f"HTTP {exc.status}: {detail}"
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else type(exc).__name__


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _state(value: Any) -> str:
    if value is None:
        return "unknown"
    raw = getattr(value, "value", value)
    return str(raw)


def to_observed(item: Any) -> ObservedSandbox:
    """Convert a generated ``Sandbox`` or ``SandboxListItem`` model."""
    return ObservedSandbox(
        id=item.id,
        name=item.name,
        state=_state(item.state),
        labels=dict(item.labels or {}),
        created_at=_parse_time(getattr(item, "created_at", None)),
        error_reason=getattr(item, "error_reason", None),
        recoverable=bool(getattr(item, "recoverable", False)),
        snapshot=getattr(item, "snapshot", None),
        target=getattr(item, "target", None),
        cpu=getattr(item, "cpu", None),
        memory=getattr(item, "memory", None),
        disk=getattr(item, "disk", None),
        gpu=getattr(item, "gpu", None),
    )


class ListItem(msgspec.Struct, rename="camel"):
    """The fields of Daytona's ``SandboxListItem`` that an ``ObservedSandbox`` holds, typed as the
    SDK's model types them (strict, as it is); the other twenty or so are skipped while decoding.
    Looser than the model where it does not matter: any ``state`` text (kept as sent, where the SDK's
    enum refuses a state it does not know), and fields the model requires may be missing."""

    id: str
    name: str
    state: str | None = None
    labels: dict[str, str] | None = None
    created_at: str | None = None
    error_reason: str | None = None
    recoverable: bool | None = None
    snapshot: str | None = None
    target: str | None = None
    cpu: int | None = None
    memory: int | None = None
    disk: int | None = None
    gpu: int | None = None


class ListPage(msgspec.Struct, rename="camel"):
    items: list[ListItem] | None = None
    next_cursor: str | None = None


_LIST_PAGE = msgspec.json.Decoder(ListPage)


class ToolboxAddress(msgspec.Struct, rename="camel"):
    """What ``exec`` needs of ``GET /api/sandbox/{id}``: where the sandbox's toolbox answers."""

    id: str
    toolbox_proxy_url: str | None = None


_TOOLBOX_ADDRESS = msgspec.json.Decoder(ToolboxAddress)


def _body_of(response: Any) -> bytes:
    """The body of a raw urllib3 answer of the SDK's transport; any non-2xx status raises the SDK's
    ``ApiException``, as the generated methods do (so :func:`translate` reads it the same way)."""
    try:
        status, body = response.status, response.data
    finally:
        response.release_conn()
    if not 200 <= status <= 299:
        answer = RESTResponse(response)
        answer.data = body  # what its untyped read() would set
        text = body.decode("utf-8", "replace") if body else None
        raise ApiException.from_response(http_resp=answer, body=text, data=None)
    return bytes(body or b"")


@functools.lru_cache(maxsize=1 << 18)
def _created_at(text: str) -> datetime | None:
    """``createdAt`` never changes for a sandbox: each text is parsed once per process (bounded)."""
    return _parse_time(text)


def observed_from_item(item: ListItem) -> ObservedSandbox:
    """One list item as an ``ObservedSandbox``: what ``to_observed`` makes of the SDK's generated
    model, without building it."""
    return observed_sandbox(
        {
            "id": item.id,
            "name": item.name,
            "state": item.state or "unknown",
            "labels": item.labels or {},
            "created_at": _created_at(item.created_at) if item.created_at else None,
            "error_reason": item.error_reason,
            "recoverable": item.recoverable is True,
            "snapshot": item.snapshot,
            "target": item.target,
            "cpu": item.cpu,
            "memory": item.memory,
            "disk": item.disk,
            "gpu": item.gpu,
        }
    )


def parse_list_page(body: bytes) -> tuple[list[ObservedSandbox], str | None]:
    """A ``GET /api/sandbox`` answer as its items and the next cursor (None on the last page).

    The JSON is decoded straight into :class:`ListItem` (no dict per item, no pydantic model per
    item). An answer that is not such a page (an item without a text id or name, a field of another
    type than the SDK's model accepts) raises UnreadableAnswerError: a transient error."""
    try:
        page = _LIST_PAGE.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise UnreadableAnswerError(f"unreadable list answer: {exc}") from exc
    return [observed_from_item(item) for item in page.items or ()], page.next_cursor or None


def _volume(item: Any) -> ObservedVolume:
    return ObservedVolume(
        id=item.id, name=item.name, state=_state(item.state), error_reason=item.error_reason or None
    )


def _network_fields(network: NetworkSettings | None, *, update: bool = False) -> dict[str, Any]:
    """Daytona's network fields (comma-separated lists) for a create or a network-settings update.

    On create, nothing is sent for no policy. An update always says ``network_block_all``; a list
    the spec emptied while the other stays is sent as "" (cleared), and with no list at all
    ``network_block_all: false`` alone restores unrestricted access (Daytona clears stored lists)."""
    if network is None:
        return {"network_block_all": False} if update else {}
    allow, domains = ",".join(network.allow_list), ",".join(network.domain_allow_list)
    fields: dict[str, Any] = {"network_block_all": network.block_all}
    if allow or domains:
        fields |= {"network_allow_list": allow, "domain_allow_list": domains}
    return fields if update else {k: v for k, v in fields.items() if v != ""}


class Toolbox:
    """The toolbox calls of ``leasectl exec`` and the queue: the six of the SDK's generated
    ``ProcessApi`` (one-request exec and the session calls) and the stdin file's upload and
    deletion, sent as the SDK sends them: the same request (path, method, headers, body model or
    multipart form), the same answer types read by the same ``response_deserialize``, the same
    ``ApiException`` on an error status. Importing ``ProcessApi`` (about 40 methods, each wrapped by
    pydantic's ``validate_call``, and the models of all of them) took ``leasectl exec`` longer than
    the rest of the provider, and the high-level client the SDK uploads with (OpenTelemetry,
    httpx, every model) made ``exec --stdin`` four times slower than ``exec``; the argument checks
    skipped are on values this module makes."""

    def __init__(self, client: ToolboxApiClient) -> None:
        self.api_client = client

    def _call(
        self,
        method: str,
        path: str,
        types: Mapping[str, str | None],
        timeout: float | None,
        *,
        path_params: dict[str, str] | None = None,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        form: list[tuple[str, str]] | None = None,
        files: dict[str, tuple[str, bytes]] | None = None,
    ) -> Any:
        headers = {"Accept": "application/json"}
        if files:
            headers["Content-Type"] = "multipart/form-data"  # urllib3 writes it with its boundary
        elif body is not None:
            headers["Content-Type"] = "application/json"
        request = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            path_params=path_params or {},
            query_params=query or [],
            header_params=headers,
            body=body,
            post_params=form or [],
            files=files or {},
            auth_settings=[],
            collection_formats={},
            _host=None,
            _request_auth=None,
        )
        answer = self.api_client.call_api(*request, _request_timeout=timeout)
        answer.read()  # type: ignore[no-untyped-call]
        return self.api_client.response_deserialize(response_data=answer, response_types_map=dict(types)).data

    def execute_command(self, request: ExecuteRequest, _request_timeout: float | None = None) -> Any:
        types = {"200": "ExecuteResponse", "400": "ErrorResponse", "408": "ErrorResponse"}
        return self._call("POST", "/process/execute", types, _request_timeout, body=request)

    def create_session(self, request: CreateSessionRequest, _request_timeout: float | None = None) -> None:
        types = {"201": None, "400": "ErrorResponse", "409": "ErrorResponse", "500": "ErrorResponse"}
        self._call("POST", "/process/session", types, _request_timeout, body=request)

    def session_execute_command(
        self, session_id: str, request: SessionExecuteRequest, _request_timeout: float | None = None
    ) -> Any:
        types: dict[str, str | None] = {"200": "SessionExecuteResponse", "202": "SessionExecuteResponse"}
        types |= {status: "ErrorResponse" for status in ("400", "404", "409", "410", "500")}
        path = "/process/session/{sessionId}/exec"
        return self._call(
            "POST", path, types, _request_timeout, path_params={"sessionId": session_id}, body=request
        )

    def get_session_command(
        self, session_id: str, command_id: str, _request_timeout: float | None = None
    ) -> Any:
        types = {"200": "Command", "404": "ErrorResponse", "500": "ErrorResponse"}
        path = "/process/session/{sessionId}/command/{commandId}"
        params = {"sessionId": session_id, "commandId": command_id}
        return self._call("GET", path, types, _request_timeout, path_params=params)

    def get_session_command_logs(
        self, session_id: str, command_id: str, _request_timeout: float | None = None
    ) -> Any:
        types: dict[str, str | None] = {"200": "SessionCommandLogsResponse"}
        types |= {status: "ErrorResponse" for status in ("400", "403", "404", "500")}
        path = "/process/session/{sessionId}/command/{commandId}/logs"
        params = {"sessionId": session_id, "commandId": command_id}
        return self._call("GET", path, types, _request_timeout, path_params=params)

    def delete_session(self, session_id: str, _request_timeout: float | None = None) -> None:
        types = {"204": None, "400": "ErrorResponse", "404": "ErrorResponse", "500": "ErrorResponse"}
        path = "/process/session/{sessionId}"
        self._call("DELETE", path, types, _request_timeout, path_params={"sessionId": session_id})

    def upload_file(self, path: str, data: bytes, _request_timeout: float | None = None) -> None:
        """``fs.upload_file(bytes, path)``: ``POST /files/bulk-upload``, the form field
        ``files[0].path`` then the file part ``files[0].file`` named after the destination; any 2xx."""
        types = {"400": "ErrorResponse", "403": "ErrorResponse", "500": "ErrorResponse"}
        self._call(
            "POST",
            "/files/bulk-upload",
            types,
            _request_timeout,
            form=[("files[0].path", path)],
            files={"files[0].file": (path, data)},
        )

    def delete_file(self, path: str, _request_timeout: float | None = None) -> None:
        """``fs.delete_file(path)``: ``DELETE /files?path=<p>&recursive=false`` (204)."""
        types = {"204": None, "400": "ErrorResponse", "403": "ErrorResponse", "404": "ErrorResponse"}
        query = [("path", path), ("recursive", "false")]
        self._call("DELETE", "/files", types, _request_timeout, query=query)


class DaytonaProvider:
    """SandboxProvider backed by the Daytona API (or the local Daytona-compatible API)."""

    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        target: str | None = None,
        request_timeout: float = 60.0,
        on_request: Callable[[str, str], None] | None = None,
    ) -> None:
        self._timeout = request_timeout
        self._target = target
        self._on_request = on_request
        self._sandboxes: dict[str, Any] = {}
        self._cache_lock = threading.Lock()
        configuration = Configuration(host=api_url.rstrip("/"))
        configuration.retries = False
        self._api_client = ApiClient(configuration)
        self._api_client.default_headers["Authorization"] = f"Bearer {api_key}"
        self._api_client.default_headers["X-Daytona-Source"] = "leasectl"
        self._sandbox_api: SandboxApi | None = None
        self._volumes_api: VolumesApi | None = None
        self._api_url = api_url.rstrip("/")
        self._api_key = api_key
        self._high_level: Any = None
        self._high_level_lock = threading.Lock()
        # Toolbox requests (exec): one connection pool for every sandbox; a stale pooled connection
        # the server closed (RemoteDisconnected: nothing was processed) is retried, as the SDK does.
        toolbox_configuration = ToolboxConfiguration(host="")
        toolbox_configuration.retries = RemoteDisconnectedRetry(total=3, raise_on_status=False)
        toolbox_configuration.connection_pool_maxsize = 32
        self._toolbox_client = ToolboxApiClient(toolbox_configuration)
        self._toolbox_client.default_headers.update(self._api_client.default_headers)
        self._processes: dict[str, Toolbox] = {}

    @property
    def _sdk(self) -> Any:
        """The high-level client (files, work dir, sessions), made on first use (slow to import)."""
        with self._high_level_lock:
            if self._high_level is None:
                from daytona import Daytona, DaytonaConfig

                with warnings.catch_warnings():
                    # Polling mode is deprecated upstream but is what we want: we never wait on events.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._high_level = Daytona(
                        DaytonaConfig(
                            api_key=self._api_key,
                            api_url=self._api_url,
                            target=self._target,
                            use_deprecated_polling=True,
                            connection_pool_maxsize=32,
                        )
                    )
            return self._high_level

    @property
    def _api(self) -> SandboxApi:
        """The sandbox API, made on first use: its module (138 methods, each wrapped by pydantic's
        ``validate_call``) takes longer to import than ``exec NAME -- true`` takes to run, and exec
        needs one GET of it (:meth:`_toolbox_address`, without the module)."""
        if self._sandbox_api is None:
            from daytona_api_client.api.sandbox_api import SandboxApi

            self._sandbox_api = SandboxApi(self._api_client)
        return self._sandbox_api

    @property
    def _volumes(self) -> VolumesApi:
        """The volumes API, made on first use: ``exec`` and the execution queue never need it."""
        if self._volumes_api is None:
            from daytona_api_client.api.volumes_api import VolumesApi

            self._volumes_api = VolumesApi(self._api_client)
        return self._volumes_api

    # -- plumbing --------------------------------------------------------------------------------

    def _call(self, operation: str, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, with a vendor failure translated (``raise ... from``); anything else (a bug,
        ours or the SDK's) propagates as it is, never disguised as a transient error."""
        try:
            result = fn()
        except ProviderError:
            raise
        except Exception as exc:
            if not is_vendor_failure(exc):
                self._record(operation, type(exc).__name__)
                raise
            error = translate(exc, what, operation)
            self._record(operation, type(error).__name__)
            raise error from exc
        self._record(operation, "ok")
        return result

    def _record(self, operation: str, outcome: str) -> None:
        if self._on_request is not None:
            self._on_request(operation, outcome)

    # -- lifecycle -------------------------------------------------------------------------------

    def list_sandboxes(self, labels: Mapping[str, str]) -> list[ObservedSandbox]:
        encoded = json.dumps(dict(labels), sort_keys=True)
        found: list[ObservedSandbox] = []
        cursor: str | None = None
        while True:
            items, cursor = self._call("list", "list sandboxes", partial(self._list_page, encoded, cursor))
            found.extend(items)
            if not cursor:
                return found

    def _list_page(self, labels: str, cursor: str | None) -> tuple[list[ObservedSandbox], str | None]:
        """One page through the SDK's request (its transport, auth and error type), read as JSON:
        a page of 200 items costs one ``json.loads``, not 200 generated pydantic models."""
        from daytona_api_client.models.sandbox_list_sort_direction import SandboxListSortDirection
        from daytona_api_client.models.sandbox_list_sort_field import SandboxListSortField

        response = self._api.list_sandboxes_without_preload_content(
            cursor=cursor,
            limit=PAGE_SIZE,
            labels=labels,
            sort=SandboxListSortField.CREATEDAT,
            order=SandboxListSortDirection.ASC,
            _request_timeout=self._timeout,
        )
        body = _body_of(response)
        return parse_list_page(body)

    def get(self, id_or_name: str) -> ObservedSandbox | None:
        try:
            item = self._call(
                "get",
                f"get sandbox {id_or_name}",
                lambda: self._api.get_sandbox(id_or_name, _request_timeout=self._timeout),
            )
        except NotFoundError:
            return None
        return to_observed(item)

    def create(self, request: CreateRequest) -> ObservedSandbox:
        # The request models are imported by the calls that send them (exec sends none of them).
        from daytona_api_client.models.create_sandbox import CreateSandbox
        from daytona_api_client.models.gpu_type import GpuType
        from daytona_api_client.models.sandbox_volume import SandboxVolume

        labels = dict(request.labels)
        labels.setdefault(LANGUAGE_LABEL, request.language or "python")
        body = CreateSandbox(
            name=request.name,
            snapshot=request.snapshot,
            env=dict(request.env),
            labels=labels,
            target=request.target or self._target,
            cpu=request.cpu,
            memory=request.memory,
            disk=request.disk,
            gpu=request.gpu,
            auto_stop_interval=request.auto_stop_interval,
            auto_archive_interval=request.auto_archive_interval,
            auto_delete_interval=request.auto_delete_interval,
            build_info=self._build_info(request),
            volumes=[
                SandboxVolume(volume_id=m.volume_id or m.volume, mount_path=m.mount_path, subpath=m.subpath)
                for m in request.volumes
            ],
            user=request.os_user,
            public=request.public,
            gpu_type=[GpuType(request.gpu_type)] if request.gpu_type else None,
            spot=request.spot,
            auto_pause_interval=request.auto_pause_interval,
            ttl_minutes=request.ttl_minutes,
            secrets=[{key: name} for key, name in sorted(request.secrets.items())] or None,
            **_network_fields(request.network),
        )
        item = self._call(
            "create",
            f"create sandbox {request.name}",
            lambda: self._api.create_sandbox(body, _request_timeout=self._timeout),
        )
        return to_observed(item)

    def _build_info(self, request: CreateRequest) -> CreateBuildInfo | None:
        """Daytona's build info: ``FROM <image>`` for an image name, or the lease's Dockerfile with
        its context uploaded to Daytona's object storage first (the SDK's own upload, which skips an
        archive whose hash is already stored)."""
        from daytona_api_client.models.create_build_info import CreateBuildInfo

        if request.dockerfile is not None:
            hashes: list[str] | None = None
            if request.build_context:
                # The SDK's image context and upload step: imported here, its package is slow to load.
                from daytona import Image
                from daytona._sync.snapshot import SnapshotService
                from daytona_api_client.api.object_storage_api import ObjectStorageApi

                image = Image.base("scratch")
                for path in request.build_context:
                    name = path.rstrip("/").rsplit("/", 1)[-1]
                    if Path(path).is_dir():
                        image = image.add_local_dir(path, f"/{name}")
                    else:
                        image = image.add_local_file(path, f"/{name}")
                storage = ObjectStorageApi(self._api_client)
                hashes = self._call(
                    "create",
                    f"upload build context of {request.name}",
                    lambda: SnapshotService.process_image_context(storage, image),
                )
            return CreateBuildInfo(dockerfile_content=request.dockerfile, context_hashes=hashes)
        if request.image:
            return CreateBuildInfo(dockerfile_content=f"FROM {request.image}\n")
        return None

    def start(self, sandbox_id: str) -> None:
        self._call(
            "start",
            f"start sandbox {sandbox_id}",
            lambda: self._api.start_sandbox(sandbox_id, _request_timeout=self._timeout),
        )

    def stop(self, sandbox_id: str) -> None:
        self._call(
            "stop",
            f"stop sandbox {sandbox_id}",
            lambda: self._api.stop_sandbox(sandbox_id, force=False, _request_timeout=self._timeout),
        )

    def archive(self, sandbox_id: str) -> None:
        self._call(
            "archive",
            f"archive sandbox {sandbox_id}",
            lambda: self._api.archive_sandbox(sandbox_id, _request_timeout=self._timeout),
        )

    def recover(self, sandbox_id: str) -> None:
        self._call(
            "recover",
            f"recover sandbox {sandbox_id}",
            lambda: self._api.recover_sandbox(sandbox_id, _request_timeout=self._timeout),
        )

    def delete(self, sandbox_id: str) -> None:
        self._forget(sandbox_id)
        try:
            self._call(
                "delete",
                f"delete sandbox {sandbox_id}",
                lambda: self._api.delete_sandbox(sandbox_id, _request_timeout=self._timeout),
            )
        except NotFoundError:
            return

    def update(self, sandbox_id: str, update: SandboxUpdate) -> None:
        """One request per setter (``POST .../autostop|autoarchive|autodelete/{n}``), labels last
        (``PUT .../labels``), so the settings label is written only after every setter succeeded."""
        api, timeout = self._api, self._timeout
        setters: dict[str, Callable[..., Any]] = {
            "auto_stop_interval": api.set_autostop_interval,
            "auto_archive_interval": api.set_auto_archive_interval,
            "auto_delete_interval": api.set_auto_delete_interval,
            "auto_pause_interval": api.set_auto_pause_interval,
            "public": api.update_public_status,
            "network": api.update_network_settings,
            "ttl_minutes": api.set_ttl,
            "labels": api.replace_labels,
        }
        from daytona_api_client.models.sandbox_labels import SandboxLabels
        from daytona_api_client.models.update_sandbox_network_settings import UpdateSandboxNetworkSettings

        for name in update.setters:
            value = getattr(update, name)
            argument = value
            if name == "labels":
                argument = SandboxLabels(labels=dict(value))
            elif name == "network":
                argument = UpdateSandboxNetworkSettings(**_network_fields(value, update=True))
            call = functools.partial(setters[name], sandbox_id, argument, _request_timeout=timeout)
            self._call("update", f"set {name} of sandbox {sandbox_id}", call)

    # -- volumes ---------------------------------------------------------------------------------

    def list_volumes(self) -> list[ObservedVolume]:
        items = self._call(
            "list_volumes", "list volumes", lambda: self._volumes.list_volumes(_request_timeout=self._timeout)
        )
        return [_volume(item) for item in items]

    def get_volume(self, name: str) -> ObservedVolume | None:
        try:
            item = self._call(
                "get_volume",
                f"get volume {name}",
                lambda: self._volumes.get_volume_by_name(name, _request_timeout=self._timeout),
            )
        except NotFoundError:
            return None
        return _volume(item)

    def create_volume(self, name: str) -> ObservedVolume:
        from daytona_api_client.models.create_volume import CreateVolume

        body = CreateVolume(name=name)  # outside the call: its validation error is a bug, not an answer
        item = self._call(
            "create_volume",
            f"create volume {name}",
            lambda: self._volumes.create_volume(body, _request_timeout=self._timeout),
        )
        return _volume(item)

    def delete_volume(self, volume_id: str) -> None:
        try:
            self._call(
                "delete_volume",
                f"delete volume {volume_id}",
                lambda: self._volumes.delete_volume(volume_id, _request_timeout=self._timeout),
            )
        except NotFoundError:
            return

    # -- toolbox ---------------------------------------------------------------------------------

    def _sandbox(self, sandbox_id: str) -> Any:
        """The SDK's Sandbox object (it carries the toolbox URL), fetched once per id and cached:
        toolbox calls then cost one request each. Dropped on delete and after any toolbox error."""
        with self._cache_lock:
            cached = self._sandboxes.get(sandbox_id)
        if cached is not None:
            return cached
        sandbox = self._call(
            "get",
            f"get sandbox {sandbox_id}",
            lambda: self._sdk.get(sandbox_id, request_timeout=self._timeout),
        )
        with self._cache_lock:
            if len(self._sandboxes) >= SANDBOX_CACHE_SIZE:
                self._sandboxes.pop(next(iter(self._sandboxes)))
            self._sandboxes[sandbox_id] = sandbox
        return sandbox

    def _forget(self, sandbox_id: str) -> None:
        with self._cache_lock:
            self._sandboxes.pop(sandbox_id, None)
            self._processes.pop(sandbox_id, None)

    def _process(self, sandbox_id: str) -> Toolbox:
        """The toolbox process API of one sandbox: its proxy URL comes from one ``get_sandbox``,
        cached like the SDK's Sandbox objects (dropped on delete and after any toolbox error)."""
        with self._cache_lock:
            cached = self._processes.get(sandbox_id)
        if cached is not None:
            return cached
        dto = self._call("get", f"get sandbox {sandbox_id}", partial(self._toolbox_address, sandbox_id))
        base_url = str(dto.toolbox_proxy_url or "").rstrip("/")
        if not base_url:  # servers older than the field: ask for it (one more request, once)
            base_url = self._call(
                "toolbox_proxy_url",
                f"get toolbox URL of {sandbox_id}",
                lambda: self._api.get_toolbox_proxy_url(sandbox_id, _request_timeout=self._timeout),
            ).url.rstrip("/")
        client = ToolboxApiClient(self._toolbox_client.configuration)
        client.rest_client = self._toolbox_client.rest_client  # the shared connection pool
        client.default_headers = self._toolbox_client.default_headers
        client.configuration = _aimed(self._toolbox_client.configuration, f"{base_url}/{dto.id}")
        process = Toolbox(client)
        with self._cache_lock:
            if len(self._processes) >= SANDBOX_CACHE_SIZE:
                self._processes.pop(next(iter(self._processes)))
            self._processes[sandbox_id] = process
        return process

    def _toolbox_address(self, sandbox_id: str) -> ToolboxAddress:
        """``GET /sandbox/{id}`` through the SDK's client (transport, auth, errors), read into the two
        fields exec needs, without importing the generated sandbox API (see :attr:`_api`)."""
        request = self._api_client.param_serialize(
            method="GET",
            resource_path="/sandbox/{sandboxIdOrName}",
            path_params={"sandboxIdOrName": sandbox_id},
            header_params={"Accept": "application/json"},
            auth_settings=["bearer", "oauth2"],
        )
        answer = self._api_client.call_api(*request, _request_timeout=self._timeout)
        try:
            return _TOOLBOX_ADDRESS.decode(_body_of(answer.response))
        except msgspec.DecodeError as exc:
            raise UnreadableAnswerError(f"unreadable sandbox answer: {exc}") from exc

    def exec(
        self,
        sandbox_id: str,
        command: str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: int | None = None,
    ) -> ExecResult:
        try:
            process = self._process(sandbox_id)
        except ProviderError as exc:
            raise not_sent(exc, "exec") from exc
        request = ExecuteRequest(command=command, cwd=cwd, timeout=timeout, envs=dict(env) if env else None)
        try:
            response = process.execute_command(
                request, _request_timeout=float(timeout + 5) if timeout else None
            )
        except Exception as exc:
            if not is_vendor_failure(exc):  # a bug, not an answer: as it is
                self._forget(sandbox_id)
                self._record("execute", type(exc).__name__)
                raise
            status = getattr(exc, "status", None)
            # The toolbox's own time-out (408 REQUEST_TIMEOUT), or ours on the answer (no status, the
            # request time-out covers the command's): timed out. A 504 is a gateway that gave up: the
            # command may still run, so it is an error like any other 5xx (``unknown`` upstairs).
            if status == 408 or (status is None and "Timeout" in type(exc).__name__):
                self._record("execute", "timeout")
                return ExecResult(exit_code=None, output="", timed_out=True)
            self._forget(sandbox_id)
            error = translate(exc, f"exec in sandbox {sandbox_id}", "execute")
            self._record("execute", type(error).__name__)
            raise error from exc
        self._record("execute", "ok")
        code = response.exit_code
        if code is None:  # older toolboxes answer {"code": N}
            code = (response.additional_properties or {}).get("code")
        return ExecResult(exit_code=int(code) if code is not None else -1, output=response.result or "")

    def _toolbox(self, sandbox_id: str, operation: str, what: str, fn: Callable[[Any], T]) -> T:
        """A toolbox call on the cached Sandbox object; any failure drops it from the cache."""
        sandbox = self._sandbox(sandbox_id)
        try:
            return self._call(operation, what, lambda: fn(sandbox))
        except ProviderError:
            self._forget(sandbox_id)
            raise

    def work_dir(self, sandbox_id: str) -> str:
        return str(self._toolbox(sandbox_id, "work_dir", "get work dir", lambda sb: sb.get_work_dir()))

    def make_dir(self, sandbox_id: str, path: str) -> None:
        self._toolbox(
            sandbox_id,
            "folder",
            f"create folder {path}",
            lambda sb: sb.fs.create_folder(path, "755", request_timeout=self._timeout),
        )

    def upload(self, sandbox_id: str, path: str, data: bytes) -> None:
        timeout = float(max(60, int(self._timeout) * 5))
        self._process_call(
            sandbox_id, "upload", f"upload {path}", lambda api: api.upload_file(path, data, timeout)
        )

    def delete_file(self, sandbox_id: str, path: str) -> None:
        try:
            self._process_call(
                sandbox_id, "delete_file", f"delete {path}", lambda api: api.delete_file(path, self._timeout)
            )
        except NotFoundError:  # already gone: not an error
            return

    # -- sessions --------------------------------------------------------------------------------

    def _process_call(self, sandbox_id: str, operation: str, what: str, fn: Callable[[Toolbox], T]) -> T:
        """A call of the sandbox's toolbox process API; any failure drops it from the cache."""
        process = self._process(sandbox_id)
        try:
            return self._call(operation, what, lambda: fn(process))
        except ProviderError:
            self._forget(sandbox_id)
            raise

    def create_session(self, sandbox_id: str, session_id: str) -> None:
        request = CreateSessionRequest(session_id=session_id)
        self._process_call(
            sandbox_id,
            "session_create",
            f"create session {session_id}",
            lambda api: api.create_session(request, _request_timeout=self._timeout),
        )

    def session_execute(self, sandbox_id: str, session_id: str, command: str) -> str:
        request = SessionExecuteRequest(command=command, run_async=True)
        try:
            self._process(sandbox_id)
        except ProviderError as exc:
            raise not_sent(exc, "session execute") from exc
        response = self._process_call(
            sandbox_id,
            "session_execute",
            f"execute in session {session_id}",
            lambda api: api.session_execute_command(
                session_id, request, _request_timeout=float(int(self._timeout) + 5)
            ),
        )
        return str(response.cmd_id)

    def session_command(self, sandbox_id: str, session_id: str, command_id: str) -> SessionCommand:
        command = self._process_call(
            sandbox_id,
            "session_command",
            f"get command {command_id} of session {session_id}",
            lambda api: api.get_session_command(session_id, command_id, _request_timeout=self._timeout),
        )
        code = command.exit_code
        return SessionCommand(command_id, int(code) if code is not None else None)

    def session_logs(self, sandbox_id: str, session_id: str, command_id: str) -> str:
        logs = self._process_call(
            sandbox_id,
            "session_logs",
            f"get logs of command {command_id}",
            lambda api: api.get_session_command_logs(session_id, command_id, _request_timeout=self._timeout),
        )
        return str(logs.output or "")

    def delete_session(self, sandbox_id: str, session_id: str) -> None:
        try:
            self._process_call(
                sandbox_id,
                "session_delete",
                f"delete session {session_id}",
                lambda api: api.delete_session(session_id, _request_timeout=self._timeout),
            )
        except NotFoundError:
            return
