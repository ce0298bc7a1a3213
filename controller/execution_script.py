"""The shell script that runs one command in a sandbox the way an interactive login shell would.

Pure text building, no I/O. :mod:`controller.execution` (``leasectl exec``, the queue dispatcher)
calls :func:`validate_env` early, :func:`quote_argv` for ``-- PROG ARGS`` (``--shell`` passes its line
as written), :func:`build_script` and finally :func:`wrap_for_exec`, whose result is the single command
line handed to the sandbox's process-execute API.

What the script does, in order:

1. sources ``/etc/profile``, ``~/.profile``, ``~/.bash_profile`` (else ``~/.bashrc``) and ``~/.zprofile``,
   each only if it is a file, in a ``{ ... }`` group (the current shell) with stdin from ``/dev/null``
   and stdout/stderr discarded: profile noise, ``set -x`` traces included, never reaches the
   command's output, and profile errors are ignored (``command .`` keeps a syntax error or a bad
   special built-in from ending a POSIX sh; ``|| :`` keeps bash's ``set -e`` from acting while a
   profile runs; ``set +eu`` after each keeps one profile's ``set -u`` from ending the script on an
   unset variable in the next). A profile that calls ``exit`` still ends the script, as it would end
   a login shell, and so does, under dash only, a profile that sets ``-e`` and then fails. Functions
   and PATH entries the profiles define stay visible to the command;
2. undoes what a profile may have switched on that would change the command's output or exit code:
   ``set -e/-u/-x/-v/-a/-C/-f``, ``pipefail``, aliases (non-interactive shells do not expand them in
   bash; dash would, and ``alias rm='rm -i'`` must not turn a command into a prompt) and EXIT/signal
   traps;
3. checks the stdin file (when given) and, in a subshell ``( ... )`` so that a top-level ``exit`` in the
   command ends only the subshell and its status comes back as is:
   ``cd`` to ``cwd`` (default: the lease workspace; neither: stay where the shell started), exports
   :data:`NONINTERACTIVE_DEFAULTS` that the environment does not already set, exports the caller's
   variables (after the profiles, so no profile can override them; as ``export`` lines, not an
   ``env K=V`` prefix, so they reach every program of a line with ``;``, pipes or ``&&``), then the
   command, with stdin from the file or from ``/dev/null`` (so nothing waits for input).

The command is kept in a shell variable and run with ``eval`` in the same shell (so functions the
profiles define are visible to it): bash then reports errors as an interactive shell does
(``bash: nosuchprog: command not found``) and dash with the command's own line numbers, never the
wrapper script's.

Cancellation: with a ``marker``, the script exports :data:`MARKER_VAR` ``=marker`` before anything
else; every process the command starts inherits it (unless it clears its environment).
:func:`stop_script` is the line that, run through the same toolbox, sends those processes SIGTERM
and, after :data:`STOP_GRACE_SECONDS`, SIGKILL (found through ``/proc/*/environ``, so a process that
left the command's process group is found too).

Exit status: the command's own, unchanged. Before the command runs, the script itself fails with
:data:`EXIT_SETUP_FAILED` (125, like ``env``/``timeout``/``docker run`` when the tool itself fails) and a
``leasectl: ...`` line on stderr when the cwd cannot be entered or the stdin file cannot be read.

The script is POSIX sh; :func:`wrap_for_exec` runs it with bash when the sandbox has one, else sh.
Both the script and the wrapped line contain the env values: never log them.

Known limits: a ``~/.bashrc`` that returns early for non-interactive shells (Debian's
``case $- in *i*)`` guard) stops there, exactly as under ``bash -lc``; ``~/.zprofile`` is zsh syntax
and is sourced by bash/sh only as far as it parses (errors ignored, as the design asks).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType

from controller.errors import SpecError

ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
"""Valid env names. Use ``fullmatch``: ``$`` alone also matches before a trailing newline."""

EXIT_SETUP_FAILED = 125
"""The script's status when it cannot start the command (cwd or stdin file unusable)."""

MARKER_VAR = "LEASECTL_EXEC_MARKER"
"""The variable that tags every process of one command, for :func:`stop_script`."""

