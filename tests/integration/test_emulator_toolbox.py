"""Toolbox of local-daytona through the unmodified sync SDK: exec, files, dirs, refusals."""

from __future__ import annotations

import http.client
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daytona import (
    CreateSandboxFromSnapshotParams,
    DaytonaBadRequestError,
    DaytonaError,
    DaytonaFileAccessDeniedError,
    DaytonaFileNotFoundError,
    DaytonaNotFoundError,
    DaytonaTimeoutError,
    FileDownloadRequest,
)
from daytona_toolbox_api_client.models.execute_response import ExecuteResponse
from daytona_toolbox_api_client.models.user_home_dir_response import UserHomeDirResponse
from daytona_toolbox_api_client.models.work_dir_response import WorkDirResponse

from tests.support.emulator import EmulatorProcess

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sandbox(emulator: EmulatorProcess) -> Iterator[Any]:
    client = emulator.client()
    yield client.create(
        CreateSandboxFromSnapshotParams(name="tb", env_vars={"SANDBOX_VAR": "from-create"}), timeout=10
    )


def test_exec_output_exit_code_and_env(sandbox: Any) -> None:
    response = sandbox.process.exec("echo out; echo err >&2; exit 7")
    assert response.exit_code == 7
    assert response.result == "out\nerr\n"
    assert sandbox.process.exec("true").exit_code == 0
    response = sandbox.process.exec('echo "$SANDBOX_VAR $REQ_VAR $HOME"', env={"REQ_VAR": "from-request"})
    home = sandbox.get_user_home_dir()
    assert response.result == f"from-create from-request {home}\n"
    assert sandbox.process.exec("pwd").result == f"{sandbox.get_work_dir()}\n"


def test_exec_awkward_quoting(sandbox: Any) -> None:
    command = """printf '%s|' "double \\"q\\"" 'single "q"' 'it'"'"'s' $'tab\\there' '$HOME' "ünïcödé" '*'"""
    result = sandbox.process.exec(command)
    assert result.exit_code == 0
    assert result.result == """double "q"|single "q"|it's|tab\there|$HOME|ünïcödé|*|"""
    multi = sandbox.process.exec("for i in 1 2 3; do\n  echo line $i\ndone")
    assert multi.result == "line 1\nline 2\nline 3\n"


def test_exec_cwd_relative_to_work_dir(sandbox: Any) -> None:
    sandbox.fs.create_folder("sub/dir", "755")
    result = sandbox.process.exec("pwd", cwd="sub/dir")
    assert result.result.strip() == os.path.join(sandbox.get_work_dir(), "sub/dir")
    assert Path(result.result.strip()).is_dir()


def test_exec_large_output(sandbox: Any) -> None:
    size = 3 * 1024 * 1024
    result = sandbox.process.exec(f"head -c {size} /dev/zero | tr '\\0' x")
    assert result.exit_code == 0
    assert len(result.result) == size and set(result.result) == {"x"}


def test_exec_timeout_kills_the_process_group(sandbox: Any, emulator: EmulatorProcess) -> None:
    marker = "timeout-marker"
    with pytest.raises(DaytonaTimeoutError) as info:
        sandbox.process.exec(f"(sleep 2; touch {marker}) & sleep 2; touch {marker}", timeout=1)
    assert info.value.status_code == 408 and info.value.code == "REQUEST_TIMEOUT"
    time.sleep(1.5)
    assert sandbox.process.exec(f"test -e {marker}").exit_code == 1
    execute = f"/toolbox/{sandbox.id}/process/execute"
    answer = emulator.call("POST", execute, {"command": "sleep 5", "timeout": 1})
    assert answer.status == 408
    assert answer.body["code"] == "REQUEST_TIMEOUT" and answer.body["statusCode"] == 408
    assert {"path", "timestamp", "error", "message"} <= set(answer.body)


def test_exec_signal_and_start_failure_report_minus_one(sandbox: Any) -> None:
    assert sandbox.process.exec("kill -9 $$").exit_code == -1
    assert sandbox.process.exec("kill -TERM $$").exit_code == -1
    assert sandbox.process.exec("exit 3").exit_code == 3
    missing = sandbox.process.exec("echo never", cwd="no/such/dir")  # the shell cannot start there
    assert missing.exit_code == -1


