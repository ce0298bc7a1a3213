"""The Daytona provider's error translation: vendor exceptions -> the project's error tree."""

from __future__ import annotations

import json
from dataclasses import FrozenInstanceError

import pytest
import urllib3
from daytona import DaytonaError
from daytona_api_client import SandboxListItem
from daytona_api_client.exceptions import ApiException

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
from controller.providers.base import ObservedSandbox
from controller.providers.daytona import (
    DaytonaProvider,
    classify,
    is_vendor_failure,
    not_sent,
    parse_list_page,
    rate_limit_pauses,
    to_observed,
    translate,
)


def api_error(
    status: int, headers: dict[str, str] | None = None, body: str = '{"message": "nope"}'
) -> ApiException:
    exc = ApiException(status=status, reason="R")
    exc.headers = headers or {}
    exc.body = body
    return exc


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, PermanentError),
        (422, PermanentError),
        (401, AuthError),
        (403, AuthError),
        (404, NotFoundError),
        (408, TransientError),
        (409, ConflictError),
        (429, RateLimitedError),
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
    ],
)
def test_status_mapping(status: int, expected: type[ProviderError]) -> None:
    error = translate(api_error(status), "get sandbox x")
    assert type(error) is expected
    assert "get sandbox x" in str(error) and f"HTTP {status}" in str(error) and "nope" in str(error)


def test_retry_after_is_honoured() -> None:
    error = translate(api_error(429, {"Retry-After": "7"}), "list")
    assert isinstance(error, RateLimitedError) and error.retry_after == 7.0
    assert translate(api_error(503, {"retry-after": "2"}), "x").retry_after == 2.0  # type: ignore[attr-defined]
    assert translate(api_error(429, {"Retry-After": "soon"}), "x").retry_after is None  # type: ignore[attr-defined]


def test_no_http_answer_is_transient() -> None:
    assert type(translate(urllib3.exceptions.MaxRetryError(None, "/x"), "list")) is TransientError  # type: ignore[arg-type]
    refused = translate(ConnectionRefusedError(), "list")  # provably never reached the server
    assert type(refused) is NotSentError and isinstance(refused, TransientError)
    assert type(translate(DaytonaError("socket closed"), "exec")) is TransientError


def test_sdk_errors_map_by_status() -> None:
    exc = DaytonaError("gone", status_code=404)
    assert type(translate(exc, "get")) is NotFoundError


# -- classify: what a status + Daytona's message + the call mean (docs/architecture.md) ----------------

CLASSIFY_TABLE = [
    # status, detail, operation, expected
    (400, "HTTP 400: Total CPU limit exceeded. Maximum allowed: 10", "create", CapacityError),
    (400, "HTTP 400: Total disk limit exceeded. Maximum allowed: 30GiB", "start", CapacityError),
    (400, "HTTP 400: Total memory limit exceeded", "create", CapacityError),
    (400, "HTTP 400: Total GPU limit exceeded", "create", CapacityError),
    (400, "HTTP 400: Total sandbox limit exceeded. Maximum allowed: 2.", "create", CapacityError),
    (400, "HTTP 400: No available runners", "create", CapacityError),
    (403, "HTTP 403: Total sandbox limit exceeded. Maximum allowed: 2.", "create", AuthError),
    (401, "HTTP 401: Unauthorized", "get", AuthError),
    (401, "HTTP 401: Unauthorized", "execute", AuthError),
    (403, "HTTP 403: Organization is suspended", "create", AuthError),
    (403, "HTTP 403: Forbidden", "list", AuthError),
    (400, "HTTP 400: Sandbox failed to start: image pull failed", "create", StartFailedError),
    (400, "HTTP 400: Sandbox failed to start: boom", "start", StartFailedError),
    (400, "HTTP 400: Sandbox failed to start: boom", "recover", StartFailedError),
    (400, "HTTP 400: Sandbox is not in a stoppable state", "stop", StateConflictError),
    (400, "HTTP 400: Sandbox is not stopped", "archive", StateConflictError),
    (400, "HTTP 400: Sandbox is not in valid state", "start", StateConflictError),
    (400, "HTTP 400: Sandbox is in an errored state", "start", StateConflictError),
    (400, "HTTP 400: Sandbox is in an errored state", "stop", StateConflictError),
    (409, "HTTP 409: Sandbox state change in progress", "delete", StateConflictError),
    (409, "HTTP 409: Sandbox state change in progress", "start", StateConflictError),
    (409, "HTTP 409: Sandbox with name x already exists", "create", ConflictError),
    (400, "HTTP 400: Sandbox is not in a stoppable state", "create", PermanentError),
    (400, "HTTP 400: Invalid snapshot name", "create", PermanentError),
    (400, "HTTP 400: GPU sandboxes must be ephemeral", "create", PermanentError),
    (422, "HTTP 422: cpu must be a number", "create", PermanentError),
    (400, "HTTP 400: Sandbox failed to start: boom", "stop", PermanentError),
    (404, "HTTP 404: Sandbox with ID or name x not found", "get", NotFoundError),
    (408, "HTTP 408: Request timeout", "create", TransientError),
    (502, "HTTP 502: bad gateway", "delete", TransientError),
    (None, "connection refused", "list", TransientError),
]


