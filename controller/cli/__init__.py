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

from collections.abc import Sequence

from controller.cli.base import app
from controller.cli.output import run_guarded

# Importing a command module registers its commands on the app; `--help` lists them in this order.
from controller.cli import db, leases, pools, policy, control, executions, gc  # noqa: F401  # isort: skip

__all__ = ["app", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    """The console script: the app, with unexpected errors turned into one line (see output.py)."""
    run_guarded(lambda: app(args=list(argv) if argv is not None else None, prog_name="leasectl"))


if __name__ == "__main__":
    main()
