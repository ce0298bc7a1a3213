"""The import rules of DESIGN.md, checked on the source: only providers/daytona.py imports the Daytona
SDK, ``models`` never imports ``controller``, and the local Daytona API imports nothing else of the
project (it is a separate server the controller never needs)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SDK_MODULES = ("daytona", "daytona_api_client", "daytona_toolbox_api_client")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def sources(*parts: str) -> list[Path]:
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


def test_only_the_daytona_provider_imports_the_sdk() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in sources("controller")
        if "emulator" not in path.parts
        and path.name != "daytona.py"
        and any(name.split(".")[0] in SDK_MODULES for name in imports(path))
    ]
    assert offenders == []
    assert any(n.startswith("daytona") for n in imports(ROOT / "controller/providers/daytona.py"))


def test_models_never_import_the_controller() -> None:
    offenders = [
        str(path.relative_to(ROOT))
        for path in sources("models")
        if any(name.split(".")[0] == "controller" for name in imports(path))
    ]
    assert offenders == []


def test_the_local_api_imports_nothing_else_of_the_project() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            name
            for name in imports(path)
            if name.split(".")[0] in ("controller", "models", "tests")
            and not name.startswith("controller.emulator")
        )
        for path in sources("controller", "emulator")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
