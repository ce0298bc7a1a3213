"""The ``leasectl`` command line (typer). Parses settings once and passes them down.

One module per command group over one shared output helper:

* :mod:`~controller.cli.base` - the typer app, global options, the settings context;
* :mod:`~controller.cli.output` - consoles, output formats, errors and exit codes;
* :mod:`~controller.cli.db`, :mod:`~controller.cli.leases`, :mod:`~controller.cli.control`,
  :mod:`~controller.cli.executions`, :mod:`~controller.cli.gc` - the commands.

Exit codes: 0 success; 1 runtime failure; 2 invalid input (bad config, lease file, arguments, or a
lease that cannot take the request). Commands that report differences (``plan``) document their own.
"""

from __future__ import annotations

from collections.abc import Sequence

from controller.cli.base import app

# Importing a command module registers its commands on the app; `--help` lists them in this order.
from controller.cli import db, leases, control, executions, gc  # noqa: F401  # isort: skip

__all__ = ["app", "main"]


def main(argv: Sequence[str] | None = None) -> None:
    app(args=list(argv) if argv is not None else None, prog_name="leasectl")


if __name__ == "__main__":
    main()