def test_work_and_home_dir_are_real_paths(sandbox: Any, emulator: EmulatorProcess) -> None:
    work = sandbox.get_work_dir()
    home = sandbox.get_user_home_dir()
    assert Path(work).is_dir() and Path(home).is_dir()
    assert Path(home).resolve().is_relative_to(emulator.state_dir.resolve())
    toolbox = f"/toolbox/{sandbox.id}"
    assert WorkDirResponse.from_dict(emulator.request("GET", f"{toolbox}/work-dir")) is not None
    assert UserHomeDirResponse.from_dict(emulator.request("GET", f"{toolbox}/user-home-dir")) is not None
    body = emulator.request("POST", f"{toolbox}/process/execute", {"command": "echo hi"})
    assert body == {"exitCode": 0, "result": "hi\n"}
    assert ExecuteResponse.from_dict(body) is not None


def test_binary_upload_download_roundtrip(sandbox: Any) -> None:
    payload = bytes(range(256)) * 4096 + b"\r\n--boundary-like--\r\n"
    sandbox.fs.upload_file(payload, "deep/nested/blob.bin")
    assert sandbox.fs.download_file("deep/nested/blob.bin") == payload
    home = sandbox.get_user_home_dir()
    assert Path(home, "deep/nested/blob.bin").read_bytes() == payload
    # absolute sandbox paths map into the sandbox root; the reported home is used as is
    sandbox.fs.upload_file(b"abs", "/home/daytona/abs.txt")
    assert sandbox.fs.download_file("/home/daytona/abs.txt") == b"abs"
    sandbox.fs.upload_file(b"real", f"{home}/real.txt")
    assert sandbox.process.exec("cat real.txt").result == "real"
    empty_name = f"/tmp/local-daytona-{uuid.uuid4().hex}"
    try:
        sandbox.fs.upload_file(b"", empty_name)
        assert sandbox.fs.download_file(empty_name) == b""
    finally:
        Path(empty_name).unlink(missing_ok=True)


def test_download_errors_are_parts(sandbox: Any) -> None:
    sandbox.fs.upload_file(b"here", "present.txt")
    with pytest.raises(DaytonaFileNotFoundError):
        sandbox.fs.download_file("absent.txt")
    results = sandbox.fs.download_files(
        [FileDownloadRequest(source="present.txt"), FileDownloadRequest(source="absent.txt")]
    )
    assert results[0].result == b"here" and results[0].error is None
    assert results[1].result is None and "not found" in (results[1].error or "")


def test_delete_and_folders(sandbox: Any) -> None:
    sandbox.fs.create_folder("made", "700")
    home = Path(sandbox.get_user_home_dir())
    assert (home / "made").is_dir() and (home / "made").stat().st_mode & 0o777 == 0o700
    sandbox.fs.upload_file(b"x", "made/file.txt")
    with pytest.raises(DaytonaError):
        sandbox.fs.delete_file("made")  # a directory needs recursive
    sandbox.fs.delete_file("made/file.txt")
    assert not (home / "made/file.txt").exists()
    sandbox.fs.delete_file("made", recursive=True)
    assert not (home / "made").exists()
    with pytest.raises(DaytonaNotFoundError):
        sandbox.fs.delete_file("made")
    with pytest.raises(DaytonaError):
        sandbox.fs.upload_file(b"x", "../../../../outside.txt")


def test_chunked_multipart_upload(sandbox: Any, emulator: EmulatorProcess) -> None:
    boundary = "chunkyboundary"
    data = os.urandom(300_000)
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files[0].path"\r\n\r\nchunked.bin\r\n'
            f"--{boundary}\r\nContent-Disposition: form-data; "
            'name="files[0].file"; filename="chunked.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    connection = http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)
    connection.request(
        "POST",
        f"/toolbox/{sandbox.id}/files/bulk-upload",
        body=chunks(),
        headers={
            "Authorization": f"Bearer {emulator.api_key}",
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Transfer-Encoding": "chunked",
        },
        encode_chunked=True,
    )
    response = connection.getresponse()
    assert response.status == 200, response.read()
    assert json.loads(response.read())["files"][0]["size"] == len(data)
    connection.close()
    assert sandbox.fs.download_file("chunked.bin") == data


