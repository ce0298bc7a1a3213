"""What every command shares for output: the consoles, formats, exit codes and error handling."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from typing import Any, NoReturn

import sqlalchemy as sa
import typer
from rich.console import Console

from controller.errors import ConfigError, LeasectlError, SpecError

# row per line, as kubectl prints them, which also keeps them greppable when piped.
out = Console(soft_wrap=True, width=10_000)
err = Console(stderr=True, soft_wrap=True)

EXIT_INVALID = 2


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


@contextmanager
def handled() -> Iterator[None]:
    """Turn expected errors into a clear message and exit code instead of a traceback."""
    try:
        yield
    except (SpecError, ConfigError) as exc:
        fail(str(exc), EXIT_INVALID)
    except LeasectlError as exc:
        fail(str(exc))
    except sa.exc.IntegrityError as exc:
        fail(f"the database refused the change: {exc.orig}", EXIT_INVALID)
    except (sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
        detail = str(exc.orig)
        if "no such table" in detail or "does not exist" in detail:
            detail += " (is the schema there? run `leasectl db upgrade`)"
        fail(f"database error: {detail}")


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def write_raw(text: str) -> None:
    """Print command output as received: no markup, no added newline."""
    try:
        data = text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        data = text.encode("utf-8", errors="replace")
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        buffer.write(data)
        buffer.flush()
    else:
        sys.stdout.write(data.decode("utf-8", errors="replace"))
        sys.stdout.flush()