MARKER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")

STOP_GRACE_SECONDS = 2
"""How long :func:`stop_script` waits after SIGTERM before SIGKILL."""

COMMAND_VAR = "leasectl_command"

MAX_COMMAND_BYTES = 131071
"""Longest command line a Linux shell can receive as one ``-c`` argument (MAX_ARG_STRLEN - 1)."""

NONINTERACTIVE_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
        "GIT_MERGE_AUTOEDIT": "no",
        "GIT_PAGER": "cat",
        "PAGER": "cat",
        "DEBIAN_FRONTEND": "noninteractive",
        "PIP_NO_INPUT": "1",
    }
)
"""Exported unless the sandbox environment, its profiles, or the caller already set the name."""

SHELL_OWNED_NAMES = frozenset(
    {
        # readonly in bash: assigning them fails
        "BASHOPTS",
        "BASH_VERSINFO",
        "EUID",
        "PPID",
        "SHELLOPTS",
        "UID",
        # maintained by the shell: the program would see the shell's value, not the caller's
        "_",
        "BASHPID",
        "BASH_ALIASES",
        "BASH_ARGC",
        "BASH_ARGV",
        "BASH_ARGV0",
        "BASH_CMDS",
        "BASH_COMMAND",
        "BASH_LINENO",
        "BASH_SOURCE",
        "BASH_SUBSHELL",
        "DIRSTACK",
        "EPOCHREALTIME",
        "EPOCHSECONDS",
        "FUNCNAME",
        "GROUPS",
        "HISTCMD",
        "LINENO",
        "OPTIND",
        "PIPESTATUS",
        "RANDOM",
        "SECONDS",
        "SHLVL",
        "SRANDOM",
    }
)
"""Names that match :data:`ENV_KEY_RE` but that bash or sh will not pass on as given."""


class ScriptInputError(SpecError, ValueError):
    """A command, argument, path or env entry that cannot be put into the script as given.

    A :class:`~controller.errors.SpecError` (the request is invalid) and a ``ValueError`` (callers
    that validate plain values catch that). Messages name env keys but never env values.
    """


def quote(word: str) -> str:
    """``word`` as one single-quoted shell word that arrives byte for byte (bash and POSIX sh)."""
    _check_text("an argument", word)
    return "'" + word.replace("'", "'\\''") + "'"


def quote_argv(argv: Sequence[str]) -> str:
    """The command line that runs ``argv[0]`` with ``argv[1:]``, every word quoted.

    Quoting every word (the program too) means a first word such as ``A=B``, ``if`` or ``%1`` is a
    program name, not an assignment, keyword or job; functions from the profiles are still found.
    """
    if isinstance(argv, str):
        raise ScriptInputError("argv must be a list of arguments, not one string")
    if not argv:
        raise ScriptInputError("no program to run: the argument list is empty")
    # Arguments made only of characters no shell treats specially stay bare (as shlex.quote does):
    # they read the same and, since the script is quoted once more when wrapped, take a sixth of
    # the room of a quoted word. The program name is always quoted (see above).
    return " ".join([quote(argv[0]), *(_bare_or_quoted(word) for word in argv[1:])])


_SAFE_WORD = re.compile(r"[A-Za-z0-9_@%+=:,./-]+")


def _bare_or_quoted(word: str) -> str:
    return word if _SAFE_WORD.fullmatch(word) else quote(word)


def validate_env(env: Mapping[str, str]) -> dict[str, str]:
    """The caller's variables as a plain dict, or :class:`ScriptInputError` naming the bad key.

    Keys must match :data:`ENV_KEY_RE` and not be one of :data:`SHELL_OWNED_NAMES`; values must be
    strings without NUL (which cannot cross ``exec``) and valid Unicode. Values never appear in
    messages.
    """
    if not isinstance(env, Mapping):
        raise ScriptInputError("env must be a mapping of names to strings")
    checked: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not ENV_KEY_RE.fullmatch(key):
            raise ScriptInputError(
                f"env key {_show(key)} is not a valid name: use letters, digits and _, not starting "
                "with a digit"
            )
        if key in SHELL_OWNED_NAMES:
            raise ScriptInputError(f"env key {key} is managed by the shell and cannot be passed to a command")
        if not isinstance(value, str):
            raise ScriptInputError(f"env {key}: the value must be a string")
        if "\x00" in value:
            raise ScriptInputError(f"env {key}: the value contains a NUL byte, which no program can receive")
        if not _is_utf8(value):
            raise ScriptInputError(f"env {key}: the value is not valid Unicode text")
        checked[key] = value
    return checked


