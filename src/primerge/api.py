"""The Python API, mirroring the recipe.

>>> import primerge
>>> result = primerge.merge(base="base/", models=["ft-a/", "ft-b/"], method="prime",
...                         rank=0.01, out="merged/")                  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from primerge.engine import resolve_device, run
from primerge.errors import RecipeError
from primerge.io.writer import DEFAULT_SHARD_SIZE, parse_size
from primerge.output.base import MergeResult, Sink
from primerge.output.folder import LoraFolder, ModelFolder, check_output
from primerge.output.memory import MemorySink
from primerge.plan import build_plan
from primerge.recipe import Recipe, build_recipe, load_recipe


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
    are then read with ``torch.load(weights_only=True)``. With ``out`` the merged model folder is
    written atomically and ``result.out`` is set; without it the merged tensors are returned in
    ``result.state_dict`` and the task-specific ones in ``result.task_tensors``.
    ``lora_rank=R`` (with ``out``) writes a PEFT LoRA adapter of rank R instead of a full
    model (:mod:`primerge.output.lora`); ``models`` may be LoRA adapter folders too.
    Raises a :class:`primerge.errors.PrimergeError` on any bad input.
    """
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


def open_sink(recipe: Recipe, out: Path | None, *, force: bool, shard_size: int) -> Sink:
    """The output the recipe asks for: a model folder, a LoRA adapter folder, or memory."""
    if out is None:
        if recipe.output.format != "model":
            raise RecipeError(f"the {recipe.output.format} output (--as-lora / output.format) needs an "
                              f"output folder (--out / out=).")
        return MemorySink()
    out = check_output(out, recipe, force)
    if recipe.output.format == "model":
        return ModelFolder(out, force=force, shard_size=shard_size)
    if recipe.spec.per_task:
        raise RecipeError(f"method '{recipe.method}' gives every task its own model; it cannot be "
                          f"written as one LoRA adapter (drop --as-lora / output.lora_rank).")
    return LoraFolder(out, force=force, rank=recipe.output.lora_rank)


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

    ``lora_rank`` overrides the recipe's output with a LoRA adapter of that rank;
    ``allow_pickle=True`` opts in to pickle checkpoints even if the recipe does not.
    """
    folder = None
    if not isinstance(recipe, Recipe):
        folder = Path(recipe).parent
        recipe = load_recipe(recipe)
    if allow_pickle:
        recipe = recipe.replace(allow_pickle=True)
    if lora_rank is not None:
        recipe = recipe.replace(output={"lora_rank": lora_rank})
    dev = resolve_device(device)
    size = parse_size(shard_size)
    sink = open_sink(recipe, Path(out) if out is not None else None, force=force, shard_size=size)
    plan = build_plan(recipe, shard_size=size)
    try:
        if recipe.purify is not None:
            from primerge.purify import build_purifier  # above the engine: imported only when asked for

            plan = plan.with_transform(build_purifier(recipe, relative_to=folder, quiet=quiet))
        return run(plan, sink, dev, quiet)
    finally:
        plan.close()
