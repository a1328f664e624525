"""The Python API, mirroring the recipe.

>>> import primerge
>>> result = primerge.merge(base="base/", models=["ft-a/", "ft-b/"], method="prime",
...                         rank=0.01, out="merged/")                  # doctest: +SKIP

Many merges on Ray pay the start-up of Ray's workers once in a session (:func:`ray_session`):

>>> with primerge.ray_session(workers=4) as ray:                       # doctest: +SKIP
...     for w in (0.3, 0.5, 0.7):
...         primerge.merge("base/", ["ft-a/", "ft-b/"], "task_arithmetic", scale=w,
...                        out=f"merged-{w}/", execution=ray)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from primerge.engine.stream import resolve_device, run
from primerge.util.errors import RecipeError
from primerge.engine.executors import make_executor
from primerge.io.user_paths import user_path
from primerge.io.writer import DEFAULT_SHARD_SIZE, parse_size
from primerge.output.base import MergeResult
from primerge.output.formats import open_sink
from primerge.core.plan import build_plan
from primerge.engine.preflight import Preflight, check_fits, preflight
from primerge.core.recipe import ExecutionConfig, Recipe, build_recipe, load_recipe
from primerge.util.schema import validate

if TYPE_CHECKING:
    from primerge.engine.ray_session import RaySession


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
    calibration: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    lora_rank: int | None = None,
    execution: dict[str, Any] | RaySession | None = None,
    tokenizer: str = "base",
    output: dict[str, Any] | None = None,
    device: str = "cpu",
    force: bool = False,
    quiet: bool = True,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    max_memory: int | str | None = None,
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
    ``execution={"backend": "ray", ...}`` runs the units on Ray (:mod:`primerge.engine.ray`);
    ``execution=session`` runs them in an open :func:`ray_session`, on its warm workers.
    ``tokenizer`` (base | union | a model's name) chooses the output vocabulary
    (:mod:`primerge.core.vocabulary`); ``output`` is the recipe's output block (e.g. ``{"dtype": "bfloat16"}``).
    ``calibration={"data": {label: task}}`` names each model's task data for a data-aware method
    (``regmean``, ``regmean_pp``: :mod:`primerge.calibration`).
    A merge that would not fit in memory (or ``max_memory``, e.g. ``"8GB"``) or on disk is refused
    before it starts (:mod:`primerge.engine.preflight`). Raises a :class:`primerge.util.errors.PrimergeError`
    on any bad input.
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
        "calibration": calibration,
        "allow_pickle": allow_pickle,
        "output": {**(output or {}), **({"lora_rank": lora_rank} if lora_rank is not None else {})} or None,
        "execution": _execution_block(execution),
        "tokenizer": tokenizer,
    })
    return merge_recipe(recipe, out=out, device=device, force=force, quiet=quiet, shard_size=shard_size,
                        max_memory=max_memory)


def ray_session(address: str | None = None, *, workers: int | None = None, cpus_per_worker: float | None = None,
                gpus_per_worker: float | None = None) -> RaySession:
    """A Ray session for many merges in this process (:mod:`primerge.engine.ray_session`), to use as
    ``with primerge.ray_session(...) as ray:`` and pass as ``execution=ray``: it connects once (joins
    ``address``, ``auto`` or ``HOST:PORT``, else starts a local runtime, or uses this process's own
    ``ray.init``), starts ``workers`` worker processes (default: one per CPU, or per
    ``gpus_per_worker`` GPUs) that import the engine once, and runs every Ray merge of the process on
    them until it closes; closing leaves Ray as it was found. The settings mean what the recipe's
    ``execution`` block says (:class:`~primerge.core.recipe.ExecutionConfig`)."""
    from primerge.engine.ray_session import RaySession

    given = {"address": address, "workers": workers, "cpus_per_worker": cpus_per_worker,
             "gpus_per_worker": gpus_per_worker}
    config = validate(ExecutionConfig, {"backend": "ray", **{k: v for k, v in given.items() if v is not None}},
                      "ray_session()")
    return RaySession(config)


def _execution_block(execution: Any) -> Any:
    """``execution`` as the recipe's block: an open Ray session stands for ``{"backend": "ray"}``
    (the session gives the rest); a closed one is refused."""
    from primerge.engine.ray_session import RaySession  # torch-free

    if not isinstance(execution, RaySession):
        return execution
    if RaySession.current() is not execution:
        raise RecipeError("execution= names a Ray session that is not open; merge inside "
                          "`with primerge.ray_session(...) as ray:`.")
    return {"backend": "ray"}


#: The execution settings that only mean something on Ray (the CLI's distributed-execution options).
RAY_ONLY = ("address", "workers", "cpus_per_worker", "gpus_per_worker")


def _resolve(recipe: Recipe | str | Path, allow_pickle: bool, lora_rank: int | None,
             execution: dict[str, Any] | None, download: bool = False) -> Recipe:
    """The recipe (read from YAML if a path, its relative paths resolved against its folder) with the
    call's overrides."""
    if not isinstance(allow_pickle, bool):
        raise RecipeError(f"allow_pickle must be true or false, not {allow_pickle!r:.40}.")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(user_path(recipe, "recipe"), download=download)
    if allow_pickle:
        recipe = recipe.replace(allow_pickle=True)
    if lora_rank is not None:
        recipe = recipe.replace(output={"lora_rank": lora_rank})
    if execution:
        merged = {**recipe.execution.model_dump(exclude_defaults=True), **execution}
        ray_only = [key for key in RAY_ONLY if key in execution]
        if merged.get("backend", "local") == "local" and ray_only:
            options = ", ".join(f"--{key.replace('_', '-')}" for key in ray_only)
            raise RecipeError(f"{options} set how units run on Ray; add --backend ray (or execution: {{backend: ray}} "
                              f"in the recipe), or leave {options} out for a local merge.")
        recipe = recipe.replace(execution=merged)
    return recipe


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
    execution: dict[str, Any] | RaySession | None = None,
    max_memory: int | str | None = None,
    download: bool = False,
) -> MergeResult:
    """Run a :class:`Recipe` (or a recipe file: primerge YAML, a mergekit configuration or a model
    card, :func:`primerge.core.recipe.load_recipe`); see :func:`merge`.

    ``lora_rank`` overrides the recipe's output with a LoRA adapter of that rank; ``execution``
    overrides fields of the recipe's ``execution`` block (e.g. ``{"backend": "ray", "workers": 4}``),
    or is an open :func:`ray_session` to run in;
    ``allow_pickle=True`` opts in to pickle checkpoints even if the recipe does not; ``max_memory``
    replaces the machine's available memory in the pre-flight check; ``download`` fetches hub ids
    missing from the local Hugging Face cache (:mod:`primerge.io.hub`).
    """
    resolve_device(device)  # the call's own arguments first: a wrong type is one clear error
    size = parse_size(shard_size)
    limit = parse_size(max_memory) if max_memory is not None else None
    recipe = _resolve(recipe, allow_pickle, lora_rank, _execution_block(execution), download)
    executor = make_executor(recipe.execution, device)
    sink = open_sink(recipe, out, force=force, shard_size=size)
    plan = build_plan(recipe, shard_size=size)
    try:
        check_fits(plan, Path(out) if out is not None else None, resolve_device(device), limit,  # out: checked by open_sink
                   executor)
        if recipe.purify is not None:
            from primerge.purify import build_purifier  # above the engine: imported only when asked for

            plan = plan.with_transform(build_purifier(recipe, quiet=quiet))
        if recipe.spec.reads_grams is not None:
            from primerge.calibration import build_grams  # above the engine: imported only when asked for

            plan = plan.with_grams(build_grams(plan, quiet=quiet))
        return run(plan, sink, executor, quiet)
    finally:
        plan.close()
        executor.close()


def dry_run(
    recipe: Recipe | str | Path,
    *,
    out: str | Path | None = None,
    device: str = "cpu",
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    allow_pickle: bool = False,
    lora_rank: int | None = None,
    max_memory: int | str | None = None,
    calibrate: bool = True,
    download: bool = False,
) -> Preflight:
    """What merging ``recipe`` into ``out`` would do, from the headers and a short calibration
    (``primerge plan``; :mod:`primerge.engine.preflight`); nothing is written. ``report.problems`` lists
    what would refuse the merge."""
    device = resolve_device(device)
    recipe = _resolve(recipe, allow_pickle, lora_rank, None, download)
    plan = build_plan(recipe, shard_size=parse_size(shard_size))
    try:
        limit = parse_size(max_memory) if max_memory is not None else None
        return preflight(plan, user_path(out, "output") if out is not None else None, device,
                                max_memory=limit, calibrate_time=calibrate)
    finally:
        plan.close()