def build_script(
    command: str,
    *,
    cwd: str | None = None,
    workspace: str | None = None,
    env: Mapping[str, str],
    stdin_path: str | None = None,
    marker: str | None = None,
) -> str:
    """The POSIX sh script that runs the shell command line ``command`` in a login shell.

    ``command`` is run as written (``--shell``); for a program and arguments pass
    :func:`quote_argv`. ``cwd`` wins over ``workspace``; empty or ``None`` means not given. A relative
    directory is taken from where the shell is after the profiles (normally the user's home).
    ``stdin_path`` is a file in the sandbox read as the command's stdin (else ``/dev/null``).
    ``marker`` (letters, digits, ``_.-``) tags the command's processes for :func:`stop_script`.
    Raises :class:`ScriptInputError` for an invalid env, a NUL byte anywhere, or an empty command.
    """
    _check_text("the command", command)
    if not command.strip():
        raise ScriptInputError("the command is empty")
    variables = validate_env(env)
    directory = cwd or workspace
    lines = [_assign(COMMAND_VAR, command)]
    if marker is not None:
        _check_marker(marker)
        lines.append(f"{MARKER_VAR}={marker}; export {MARKER_VAR}")
    lines += [
        "{",
        "  if [ -f /etc/profile ]; then command . /etc/profile || :; set +eu; fi",
        '  if [ -n "${HOME:-}" ]; then',
        '    if [ -f "$HOME/.profile" ]; then command . "$HOME/.profile" || :; set +eu; fi',
        '    if [ -f "$HOME/.bash_profile" ]; then command . "$HOME/.bash_profile" || :; set +eu;',
        '    elif [ -f "$HOME/.bashrc" ]; then command . "$HOME/.bashrc" || :; set +eu; fi',
        '    if [ -f "$HOME/.zprofile" ]; then command . "$HOME/.zprofile" || :; set +eu; fi',
        "  fi",
        "  set +aCefuvx",
        "  command set +o pipefail",
        "  unalias -a",
        "  trap - EXIT HUP INT QUIT TERM",
        "} </dev/null >/dev/null 2>&1",
    ]
    stdin = "/dev/null"
    if stdin_path:
        _check_text("the stdin path", stdin_path)
        stdin = stdin_path
        lines.append(_assign("leasectl_stdin", stdin))
        lines.append(
            'if [ ! -r "$leasectl_stdin" ] || [ -d "$leasectl_stdin" ]; then '
            f"{_fail('cannot read the stdin file ' + stdin)}; fi"
        )
    else:
        lines.append("leasectl_stdin=/dev/null")
    if directory:
        _check_text("the working directory", directory)
        lines.append(_assign("leasectl_cwd", directory if directory.startswith("/") else "./" + directory))
    lines.append("(")
    if directory:
        lines.append(f'  cd -- "$leasectl_cwd" || {{ {_fail("cannot change directory to " + directory)}; }}')
    for key, value in NONINTERACTIVE_DEFAULTS.items():
        if key not in variables:
            lines.append(f'  if [ -z "${{{key}+set}}" ]; then export {key}={quote(value)}; fi')
    lines.extend(f"  {_assign(key, value)}; export {key}" for key, value in variables.items())
    lines.append(f'  eval "${COMMAND_VAR}"')
    lines.append(') <"$leasectl_stdin"')
    return _one_line(lines) + "\n"


def _assign(name: str, value: str) -> str:
    """``name=value`` as a statement on one physical line, whatever ``value`` holds (newlines are
    decoded by ``printf %b``; the ``x`` keeps trailing newlines from command substitution)."""
    if "\n" not in value:
        return f"{name}={quote(value)}"
    encoded = value.replace("\\", "\\\\").replace("\n", "\\n")
    return f"{name}=$(printf '%bx' {quote(encoded)}); {name}=${{{name}%x}}"


