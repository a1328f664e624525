"""The Python API, mirroring the recipe.

>>> import primerge
>>> result = primerge.merge(base="base/", models=["ft-a/", "ft-b/"], method="prime",
...                         rank=0.01, out="merged/")                  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from primerge.engine import MergeResult, build_plan, check_output, resolve_device, run_merge
from primerge.errors import RecipeError
from primerge.io.names import user_path
from primerge.io.writer import DEFAULT_SHARD_SIZE, parse_size
from primerge.recipe import OutputConfig, Recipe, build_recipe, load_recipe
from primerge.validation import validate


def merge(
    base: str | Path,
    models: list[str | Path | dict[str, Any]],
    method: str = "prime",
    *,
    out: str | Path | None = None,
    parameters: dict[str, Any] | None = None,
    task_specific: str | None = None,
    matrices: str | None = None,
    seed: int = 42,
    lines: dict[str, Any] | None = None,
    purify: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    lora_rank: int | None = None,
    device: str = "cpu",
    force: bool = False,
    quiet: bool = True,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    **params: Any,
) -> MergeResult:
    """Merge ``models`` (fine-tunes of ``base``) with ``method``.

    Method parameters come from ``parameters`` and/or keyword arguments (e.g.
    ``rank=0.01``). ``allow_pickle`` opts in to ``.bin``/``.pt`` pickle checkpoints, which
    are then read with ``torch.load(weights_only=True)``. With ``out`` the merged model folder is written atomically and
    ``result.out`` is set; without it the merged tensors are returned in
    ``result.state_dict`` and the task-specific ones in ``result.task_tensors``.
    ``lora_rank=R`` (with ``out``) writes a PEFT LoRA adapter of rank R instead of a full
    model (:mod:`primerge.lora_export`); ``models`` may be LoRA adapter folders too.
    Raises a :class:`primerge.errors.PrimergeError` on any bad input.
    """
    if not isinstance(parameters, (dict, type(None))):
        raise RecipeError(f"parameters must be a mapping of method parameters, not {type(parameters).__name__}.")
    recipe = build_recipe({
        "base": base,
        "models": models,
        "method": method,
        "parameters": {**(parameters or {}), **params},
        "task_specific": task_specific,
        "matrices": matrices,
        "seed": seed,
        "lines": lines,
        "purify": purify,
        "allow_pickle": allow_pickle,
        "output": {"lora_rank": lora_rank} if lora_rank is not None else None,
    })
    return merge_recipe(recipe, out=out, device=device, force=force, quiet=quiet, shard_size=shard_size)


def merge_recipe(
    recipe: Recipe | str | Path,
    *,
    out: str | Path | None = None,
    device: str = "cpu",
    force: bool = False,
    quiet: bool = True,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    allow_pickle: bool = False,
    lora_rank: int | None = None,
) -> MergeResult:
    """Run a :class:`Recipe` (or a YAML recipe file); see :func:`merge`.

    ``lora_rank`` overrides the recipe's ``output.lora_rank`` (a LoRA adapter output).

    ``allow_pickle=True`` opts in to pickle checkpoints even if the recipe does not.
    """
    size = parse_size(shard_size)  # the call's own arguments first: wrong types are one clear error
    resolve_device(device)
    if not isinstance(allow_pickle, bool):
        raise RecipeError(f"allow_pickle must be true or false, not {allow_pickle!r:.40}.")
    folder = None
    if not isinstance(recipe, Recipe):
        path = user_path(recipe, "recipe")
        folder = path.parent
        recipe = load_recipe(path)
    if allow_pickle:
        recipe = recipe.model_copy(update={"allow_pickle": True})
    if lora_rank is not None:
        output = validate(OutputConfig, {"lora_rank": lora_rank}, "output")
        recipe = recipe.model_copy(update={"output": output})
    transform = None
    if recipe.purify is not None:
        from primerge.purify import build_purifier  # above the engine: imported only when asked for

        if out is not None:  # fail on a bad output before the (slow) covariance collection
            check_output(out, recipe, force)
        build_plan(recipe).close()  # likewise for the inputs: files, key sets, shapes
        transform = build_purifier(recipe, relative_to=folder, quiet=quiet)
    return run_merge(recipe, out, device=device, force=force, quiet=quiet,
                     shard_size=size, transform=transform)