@pytest.mark.parametrize(("status", "detail", "operation", "expected"), CLASSIFY_TABLE)
def test_classify_table(status: int | None, detail: str, operation: str, expected: type) -> None:
    error = classify(status, detail, operation)
    assert type(error) is expected, (status, detail, operation, type(error).__name__)
    assert str(error) == detail


def test_capacity_is_transient_not_permanent() -> None:
    error = translate(
        api_error(400, body='{"message": "Total disk limit exceeded. Maximum allowed: 30"}'),
        "create sandbox x",
        "create",
    )
    assert isinstance(error, TransientError) and not isinstance(error, PermanentError)


@pytest.mark.parametrize(
    ("headers", "scope", "retry_after"),
    [
        ({"Retry-After-sandbox-create": "12"}, SCOPE_CREATE, 12.0),
        ({"retry-after-sandbox-lifecycle": "3"}, SCOPE_LIFECYCLE, 3.0),
        ({"Retry-After-authenticated": "5"}, SCOPE_ALL, 5.0),
        ({"Retry-After": "4"}, SCOPE_ALL, 4.0),
        ({"Retry-After-sandbox-create": "2", "Retry-After-authenticated": "9"}, SCOPE_ALL, 9.0),
        ({"Retry-After-sandbox-create": "20", "Retry-After-authenticated": "9"}, SCOPE_CREATE, 20.0),
        ({"Retry-After-some-new-throttler": "6"}, SCOPE_ALL, 6.0),
        ({"X-RateLimit-Reset-sandbox-create": "60"}, SCOPE_ALL, None),
    ],
)
def test_named_throttler_headers(headers: dict[str, str], scope: str, retry_after: float | None) -> None:
    error = translate(api_error(429, headers), "create sandbox x", "create")
    assert isinstance(error, RateLimitedError)
    assert error.scope == scope and error.retry_after == retry_after


def test_every_named_scope_is_kept() -> None:
    headers = {"Retry-After-sandbox-create": "20", "Retry-After-authenticated": "9"}
    assert rate_limit_pauses(headers) == {SCOPE_CREATE: 20.0, SCOPE_ALL: 9.0}
    error = translate(api_error(429, headers), "create", "create")
    assert isinstance(error, RateLimitedError) and error.pauses == {SCOPE_CREATE: 20.0, SCOPE_ALL: 9.0}


# -- list pages read as JSON (issue 14) --------------------------------------------------------------


def _item(**overrides: object) -> dict[str, object]:
    """A list item as the local API and Daytona send it (camelCase, extra fields included)."""
    item: dict[str, object] = {
        "id": "5f0c9d7e-1",
        "organizationId": "org",
        "name": "bench-fleet-00001-0123abcd-ab12cd",
        "target": "local",
        "runnerId": "local",
        "sandboxClass": "container",
        "state": "started",
        "desiredState": "started",
        "snapshot": "daytonaio/sandbox:local",
        "user": "daytona",
        "errorReason": None,
        "recoverable": False,
        "public": False,
        "networkBlockAll": False,
        "cpu": 2,
        "gpu": 0,
        "memory": 4,
        "disk": 10,
        "labels": {"leasectl-instance": "bench", "leasectl-lease": "fleet-00001", "leasectl-spec": "abc"},
        "backupState": "None",
        "autoStopInterval": 0,
        "autoArchiveInterval": 10080,
        "autoDeleteInterval": -1,
        "createdAt": "2026-11-27T06:00:00.000Z",
        "updatedAt": "2026-11-27T06:00:01.000Z",
        "lastActivityAt": "2026-11-27T06:00:01.000Z",
        "daemonVersion": "local-daytona",
        "toolboxProxyUrl": "http://127.0.0.1:1/toolbox",
        "somethingNew": {"nested": [1, 2]},
    }
    item.update(overrides)
    return item


