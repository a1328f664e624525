"""The floors of the package run one way (ARCHITECTURE.md, "Rules of the house"): a module may import
modules of its own floor or lower ones, never higher. Lazy imports inside functions count too.
Each package's docstring names its floor."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "primerge"

#: module prefix -> floor (the longest matching prefix wins)
FLOORS = {
    "primerge.errors": 0, "primerge.validation": 0, "primerge.seeding": 0, "primerge.paths": 0,
    "primerge.version": 0, "primerge.lazy": 0, "primerge.patterns": 0, "primerge.deterministic": 0, "primerge.linalg": 0, "primerge.io": 0,
    "primerge.datasets": 0,
    "primerge.methods": 1,
    "primerge.recipe": 2, "primerge.taskvectors": 2, "primerge.plan": 2, "primerge.names": 2,
    "primerge.treatments": 2, "primerge.vocabulary": 2, "primerge.support": 2,
    "primerge.engine": 3, "primerge.output": 3, "primerge.execution": 4,
    "primerge.purify": 4, "primerge.analysis": 4, "primerge.preflight": 4,
    "primerge": 5, "primerge.api": 5,
    "primerge.evaluation": 6, "primerge.tuning": 6, "primerge.bench": 6,
    "primerge.cli": 7, "primerge.__main__": 7,
}


def floor(module: str) -> int:
    parts = module.split(".")
    for k in range(len(parts), 0, -1):
        prefix = ".".join(parts[:k])
        if prefix in FLOORS:
            return FLOORS[prefix]
    raise KeyError(f"{module} has no floor in tests/test_layers.py; give it one")


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[str]:
    """Every primerge module ``path`` imports (absolute imports; relative ones are not used here)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] == "primerge"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "primerge":
            assert node.level == 0, f"{path}: relative import"
            found.append(node.module)
    return found


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_runs_up(path):
    here = module_name(path)
    upward = [m for m in imports(path) if floor(m) > floor(here)]
    assert not upward, f"{here} (floor {floor(here)}) imports higher floors: " + ", ".join(
        f"{m} ({floor(m)})" for m in upward)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an engine-floor module importing evaluation is reported."""
    fake = SRC / "engine.py"
    assert floor("primerge.evaluation.demo") > floor(module_name(fake))
    assert "primerge.evaluation.demo" in imports(_write(tmp_path, "from primerge.evaluation.demo import x\n"))


def _write(folder: Path, text: str) -> Path:
    path = folder / "m.py"
    path.write_text(text)
    return path


def test_version_and_help_load_no_torch():
    """``primerge --version`` / ``--help`` build every subcommand's parser without importing torch
    (measured: 0.22-0.28 s on the 2-core CI machine, against ~3 s with torch)."""
    import subprocess
    import sys

    code = ("import sys\nfrom primerge.cli import build_parser\nbuild_parser().format_help()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'optuna', 'ray', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
