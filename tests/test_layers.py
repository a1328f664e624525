"""The floors of the package run one way (docs/architecture.md, "The layers"): a module may import
modules of its own floor or lower ones, never higher. Lazy imports inside functions count too.
Each package's docstring names its floor, and every module lives in a package of the layout: only
the public API (``__init__``, ``api``), ``__main__`` and ``version`` stay at the root."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "primerge"

#: package (or module) -> floor (the longest matching prefix wins): docs/architecture.md, "The layers"
FLOORS = {
    "primerge.util": 0, "primerge.version": 0, "primerge.data": 0, "primerge.linalg": 0, "primerge.io": 0,
    "primerge.methods": 1,
    "primerge.core": 2,
    "primerge.output": 3,
    "primerge.engine": 4, "primerge.purify": 4, "primerge.analysis": 4, "primerge.calibration": 4,
    "primerge": 5, "primerge.api": 5, "primerge.testing": 5,
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


ROOT_MODULES = {"primerge", "primerge.api", "primerge.version", "primerge.__main__"}


def test_every_module_lives_in_a_package_of_the_layout():
    strays = [module_name(p) for p in MODULES if module_name(p).count(".") < 2 and module_name(p) not in ROOT_MODULES
              and not (p.name == "__init__.py")]
    assert not strays, f"modules at the package root: {strays}; move each into its layer's package"


def package(module: str) -> str:
    """``primerge.core.plan`` -> ``primerge.core``; root modules are their own package."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        here = package(module_name(path))
        graph.setdefault(here, set()).update(package(m) for m in imports(path) if package(m) != here)
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle between packages, or None (depth-first search with a path stack)."""
    state: dict[str, int] = {}
    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = 2
        return None
    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_packages_import_each_other_without_cycles():
    graph = package_graph()
    graph.get("primerge", set()).clear()  # the root package's lazy table names the API of every floor
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: an engine-floor module importing evaluation is reported."""
    fake = SRC / "engine" / "stream.py"
    assert floor("primerge.evaluation.demo") > floor(module_name(fake))
    assert "primerge.evaluation.demo" in imports(_write(tmp_path, "from primerge.evaluation.demo import x\n"))


def _write(folder: Path, text: str) -> Path:
    path = folder / "m.py"
    path.write_text(text)
    return path


def test_version_and_help_load_no_torch():
    """``primerge --version`` / ``--help`` build every subcommand's parser without importing torch
    (a fraction of the seconds torch takes to import: docs/benchmarks.md, "Measurements behind design
    decisions")."""
    import subprocess
    import sys

    code = ("import sys\nfrom primerge.cli.main import build_parser\nbuild_parser().format_help()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'optuna', 'ray', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