def _page(*items: object, cursor: object = None) -> bytes:
    return json.dumps({"items": list(items), "nextCursor": cursor}).encode()


def _one(item: object) -> ObservedSandbox:
    items, _ = parse_list_page(_page(item))
    assert len(items) == 1
    return items[0]


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"state": "error", "errorReason": "disk full", "recoverable": True},
        {"state": "build_failed", "errorReason": "bad image", "snapshot": None},
        {"state": "stopping", "labels": {}, "createdAt": None},
        {"state": "archived", "cpu": 1, "gpu": 1, "memory": 1, "disk": 1, "target": "eu"},
    ],
)
def test_a_list_item_reads_as_the_sdk_model_does(overrides: dict[str, object]) -> None:
    """parse_list_page makes of the JSON what to_observed makes of the SDK's generated model."""
    item = _item(**overrides)
    ours, sdk = _one(item), to_observed(SandboxListItem.from_dict(item))
    assert ours == sdk
    # Made without ObservedSandbox.__init__ (providers.base.frozen_instance): the same attributes,
    # none missing, none extra, and as frozen.
    assert type(ours) is ObservedSandbox and vars(ours) == vars(sdk)
    with pytest.raises(FrozenInstanceError):
        ours.state = "started"  # type: ignore[misc]


def test_a_page_reads_its_items_and_cursor() -> None:
    items, cursor = parse_list_page(_page(_item(), _item(id="2", name="b"), cursor="abc"))
    assert [sb.id for sb in items] == ["5f0c9d7e-1", "2"] and cursor == "abc"
    assert parse_list_page(_page()) == ([], None)
    assert parse_list_page(b'{"items": []}') == ([], None)
    assert parse_list_page(_page(_item(), cursor=""))[1] is None


def test_an_unknown_state_is_kept_as_sent() -> None:
    assert _one(_item(state="hibernating")).state == "hibernating"
    assert _one(_item(state=None)).state == "unknown"


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"not json",
        b'{"items": "no"}',
        _page(["not", "an", "object"]),
        _page(_item(id=None)),
        _page(_item(name=7)),
        _page(_item(labels=["a"])),
        _page(_item(labels={"a": 1})),
    ],
)
def test_an_unreadable_page_is_a_transient_error(body: bytes) -> None:
    with pytest.raises(ValueError) as caught:
        parse_list_page(body)
    assert isinstance(translate(caught.value, "list sandboxes", "list"), TransientError)


# -- 401/403: the credentials, recognisable (AuthError is a TransientError) -----------------------------


def test_auth_errors_are_transient_for_the_reconciler_but_recognisable() -> None:
    for status in (401, 403):
        error = translate(api_error(status, body='{"message": "Unauthorized"}'), "list sandboxes", "list")
        assert type(error) is AuthError and isinstance(error, TransientError)
        assert error.status == status and f"HTTP {status}" in str(error)
    assert type(translate(DaytonaError("denied", status_code=401), "get work dir")) is AuthError


def test_a_toolbox_file_access_denied_is_not_a_credential_problem() -> None:
    body = '{"statusCode": 403, "message": "access to /etc is denied", "code": "FILE_ACCESS_DENIED"}'
    error = translate(api_error(403, body=body), "upload /etc/x", "upload")
    assert type(error) is TransientError
    assert type(classify(403, "HTTP 403: denied", "upload", code="FILE_ACCESS_DENIED")) is TransientError
    denied = DaytonaError("denied", status_code=403, code="FILE_ACCESS_DENIED")
    assert type(translate(denied, "upload")) is TransientError


def test_a_refused_lookup_before_exec_stays_an_auth_error() -> None:
    lookup = translate(api_error(401), "get sandbox x", "get")
    error = not_sent(lookup, "exec")
    assert type(error) is AuthError and error.status == 401 and "exec not sent" in str(error)
    other = not_sent(translate(api_error(503), "get sandbox x", "get"), "exec")
    assert type(other) is NotSentError


# -- only vendor failures are translated; a bug propagates unchanged ------------------------------------


def _sdk_wrapped(exc: BaseException) -> BaseException:
    """What the high-level client's ``intercept_errors`` makes of ``exc`` raised inside a call."""
    from daytona._utils.errors import intercept_errors

    @intercept_errors(message_prefix="Failed to do it: ")
    def call() -> None:
        raise exc

    try:
        call()
    except BaseException as caught:
        return caught
    raise AssertionError("not raised")


