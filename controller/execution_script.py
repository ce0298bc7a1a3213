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
    return " ".join(quote(word) for word in argv)


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
) -> str:
    """The POSIX sh script that runs the shell command line ``command`` in a login shell.

    ``command`` is run as written (``--shell``); for a program and arguments pass
    :func:`quote_argv`. ``cwd`` wins over ``workspace``; empty or ``None`` means not given. A relative
    directory is taken from where the shell is after the profiles (normally the user's home).
    ``stdin_path`` is a file in the sandbox read as the command's stdin (else ``/dev/null``).
    Raises :class:`ScriptInputError` for an invalid env, a NUL byte anywhere, or an empty command.
    """
    _check_text("the command", command)
    if not command.strip():
        raise ScriptInputError("the command is empty")
    variables = validate_env(env)
    directory = cwd or workspace
    lines = [
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
        lines.append(
            f"if [ ! -r {quote(stdin)} ] || [ -d {quote(stdin)} ]; then "
            f"{_fail('cannot read the stdin file ' + stdin)}; fi"
        )
    lines.append("(")
    if directory:
        _check_text("the working directory", directory)
        target = directory if directory.startswith("/") else "./" + directory
        lines.append(f"  cd -- {quote(target)} || {{ {_fail('cannot change directory to ' + directory)}; }}")
    for key, value in NONINTERACTIVE_DEFAULTS.items():
        if key not in variables:
            lines.append(f'  if [ -z "${{{key}+set}}" ]; then export {key}={quote(value)}; fi')
    lines.extend(f"  export {key}={quote(value)}" for key, value in variables.items())
    lines.append(command)
    lines.append(f") <{quote(stdin)}")
    return "\n".join(lines) + "\n"


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
