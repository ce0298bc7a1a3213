"""Where the files that commands need at run time live: the Alembic migrations and their
``alembic.ini``, and ``config.example.yaml``.

In a checkout they sit at the repository's top level (``migrations/``, ``alembic.ini``,
``config.example.yaml``), which is where developers edit them. A built wheel carries copies in
``controller/_bundled/`` (put there at build time by ``setup.py``; see docs/architecture.md,
"Packaging"), with the same relative layout, so ``alembic.ini``'s ``%(here)s/migrations`` is right in
both. The bundled copy wins when present; otherwise the checkout's files are used (editable
installs and tests run from the source tree). Callers: ``controller.db`` and the CLI.
"""

from __future__ import annotations

from pathlib import Path

from controller.errors import MissingResourceError

BUNDLE_DIRNAME = "_bundled"
_PACKAGE_DIR = Path(__file__).resolve().parent


def resource_root() -> Path:
    """The directory holding ``migrations/``, ``alembic.ini`` and ``config.example.yaml``."""
    for candidate in (_PACKAGE_DIR / BUNDLE_DIRNAME, _PACKAGE_DIR.parent):
        if (candidate / "migrations" / "env.py").is_file() and (candidate / "alembic.ini").is_file():
            return candidate
    raise MissingResourceError(
        f"the Alembic migrations are missing: looked in {_PACKAGE_DIR / BUNDLE_DIRNAME} and "
        f"{_PACKAGE_DIR.parent}; reinstall leasectl"
    )


def migrations_dir() -> Path:
    return resource_root() / "migrations"


def alembic_ini() -> Path:
    return resource_root() / "alembic.ini"


def example_config() -> str:
    """The text of config.example.yaml: every setting, commented, with its default."""
    path = resource_root() / "config.example.yaml"
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MissingResourceError(f"{path}: {exc.strerror or exc}; reinstall leasectl") from exc
