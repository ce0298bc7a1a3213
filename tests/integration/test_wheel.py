"""The built distribution works as an installed tool, away from the source tree.

Builds the sdist and, from it, the wheel (``python -m build --no-isolation``), checks that they carry
every file a command needs at run time, installs the wheel into a fresh venv with pip and with pipx
(dependencies from the package index, through pip's cache), and runs an operator's first session
from an empty temporary directory: ``db upgrade`` on SQLite, ``apply``, ``local-daytona`` in the
background, ``reconcile --once`` until Ready, ``exec``, ``gc --dry-run``. ``controller`` must be
imported from the venv's site-packages, never from this checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

import controller
from controller import db as dbmod
from tests.conftest import IN_CI

pytestmark = pytest.mark.wheel

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ("migrations", "alembic.ini", "config.example.yaml")  # setup.py copies these
URL_LINE = re.compile(r"local-daytona listening on (http://\S+)")
LEASES = "leases:\n  - name: smoke\n    labels: {from: wheel}\n"


def _run(args: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=240, **kwargs)


def _ok(args: list[str | Path], **kwargs: Any) -> str:
    result = _run(args, **kwargs)
    assert result.returncode == 0, f"{args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _ok([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO_ROOT])
    return out


def _wheel(dist: Path) -> Path:
    (wheel,) = dist.glob(f"leasectl-{controller.__version__}-*.whl")
    return wheel


def _source_files(top: str) -> set[str]:
    root = REPO_ROOT / top
    if root.is_file():
        return {top}
    return {
        p.relative_to(REPO_ROOT).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    }


def test_wheel_and_sdist_carry_every_runtime_file(dist: Path) -> None:
    with zipfile.ZipFile(_wheel(dist)) as wheel:
        in_wheel = set(wheel.namelist())
    package_files = _source_files("controller") | _source_files("models")
    assert package_files - in_wheel == set(), "package files missing from the wheel"
    bundled = {f"controller/_bundled/{name}" for top in BUNDLED for name in _source_files(top)}
    assert bundled - in_wheel == set(), "migrations/config files missing from the wheel"
    assert not any(name.startswith(("tests/", "bench/", "migrations/")) for name in in_wheel)

    (sdist,) = dist.glob(f"leasectl-{controller.__version__}.tar.gz")
    prefix = f"leasectl-{controller.__version__}/"
    with tarfile.open(sdist) as tar:
        in_sdist = {name.removeprefix(prefix) for name in tar.getnames()}
    for top in (*BUNDLED, "controller", "models", "tests", "setup.py", "pyproject.toml", "README.md"):
        assert _source_files(top) - in_sdist == set(), f"{top} incomplete in the sdist"


def _install_with_pip(wheel: Path, where: Path) -> tuple[Path, Path]:
    venv = where / "venv"
    _ok([sys.executable, "-m", "venv", venv])
    _ok([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--no-compile", wheel])
    return venv / "bin" / "leasectl", venv / "bin" / "python"


def _install_with_pipx(wheel: Path, where: Path) -> tuple[Path, Path]:
    if importlib.util.find_spec("pipx") is None:
        if IN_CI:
            pytest.fail("CI=true and pipx is not installed (it is in the dev extras)")
        pytest.skip("pipx is not installed")
    env = {
        **_clean_env(Path.home()),  # the real HOME: pip's cache lives there
        "PIPX_HOME": str(where / "pipx"),
        "PIPX_BIN_DIR": str(where / "pipx-bin"),
        "PIPX_MAN_DIR": str(where / "pipx-man"),
    }
    _ok([sys.executable, "-m", "pipx", "install", "--python", sys.executable, wheel], env=env, cwd=where)
    return where / "pipx-bin" / "leasectl", where / "pipx" / "venvs" / "leasectl" / "bin" / "python"


def _clean_env(home: Path) -> dict[str, str]:
    """This process's environment without anything that could lead Python back to the checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LEASECTL_", "DAYTONA_", "PYTHON", "VIRTUAL_ENV"))
    }
    env["HOME"] = str(home)
    return env


@pytest.mark.parametrize("installer", ["pip", "pipx"])
def test_installed_wheel_runs_an_operator_session_from_an_empty_directory(
    dist: Path, tmp_path: Path, installer: str
) -> None:
    install = _install_with_pip if installer == "pip" else _install_with_pipx
    leasectl, python = install(_wheel(dist), tmp_path)
    work = tmp_path / "work"  # holds no source: only what this session writes
    work.mkdir()
    env = {
        **_clean_env(tmp_path),
        "LEASECTL_DATABASE_URL": f"sqlite:///{work / 'leasectl.db'}",
        "DAYTONA_API_KEY": "wheel-smoke-key",
    }

    def cli(*args: str | Path) -> str:
        return _ok([leasectl, *args], cwd=work, env=env)

    probe = _ok(
        [
            python,
            "-c",
            "import controller, importlib.metadata as m, sysconfig; "
            "print(controller.__file__); print(m.version('leasectl')); print(sysconfig.get_path('purelib'))",
        ],
        cwd=work,
        env=env,
    ).split("\n")
    imported_from, installed_version, site_packages = Path(probe[0]), probe[1], Path(probe[2])
    assert imported_from.is_relative_to(site_packages), probe
    assert not imported_from.is_relative_to(REPO_ROOT), probe
    assert installed_version == controller.__version__

    assert cli("--version").strip() == f"leasectl {controller.__version__}"
    assert cli("config", "example") == (REPO_ROOT / "config.example.yaml").read_text(encoding="utf-8")
    assert f"at revision {dbmod.head_revision()}" in cli("db", "upgrade")
    (work / "leases.yaml").write_text(LEASES)
    assert "lease/smoke created" in cli("apply", "-f", "leases.yaml")

    log = (work / "local-daytona.log").open("w")
    api = subprocess.Popen(
        [str(leasectl), "local-daytona", "--port", "0", "--state-dir", str(work / "daytona")],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        match = None
        while match is None and time.monotonic() < deadline and api.poll() is None:
            time.sleep(0.2)
            match = URL_LINE.search((work / "local-daytona.log").read_text())
        assert match, f"local-daytona did not start: {(work / 'local-daytona.log').read_text()}"
        env["DAYTONA_API_URL"] = match.group(1)

        phase = None
        deadline = time.monotonic() + 90
        while phase != "Ready" and time.monotonic() < deadline:
            _run([leasectl, "reconcile", "--once"], cwd=work, env=env)
            (row,) = json.loads(cli("get", "smoke", "-o", "json"))
            phase = row["phase"]
            time.sleep(0.5 if phase != "Ready" else 0)
        assert phase == "Ready", row

        assert cli("exec", "smoke", "--", "echo", "from the wheel").strip() == "from the wheel"
        assert "dry run: nothing changed" in cli("gc", "--dry-run")
        # The status page renders from the installed templates and serves its installed assets.
        page = _ok(
            [
                python,
                "-c",
                "from controller import db; from controller.config import load_settings; "
                "from controller.web.page import StatusPage; "
                "s = load_settings(); p = StatusPage(db.connect(s.database_url), s); "
                "r = p.handle('/', {}); print(r.status, b'data-lease=\"smoke\"' in r.body); "
                "a = p.handle(p.static_url('style.css'), {}); print(a.status, len(a.body) > 1000)",
            ],
            cwd=work,
            env=env,
        )
        assert page.split() == ["200", "True", "200", "True"], page
    finally:
        api.terminate()
        try:
            api.wait(timeout=15)
        except subprocess.TimeoutExpired:
            api.kill()
            api.wait()
        log.close()
