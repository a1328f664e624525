"""Helpers for tests of refused inputs: run a recipe through the API and the CLI, check nothing is left.

A refusal must raise the expected primerge error with the file/tensor named, make the
CLI exit 2 with one ``primerge: error:`` line (no traceback), and leave neither the
output nor a hidden ``.<name>.primerge-*`` folder beside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from safetensors.torch import save_file

import primerge
from primerge.cli import main as cli
from primerge.util.errors import PrimergeError

TASK_SPECIFIC = r"^classifier\."

def recipe_file(folder: Path, data: dict, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(_plain(data), sort_keys=False))
    return path


def _plain(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def zoo_recipe(zoo, **overrides) -> dict:
    p = zoo["paths"]
    data = {"base": p["base"], "models": list(p["models"]), "method": "task_arithmetic",
            "task_specific": TASK_SPECIFIC}
    data.update(overrides)
    return data


def leftovers(out: Path) -> list[Path]:
    parent = out.parent
    return sorted(parent.glob(f".{out.name}.primerge-*")) if parent.exists() else []


def assert_nothing_left(out: Path, *, existed: bool = False) -> None:
    if not existed:
        assert not out.exists(), f"{out} was left behind"
    assert leftovers(out) == [], leftovers(out)


def refused(recipe: Path, out: Path, exc_type: type[PrimergeError], needles, capsys, *,
            force: bool = False, existed: bool = False, shard_size: int | None = None,
            device: str = "cpu") -> str:
    """Run the recipe through the API and the CLI; both must refuse with the needles in the message."""
    kwargs = {"shard_size": shard_size} if shard_size else {}
    with pytest.raises(exc_type) as info:
        primerge.merge_recipe(recipe, out=out, force=force, device=device, **kwargs)
    message = str(info.value)
    for needle in needles:
        assert str(needle) in message, (needle, message)
    assert_nothing_left(out, existed=existed)

    argv = ["merge", str(recipe), "--out", str(out), "--quiet", "--device", device]
    argv += ["--force"] if force else []
    argv += ["--shard-size", str(shard_size)] if shard_size else []
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("primerge: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    assert_nothing_left(out, existed=existed)
    return message


def model_copy(folder: Path, state: dict, config_from: Path | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    if config_from is not None:
        shutil.copy(config_from / "config.json", folder / "config.json")
    return folder


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
