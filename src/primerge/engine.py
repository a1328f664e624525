"""The streaming merge engine.

recipe -> plan -> (declared whole-model pre-passes) -> for each parameter name:
read base + every model lazily -> task vectors in float32 on the chosen device
-> method -> cast to the base dtype -> write into the current shard -> model card.

Peak memory is about (T + 2) x the largest tensor plus one output shard; it does
not grow with the number of layers. Everything that can be checked from the
headers (files, key sets, shapes, output location) is checked before any tensor
is read; a value problem found while streaming (NaN/Inf) aborts the merge and
removes the temporary output folder, so nothing partial is ever left in place.

A model may be a PEFT LoRA adapter folder (:mod:`primerge.io.adapters`): its task vectors are
s·B A on the modules it adapts, full differences on the tensors it stores, zero elsewhere. Methods
that declare ``factored`` receive those low-rank task vectors as their factors
(:class:`primerge.methods.stack.TaskStack`); everything else gets them materialised, one tensor
at a time.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from primerge.deterministic import ThreadIndependent
from primerge.errors import InputError, RecipeError
from primerge.io.adapters import Adapter, is_adapter, open_adapter
from primerge.io.card import write_card
from primerge.io.destination import Destination, destination
from primerge.io.manifest import Ledger
from primerge.io.names import components
from primerge.io.readers import Checkpoint, open_checkpoint
from primerge.lora_export import LoraExport
from primerge.io.writer import (
    DEFAULT_SHARD_SIZE,
    ShardedWriter,
    atomic_folder,
    check_finite,
    copy_support_files,
    save_tensors,
)
from primerge.methods.base import MethodParams, MethodSpec, PerTaskUpdate, TensorContext, derive_seed
from primerge.methods.lines import layer_scales
from primerge.methods.stack import LowRank, TaskStack
from primerge.per_task import PerTaskWriter, rebuild_task
from primerge.recipe import Recipe

EntryKind = Literal["matrix", "fallback", "copy"]


@dataclass(frozen=True)
class PlanEntry:
    """One output tensor: its base name, class, shape and storage dtype."""

    name: str
    kind: EntryKind
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Source:
    """A fine-tuned model: its checkpoint, weight, and base-name -> model-name map.

    For a LoRA ``adapter``, ``checkpoint`` is its weight file and ``names`` maps the base names
    it changes to its own target names; every other base tensor has τ = 0.
    """

    label: str
    checkpoint: Checkpoint
    weight: float
    names: dict[str, str]
    task_specific: list[str]
    adapter: Adapter | None = None

    def lowrank(self, entry: PlanEntry) -> bool:
        """Whether this model's τ of ``entry`` is low-rank by construction (LoRA or zero)."""
        if self.adapter is None or entry.kind != "matrix":
            return False
        target = self.names.get(entry.name)
        return target is None or self.adapter.is_lowrank(target)

    def head(self, name: str) -> torch.Tensor:
        """A task-specific tensor under its name in this model."""
        return self.adapter.full_value(name) if self.adapter is not None else self.checkpoint.load(name)


