"""The aiohttp application: REST under ``/api``, toolbox under ``/toolbox``, admin under ``/_emulator``.

The middleware does, in order: answer ``/api/socket.io/`` with 404 (no event stream; the SDK falls
back to polling), check the bearer key (401 with Daytona's envelope), complete due transitions,
count the request under its operation name, apply injected latency and failures (a 429 carries the
named throttler headers of Daytona, ``Retry-After-<name>`` and ``X-RateLimit-*-<name>``, and no
plain ``Retry-After``), run the handler and turn :class:`ApiError` and aiohttp's HTTP errors into
Daytona's envelope. Route names are the operation names of ``faults.OPERATIONS``; admin routes
start with ``admin_`` and are neither counted nor faulted.

Every call on one sandbox (REST other than the list, and the toolbox) is activity: it resets the
sandbox's auto-stop timer and its ``lastActivityAt``. Create, start and recover answer once the
sandbox is started (or after ``start_wait_seconds``), and 400 "Sandbox failed to start: ..." when
it reached ``error``/``build_failed`` first. The list sorts by ``lastActivityAt`` descending unless
asked otherwise, shows derived states, and with ``list_lag`` shows every sandbox as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import shutil
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import toolbox
from .errors import SOURCE_API, SOURCE_PROXY, ApiError, error_response, json_response, now_iso
from .faults import THROTTLE_LIMITS, Faults, FaultSettings, throttler_for, validate
from .lifecycle import Lifecycle, check_list, parse_secrets, secret_placeholder
from .sessions import Sessions
from .state import (
    DEFAULT_SNAPSHOT,
    ERRORED,
    SandboxRecord,
    Store,
    VolumeRecord,
    decode_cursor,
    encode_cursor,
)

log = logging.getLogger(__name__)

STORE = web.AppKey("store", Store)
FAULTS = web.AppKey("faults", Faults)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
API_KEY = web.AppKey("api_key", str)
SESSIONS = web.AppKey("sessions", Sessions)

MAX_LIMIT = 200
DEFAULT_LIMIT = 100
SORT_FIELDS: dict[str, Callable[[SandboxRecord], Any]] = {
    "name": lambda r: r.name,
    "cpu": lambda r: r.cpu,
    "memoryGib": lambda r: r.memory,
    "diskGib": lambda r: r.disk,
    "lastActivityAt": lambda r: r.last_activity_ts,
    "createdAt": lambda r: r.created_ts,
}
DEFAULT_SORT = "lastActivityAt"
DEFAULT_ORDER = "desc"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def toolbox_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}/toolbox"


def dto(request: web.Request, record: SandboxRecord) -> web.Response:
    return json_response(record.to_dto(toolbox_url(request)))


def find(request: web.Request, key: str = "idOrName") -> SandboxRecord:
    """The sandbox a REST call names (404 if unknown); the call counts as activity on it."""
    ident = request.match_info[key]
    record = request.app[STORE].find(ident)
    if record is None:
        raise ApiError(404, f"Sandbox with ID or name {ident} not found", source=SOURCE_API)
    request.app[LIFECYCLE].touch(record)
    return record


async def json_body(request: web.Request) -> Any:
    if not request.can_read_body:
        return {}
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "request body must be JSON", source=SOURCE_API) from None


# -- middleware --------------------------------------------------------------------------------


def _authorized(request: web.Request) -> bool:
    header = request.headers.get("Authorization", "")
    expected = f"Bearer {request.app[API_KEY]}"
    return hmac.compare_digest(header.encode(), expected.encode())


@web.middleware
async def daytona_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    if path.startswith("/api/socket.io"):
        return error_response(ApiError(404, "socket.io is not served by local-daytona"), path)
    try:
        if not _authorized(request):
            request.app[FAULTS].count("unauthorized")  # so a test can count what a wrong key costs
            raise ApiError(401, "Unauthorized", source=SOURCE_API)
        request.app[LIFECYCLE].tick()
        route = request.match_info.route
        op = route.name or ""
        if op and not op.startswith("admin_"):
            return await _with_faults(request, handler, op)
        return await handler(request)
    except ApiError as exc:
        return error_response(exc, path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        source = SOURCE_PROXY if path.startswith("/toolbox") else SOURCE_API
        return error_response(ApiError(exc.status, exc.reason, source=source), path)


async def _with_faults(request: web.Request, handler: Handler, op: str) -> web.StreamResponse:
    faults = request.app[FAULTS]
    faults.count(op)
    delay = faults.latency(op)
    if delay > 0:
        await asyncio.sleep(delay)
    kind = faults.failure(op)
    if kind == "429":
        raise ApiError(429, "ThrottlerException: Too Many Requests", headers=throttle_headers(faults, op))
    if kind in ("500", "503"):
        raise ApiError(int(kind), f"injected fault on {op}", source=SOURCE_API)
    if kind == "timeout":
        # The operation happens; its answer is lost (like a create that timed out on the client).
        with contextlib.suppress(ApiError, web.HTTPException):
            await handler(request)
        await asyncio.sleep(faults.settings.hang_seconds)
        raise ApiError(504, f"injected time-out on {op}", source=SOURCE_API)
    return await handler(request)


def throttle_headers(faults: Faults, op: str) -> dict[str, str]:
    """The headers of a 429 from the Daytona throttler that guards ``op`` (no plain Retry-After)."""
    name = throttler_for(op)
    retry = str(faults.settings.retry_after)
    return {
        f"Retry-After-{name}": retry,
        f"X-RateLimit-Limit-{name}": str(THROTTLE_LIMITS[name]),
        f"X-RateLimit-Remaining-{name}": "0",
        f"X-RateLimit-Reset-{name}": retry,
    }


# -- REST --------------------------------------------------------------------------------------


async def _started_or_failed(request: web.Request, record: SandboxRecord) -> web.StreamResponse:
    """Wait as the server does for ``started``; an errored sandbox is a 400 (and stays)."""
    record = await request.app[LIFECYCLE].wait_started(record)
    if record.state in ERRORED:
        raise ApiError(400, f"Sandbox failed to start: {record.error_reason}", source=SOURCE_API)
    return dto(request, record)


async def create_sandbox(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object", source=SOURCE_API)
    return await _started_or_failed(request, request.app[LIFECYCLE].create(body))


async def get_sandbox(request: web.Request) -> web.StreamResponse:
    return dto(request, find(request))


def _flag(value: str | None) -> bool | None:
    if value is None:
        return None
    return value.lower() == "true"


def _int_query(request: web.Request, key: str) -> int | None:
    value = request.query.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, f"{key} must be an integer", source=SOURCE_API) from None


def _matcher(request: web.Request) -> Callable[[SandboxRecord], bool]:
    """The list filters. ``states`` matches the stored state (the server filters its state column),
    not the derived state the list item shows."""
    query = request.query
    labels: dict[str, Any] = {}
    if query.get("labels"):
        try:
            labels = json.loads(query["labels"])
        except ValueError:
            raise ApiError(400, "labels must be a JSON object", source=SOURCE_API) from None
        if not isinstance(labels, dict):
            raise ApiError(400, "labels must be a JSON object", source=SOURCE_API)
    states = set(query.getall("states", []))
    snapshots = set(query.getall("snapshots", []))
    regions = set(query.getall("regionIds", []))
    id_prefix = (query.get("id") or "").lower()
    name_prefix = (query.get("name") or "").lower()
    is_public = _flag(query.get("isPublic"))
    is_recoverable = _flag(query.get("isRecoverable"))
    errored_deleted = _flag(query.get("includeErroredDeleted")) or False
    bounds = [
        (_int_query(request, "minCpu"), _int_query(request, "maxCpu"), "cpu"),
        (_int_query(request, "minMemoryGiB"), _int_query(request, "maxMemoryGiB"), "memory"),
        (_int_query(request, "minDiskGiB"), _int_query(request, "maxDiskGiB"), "disk"),
        (_int_query(request, "minGpu"), _int_query(request, "maxGpu"), "gpu"),
    ]
    bounds = [b for b in bounds if b[0] is not None or b[1] is not None]
    label_items = list(labels.items())

    def match(r: SandboxRecord) -> bool:
        if r.state in ERRORED and r.desired_state == "destroyed" and not errored_deleted:
            return False
        if label_items and any(r.labels.get(k) != v for k, v in label_items):
            return False
        if states and r.state not in states:
            return False
        if snapshots and r.snapshot not in snapshots:
            return False
        if regions and r.target not in regions:
            return False
        if id_prefix and not r.id.lower().startswith(id_prefix):
            return False
        if name_prefix and not r.name.lower().startswith(name_prefix):
            return False
        if is_public is not None and r.public != is_public:
            return False
        if is_recoverable is not None and r.recoverable != is_recoverable:
            return False
        for low, high, attr in bounds:
            value = getattr(r, attr)
            if (low is not None and value < low) or (high is not None and value > high):
                return False
        return True

    return match


@dataclass
class Listing:
    """The matching rows of the last list query (cursor and limit aside), sorted ascending, as of one
    store generation: the pages of one walk then cost a bisect each, not a filter and a sort of the
    whole store, so listing N sandboxes stays linear in N. Never used for a lagging list."""

    generation: int = -1
    query: tuple[tuple[str, str], ...] = ()
    rows: list[SandboxRecord] = field(default_factory=list)
    keys: list[tuple[Any, str]] = field(default_factory=list)


LISTING = web.AppKey("listing", Listing)


def _listing(
    request: web.Request,
    match: Callable[[SandboxRecord], bool],
    key: Callable[[SandboxRecord], Any],
    lag: float,
) -> tuple[list[SandboxRecord], list[tuple[Any, str]]]:
    store = request.app[STORE]
    query = tuple(sorted((k, v) for k, v in request.query.items() if k not in ("cursor", "limit")))
    cached = request.app[LISTING]
    if lag <= 0 and cached.generation == store.generation and cached.query == query:
        return cached.rows, cached.keys
    # The list is eventually consistent: with a lag it shows each sandbox as it was then.
    visible = store.as_of(request.app[LIFECYCLE].clock() - lag) if lag > 0 else store.ordered()
    rows = sorted((r for r in visible if match(r)), key=lambda r: (key(r), r.id))
    keys = [(key(r), r.id) for r in rows]
    if lag <= 0:
        request.app[LISTING] = Listing(store.generation, query, rows, keys)
    return rows, keys


async def list_sandboxes(request: web.Request) -> web.StreamResponse:
    limit = _int_query(request, "limit")
    limit = DEFAULT_LIMIT if limit is None else limit
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(400, f"limit must be between 1 and {MAX_LIMIT}", source=SOURCE_API)
    lag = request.app[FAULTS].settings.list_lag
    match = _matcher(request)
    sort = request.query.get("sort") or DEFAULT_SORT
    if sort not in SORT_FIELDS:
        raise ApiError(400, f"sort must be one of {', '.join(SORT_FIELDS)}", source=SOURCE_API)
    order = (request.query.get("order") or DEFAULT_ORDER).lower()
    if order not in ("asc", "desc"):
        raise ApiError(400, "order must be asc or desc", source=SOURCE_API)
    descending = order == "desc"
    sort_key = SORT_FIELDS[sort]
    rows, keys = _listing(request, match, sort_key, lag)
    start = 0
    cursor = request.query.get("cursor")
    if cursor:
        after = decode_cursor(cursor)
        if after is None or len(after) != 2:
            raise ApiError(400, "invalid cursor", source=SOURCE_API)
        mark = tuple(after)
        try:  # the first row beyond the cursor, in the order asked for
            start = len(keys) - bisect_left(keys, mark) if descending else bisect_right(keys, mark)
        except TypeError:
            raise ApiError(400, "cursor does not belong to this sort", source=SOURCE_API) from None
    end = min(start + limit, len(rows))
    page = [rows[-1 - i] for i in range(start, end)] if descending else rows[start:end]
    next_cursor = None
    if len(rows) > end:
        last = page[-1]
        next_cursor = encode_cursor([sort_key(last), last.id])
    base = toolbox_url(request)
    return json_response({"items": [r.to_dto(base, list_item=True) for r in page], "nextCursor": next_cursor})


def _lifecycle_route(action: str) -> Handler:
    waits = action in ("start", "recover")

    async def handle(request: web.Request) -> web.StreamResponse:
        record = find(request)
        lifecycle = request.app[LIFECYCLE]
        method: Callable[[SandboxRecord], SandboxRecord] = getattr(lifecycle, action)
        record = method(record)
        if waits:
            return await _started_or_failed(request, record)
        return dto(request, record)

    return handle


async def set_labels(request: web.Request) -> web.StreamResponse:
    record = find(request)
    body = await json_body(request)
    labels = body.get("labels") if isinstance(body, dict) else None
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ApiError(400, "labels must be an object of strings", source=SOURCE_API)
    record.labels = dict(labels)
    request.app[STORE].save(record)
    return json_response({"labels": record.labels})


async def toolbox_proxy_url(request: web.Request) -> web.StreamResponse:
    find(request)
    return json_response({"url": toolbox_url(request)})


_STOP_XOR_PAUSE = "autoStopInterval and autoPauseInterval are mutually exclusive"


async def set_setting(request: web.Request) -> web.StreamResponse:
    record = find(request)
    setting = request.match_info["setting"]
    value = request.match_info["value"]
    if setting == "public":
        record.public = value.lower() == "true"
    else:
        try:
            number = int(value)
        except ValueError:
            raise ApiError(400, f"{setting} needs an integer", source=SOURCE_API) from None
        if number < 0 and setting != "autodelete":
            raise ApiError(400, f"{setting} must not be negative", source=SOURCE_API)
        if setting == "autostop":
            if number and record.auto_pause_interval:
                raise ApiError(
                    400, "autoStopInterval and autoPauseInterval are mutually exclusive", source=SOURCE_API
                )
            record.auto_stop_interval = number
        elif setting == "autoarchive":
            record.auto_archive_interval = number
        elif setting == "autodelete":
            record.auto_delete_interval = number
        elif setting == "autopause":
            if number and record.auto_stop_interval:
                raise ApiError(
                    400, "autoStopInterval and autoPauseInterval are mutually exclusive", source=SOURCE_API
                )
            if number and record.auto_delete_interval == 0:
                raise ApiError(400, "Ephemeral sandboxes cannot have auto-pause enabled", source=SOURCE_API)
            record.auto_pause_interval = number
        elif setting == "ttl":
            request.app[LIFECYCLE].set_ttl(record, number)
        else:
            raise ApiError(404, f"unknown setting {setting}", source=SOURCE_API)
    request.app[STORE].save(record)
    return dto(request, record)


async def set_network(request: web.Request) -> web.StreamResponse:
    """``POST /sandbox/{id}/network-settings``: a list given replaces the stored one ("" clears it);
    ``networkBlockAll: false`` with no list restores unrestricted access and clears both lists."""
    record = find(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object", source=SOURCE_API)
    block = body.get("networkBlockAll")
    lists = {k: body.get(k) for k in ("networkAllowList", "domainAllowList") if body.get(k) is not None}
    if block is None and not lists:
        raise ApiError(400, "give networkBlockAll, networkAllowList or domainAllowList", source=SOURCE_API)
    if block is not None and not isinstance(block, bool):
        raise ApiError(400, "networkBlockAll must be a boolean", source=SOURCE_API)
    for key, value in lists.items():
        if not isinstance(value, str):
            raise ApiError(400, f"{key} must be a string", source=SOURCE_API)
        checked = check_list(key, value)
        if checked:
            record.extra[key] = checked
        else:
            record.extra.pop(key, None)
    if block is False and not lists:
        record.extra.pop("networkAllowList", None)
        record.extra.pop("domainAllowList", None)
    record.network_block_all = bool(block) if block is not None else (record.network_block_all and not lists)
    request.app[STORE].save(record)
    return dto(request, record)


async def set_secrets(request: web.Request) -> web.StreamResponse:
    """``PUT /sandbox/{id}/secrets``: replaces the set of Daytona secrets (env placeholders)."""
    record = find(request)
    body = await json_body(request)
    secrets = parse_secrets(body.get("secrets") if isinstance(body, dict) else None)
    for key in record.secrets:
        record.env.pop(key, None)
    record.secrets = secrets
    record.env.update({k: secret_placeholder(v) for k, v in secrets.items()})
    request.app[STORE].save(record)
    return dto(request, record)


# -- volumes -----------------------------------------------------------------------------------


def _volume(request: web.Request, key: str) -> VolumeRecord:
    volume = request.app[STORE].find_volume(request.match_info[key])
    if volume is None:
        raise ApiError(404, f"Volume with ID or name {request.match_info[key]} not found", source=SOURCE_API)
    return volume


async def list_volumes(request: web.Request) -> web.StreamResponse:
    return json_response([v.to_dto() for v in request.app[STORE].volumes.values()])


async def create_volume(request: web.Request) -> web.StreamResponse:
    body = await json_body(request)
    name = body.get("name") if isinstance(body, dict) else None
    if not isinstance(name, str) or not name:
        raise ApiError(400, "name is required", source=SOURCE_API)
    store = request.app[STORE]
    if any(v.name == name for v in store.volumes.values()):
        raise ApiError(409, f"Volume with name {name} already exists", source=SOURCE_API)
    volume = VolumeRecord(id=str(uuid.uuid4()), name=name, created_at=now_iso())
    store.save_volume(volume)
    return json_response(volume.to_dto())


async def get_volume(request: web.Request) -> web.StreamResponse:
    return json_response(_volume(request, "volumeId").to_dto())


async def get_volume_by_name(request: web.Request) -> web.StreamResponse:
    return json_response(_volume(request, "name").to_dto())


async def delete_volume(request: web.Request) -> web.StreamResponse:
    """Refused while a sandbox mounts the volume; the directory goes with the volume."""
    volume = _volume(request, "volumeId")
    if request.app[LIFECYCLE].in_use(volume.id):
        raise ApiError(409, f"Volume {volume.name} is in use by a sandbox", source=SOURCE_API)
    store = request.app[STORE]
    store.remove_volume(volume)
    shutil.rmtree(store.volume_dir(volume.id), ignore_errors=True)
    return web.Response(status=200)


async def get_config(request: web.Request) -> web.StreamResponse:
    base = f"{request.scheme}://{request.host}"
    return json_response(
        {
            "version": "local-daytona",
            "oidc": {"issuer": base, "clientId": "local", "audience": "local"},
            "linkedAccountsEnabled": False,
            "announcements": {},
            "proxyTemplateUrl": f"{base}/proxy/{{{{PORT}}}}-{{{{sandboxId}}}}",
            "proxyToolboxUrl": toolbox_url(request),
            "defaultSnapshot": DEFAULT_SNAPSHOT,
            "dashboardUrl": base,
            "maxAutoArchiveInterval": 43200,
            "maintananceMode": False,
            "environment": "local",
        }
    )


# -- toolbox -----------------------------------------------------------------------------------


def started(request: web.Request) -> SandboxRecord:
    """The started sandbox a toolbox call is for; the call counts as activity on it."""
    ident = request.match_info["sandboxId"]
    record = request.app[STORE].find(ident)
    if record is None:
        raise ApiError(404, f"sandbox {ident} not found", source=SOURCE_PROXY)
    toolbox.require_started(record)
    request.app[LIFECYCLE].touch(record)
    return record


async def tb_execute(request: web.Request) -> web.StreamResponse:
    record = started(request)
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "body must be JSON", source="DAYTONA_DAEMON") from None
    return await toolbox.execute(request.app[STORE], record, body)


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise ApiError(400, "body must be JSON", source="DAYTONA_DAEMON") from None


async def tb_session_create(request: web.Request) -> web.StreamResponse:
    record = started(request)
    return request.app[SESSIONS].create(record, await _json(request))


async def tb_session_get(request: web.Request) -> web.StreamResponse:
    return request.app[SESSIONS].get(started(request), request.match_info["sessionId"])


async def tb_session_delete(request: web.Request) -> web.StreamResponse:
    return request.app[SESSIONS].delete(started(request), request.match_info["sessionId"])


async def tb_session_execute(request: web.Request) -> web.StreamResponse:
    record = started(request)
    body = await _json(request)
    return await request.app[SESSIONS].execute(record, request.match_info["sessionId"], body)


async def tb_session_command(request: web.Request) -> web.StreamResponse:
    info = request.match_info
    return request.app[SESSIONS].get_command(started(request), info["sessionId"], info["commandId"])


async def tb_session_logs(request: web.Request) -> web.StreamResponse:
    info = request.match_info
    return await request.app[SESSIONS].logs(started(request), info["sessionId"], info["commandId"], request)


async def tb_work_dir(request: web.Request) -> web.StreamResponse:
    record = started(request)
    return json_response({"dir": str(toolbox.home_of(request.app[STORE], record))})


async def tb_folder(request: web.Request) -> web.StreamResponse:
    return toolbox.create_folder(request.app[STORE], started(request), request.query)


async def tb_delete_file(request: web.Request) -> web.StreamResponse:
    return toolbox.delete_file(request.app[STORE], started(request), request.query)


async def tb_upload(request: web.Request) -> web.StreamResponse:
    return await toolbox.bulk_upload(request.app[STORE], started(request), request)


async def tb_download(request: web.Request) -> web.StreamResponse:
    return await toolbox.bulk_download(request.app[STORE], started(request), request)


# -- admin -------------------------------------------------------------------------------------


async def admin_stats(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[FAULTS].stats())


async def admin_stats_reset(request: web.Request) -> web.StreamResponse:
    request.app[FAULTS].reset_stats()
    return json_response(request.app[FAULTS].stats())


async def admin_get_faults(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[FAULTS].settings.to_json())


async def admin_set_faults(request: web.Request) -> web.StreamResponse:
    """PUT replaces every setting (missing keys get defaults); PATCH changes only the given keys."""
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object", source=SOURCE_API)
    faults = request.app[FAULTS]
    try:
        settings = faults.settings.patched(body) if request.method == "PATCH" else validate(body)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, str(exc), source=SOURCE_API) from None
    faults.replace(settings)
    return json_response(settings.to_json())


async def admin_reset_faults(request: web.Request) -> web.StreamResponse:
    request.app[FAULTS].replace(FaultSettings())
    return json_response(request.app[FAULTS].settings.to_json())


async def admin_force_state(request: web.Request) -> web.StreamResponse:
    record = find(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object", source=SOURCE_API)
    return dto(request, request.app[LIFECYCLE].force_state(record, body))


async def admin_health(request: web.Request) -> web.StreamResponse:
    return json_response({"status": "ok", "sandboxes": request.app[STORE].count()})


# -- assembly ----------------------------------------------------------------------------------


async def _ticker(app: web.Application) -> AsyncIterator[None]:
    async def loop() -> None:
        while True:
            await asyncio.sleep(0.1)
            try:
                app[LIFECYCLE].tick()
                app[LIFECYCLE].sweep()
            except Exception:  # keep ticking; a broken record must not stop time
                log.exception("transition tick failed")

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    app[SESSIONS].close()
    app[STORE].close()


def build_app(store: Store, faults: Faults, api_key: str) -> web.Application:
    """The whole emulator as an aiohttp application (the caller owns running it)."""
    app = web.Application(middlewares=[daytona_middleware], client_max_size=1024**4)
    app[STORE] = store
    app[LISTING] = Listing()
    app[FAULTS] = faults
    app[LIFECYCLE] = Lifecycle(store, faults)
    app[API_KEY] = api_key
    app[SESSIONS] = Sessions(store)
    app.cleanup_ctx.append(_ticker)
    r = app.router
    r.add_post("/api/sandbox", create_sandbox, name="create")
    r.add_get("/api/sandbox", list_sandboxes, name="list", allow_head=False)
    r.add_get("/api/sandbox/{idOrName}", get_sandbox, name="get", allow_head=False)
    for action in ("start", "stop", "archive", "recover"):
        r.add_post(f"/api/sandbox/{{idOrName}}/{action}", _lifecycle_route(action), name=action)
    r.add_delete("/api/sandbox/{idOrName}", _lifecycle_route("delete"), name="delete")
    r.add_put("/api/sandbox/{idOrName}/labels", set_labels, name="labels")
    r.add_get(
        "/api/sandbox/{idOrName}/toolbox-proxy-url",
        toolbox_proxy_url,
        name="toolbox_proxy_url",
        allow_head=False,
    )
    r.add_post(
        "/api/sandbox/{idOrName}/{setting:autostop|autoarchive|autodelete|autopause|ttl|public}/{value}",
        set_setting,
        name="settings",
    )
    r.add_post("/api/sandbox/{idOrName}/network-settings", set_network, name="network_settings")
    r.add_put("/api/sandbox/{idOrName}/secrets", set_secrets, name="secrets")
    r.add_get("/api/volumes", list_volumes, name="list_volumes", allow_head=False)
    r.add_post("/api/volumes", create_volume, name="create_volume")
    r.add_get("/api/volumes/by-name/{name}", get_volume_by_name, name="get_volume_by_name", allow_head=False)
    r.add_get("/api/volumes/{volumeId}", get_volume, name="get_volume", allow_head=False)
    r.add_delete("/api/volumes/{volumeId}", delete_volume, name="delete_volume")
    r.add_get("/api/config", get_config, name="config", allow_head=False)
    tb = "/toolbox/{sandboxId}"
    r.add_post(f"{tb}/process/execute", tb_execute, name="execute")
    r.add_get(f"{tb}/work-dir", tb_work_dir, name="work_dir", allow_head=False)
    r.add_get(f"{tb}/user-home-dir", tb_work_dir, name="home_dir", allow_head=False)
    r.add_post(f"{tb}/files/folder", tb_folder, name="folder")
    r.add_delete(f"{tb}/files", tb_delete_file, name="delete_file")
    r.add_post(f"{tb}/files/bulk-upload", tb_upload, name="upload")
    r.add_post(f"{tb}/files/bulk-download", tb_download, name="download")
    ps = f"{tb}/process/session"
    r.add_post(ps, tb_session_create, name="session_create")
    r.add_get(f"{ps}/{{sessionId}}", tb_session_get, name="session_get", allow_head=False)
    r.add_delete(f"{ps}/{{sessionId}}", tb_session_delete, name="session_delete")
    r.add_post(f"{ps}/{{sessionId}}/exec", tb_session_execute, name="session_execute")
    r.add_get(
        f"{ps}/{{sessionId}}/command/{{commandId}}",
        tb_session_command,
        name="session_command",
        allow_head=False,
    )
    r.add_get(
        f"{ps}/{{sessionId}}/command/{{commandId}}/logs",
        tb_session_logs,
        name="session_logs",
        allow_head=False,
    )
    r.add_get("/_emulator/stats", admin_stats, name="admin_stats", allow_head=False)
    r.add_post("/_emulator/stats/reset", admin_stats_reset, name="admin_stats_reset")
    r.add_get("/_emulator/faults", admin_get_faults, name="admin_faults", allow_head=False)
    r.add_put("/_emulator/faults", admin_set_faults, name="admin_faults_put")
    r.add_patch("/_emulator/faults", admin_set_faults, name="admin_faults_patch")
    r.add_post("/_emulator/faults/reset", admin_reset_faults, name="admin_faults_reset")
    r.add_post("/_emulator/sandboxes/{idOrName}/state", admin_force_state, name="admin_force_state")
    r.add_get("/_emulator/health", admin_health, name="admin_health", allow_head=False)
    return app
