"""The schema guard's knowledge: which revisions this leasectl's migrations hold, and what is wrong
with a database at some revision, without importing SQLAlchemy or Alembic.

Every writing command refuses a schema older or newer than this build knows (:class:`SchemaState`
says why and names the command to run). The revisions are read from the ``revision`` /
``down_revision`` lines of migrations/versions; anything but a plain chain is read by Alembic
instead. :mod:`controller.db` reads the database's revision through SQLAlchemy; ``leasectl exec``
reads it through the driver (:mod:`controller.exec_rows`), so the guard stays on a path that
imports neither.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from controller import resources

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory


def alembic_config(url: str | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(resources.migrations_dir()))
    if url is not None:
        cfg.attributes["database_url"] = url
    return cfg


@functools.cache
def alembic_script() -> ScriptDirectory:
    """The migrations this leasectl ships, as Alembic reads them (read once per process)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


_REVISION_LINE = re.compile(
    r"^(?P<key>revision|down_revision)\s*(?::[^=]*)?=\s*(?:(?P<none>None)|[\"'](?P<id>[^\"']+)[\"'])\s*$",
    re.M,
)


@functools.cache
def revision_chain() -> tuple[str, ...]:
    """Every revision of migrations/versions, oldest first, read from the files' ``revision`` and
    ``down_revision`` lines without importing Alembic. A layout this does not understand (a file
    without both lines, a merge, a branch) is read by Alembic instead."""
    down_of: dict[str, str | None] = {}
    for path in sorted((resources.migrations_dir() / "versions").glob("*.py")):
        found = {m["key"]: m["id"] for m in _REVISION_LINE.finditer(path.read_text(encoding="utf-8"))}
        if "revision" not in found or "down_revision" not in found or found["revision"] is None:
            return alembic_chain()
        down_of[found["revision"]] = found["down_revision"]
    children = {down for down in down_of.values() if down is not None}
    heads = [rev for rev in down_of if rev not in children]
    if len(heads) != 1 or len(children) != len(down_of) - 1:
        return alembic_chain()
    chain: list[str] = []
    current: str | None = heads[0]
    while current is not None:
        if current not in down_of or current in chain:
            return alembic_chain()
        chain.append(current)
        current = down_of[current]
    if len(chain) != len(down_of):
        return alembic_chain()
    return tuple(reversed(chain))


def alembic_chain() -> tuple[str, ...]:
    return tuple(rev.revision for rev in reversed(list(alembic_script().walk_revisions())))


def head_revision() -> str | None:
    chain = revision_chain()
    return chain[-1] if chain else None


def known_revisions() -> list[str]:
    """Every revision this leasectl's migrations hold, oldest first."""
    return list(revision_chain())


@dataclass(frozen=True)
class SchemaState:
    """The database's schema revision against the ones this leasectl knows."""

    current: str | None
    head: str | None
    known: bool

    @classmethod
    def of(cls, current: str | None) -> SchemaState:
        """The state of a database at revision ``current`` (None: no ``alembic_version`` row)."""
        return cls(current=current, head=head_revision(), known=current in known_revisions())

    @property
    def ok(self) -> bool:
        return self.current == self.head

    @property
    def newer(self) -> bool:
        """The database was migrated by a newer leasectl (a revision this one does not have)."""
        return self.current is not None and not self.known

    def problem(self) -> str | None:
        """What is wrong and the command that fixes it; None when the schema is current."""
        if self.ok:
            return None
        if self.current is None:
            return "the database has no leasectl schema yet: run `leasectl db upgrade`"
        if self.newer:
            from controller import __version__

            return (
                f"the database schema (revision {self.current}) is newer than leasectl {__version__} "
                f"knows (newest: {self.head}): upgrade leasectl"
            )
        return (
            f"the database schema (revision {self.current}) is older than this leasectl's "
            f"({self.head}): run `leasectl db upgrade`"
        )
