"""The rules of the house (docs/design.md), checked on the source so a change that breaks them fails here.

- Floors: a module imports only modules on lower floors, or its own package. The stages (data, train,
  glue, report) share floor 3 and never import each other; the top floor (cli, pipeline, experiment,
  bench) composes them.
- The file names of a run folder appear only in `cramming/runs.py`, which owns those formats.
- No function is longer than about 120 lines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cramming"
# Top-level name under cramming -> floor. Floor 1: the ground floor every stage uses.
FLOORS = {
    "errors": 1, "checks": 1, "config": 1, "fileio": 1, "runs": 1, "faults": 1, "gpu": 1, "benchtools": 1,
    "card": 1, "trackers": 1,
    "model": 2, "optim": 2, "corpus": 2,
    "data": 3, "train": 3, "glue": 3, "report": 3,
    "cli": 4, "pipeline": 4, "experiment": 4, "bench": 4, "hub": 4,
}
RUN_FILE_NAMES = ("metrics.jsonl", "summary.json", "results.json")
MAX_FUNCTION_LINES = 120
# Known, not yet fixed (issue 15 is open on them). Each entry must still be a violation: fixing one
# fails the test until it is removed here, so this list can only shrink.
KNOWN_IMPORTS: set[tuple[str, str]] = set()
KNOWN_FILE_NAMES: set[tuple[str, str]] = set()


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _unit(path: Path) -> str:
    """The top-level unit of a module: `cramming/train/loop.py` -> `train`, `cramming/runs.py` -> `runs`."""
    rel = path.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if rel.parts[0] != "__init__" else "__init__"


def _imported_units(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n.split(".")[1] for n in names if n.startswith("cramming.") and len(n.split(".")) > 1}


def _may_import(unit: str, used: str) -> bool:
    """Lower floors only; the ground floor's small modules and the top floor's entry points may also use
    their own floor's modules (e.g. fileio uses faults, cli uses pipeline)."""
    mine, theirs = FLOORS[unit], FLOORS.get(used, 99)
    return theirs < mine or (theirs == mine and mine in (1, 4))


def test_every_unit_has_a_floor() -> None:
    units = {_unit(p) for p in _modules()} - {"__init__"}
    assert units <= set(FLOORS), f"place these in FLOORS (and in docs/design.md): {sorted(units - set(FLOORS))}"


def test_modules_import_only_lower_floors_or_their_own_package() -> None:
    found = set()
    for path in _modules():
        unit = _unit(path)
        if unit == "__init__":
            continue
        for used in _imported_units(ast.parse(path.read_text())):
            if used != unit and not _may_import(unit, used):
                found.add((str(path.relative_to(PACKAGE)), used))
    assert found - KNOWN_IMPORTS == set(), f"imports across floors: {sorted(found - KNOWN_IMPORTS)}"
    assert KNOWN_IMPORTS - found == set(), f"fixed, remove from KNOWN_IMPORTS: {sorted(KNOWN_IMPORTS - found)}"


def test_run_folder_file_names_live_in_runs_only() -> None:
    found = {(str(p.relative_to(PACKAGE)), name) for p in _modules() if p.name != "runs.py"
             for name in RUN_FILE_NAMES if name in p.read_text()}
    assert found - KNOWN_FILE_NAMES == set(), f"use cramming.runs: {sorted(found - KNOWN_FILE_NAMES)}"
    assert KNOWN_FILE_NAMES - found == set(), f"fixed, remove: {sorted(KNOWN_FILE_NAMES - found)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_function_is_longer_than_the_limit(path: Path) -> None:
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"split these: {long}"


def test_the_wheel_lists_every_package() -> None:
    """pyproject.toml lists the packages by hand (the configs folder is mapped in); a new subpackage
    missing from that list would be left out of the wheel."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(PACKAGE.parent).parts) for p in PACKAGE.rglob("__init__.py")}
    assert found | {"cramming.configs"} == listed


@pytest.mark.slow
def test_installed_wheel_finds_its_configs(tmp_path: Path) -> None:
    """The wheel carries configs/ as cramming/configs: from a folder outside the checkout, with only
    the wheel on the path, a stage composes its config."""
    import subprocess
    import sys
    import zipfile

    repo = PACKAGE.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(repo), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("cramming-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "cramming" / "configs" / "config.yaml").is_file()
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(tmp_path)}
    # -S keeps the venv's editable finder (which points at the checkout) out; the dependencies come
    # from the venv's site-packages, appended after the wheel.
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    env["PYTHONPATH"] += f":{deps}"
    out = subprocess.run([sys.executable, "-S", "-m", "cramming.cli", "pretrain", "--cfg", "job", "budget=24h",
                          "gpu=rtx2080ti"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "micro_batch_size" in out.stdout and "budget: 24h" in out.stdout
    probe = subprocess.run([sys.executable, "-S", "-c", "import cramming.config as c; print(c.CONFIG_DIR)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == str(site / "cramming" / "configs")
