"""What every command shares for output: the consoles, formats, exit codes and error handling.

Every user-facing error is one line (two at most) on stderr that says what to do, and exits with a
code of :mod:`controller.exitcodes`. :func:`handled` turns the expected errors into such a line;
:func:`run_guarded` (around the whole app, in ``main``) does the same for anything unexpected.
``--debug`` or ``LEASECTL_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NoReturn, cast

import typer

from controller import exitcodes
from controller.errors import (
    AUTH_HINT,
    AuthError,
    ConfigError,
    LeasectlError,
    NotLeaderError,
    ProviderError,
    SchemaError,
    SpecError,
)

if TYPE_CHECKING:
    from rich.console import Console


class _LazyConsole:
    """A rich ``Console`` made on first use: importing rich costs start-up time that ``--help`` and
    commands printing plain lines never need."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    def __getattr__(self, name: str) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return getattr(self._console, name)


def escape(text: str) -> str:
    """rich's markup escape (imported when an error is printed)."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


# Tables are never squeezed to the terminal's width (rich would cut the NAME column first): one
# row per line, as kubectl prints them, which also keeps them greppable when piped.
out = cast("Console", _LazyConsole(soft_wrap=True, width=10_000))
err = cast("Console", _LazyConsole(stderr=True, soft_wrap=True))

EXIT_INVALID = exitcodes.INVALID
DEBUG_ENV_VAR = "LEASECTL_DEBUG"
DEBUG_HINT = "(--debug or LEASECTL_DEBUG=1 shows the traceback)"


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


class _State:
    """Per-process CLI state the error paths need: whether to debug, and how to name the database."""

    debug: bool = False
    describe_database: Callable[[], str] | None = None


state = _State()


class UnusableDatabaseError(LeasectlError):
    """The configured database cannot be used as it is; ``code`` is the exit code to leave with."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def debug_enabled() -> bool:
    return state.debug or os.environ.get(DEBUG_ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")


def fail(message: str, code: int = exitcodes.FAILURE) -> NoReturn:
    """Print ``error: message`` on stderr (the traceback first under --debug) and exit ``code``."""
    if debug_enabled() and sys.exc_info()[0] is not None:
        traceback.print_exc(file=sys.stderr)
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    raise typer.Exit(code)


def _database() -> str:
    describe = state.describe_database
    return describe() if describe is not None else "the database"


def first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


@contextmanager
def handled() -> Iterator[None]:
    """Turn expected errors into one clear line and an exit code instead of a traceback."""
    try:
        yield
    except UnusableDatabaseError as exc:
        fail(str(exc), exc.code)
    except SchemaError as exc:
        fail(str(exc), exitcodes.NO_DATABASE)
    except NotLeaderError as exc:
        fail(
            f"{exc}: stop that daemon first, or run `leasectl plan` to see what a pass would do",
            exitcodes.NOT_LEADER,
        )
    except (SpecError, ConfigError) as exc:
        fail(str(exc), EXIT_INVALID)
    except AuthError as exc:
        fail(f"{exc}: the Daytona API refused the credentials; {AUTH_HINT}", exitcodes.FAILURE)
    except ProviderError as exc:
        fail(f"{exc}", exitcodes.FAILURE)
    except LeasectlError as exc:
        fail(str(exc))
    except Exception as exc:
        _database_error(exc)
        raise


def _database_error(exc: Exception) -> None:
    """Fail with one line for a database error (SQLAlchemy's, or the driver's when ``get`` read
    through it: controller/dbapi.py); return for anything else. Only modules already imported are
    consulted: a command that never imported one cannot have raised its errors."""
    sa_exc = sys.modules.get("sqlalchemy.exc")
    if sa_exc is not None:
        if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError)):
            fail(f"the database refused the change: {first_line(exc.orig)}", EXIT_INVALID)
        if isinstance(exc, (sa_exc.OperationalError, sa_exc.ProgrammingError)):
            _database_failure(first_line(exc.orig))
    drivers = [sys.modules.get("sqlite3"), sys.modules.get("psycopg")]
    if any(driver is not None and isinstance(exc, driver.Error) for driver in drivers):
        _database_failure(first_line(exc))


def _database_failure(detail: str) -> NoReturn:
    lowered = detail.lower()
    if "no such table" in lowered or ("relation" in lowered and "does not exist" in lowered):
        fail(
            f"{_database()} has no leasectl schema ({detail}): run `leasectl db upgrade`",
            exitcodes.NO_DATABASE,
        )
    if "database" in lowered and "does not exist" in lowered:
        fail(f"{_database()}: {detail}; create it, then run `leasectl db upgrade`", exitcodes.NO_DATABASE)
    fail(f"cannot use {_database()}: {detail}")


def run_guarded(run: Callable[[], Any]) -> None:
    """Run the app; an unexpected exception becomes one line (and exit 1), Ctrl-C exit 130."""
    try:
        run()
    except KeyboardInterrupt:
        if debug_enabled():
            traceback.print_exc(file=sys.stderr)
        err.print("interrupted", highlight=False)
        sys.exit(exitcodes.INTERRUPTED)
    except Exception as exc:
        if debug_enabled():
            traceback.print_exc(file=sys.stderr)
        detail = first_line(exc) or type(exc).__name__
        err.print(
            f"[bold red]error:[/] {escape(type(exc).__name__)}: {escape(detail)}",
            highlight=False,
            markup=True,
        )
        if not debug_enabled():
            err.print(f"this is unexpected; please report it {DEBUG_HINT}", highlight=False)
        sys.exit(exitcodes.FAILURE)


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def yaml_dump(data: Any) -> str:
    """YAML of ``data`` in the order given (PyYAML is imported when a command prints YAML)."""
    import yaml

    return str(yaml.safe_dump(data, sort_keys=False))


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
