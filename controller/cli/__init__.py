"""The ``leasectl`` command line (typer). Parses settings once and passes them down.

One module per command group over one shared output helper:

* :mod:`~controller.cli.base` - the typer app, global options, the settings context;
* :mod:`~controller.cli.output` - consoles, output formats, errors and exit codes;
* :mod:`~controller.cli.db`, :mod:`~controller.cli.leases`, :mod:`~controller.cli.control`,
  :mod:`~controller.cli.executions`, :mod:`~controller.cli.gc`, :mod:`~controller.cli.pools`,
  :mod:`~controller.cli.policy` - the commands.

Exit codes: every command exits with a code of :mod:`controller.exitcodes` (the README's table);
``exec`` also passes the remote command's own status through.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Sequence
from gc import freeze as freeze_objects  # `gc` is the command module below

import typer

from controller.cli.base import app
from controller.cli.output import run_guarded

# Importing a command module registers its commands on the app; `--help` lists them in this order.
from controller.cli import db, leases, pools, policy, control, executions, gc  # noqa: F401  # isort: skip

__all__ = ["app", "main"]

# The global options (controller.cli.base.main_options) that take a value; a unit test compares
# this with the options of the built command.
VALUE_OPTIONS = frozenset(
    {"--config", "-c", "--database-url", "--instance", "--api-url", "--log-level", "--log-format"}
)


def command_name(argv: Sequence[str]) -> str | None:
    """The command that ``argv`` runs (its first word after the global options), or None when it
    names none or asks for the top-level help, or when its global options are not plainly read."""
    args = iter(argv)
    for arg in args:
        if arg in ("--", "--help"):
            return None
        if arg.startswith("--"):
            if "=" not in arg and arg in VALUE_OPTIONS:
                next(args, None)
            continue
        if arg.startswith("-") and len(arg) > 1:
            if arg == "-c":
                next(args, None)
            elif not (arg.startswith("-c") or set(arg[1:]) == {"v"}):
                return None
            continue
        return arg
    return None


def app_for(argv: Sequence[str]) -> typer.Typer:
    """The app with only the command that ``argv`` runs: typer builds the click command of every
    registered command at each start (parameters read from type hints: about 20 ms for all of
    leasectl's, a few for one). No command, the top-level help, shell completion or a name that is
    not a command get the whole app, so help, completion and "no such command" are unchanged."""
    name = command_name(argv)
    if name is None or "_LEASECTL_COMPLETE" in os.environ:
        return app
    commands = [
        c
        for c in app.registered_commands
        if (c.name or typer.main.get_command_name(getattr(c.callback, "__name__", ""))) == name
    ]
    groups = [g for g in app.registered_groups if g.name == name]
    if len(commands) + len(groups) != 1:
        return app
    one = copy.copy(app)
    one.registered_commands, one.registered_groups = commands, groups
    return one


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: the app, with unexpected errors turned into one line (see output.py).

    The process ends when this returns (or raises SystemExit): the objects that exist then are
    frozen (``gc.freeze``), so the interpreter's collections at exit no longer walk them all to find
    cycles whose memory the OS takes back anyway (about 100,000 objects after ``exec``'s imports:
    0.1-0.2 s). Everything else about the exit stays: atexit handlers, flushing, objects freed by
    reference counting as modules are cleared (connections closed).
    """
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        run_guarded(lambda: app_for(args)(args=args, prog_name="leasectl"))
    finally:
        freeze_objects()


if __name__ == "__main__":
    main()
