"""The toolbox (in-sandbox daemon) API: process execute, work/home dir and files.

Served at ``/toolbox/{sandboxId}/...``, the ``toolboxProxyUrl`` of every sandbox. Commands run as
real ``bash -c`` processes on the host, in their own process group, with HOME set to the sandbox
home; so this is a development tool and NOT an isolation boundary.

Path mapping (the SDK only round-trips the strings):

- the sandbox root is ``<state-dir>/sandboxes/<id>/``; its HOME and work dir are
  ``<root>/home/daytona``, reported by ``/user-home-dir`` and ``/work-dir`` as real host paths that
  commands can use;
- a relative path resolves against the work dir and must stay inside the sandbox root;
- an absolute path inside the sandbox root, or under ``/tmp`` (but not inside the state dir), is
  used as is (the host's ``/tmp`` is shared, as commands see it);
- any other absolute path is mapped into the root: ``/home/daytona/x`` -> ``<root>/home/daytona/x``
  (file calls round-trip; commands see only the host path, so prefer the reported dirs);
- a volume mounted at ``/data`` is a symlink ``<root>/data`` -> ``<state-dir>/volumes/<id>/[subpath]``:
  paths through it are allowed (the volume is shared by every sandbox that mounts it); commands
  see the host path, so they reach it as ``$DAYTONA_SANDBOX_ROOT/data`` or with ``cwd: /data``;
- anything else (e.g. ``..`` out of the root) is refused (403 ``FILE_ACCESS_DENIED``);
- the check is made on the real path (symlinks resolved), so a symlink inside the sandbox that
  points out of it (``ln -s /etc etclink``) cannot be read, written or used as a cwd through the
  file API; deleting such a link removes the link only. (A command can of course still follow it:
  commands are not confined.)

Exec: ``timeout`` > 0 kills the process group when it runs out and answers 408 with code
``REQUEST_TIMEOUT``; a shell killed by a signal reports exit code -1, as does a command that cannot
start (answered 200).

A sandbox that is not ``started`` refuses toolbox calls with 400, as Daytona's proxy does ("bad
request: ... Is the Sandbox started?", daytonaio/daytona#4142).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from .errors import SOURCE_DAEMON, SOURCE_PROXY, ApiError, envelope, json_response
from .state import HOME_RELATIVE, SandboxRecord, Store

CHUNK = 1024 * 1024


def require_started(record: SandboxRecord) -> None:
    if record.state != "started":
        raise ApiError(
            400,
            f"bad request: sandbox {record.id} is {record.state}, not started. Is the Sandbox started?",
            source=SOURCE_PROXY,
        )


def home_of(store: Store, record: SandboxRecord) -> Path:
    return store.root_of(record) / HOME_RELATIVE


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def resolve_path(store: Store, record: SandboxRecord, raw: str | None, *, follow_last: bool = True) -> Path:
    """Map a toolbox path to a host path (see the module docstring); 403 if it leaves the sandbox.

    The lexical check runs on the normalized path, then again on the real path (every symlink
    resolved; with ``follow_last=False`` all but the last component, for deleting a link itself).
    """
    if not raw:
        raise ApiError(400, "path is required", code="INVALID_FILE_PATH", source=SOURCE_DAEMON)
    if "\0" in raw:
        raise ApiError(400, "path contains a NUL byte", code="INVALID_FILE_PATH", source=SOURCE_DAEMON)
    root = str(store.root_of(record))
    state_dir = str(store.state_dir)
    shared_tmp = False
    if not raw.startswith("/"):
        candidate = os.path.normpath(os.path.join(home_of(store, record), raw))
    else:
        candidate = os.path.normpath(raw)
        shared_tmp = _inside(candidate, "/tmp") and not _inside(candidate, state_dir)
        if not shared_tmp and not _inside(candidate, root):
            candidate = os.path.normpath(os.path.join(root, candidate.lstrip("/")))
    if shared_tmp or _inside(candidate, root):
        head, tail = os.path.split(candidate)
        real = os.path.realpath(candidate) if follow_last else os.path.join(os.path.realpath(head), tail)
        if shared_tmp:
            real_state = os.path.realpath(state_dir)
            if _inside(real, os.path.realpath("/tmp")) and not _inside(real, real_state):
                return Path(candidate)
        elif _inside(real, os.path.realpath(root)) or any(
            _inside(real, os.path.realpath(d)) for d in mounted_dirs(store, record)
        ):
            return Path(candidate)
    raise ApiError(403, f"access to {raw} is denied", code="FILE_ACCESS_DENIED", source=SOURCE_DAEMON)


def mounted_dirs(store: Store, record: SandboxRecord) -> list[Path]:
    """The volume directories (or subpaths) mounted into the sandbox: reachable through its mounts."""
    return [
        store.volume_dir(str(m.get("volumeId"))) / str(m.get("subpath") or "")
        for m in record.volumes
        if isinstance(m, dict)
    ]


def _not_found(raw: str) -> ApiError:
    return ApiError(404, f"file not found: {raw}", code="FILE_NOT_FOUND", source=SOURCE_DAEMON)


# -- process -----------------------------------------------------------------------------------


def command_env(store: Store, record: SandboxRecord, extra: dict[str, str]) -> dict[str, str]:
    home = str(home_of(store, record))
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": home,
        "TMPDIR": str(store.root_of(record) / "tmp"),
        "LANG": "C.UTF-8",
        "SHELL": "/bin/bash",
        "DAYTONA_SANDBOX_ID": record.id,
        "DAYTONA_SANDBOX_USER": record.user,
        "DAYTONA_SANDBOX_ROOT": str(store.root_of(record)),  # local API only: where /<mount> lives
    }
    if record.snapshot:
        env["DAYTONA_SANDBOX_SNAPSHOT"] = record.snapshot
    env.update(record.env)
    env.update(extra)
    return env


async def execute(store: Store, record: SandboxRecord, body: Any) -> web.Response:
    if not isinstance(body, dict) or not isinstance(body.get("command"), str) or not body["command"]:
        raise ApiError(400, "command is required", source=SOURCE_DAEMON)
    envs = body.get("envs") or {}
    if not isinstance(envs, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in envs.items()
    ):
        raise ApiError(400, "envs must be an object of strings", source=SOURCE_DAEMON)
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
        raise ApiError(400, "timeout must be a number of seconds", source=SOURCE_DAEMON)
    cwd = resolve_path(store, record, body.get("cwd") or str(home_of(store, record)))
    try:
        process = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            body["command"],
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            cwd=str(cwd),
            env=command_env(store, record, envs),
            start_new_session=True,
        )
    except OSError as exc:
        # The daemon answers a start failure with 200 and exit code -1.
        return json_response({"exitCode": -1, "result": f"failed to start command: {exc}"})
    try:
        output, _ = await asyncio.wait_for(
            process.communicate(), timeout=timeout if timeout and timeout > 0 else None
        )
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise ApiError(
            408, "command execution timeout", code="REQUEST_TIMEOUT", source=SOURCE_DAEMON
        ) from None
    code = process.returncode
    if code is None or code < 0:  # killed by a signal: the daemon reports -1
        code = -1
    return json_response({"exitCode": code, "result": output.decode("utf-8", errors="replace")})


# -- files -------------------------------------------------------------------------------------


def create_folder(store: Store, record: SandboxRecord, query: Any) -> web.Response:
    path = resolve_path(store, record, query.get("path"))
    mode_text = query.get("mode") or "755"
    try:
        mode = int(mode_text, 8)
    except ValueError:
        raise ApiError(400, f"invalid mode {mode_text}", source=SOURCE_DAEMON) from None
    try:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
    except OSError as exc:
        raise ApiError(400, f"cannot create folder: {exc.strerror}", source=SOURCE_DAEMON) from None
    return web.Response(status=201)


def delete_file(store: Store, record: SandboxRecord, query: Any) -> web.Response:
    raw = query.get("path")
    path = resolve_path(store, record, raw, follow_last=False)
    recursive = (query.get("recursive") or "false").lower() == "true"
    if not path.exists() and not path.is_symlink():
        raise _not_found(raw)
    try:
        if path.is_dir() and not path.is_symlink():
            if not recursive:
                raise ApiError(400, f"{raw} is a directory: set recursive to delete it", source=SOURCE_DAEMON)
            shutil.rmtree(path)
        else:
            path.unlink()
    except PermissionError:
        raise ApiError(
            403, f"permission denied: {raw}", code="FILE_ACCESS_DENIED", source=SOURCE_DAEMON
        ) from None
    return web.Response(status=204)


async def bulk_upload(store: Store, record: SandboxRecord, request: web.Request) -> web.Response:
    """Multipart ``files[i].path`` + ``files[i].file`` pairs; chunked bodies work as well."""
    try:
        reader = await request.multipart()
    except (AssertionError, ValueError, KeyError) as exc:
        raise ApiError(400, f"expected multipart/form-data: {exc}", source=SOURCE_DAEMON) from None
    paths: dict[str, str] = {}
    written: list[dict[str, Any]] = []
    while True:
        part = await reader.next()
        if part is None:
            break
        if not isinstance(part, BodyPartReader):
            continue
        name = part.name or ""
        if name.endswith(".path") and part.filename is None:
            paths[name[: -len(".path")]] = (await part.read()).decode("utf-8")
            continue
        key = name[: -len(".file")] if name.endswith(".file") else name
        destination = paths.get(key) or part.filename
        if not destination:
            raise ApiError(400, f"no destination path for part {name}", source=SOURCE_DAEMON)
        target = resolve_path(store, record, destination)
        size = 0
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as handle:
                while chunk := await part.read_chunk(CHUNK):
                    handle.write(chunk)
                    size += len(chunk)
        except OSError as exc:
            raise ApiError(400, f"cannot write {destination}: {exc.strerror}", source=SOURCE_DAEMON) from None
        written.append({"path": destination, "size": size})
    return json_response({"files": written})


def _disposition(name: str, filename: str) -> str:
    plain = filename.encode("ascii", errors="replace").decode().replace("\\", "\\\\").replace('"', '\\"')
    encoded = urllib.parse.quote(filename, safe="")
    return f'form-data; name="{name}"; filename="{plain}"; filename*=utf-8\'\'{encoded}'


async def bulk_download(store: Store, record: SandboxRecord, request: web.Request) -> web.StreamResponse:
    """One multipart part per requested path, named by the exact path string; errors as parts."""
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "body must be JSON {paths: [...]}", source=SOURCE_DAEMON) from None
    paths = body.get("paths") if isinstance(body, dict) else None
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ApiError(400, "paths must be a list of strings", source=SOURCE_DAEMON)
    boundary = uuid.uuid4().hex
    response = web.StreamResponse(
        status=200, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    await response.prepare(request)
    for raw in paths:
        error: ApiError | None = None
        handle = None
        try:
            target = resolve_path(store, record, raw)
            if target.is_dir():
                error = ApiError(400, f"{raw} is a directory", code="INVALID_FILE_PATH", source=SOURCE_DAEMON)
            else:
                handle = target.open("rb")
        except ApiError as exc:
            error = exc
        except FileNotFoundError:
            error = _not_found(raw)
        except PermissionError:
            error = ApiError(
                403, f"permission denied: {raw}", code="FILE_ACCESS_DENIED", source=SOURCE_DAEMON
            )
        except OSError as exc:
            error = ApiError(
                500, f"cannot read {raw}: {exc.strerror}", code="FILE_READ_FAILED", source=SOURCE_DAEMON
            )
        if handle is None:
            assert error is not None
            payload = envelope(error.status, error.message, raw, error.code, error.source)
            head = (
                f"--{boundary}\r\nContent-Disposition: {_disposition('error', raw)}\r\n"
                "Content-Type: application/json\r\n\r\n"
            )
            await response.write(head.encode() + json.dumps(payload).encode() + b"\r\n")
            continue
        with handle:
            head = (
                f"--{boundary}\r\nContent-Disposition: {_disposition('file', raw)}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n"
            )
            await response.write(head.encode())
            while chunk := handle.read(CHUNK):
                await response.write(chunk)
            await response.write(b"\r\n")
    await response.write(f"--{boundary}--\r\n".encode())
    await response.write_eof()
    return response