#: (model label, tensor name, θ₀ in float32, τ_t in float32) -> replacement τ_t, applied to
#: every mergeable tensor before model weights (e.g. PAVE purification, primerge.purify).
TaskVectorTransform = Callable[[str, str, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Plan:
    """Everything the merge needs to know before reading a single tensor."""

    base: Checkpoint
    sources: list[Source]
    entries: list[PlanEntry]
    transform: TaskVectorTransform | None = None
    scales: dict[str, float] | None = None  # LiNeS λ(ℓ) per mergeable tensor, when asked for

    def close(self) -> None:
        """Release every checkpoint's file handles."""
        self.base.close()
        for s in self.sources:
            s.checkpoint.close()

    def mergeable(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.kind != "copy"]

    def counts(self) -> dict[str, int]:
        counts = {"matrix": 0, "fallback": 0, "copy": 0}
        for e in self.entries:
            counts[e.kind] += 1
        counts["task_specific"] = sum(len(s.task_specific) for s in self.sources)
        return counts


@dataclass
class MergeResult:
    """What a merge produced: the output folder, or the tensors when no folder was asked for."""

    method: str
    parameters: dict
    out: Path | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    task_tensors: dict[str, dict[str, torch.Tensor]] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    report: str | None = None  # what a whole-model pre-pass decided (e.g. PRIME's F(r) table)
    task_states: dict[str, dict[str, torch.Tensor]] | None = None  # per-task methods, in memory
    per_task: bool = False  # the method gives every task its own model (see primerge.per_task)
    lora: dict | None = None  # LoRA output: rank and per-module errors (primerge.lora_export)


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (or ``cuda:N``) or ``auto`` (CUDA when available); anything else,
    or a CUDA device that is not there, is a :class:`RecipeError`."""
    if not isinstance(device, str):
        raise RecipeError(f"device must be text (cpu, cuda, cuda:N or auto), not {type(device).__name__}.")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    match = re.fullmatch(r"cpu|cuda(?::(\d{1,4}))?", device)
    if match is None:
        raise RecipeError(f"unsupported device '{device[:40]}'; use cpu, cuda, cuda:N or auto.")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RecipeError("--device cuda was requested but no CUDA device is available; use cpu.")
        if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
            raise RecipeError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices.")
    return torch.device(device)


def _prefix_map(base_names: list[str], model_names: set[str]) -> dict[str, str] | None:
    """Map base names to model names, allowing one added or removed leading prefix.

    A model saved with a task wrapper (``bert.encoder...`` for a base ``encoder...``)
    or the reverse is recognised; returns ``None`` when no single prefix fits.
    """
    if all(n in model_names for n in base_names):
        return {n: n for n in base_names}
    for p in sorted({m.split(".", 1)[0] + "." for m in model_names if "." in m}):
        if all(p + n in model_names for n in base_names):
            return {n: p + n for n in base_names}
    for p in sorted({b.split(".", 1)[0] + "." for b in base_names if "." in b}):
        if all(n.startswith(p) and n[len(p):] in model_names for n in base_names):
            return {n: n[len(p):] for n in base_names}
    return None


def _align(recipe: Recipe, base: Checkpoint, model: Checkpoint, label: str, weight: float) -> Source:
    """Check a model against the base (key set, shapes, dtype class) and map its names."""
    shared = [n for n in base.names if not recipe.is_task_specific(n)]
    names = _prefix_map(shared, set(model.names))
    if names is None:
        missing = [n for n in shared if n not in model]
        raise InputError(
            f"{model.path}: {len(missing)} tensors of the base {base.path} are missing "
            f"(first: '{missing[0]}'). Is '{label}' a fine-tune of this base?"
        )
    heads = [n for n in model.names if recipe.is_task_specific(n)]
    extra = sorted(set(model.names) - set(names.values()) - set(heads))
    if extra:
        raise InputError(
            f"{model.path}: {len(extra)} tensors are not in the base {base.path} "
            f"(first: '{extra[0]}'). If they are per-task heads, name them with "
            f"task_specific: REGEX in the recipe."
        )
    for b, m in names.items():
        bi, mi = base.info(b), model.info(m)
        if bi.shape != mi.shape:
            vocab = re.search(r"embed|wte|lm_head|shared", b) and bi.shape[1:] == mi.shape[1:]
            hint = (" A resized vocabulary? Resize the base's embeddings to the model's (or the model's "
                    "to the base's) before merging." if vocab else " Models must share the base's architecture.")
            raise InputError(
                f"tensor '{b}': shape {list(mi.shape)} in {mi.file} but {list(bi.shape)} "
                f"in the base {bi.file}.{hint}"
            )
        if bi.dtype.is_floating_point != mi.dtype.is_floating_point:
            raise InputError(
                f"tensor '{b}': dtype {mi.dtype} in {mi.file} but {bi.dtype} in the base {bi.file}."
            )
    return Source(label, model, weight, names, heads)


def _align_adapter(recipe: Recipe, base: Checkpoint, adapter: Adapter, label: str, weight: float) -> Source:
    """Map an adapter's targets onto base names (one prefix added or removed) and check shapes."""
    heads = [n for n in adapter.targets() if recipe.is_task_specific(n)]
    shared = [n for n in adapter.targets() if n not in heads]
    mapping = _prefix_map(shared, set(base.names)) if shared else {}
    if mapping is None:
        missing = [n for n in shared if n not in base]
        raise InputError(
            f"{adapter.path}: the adapter changes {len(missing)} tensors that are not in the base "
            f"{base.path} (first: '{missing[0]}'). Is '{label}' an adapter of this base model? "
            f"If they are per-task heads (modules_to_save), name them with task_specific: REGEX."
        )
    for target, name in mapping.items():
        info = base.info(name)
        adapter.orient(target, info.shape, info.file)
        if not info.dtype.is_floating_point or recipe.is_task_specific(name):
            raise InputError(f"{adapter.path}: the adapter changes '{target}', which the base "
                             f"{base.path} keeps unmerged (task-specific or not floating).")
    return Source(label, adapter.weights, weight, {b: t for t, b in mapping.items()}, heads, adapter)


def _open_source(recipe: Recipe, base: Checkpoint, path: Path, label: str, weight: float) -> Source:
    """A full fine-tune (any checkpoint :func:`open_checkpoint` reads) or a LoRA adapter folder."""
    if is_adapter(path):
        opener = partial(open_checkpoint, allow_pickle=recipe.allow_pickle)
        return _align_adapter(recipe, base, open_adapter(path, opener), label, weight)
    return _align(recipe, base, open_checkpoint(path, allow_pickle=recipe.allow_pickle), label, weight)


def _classify(recipe: Recipe, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> EntryKind:
    """matrix / fallback / copy for one base tensor (ALGORITHMS.md Conventions).

    Empty tensors (a zero-sized dimension) have nothing to merge and are copied.
    """
    if recipe.is_task_specific(name) or not dtype.is_floating_point or 0 in shape:
        return "copy"
    if len(shape) == 2 and recipe.is_matrix_name(name):
        return "matrix"
    return "fallback"


def build_plan(recipe: Recipe) -> Plan:
    """Open every checkpoint lazily and check it against the base; no tensor is read."""
    if is_adapter(recipe.base):
        raise InputError(f"{recipe.base}: the base is a LoRA adapter; give the full base model it "
                         f"was trained on (its base_model_name_or_path).")
    base = open_checkpoint(recipe.base, allow_pickle=recipe.allow_pickle)
    sources = [
        _open_source(recipe, base, entry.path, label, entry.weight)
        for entry, label in zip(recipe.models, recipe.model_labels())
    ]
    entries = []
    for name in base.names:
        info = base.info(name)
        entries.append(PlanEntry(name, _classify(recipe, name, info.shape, info.dtype), info.shape, info.dtype))
    plan = Plan(base, sources, entries)
    if recipe.lines is not None:
        plan.scales = layer_scales([e.name for e in plan.mergeable()], recipe.lines)
    return plan


def check_output(out: str | Path, recipe: Recipe, force: bool) -> Destination:
    """The checked output location: never an input, inside one or holding one's files; an existing
    folder only when empty or, with ``force``, an earlier primerge output (:mod:`primerge.io.destination`)."""
    return destination(out, [recipe.base, *(m.path for m in recipe.models)], force=force)


def _finite(tensor: torch.Tensor, what: str, name: str) -> torch.Tensor:
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{what}: tensor '{name}' contains NaN or Inf values; fix or re-export it.")
    return tensor


def _adapter_delta(src: Source, entry: PlanEntry, base: torch.Tensor, out: torch.Tensor) -> None:
    """Write an adapter's τ of ``entry`` into ``out`` (zero where the adapter does not touch it)."""
    target = src.names.get(entry.name)
    if target is None:
        out.zero_()
    else:
        out.copy_(_finite(src.adapter.delta(target, base), str(src.adapter.path), target))


def _factors(src: Source, entry: PlanEntry, device: torch.device) -> LowRank:
    """w·s·B A of an adapter as factors (L, R); rank 0 where the adapter does not touch ``entry``."""
    target = src.names.get(entry.name)
    if target is None:
        m, n = entry.shape
        return LowRank(torch.zeros((m, 0), device=device), torch.zeros((0, n), device=device))
    left, right = (_finite(f, str(src.adapter.path), target).to(device) for f in src.adapter.factors(target))
    return LowRank(left * src.weight, right)


def _task_vector(plan: Plan, src: Source, entry: PlanEntry, base: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write w·τ of one model into ``out``: θ_t − θ₀ (or an adapter's delta), the plan's
    ``transform`` if any, then the model's weight."""
    if src.adapter is not None:
        _adapter_delta(src, entry, base, out)
    else:
        name = src.names[entry.name]
        tensor = _finite(src.checkpoint.load(name), str(src.checkpoint.info(name).file), name)
        torch.sub(tensor.to(device=out.device, dtype=torch.float32), base, out=out)
    if plan.transform is not None:
        out.copy_(plan.transform(src.label, entry.name, base, out))
    if src.weight != 1.0:
        out.mul_(src.weight)
    return out


def _base_tensor(plan: Plan, entry: PlanEntry, device: torch.device) -> torch.Tensor:
    base = _finite(plan.base.load(entry.name), str(plan.base.info(entry.name).file), entry.name)
    return base.to(device=device, dtype=torch.float32)


def task_vectors(plan: Plan, entry: PlanEntry, device: torch.device, *,
                 factors: bool = False) -> tuple[torch.Tensor, torch.Tensor | TaskStack]:
    """Base tensor (float32) and the stacked weighted task vectors w_t (θ_t − θ₀), shape (T, *shape).

    A plan's ``transform`` (if any) replaces each τ_t before its weight is applied. With
    ``factors`` the task vectors come as a :class:`TaskStack` in which LoRA matrices stay as
    their factors w·s·B A (unless a ``transform`` needs them dense).
    """
    base = _base_tensor(plan, entry, device)
    keep = factors and plan.transform is None
    lowrank = {t: _factors(s, entry, device) for t, s in enumerate(plan.sources) if keep and s.lowrank(entry)}
    dense_index = [t for t in range(len(plan.sources)) if t not in lowrank]
    taus = torch.empty((len(dense_index), *entry.shape), dtype=torch.float32, device=device)
    for i, t in enumerate(dense_index):
        _task_vector(plan, plan.sources[t], entry, base, taus[i])
    return base, (TaskStack(taus, dense_index, lowrank) if factors else taus)


def summed_task_vectors(plan: Plan, entry: PlanEntry, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Base tensor (float32) and Σ_t w_t τ_t, accumulated one model at a time.

    For merges that depend on the task vectors only through their sum (Task Arithmetic,
    the SVD methods' mean fallback): three tensors in memory whatever the number of models.
    """
    base = _base_tensor(plan, entry, device)
    total = torch.zeros_like(base)
    scratch = torch.empty_like(base)
    for src in plan.sources:
        total += _task_vector(plan, src, entry, base, scratch)
    return base, total


def _contexts(plan: Plan, recipe: Recipe, prepass_result=None) -> Iterator[tuple[PlanEntry, TensorContext]]:
    for entry in plan.entries:
        if entry.kind != "copy":
            kind = "matrix" if entry.kind == "matrix" else "fallback"
            yield entry, TensorContext(entry.name, kind, derive_seed(recipe.seed, entry.name), prepass_result)


def run_prepass(plan: Plan, recipe: Recipe, spec: MethodSpec, params: MethodParams,
                device: torch.device, quiet: bool):
    """Stream every mergeable tensor through the method's declared whole-model pass."""
    prepass = spec.make_prepass(params)
    if prepass is None:
        return None
    for i in range(prepass.passes):
        items = list(_contexts(plan, recipe))
        for entry, ctx in tqdm(items, desc=f"{spec.name} pre-pass {i + 1}/{prepass.passes}",
                               unit="tensor", disable=quiet, leave=False):
            prepass.observe(i, task_vectors(plan, entry, device)[1], ctx)
        prepass.end_pass(i)
    return prepass.result()


@dataclass
class MergedTensor:
    """One output tensor, and for per-task methods the unified update and per-task tensors."""

    name: str
    tensor: torch.Tensor
    unified: torch.Tensor | None = None  # τ_uni in the base dtype (per-task methods)
    task_tensors: dict[str, torch.Tensor] | None = None  # key -> (T, *shape)
    update: torch.Tensor | None = None  # the merged update in float32 (LoRA output)


def merged_tensors(plan: Plan, recipe: Recipe, spec: MethodSpec, params: MethodParams,
                   device: torch.device, quiet: bool, prepass_result=None) -> Iterator[MergedTensor]:
    """Yield each merged tensor (base dtype, CPU) in base order."""
    contexts = dict((e.name, ctx) for e, ctx in _contexts(plan, recipe, prepass_result))
    for entry in tqdm(plan.entries, desc=f"merge [{spec.name}]", unit="tensor", disable=quiet):
        if entry.kind == "copy":
            yield MergedTensor(entry.name, plan.base.load(entry.name))
            continue
        ctx = contexts[entry.name]
        of_sum = spec.sum_merge_for(ctx)
        if of_sum is not None:  # streamed: memory independent of the number of models
            base, total = summed_task_vectors(plan, entry, device)
            update = of_sum(total, len(plan.sources), ctx, params)
            del total
        else:
            base, taus = task_vectors(plan, entry, device, factors=spec.factored)
            update = spec.apply(taus, ctx, params)
            del taus
        per_task = update if isinstance(update, PerTaskUpdate) else None
        if per_task is not None:
            update = per_task.update
        if plan.scales is not None:
            update = update * plan.scales[entry.name]
        if not bool(torch.isfinite(update).all()):
            raise InputError(
                f"tensor '{entry.name}': method '{spec.name}' produced NaN/Inf; check the inputs "
                f"and parameters ({params.model_dump()})."
            )
        merged = MergedTensor(entry.name, (base + update).to(dtype=entry.dtype, device="cpu"), update=update)
        if per_task is not None:
            merged.unified = update.to(dtype=entry.dtype, device="cpu")
            merged.task_tensors = {k: v.cpu() for k, v in per_task.task_tensors.items()}
        yield merged


def task_specific_tensors(plan: Plan) -> dict[str, dict[str, torch.Tensor]]:
    """Each model's task-specific tensors, under their names in that model."""
    return {
        s.label: {n: s.head(n).contiguous() for n in s.task_specific}
        for s in plan.sources
        if s.task_specific
    }


def run_merge(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    device: str = "cpu",
    force: bool = False,
    quiet: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
    transform: TaskVectorTransform | None = None,
) -> MergeResult:
    """Merge as the recipe says; write a model folder at ``out`` or return tensors in memory.

    ``transform`` rewrites each task vector before the method sees it (see
    :data:`TaskVectorTransform`); the API passes PAVE purification here.
    """
    start = time.perf_counter()
    spec = recipe.spec
    params = recipe.method_parameters()
    dev = resolve_device(device)
    out_path = check_output(out, recipe, force) if out is not None else None
    if recipe.lora_rank is not None and (out is None or spec.per_task):
        raise RecipeError("a LoRA output (--as-lora / output.lora_rank) needs an output folder and a "
                          "method that writes one model (not a per-task method).")
    plan = build_plan(recipe)
    plan.transform = transform
    result = MergeResult(spec.name, params.model_dump(mode="json"), counts=plan.counts(),
                         per_task=spec.per_task)
    try:
        with ThreadIndependent():  # byte-identical outputs whatever the thread count
            prepass_result = run_prepass(plan, recipe, spec, params, dev, quiet)
            if hasattr(prepass_result, "to_markdown"):
                result.report = prepass_result.to_markdown()
            stream = merged_tensors(plan, recipe, spec, params, dev, quiet, prepass_result)
            scalars = prepass_result.task_scalars() if spec.per_task else None
            if out_path is None:
                _collect(plan, spec, stream, scalars, result)
            elif recipe.lora_rank is not None:
                _write_lora(out_path, plan, recipe, stream, result)
                result.out = out_path.path
            else:
                _write_output(out_path, plan, recipe, stream, shard_size, result, spec, scalars)
                result.out = out_path.path
    finally:
        plan.close()
    result.seconds = time.perf_counter() - start
    return result


def _collect(plan: Plan, spec: MethodSpec, stream: Iterator[MergedTensor],
             scalars: list[dict[str, float]] | None, result: MergeResult) -> None:
    """In-memory output: the merged state dict, heads, and (per-task methods) every task's state."""
    result.state_dict = {}
    labels = [s.label for s in plan.sources]
    if scalars is not None:
        result.task_states = {label: {} for label in labels}
    for m in stream:
        check_finite({m.name: m.tensor}, "merge result")  # as the writers check every written tensor
        result.state_dict[m.name] = m.tensor
        if scalars is None:
            continue
        for t, label in enumerate(labels):
            if m.unified is None:
                result.task_states[label][m.name] = m.tensor
            else:
                task = {k: v[t] for k, v in m.task_tensors.items()}
                result.task_states[label][m.name] = rebuild_task(
                    spec, plan.base.load(m.name), m.unified, task, scalars[t], m.tensor.dtype)
    result.task_tensors = task_specific_tensors(plan)


def _write_heads(folder: Path, plan: Plan, ledger: Ledger) -> dict[str, dict[str, torch.Tensor]]:
    """Each model's task-specific tensors in ``task_heads/<model>.safetensors``; returns them."""
    heads = task_specific_tensors(plan)
    if heads:
        (folder / "task_heads").mkdir()
        files = components(heads)  # labels are user text: encoded into safe file names
        for label, tensors in heads.items():
            save_tensors(folder / "task_heads" / f"{files[label]}.safetensors", tensors, ledger=ledger)
    return heads


def _write_output(out: Destination, plan: Plan, recipe: Recipe, stream: Iterator[MergedTensor],
                  shard_size: int, result: MergeResult, spec: MethodSpec,
                  scalars: list[dict[str, float]] | None) -> None:
    with atomic_folder(out) as folder:
        ledger = Ledger(folder)
        writer = ShardedWriter(folder, shard_size, ledger=ledger)
        per_task = (PerTaskWriter(folder, [s.label for s in plan.sources], shard_size, ledger)
                    if scalars is not None else None)
        for m in stream:
            writer.add(m.name, m.tensor)
            if per_task is not None and m.unified is not None:
                per_task.add(m.name, m.unified, m.task_tensors)
        files = writer.finish()
        if per_task is not None:
            per_task.finish(spec.name, recipe.base, scalars)
        heads = _write_heads(folder, plan, ledger)
        copied = copy_support_files(plan.base.support, folder)
        write_card(folder, recipe, result, [f.name for f in files], heads, copied)
        ledger.seal()


def _write_lora(out: Destination, plan: Plan, recipe: Recipe, stream: Iterator[MergedTensor],
                result: MergeResult) -> None:
    """The merge as a PEFT LoRA adapter folder (:mod:`primerge.lora_export`), written atomically."""
    kinds = {e.name: e.kind for e in plan.entries}
    export = LoraExport(recipe.lora_rank, recipe.seed)
    with atomic_folder(out) as folder:
        ledger = Ledger(folder)
        for m in stream:
            if m.update is not None:
                export.add(m.name, kinds[m.name], m.update, m.tensor)
        files = export.write(folder, recipe.base, ledger)
        heads = _write_heads(folder, plan, ledger)
        result.lora = export.report()
        card = write_card(folder, recipe, result, files, heads, [])
        with open(card, "a") as handle:
            handle.write("\n" + export.to_markdown())
        ledger.seal()
