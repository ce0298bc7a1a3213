"""controller.resources: the bundled copy wins, the checkout is the fallback, a broken install says so;
`leasectl config example` and `--version` read the one source of each."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

import controller
from controller import resources
from controller.cli import app
from controller.errors import MissingResourceError

REPO_ROOT = Path(__file__).resolve().parents[2]


def _fake_root(root: Path, example: str) -> None:
    (root / "migrations").mkdir(parents=True)
    (root / "migrations" / "env.py").write_text("# env\n")
    (root / "alembic.ini").write_text("[alembic]\n")
    (root / "config.example.yaml").write_text(example)


def test_checkout_files_are_used_without_a_bundle() -> None:
    assert resources.resource_root() == REPO_ROOT
    assert resources.migrations_dir() == REPO_ROOT / "migrations"
    assert resources.alembic_ini() == REPO_ROOT / "alembic.ini"
    assert resources.example_config() == (REPO_ROOT / "config.example.yaml").read_text(encoding="utf-8")


def test_the_bundle_of_a_wheel_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site-packages" / "controller"
    _fake_root(package / resources.BUNDLE_DIRNAME, "bundled: true\n")
    _fake_root(package.parent, "stray: true\n")  # a `migrations/` some other install left beside us
    monkeypatch.setattr(resources, "_PACKAGE_DIR", package)
    assert resources.migrations_dir() == package / "_bundled" / "migrations"
    assert resources.example_config() == "bundled: true\n"


def test_a_broken_install_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resources, "_PACKAGE_DIR", tmp_path / "site-packages" / "controller")
    with pytest.raises(MissingResourceError, match="reinstall leasectl"):
        resources.migrations_dir()


def test_config_example_prints_the_example_file() -> None:
    result = CliRunner().invoke(app, ["config", "example"])
    assert result.exit_code == 0, result.output
    assert result.stdout == (REPO_ROOT / "config.example.yaml").read_text(encoding="utf-8")


def test_version_has_one_source() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"leasectl {controller.__version__}"
    assert importlib.metadata.version("leasectl") == controller.__version__
    assert 'version = { attr = "controller.__version__" }' in (REPO_ROOT / "pyproject.toml").read_text()
