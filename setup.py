"""Build hook: copy the run-time files that live at the top level of the checkout into the package.

Everything else about the distribution is in pyproject.toml. ``migrations/`` (with ``env.py``,
``script.py.mako`` and ``versions/``), ``alembic.ini`` and ``config.example.yaml`` stay at the top
level where developers edit them; a built wheel carries copies in ``controller/_bundled/`` with the
same relative layout, found at run time by ``controller/resources.py``. Editable installs skip the
copy: the package then finds the checkout's files directly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

BUNDLED = ("migrations", "alembic.ini", "config.example.yaml")
BUNDLE_DIR = Path("controller") / "_bundled"


class BuildPyWithBundle(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        here = Path(__file__).resolve().parent
        target = Path(self.build_lib) / BUNDLE_DIR
        if target.exists():
            shutil.rmtree(target)  # never ship a file removed from the source since the last build
        target.mkdir(parents=True)
        for name in BUNDLED:
            source = here / name
            if source.is_dir():
                skip = shutil.ignore_patterns("__pycache__", "*.py[co]")
                shutil.copytree(source, target / name, ignore=skip)
            else:
                shutil.copy2(source, target / name)


setup(cmdclass={"build_py": BuildPyWithBundle})
