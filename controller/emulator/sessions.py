"""The toolbox session API: sessions, asynchronous commands in them, their logs and exit codes.

Served under ``/toolbox/{sandboxId}/process/session``, with the shapes of Daytona's daemon
(``apps/daemon/pkg/toolbox/process/session`` at v0.190.0): create answers 201 with no body, execute
answers ``{cmdId}`` (202 with ``runAsync``; without it the command runs to its end and the answer
carries ``output`` and ``exitCode``), get session ``{sessionId, commands: [{id, command, exitCode}]}``,
get command ``{id, command, exitCode}`` (``exitCode`` absent while it runs), logs
``{output, stdout, stderr}`` (with ``follow=true`` over a WebSocket: binary frames of stdout
prefixed with ``\\x01\\x01\\x01``, closed with 1000 when the command ends), delete 204.

Every command is a real ``bash -c`` process in its own process group, its output (stdout and stderr
merged) written to a log file under the sandbox root, so the output survives a client that goes
away. Deleting a session kills the process groups of its commands; a command killed by a signal
reports ``128 + signal`` as a shell would. Session ids are per sandbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, web

from .errors import SOURCE_DAEMON, ApiError, json_response
from .state import SandboxRecord, Store
from .toolbox import command_env, home_of

STDOUT_PREFIX = b"\x01\x01\x01"
FOLLOW_POLL_SECONDS = 0.1


@dataclass
class Command:
    id: str
    command: str
    log_path: Path
    process: asyncio.subprocess.Process | None = None
    exit_code: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def dto(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "command": self.command}
        if self.exit_code is not None:
            body["exitCode"] = self.exit_code
        return body


@dataclass
class Session:
    id: str
    commands: dict[str, Command] = field(default_factory=dict)


class Sessions:
    """Every session of every sandbox: ``(sandbox id, session id) -> Session``."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._sessions: dict[tuple[str, str], Session] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _dir(self, record: SandboxRecord, session_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in session_id)
        return self.store.root_of(record) / ".daytona-sessions" / safe

    def _get(self, record: SandboxRecord, session_id: str) -> Session:
        session = self._sessions.get((record.id, session_id))
        if session is None:
            raise ApiError(404, f"session {session_id} not found", source=SOURCE_DAEMON)
        return session

    def _command(self, record: SandboxRecord, session_id: str, command_id: str) -> Command:
        command = self._get(record, session_id).commands.get(command_id)
        if command is None:
            raise ApiError(404, f"command {command_id} not found", source=SOURCE_DAEMON)
        return command

    def create(self, record: SandboxRecord, body: Any) -> web.Response:
        session_id = body.get("sessionId") if isinstance(body, dict) else None
        if not isinstance(session_id, str) or not session_id:
            raise ApiError(400, "sessionId is required", source=SOURCE_DAEMON)
        if (record.id, session_id) in self._sessions:
            raise ApiError(409, f"session {session_id} already exists", source=SOURCE_DAEMON)
        self._dir(record, session_id).mkdir(parents=True, exist_ok=True)
        self._sessions[(record.id, session_id)] = Session(session_id)
        return web.Response(status=201)

    def get(self, record: SandboxRecord, session_id: str) -> web.Response:
        session = self._get(record, session_id)
        return json_response(
            {"sessionId": session.id, "commands": [c.dto() for c in session.commands.values()]}
        )

    def get_command(self, record: SandboxRecord, session_id: str, command_id: str) -> web.Response:
        return json_response(self._command(record, session_id, command_id).dto())

    async def execute(self, record: SandboxRecord, session_id: str, body: Any) -> web.Response:
        session = self._get(record, session_id)
        if not isinstance(body, dict) or not isinstance(body.get("command"), str):
            raise ApiError(400, "invalid request body: command is required", source=SOURCE_DAEMON)
        if not body["command"].strip():
            raise ApiError(400, "command cannot be empty", source=SOURCE_DAEMON)
        run_async = bool(body.get("runAsync") or body.get("async"))
        command_id = str(uuid.uuid4())
        log_path = self._dir(record, session_id) / f"{command_id}.log"
        command = Command(command_id, body["command"], log_path)
        session.commands[command_id] = command
        with log_path.open("wb") as sink:
            try:
                command.process = await asyncio.create_subprocess_exec(
                    "bash",
                    "-c",
                    body["command"],
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=sink,
                    stderr=asyncio.subprocess.STDOUT,
                    cwd=str(home_of(self.store, record)),
                    env=command_env(self.store, record, {}),
                    start_new_session=True,
                )
            except OSError as exc:
                sink.write(f"failed to start command: {exc}\n".encode())
                command.exit_code = -1
                command.done.set()
        if command.process is not None:
            task = asyncio.create_task(self._reap(command))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if run_async:
            return json_response({"cmdId": command_id}, status=202)
        await command.done.wait()
        output = _read(log_path)
        return json_response(
            {
                "cmdId": command_id,
                "output": output,
                "stdout": output,
                "stderr": "",
                "exitCode": command.exit_code,
            }
        )

    async def _reap(self, command: Command) -> None:
        assert command.process is not None
        code = await command.process.wait()
        command.exit_code = 128 - code if code < 0 else code
        command.done.set()

    async def logs(
        self, record: SandboxRecord, session_id: str, command_id: str, request: web.Request
    ) -> web.StreamResponse:
        command = self._command(record, session_id, command_id)
        follow = request.query.get("follow") == "true"
        if not follow or request.headers.get("Upgrade", "").lower() != "websocket":
            output = _read(command.log_path)
            return json_response({"output": output, "stdout": output, "stderr": ""})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        offset = 0
        while True:
            finished = command.done.is_set()
            with contextlib.suppress(OSError), command.log_path.open("rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
                if chunk:
                    offset += len(chunk)
                    await ws.send_bytes(STDOUT_PREFIX + chunk)
            if finished:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(command.done.wait(), FOLLOW_POLL_SECONDS)
        await ws.close(code=WSCloseCode.OK)
        return ws

    def delete(self, record: SandboxRecord, session_id: str) -> web.Response:
        session = self._get(record, session_id)
        del self._sessions[(record.id, session_id)]
        for command in session.commands.values():
            if command.process is not None and command.exit_code is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(command.process.pid, signal.SIGKILL)
        return web.Response(status=204)

    def close(self) -> None:
        """Kill every command still running (the server is going away)."""
        for key in list(self._sessions):
            session = self._sessions.pop(key)
            for command in session.commands.values():
                if command.process is not None and command.exit_code is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(command.process.pid, signal.SIGKILL)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return ""