@pytest.mark.parametrize(
    ("exc", "vendor"),
    [
        (api_error(503), True),
        (urllib3.exceptions.MaxRetryError(None, "/x"), True),  # type: ignore[arg-type]
        (urllib3.exceptions.ReadTimeoutError(None, "/x", "read timed out"), True),  # type: ignore[arg-type]
        (ConnectionRefusedError(), True),
        (TimeoutError(), True),
        (OSError("reset"), True),
        (DaytonaError("Function 'x' exceeded timeout"), True),  # the SDK's own, no cause
        (DaytonaError("gone", status_code=404), True),
        (ValueError("not json"), False),  # a ValueError of ours is a bug, not an answer
        (NameError("name 'x' is not defined"), False),
        (TypeError("f() got an unexpected keyword argument"), False),
        (AttributeError("'NoneType' object has no attribute 'id'"), False),
        (KeyError("id"), False),
        (AssertionError(), False),
    ],
)
def test_what_is_a_vendor_failure(exc: BaseException, vendor: bool) -> None:
    assert is_vendor_failure(exc) is vendor


def test_the_sdks_wrapping_is_looked_through() -> None:
    """The high-level client wraps any exception in a DaytonaError: what it wraps decides."""
    bug = _sdk_wrapped(NameError("name 'sandbox' is not defined"))
    assert type(bug).__name__ == "DaytonaError" and not is_vendor_failure(bug)
    refused = _sdk_wrapped(urllib3.exceptions.ProtocolError("Connection aborted."))
    assert is_vendor_failure(refused)
    answered = _sdk_wrapped(api_error(502))
    assert is_vendor_failure(answered) and type(translate(answered, "get work dir")) is TransientError
    import httpx
    from daytona_api_client.exceptions import ApiTypeError

    upload_failed = _sdk_wrapped(httpx.ConnectError("connection refused"))  # file transfers use httpx
    assert is_vendor_failure(upload_failed) and is_vendor_failure(httpx.ReadTimeout("timed out"))
    assert type(translate(upload_failed, "upload /tmp/x")) is TransientError
    from obstore.exceptions import GenericError

    assert is_vendor_failure(GenericError("upload of the build context failed"))  # object storage
    refused_argument = _sdk_wrapped(ApiTypeError("Got an unexpected keyword argument 'x'"))
    assert not is_vendor_failure(refused_argument)


class _Api:
    """Stands in for the SDK's generated SandboxApi: its ``get_sandbox`` raises ``exc``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc
        self.calls = 0

    def get_sandbox(self, *_args: object, **_kwargs: object) -> None:
        self.calls += 1
        raise self.exc

    def execute_command(self, *_args: object, **_kwargs: object) -> None:
        self.calls += 1
        raise self.exc


def _provider(exc: BaseException) -> tuple[DaytonaProvider, _Api, list[tuple[str, str]]]:
    requests: list[tuple[str, str]] = []
    provider = DaytonaProvider(
        "http://127.0.0.1:9/api", "k", on_request=lambda op, outcome: requests.append((op, outcome))
    )
    api = _Api(exc)
    provider._sandbox_api = api  # type: ignore[assignment]
    provider._processes["sb-1"] = api  # type: ignore[assignment]
    return provider, api, requests


@pytest.mark.parametrize(
    "bug",
    [
        NameError("name 'sandbox_id' is not defined"),
        TypeError("get_sandbox() got an unexpected keyword argument '_request_timout'"),
        AttributeError("'NoneType' object has no attribute 'state'"),
        KeyError("id"),
        ValueError("invalid literal for int()"),
    ],
)
def test_a_bug_inside_a_provider_call_propagates_unchanged(bug: Exception) -> None:
    provider, api, requests = _provider(bug)
    with pytest.raises(type(bug)) as caught:
        provider.get("sb-1")
    assert caught.value is bug and not isinstance(caught.value, ProviderError)
    with pytest.raises(type(bug)) as caught:
        provider.exec("sb-1", "true")
    assert caught.value is bug
    assert api.calls == 2
    assert requests == [("get", type(bug).__name__), ("execute", type(bug).__name__)]


def test_a_vendor_failure_inside_a_provider_call_is_still_translated() -> None:
    provider, _, requests = _provider(api_error(503))
    with pytest.raises(TransientError) as caught:
        provider.get("sb-1")
    assert isinstance(caught.value.__cause__, ApiException)
    with pytest.raises(AuthError):
        _provider(api_error(401))[0].exec("sb-1", "true")
    assert requests == [("get", "TransientError")]
