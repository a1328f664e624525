"""The stream: pre-passes, then work units, each tensor handed to an output as it is merged.

    plan ──► pre-passes (whole-model statistics, reduced) ──► units: read → method → cast ──► sink

For every tensor of a unit: the task vectors are read (:meth:`primerge.plan.Plan.task_vectors`:
a :class:`~primerge.methods.stack.TaskStack`, or only Σ_t τ_t for a merge marked
:func:`~primerge.methods.base.reads_sum`), the method's function for the tensor's treatment
gives the update, LiNeS scales it, and θ₀ + update is cast to the stored dtype. Executing a unit
(:func:`execute_unit`) is a pure function of (plan, unit, pre-pass result, device), so units can
run on other processes or machines; a pre-pass is a fold of per-tensor statistics in plan order
(:class:`~primerge.methods.base.Prepass`), the same whichever way the units are split. Nothing
about file formats lives here.

Peak memory is about (T + 2) x the largest tensor plus what the output buffers (one shard); it
does not grow with the number of layers. A value problem found while streaming (NaN/Inf) aborts
the merge, and a folder output removes its temporary folder, so nothing partial is ever left.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from tqdm.auto import tqdm

from primerge.deterministic import ThreadIndependent
from primerge.errors import InputError, RecipeError
from primerge.methods.base import PerTaskUpdate, Prepass, TensorContext, fold_statistics, is_sum_merge
from primerge.output.base import MergedTensor, MergedUpdate, MergeResult, PerTaskTensor, Sink
from primerge.plan import Plan, WorkUnit
from primerge.seeding import derive_seed
from primerge.taskvectors import PlanEntry


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (CUDA when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError("--device cuda was requested but no CUDA device is available; use cpu.")
    try:
        return torch.device(device)
    except RuntimeError:
        raise RecipeError(f"unknown device '{device}'; use cpu, cuda or auto.") from None


def context(plan: Plan, entry: PlanEntry, prepass: Any = None) -> TensorContext:
    """What the method knows of ``entry``: treatment, seed from the recipe seed and its name."""
    kind = "matrix" if entry.kind == "matrix" else "fallback"
    return TensorContext(entry.name, kind, derive_seed(plan.recipe.seed, entry.name), prepass)


def prepass_statistics(plan: Plan, prepass: Prepass, pass_index: int, entries: Iterable[PlanEntry],
                       device: torch.device) -> Any:
    """The fold (``prepass.combine``) of the statistics of ``entries`` in pass ``pass_index``."""
    tensors = ((plan.task_vectors(e, device)[1], context(plan, e)) for e in entries if e.kind != "copy")
    return fold_statistics(prepass, pass_index, tensors)


def run_prepass(plan: Plan, device: torch.device, quiet: bool = True) -> Any:
    """Fold every unit's statistics through the method's declared whole-model pass; its result."""
    spec, params = plan.recipe.spec, plan.recipe.params
    prepass = spec.make_prepass(params)
    if prepass is None:
        return None
    for i in range(prepass.passes):
        total = None
        for unit in tqdm(plan.units, desc=f"{spec.name} pre-pass {i + 1}/{prepass.passes}", unit="unit",
                         disable=quiet, leave=False):
            part = prepass_statistics(plan, prepass, i, unit.entries, device)
            if part is not None:
                total = part if total is None else prepass.combine(total, part)
        prepass.end_pass(i, total)
    return prepass.result()


def merge_tensor(plan: Plan, entry: PlanEntry, device: torch.device, prepass: Any = None) -> MergedTensor:
    """One output tensor: copied from the base, or θ₀ + update in the stored dtype."""
    if entry.kind == "copy":
        return MergedTensor(entry.name, plan.base.load(entry.name), entry.kind)
    spec, params = plan.recipe.spec, plan.recipe.params
    merge = spec.function_for(entry.kind)
    base, taus = plan.task_vectors(entry, device, summed=is_sum_merge(merge))
    update = merge(taus, context(plan, entry, prepass), params)
    del taus
    per_task = update if isinstance(update, PerTaskUpdate) else None
    if per_task is not None:
        update = per_task.update
    if plan.scales is not None:
        update = update * plan.scales[entry.name]
    if not bool(torch.isfinite(update).all()):
        raise InputError(f"tensor '{entry.name}': method '{spec.name}' produced NaN/Inf; check the inputs "
                         f"and parameters ({params.model_dump()}).")
    value = (base + update).to(dtype=entry.dtype, device="cpu")
    if per_task is None:
        return MergedUpdate(entry.name, value, entry.kind, update)
    unified = update.to(dtype=entry.dtype, device="cpu")
    tensors = {k: v.cpu() for k, v in per_task.task_tensors.items()}
    return PerTaskTensor(entry.name, value, entry.kind, update, unified, tensors)


def execute_unit(plan: Plan, unit: WorkUnit, device: torch.device, prepass: Any = None) -> Iterator[MergedTensor]:
    """The tensors of one unit, in order: a pure function of (plan, unit, pre-pass result)."""
    for entry in unit.entries:
        yield merge_tensor(plan, entry, device, prepass)


def stream(plan: Plan, device: torch.device, prepass: Any = None, quiet: bool = True) -> Iterator[MergedTensor]:
    """Every output tensor of the plan, unit after unit, in base order."""
    bar = tqdm(total=len(plan.entries), desc=f"merge [{plan.recipe.spec.name}]", unit="tensor", disable=quiet)
    with bar:
        for unit in plan.units:
            for merged in execute_unit(plan, unit, device, prepass):
                bar.update()
                yield merged


def run(plan: Plan, sink: Sink, device: torch.device, quiet: bool = True) -> MergeResult:
    """Pre-passes, then every unit into ``sink``; returns what the merge produced."""
    start = time.perf_counter()
    spec = plan.recipe.spec
    result = MergeResult(spec.name, plan.recipe.params.model_dump(mode="json"), counts=plan.counts(),
                         per_task=spec.per_task)
    with ThreadIndependent():  # byte-identical outputs whatever the thread count
        prepass = run_prepass(plan, device, quiet)
        if hasattr(prepass, "to_markdown"):
            result.report = prepass.to_markdown()
        with sink.session(plan, prepass):
            for merged in stream(plan, device, prepass, quiet):
                sink.add(merged)
            sink.finish(result)
    result.seconds = time.perf_counter() - start
    return result