def test_toolbox_refused_when_not_started(sandbox: Any, emulator: EmulatorProcess) -> None:
    sandbox.stop(timeout=10)
    with pytest.raises(DaytonaBadRequestError, match="not started"):
        sandbox.process.exec("echo hi")
    with pytest.raises(DaytonaError):
        sandbox.fs.upload_file(b"x", "x.txt")
    sandbox.start(timeout=10)
    assert sandbox.process.exec("echo back").result == "back\n"
    stats = emulator.stats()
    assert stats["execute"] == 2 and stats["upload"] == 1


# -- the file API stays inside the sandbox (issue 17) ------------------------------------------


def test_dot_dot_and_absolute_paths_stay_inside(sandbox: Any, emulator: EmulatorProcess) -> None:
    host_hostname = Path("/etc/hostname")
    for escape in ("../../../../../etc/hostname", "sub/../../../../../../etc/hostname"):
        with pytest.raises(DaytonaFileAccessDeniedError):
            sandbox.fs.download_file(escape)
        with pytest.raises(DaytonaError):
            sandbox.fs.upload_file(b"x", escape.replace("hostname", "leasectl-escape"))
        with pytest.raises(DaytonaFileAccessDeniedError):
            sandbox.fs.create_folder(escape + "-dir", "755")
    # an absolute path outside the sandbox maps into its root: never the host's file
    with pytest.raises(DaytonaFileNotFoundError):
        sandbox.fs.download_file("/etc/hostname")
    sandbox.fs.upload_file(b"mapped", "/etc/hostname")
    assert sandbox.fs.download_file("/etc/hostname") == b"mapped"
    assert not host_hostname.exists() or host_hostname.read_bytes() != b"mapped"
    root = Path(sandbox.get_user_home_dir()).parents[1]
    assert (root / "etc/hostname").read_bytes() == b"mapped"


def test_url_encoded_traversal_is_refused(sandbox: Any, emulator: EmulatorProcess) -> None:
    outside = emulator.state_dir / "victim.txt"
    outside.write_text("keep me")
    relative = "..%2F..%2F..%2F..%2Fvictim.txt"  # decoded once by the server: ../../../../victim.txt
    answer = emulator.call("DELETE", f"/toolbox/{sandbox.id}/files?path={relative}&recursive=false")
    assert answer.status == 403 and answer.body["code"] == "FILE_ACCESS_DENIED"
    answer = emulator.call(
        "POST", f"/toolbox/{sandbox.id}/files/folder?path=%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E%2Fevil&mode=755"
    )
    assert answer.status == 403
    double = "%252E%252E%252Fvictim.txt"  # decoded once: a literal name "%2E%2E%2Fvictim.txt"
    answer = emulator.call("DELETE", f"/toolbox/{sandbox.id}/files?path={double}")
    assert answer.status == 404
    assert outside.read_text() == "keep me"


def test_symlinks_pointing_out_are_refused(sandbox: Any, emulator: EmulatorProcess) -> None:
    outside = emulator.state_dir / "outside"  # beside the sandboxes (the host's /tmp is shared on purpose)
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    assert (
        sandbox.process.exec(f"ln -s {outside} outlink && ln -s {outside}/secret.txt filelink").exit_code == 0
    )
    assert sandbox.process.exec("ln -s /etc etclink").exit_code == 0
    for path in ("etclink/hostname", "outlink/secret.txt", "filelink"):
        with pytest.raises(DaytonaFileAccessDeniedError):
            sandbox.fs.download_file(path)
    with pytest.raises(DaytonaError):
        sandbox.fs.upload_file(b"overwrite", "filelink")
    with pytest.raises(DaytonaError):
        sandbox.fs.upload_file(b"planted", "outlink/planted.txt")
    with pytest.raises(DaytonaFileAccessDeniedError):
        sandbox.fs.create_folder("outlink/newdir", "755")
    with pytest.raises(DaytonaFileAccessDeniedError):
        sandbox.fs.delete_file("outlink/secret.txt")
    with pytest.raises(DaytonaFileAccessDeniedError):
        sandbox.process.exec("pwd", cwd="outlink")
    assert (outside / "secret.txt").read_text() == "secret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    # removing the link itself is fine and leaves its target alone
    sandbox.fs.delete_file("outlink")
    assert (outside / "secret.txt").exists()
    # a link that stays inside the sandbox works
    sandbox.fs.upload_file(b"inside", "real.txt")
    assert sandbox.process.exec("ln -s real.txt inner").exit_code == 0
    assert sandbox.fs.download_file("inner") == b"inside"
