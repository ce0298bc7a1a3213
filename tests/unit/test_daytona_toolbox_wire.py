"""The stdin file's toolbox calls on the wire (providers.daytona.Toolbox), against Daytona's
contract (../shared/reference/daytona-api-contract.md, the file-system rows): the upload is
``POST /files/bulk-upload`` with the text field ``files[0].path`` and then the file part
``files[0].file`` named after the destination; the deletion is ``DELETE /files?path=&recursive=false``;
an error status raises the generated client's ``ApiException`` with that status."""

from __future__ import annotations

import email.parser
import email.policy
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest


class _Capture(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]]
    status = 200

    def _answer(self, body: bytes) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.seen.append(
            {
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers),
                "body": self.rfile.read(length),
            }
        )
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self._answer(b'{"files": [{"path": "x", "size": 1}]}' if self.status < 400 else b'{"message": "no"}')

    def do_DELETE(self) -> None:
        self._answer(b"" if self.status < 400 else b'{"message": "gone"}')

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def toolbox() -> Iterator[tuple[Any, type[_Capture]]]:
    from daytona_toolbox_api_client import ApiClient, Configuration

    from controller.providers.daytona import Toolbox

    handler = type("Handler", (_Capture,), {"seen": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = ApiClient(Configuration(host=f"http://127.0.0.1:{server.server_port}/toolbox/sb-1"))
        yield Toolbox(client), handler
    finally:
        server.shutdown()
        server.server_close()


def test_upload_sends_the_path_field_then_the_file_part_named_after_it(
    toolbox: tuple[Any, type[_Capture]],
) -> None:
    box, handler = toolbox
    data = bytes(range(256)) * 3
    box.upload_file("/tmp/leasectl-stdin-abc", data, 30.0)
    [request] = handler.seen
    assert (request["method"], request["path"]) == ("POST", "/toolbox/sb-1/files/bulk-upload")
    content_type = request["headers"]["Content-Type"]
    assert content_type.startswith("multipart/form-data; boundary=")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + request["body"]
    )
    parts = list(message.iter_parts())
    assert [p.get_param("name", header="content-disposition") for p in parts] == [
        "files[0].path",
        "files[0].file",
    ]
    assert parts[0].get_filename() is None
    assert parts[0].get_payload(decode=True) == b"/tmp/leasectl-stdin-abc"
    assert parts[1].get_filename() == "/tmp/leasectl-stdin-abc"
    assert parts[1].get_payload(decode=True) == data


def test_delete_sends_the_path_and_recursive_false(toolbox: tuple[Any, type[_Capture]]) -> None:
    box, handler = toolbox
    handler.status = 204
    box.delete_file("/tmp/leasectl-stdin-a b&c", 30.0)
    [request] = handler.seen
    assert request["method"] == "DELETE"
    path, _, query = request["path"].partition("?")
    assert path == "/toolbox/sb-1/files"
    assert urllib.parse.parse_qsl(query) == [("path", "/tmp/leasectl-stdin-a b&c"), ("recursive", "false")]


@pytest.mark.parametrize("call", ["upload", "delete"])
def test_an_error_status_raises_the_generated_clients_exception(
    toolbox: tuple[Any, type[_Capture]], call: str
) -> None:
    """What ``classify`` reads (``status``), as the generated calls raise it."""
    from daytona_toolbox_api_client.exceptions import ApiException

    box, handler = toolbox
    handler.status = 404 if call == "delete" else 403
    with pytest.raises(ApiException) as caught:
        if call == "upload":
            box.upload_file("/tmp/x", b"1", 30.0)
        else:
            box.delete_file("/tmp/x", 30.0)
    assert caught.value.status == handler.status