def _one_line(lines: Sequence[str]) -> str:
    """Join script lines into one physical line, so that the ``eval`` of the command is on line 1
    and the shell numbers the command's lines as its own."""
    joined = ""
    for raw in lines:
        line = raw.strip()
        if not joined:
            joined = line
        elif joined.endswith(("{", "(", "then", "else", "do", ";", "&&", "||", "|")) or (
            line.startswith(("elif", "else", "fi")) and joined.endswith(";")
        ):
            joined += " " + line
        else:
            joined += "; " + line
    return joined


def stop_script(marker: str) -> str:
    """The POSIX sh command line that stops every process tagged with ``marker`` (see the module
    docstring): SIGTERM, up to :data:`STOP_GRACE_SECONDS` of grace, then SIGKILL. Exit 0 when none
    is left (or there was none), 1 when some could not be stopped. Contains no secret."""
    _check_marker(marker)
    tag = quote(f"{MARKER_VAR}={marker}")
    ticks = STOP_GRACE_SECONDS * 5
    return (
        "leasectl_found() { for d in /proc/[0-9]*; do p=${d#/proc/}; "
        '[ "$p" = "$$" ] && continue; '
        f'grep -qaF -- {tag} "$d/environ" 2>/dev/null && printf "%s " "$p"; done; }}; '
        'pids=$(leasectl_found); [ -z "$pids" ] && exit 0; '
        "kill -TERM $pids 2>/dev/null; i=0; "
        f"while [ $i -lt {ticks} ]; do "
        'pids=$(leasectl_found); [ -z "$pids" ] && exit 0; '
        "sleep 0.2 2>/dev/null || sleep 1; i=$((i+1)); done; "
        "kill -KILL $pids 2>/dev/null; sleep 0.2 2>/dev/null || sleep 1; "
        'pids=$(leasectl_found); [ -z "$pids" ]'
    )


def _check_marker(marker: str) -> None:
    if not isinstance(marker, str) or not MARKER_RE.fullmatch(marker):
        raise ScriptInputError("the execution marker must be 1-100 letters, digits, '_', '.' or '-'")


def wrap_for_exec(script: str) -> str:
    """The one POSIX sh command line that runs ``script`` with bash, or with sh when there is no bash.

    This is what goes to the sandbox's process-execute API, whose daemon hands it to a shell (as
    ``sh -c``/``bash -c`` or on stdin). ``$0`` of the script is ``bash`` or ``sh``. Raises
    :class:`ScriptInputError` when the line is longer than :data:`MAX_COMMAND_BYTES` (pass large data
    as stdin instead).
    """
    line = (
        "if command -v bash >/dev/null 2>&1; then leasectl_shell=bash; else leasectl_shell=sh; fi; "
        f'exec "$leasectl_shell" -c {quote(script)} "$leasectl_shell"'
    )
    size = len(line.encode("utf-8"))
    if size > MAX_COMMAND_BYTES:
        raise ScriptInputError(
            f"the command is too long: {size} bytes once wrapped, a sandbox shell takes at most "
            f"{MAX_COMMAND_BYTES}; pass large data as stdin"
        )
    return line


def _fail(message: str) -> str:
    message = message.replace("\n", "?")  # a message stays on the script's one line
    return f"printf '%s\\n' {quote('leasectl: ' + message)} >&2; exit {EXIT_SETUP_FAILED}"


def _check_text(what: str, text: str) -> None:
    if not isinstance(text, str):
        raise ScriptInputError(f"{what} must be a string")
    if "\x00" in text:
        raise ScriptInputError(f"{what} contains a NUL byte, which cannot be passed to a program")
    if not _is_utf8(text):
        raise ScriptInputError(f"{what} is not valid Unicode text (a lone surrogate)")


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _show(key: object) -> str:
    shown = repr(key)
    return shown if len(shown) <= 60 else shown[:57] + "..."
