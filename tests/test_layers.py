"""The layer contract (``[tool.importlinter]`` in pyproject.toml, drawn in docs/architecture.md): no module imports
from a floor above its own, so a new upward import fails here with import-linter's report of the offending lines.

Offline and quick (a second or two): import-linter reads the source files; nothing is imported or downloaded.
"""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: import-linter depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("masksearch_rl", "envs", "reward")

_LINT = (
    "import sys\n"
    "from importlinter.cli import lint_imports\n"
    "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))\n"
)


def _lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the packages under ``root`` (its cwd, which import-linter puts first on the path)."""
    return subprocess.run([sys.executable, "-c", _LINT], cwd=root, capture_output=True, text=True, timeout=300)


def _layer_modules() -> set[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    [contract] = [c for c in config["contracts"] if c["type"] == "layers"]
    names = set()
    for layer in contract["layers"]:
        for name in layer.replace("|", ":").split(":"):
            names.add(name.strip().strip("()"))
    return names


def test_no_module_imports_from_a_floor_above_its_own():
    result = _lint(REPO)
    assert result.returncode == 0, f"the layer contract is broken:\n{result.stdout}\n{result.stderr}"
    assert "1 kept, 0 broken" in result.stdout, result.stdout


def test_every_top_level_module_has_a_floor():
    """A new package of masksearch_rl is placed on a floor, not left outside the contract."""
    modules = {f"masksearch_rl.{m.name}" for m in pkgutil.iter_modules([str(REPO / "masksearch_rl")])}
    missing = modules - _layer_modules()
    assert not missing, f"add these to a floor of [tool.importlinter] in pyproject.toml: {sorted(missing)}"
    assert {"envs", "reward"} <= _layer_modules()


def test_an_upward_import_breaks_the_contract(tmp_path):
    """The check is not vacuous: in a copy of the packages where a base utility imports the CLI, it fails and names
    the line."""
    for root in ROOTS:
        shutil.copytree(REPO / root, tmp_path / root, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    jsonl = tmp_path / "masksearch_rl" / "jsonl.py"
    jsonl.write_text(jsonl.read_text() + "\nimport masksearch_rl.cli  # noqa: E402,F401\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "masksearch_rl.jsonl -> masksearch_rl.cli" in result.stdout, result.stdout
