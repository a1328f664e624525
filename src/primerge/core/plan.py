"""recipe -> :class:`Plan`: everything a merge needs to know before reading a single tensor.

The plan is checked once, from the headers: the base and every model opened lazily (quantized
formats dequantized or refused, :mod:`primerge.io.quantized`) and aligned with the base
(:mod:`primerge.core.sources`: names, tied embeddings; :mod:`primerge.core.vocabulary`: token rows),
one :class:`~primerge.core.sources.PlanEntry` per output tensor with its treatment
(:mod:`primerge.core.treatments`: ``matrix``, ``experts``, ``reshaped``, ``fallback``, ``copy``) and
stored format, LiNeS scales, the output's support files (:mod:`primerge.core.support_files`), and a
deterministic partition of the entries into :class:`WorkUnit` s — the tensors of one output shard
each, in base order. Executing a unit
is a pure function of (plan, unit, pre-pass result), which is what lets units run on any worker.
A plan holds only checkpoint metadata (readers open files per read), so it can be pickled and
sent to a remote worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from primerge.util.errors import InputError, RecipeError
from primerge.io.adapters import is_adapter
from primerge.io.quantized import Fp8Blocks, Fp8Checkpoint, open_weights, read_config
from primerge.io.readers import Checkpoint
from primerge.io.writer import DEFAULT_SHARD_SIZE
from primerge.methods.lines_scaling import layer_scales
from primerge.methods.stack import TaskStack
from primerge.core.recipe import Recipe
from primerge.core.support_files import OutputFile, output_files
from primerge.core.sources import (
    FullFineTune,
    PlanEntry,
    TaskVectorSource,
    TaskVectorTransform,
    open_source,
    read_stack,
    read_sum,
)
from primerge.core.treatments import classify
from primerge.core.vocabulary import VocabularyAlignment, align_vocabulary

#: the plan's treatments, in the order reports list them
KINDS = ("matrix", "experts", "reshaped", "fallback", "copy")

@dataclass(frozen=True)
class WorkUnit:
    """The entries of one output shard, in base order; ``index`` counts units from 0."""

    index: int
    entries: tuple[PlanEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def shard_units(entries: list[PlanEntry], shard_size: int) -> list[WorkUnit]:
    """Split entries, in order, into units of at most ``shard_size`` stored bytes (a tensor larger
    than that is a unit of its own): the rule :class:`primerge.io.writer.ShardedWriter` shards by."""
    units: list[list[PlanEntry]] = [[]]
    filled = 0
    for entry in entries:
        if units[-1] and filled + entry.nbytes > shard_size:
            units.append([])
            filled = 0
        units[-1].append(entry)
        filled += entry.nbytes
    return [WorkUnit(i, tuple(u)) for i, u in enumerate(units) if u]


@dataclass(frozen=True)
class Plan:
    """The checked merge: recipe (method spec and parameters resolved), base, sources, entries,
    units, the optional task-vector ``transform`` and LiNeS ``scales``; the ``vocabulary``
    alignment, the output's support ``files`` and ``notes`` on what was reconciled."""

    recipe: Recipe
    base: Checkpoint
    sources: tuple[TaskVectorSource, ...]
    entries: tuple[PlanEntry, ...]
    units: tuple[WorkUnit, ...]
    transform: TaskVectorTransform | None = None
    scales: dict[str, float] | None = None  # LiNeS λ(ℓ) per mergeable tensor, when asked for
    vocabulary: VocabularyAlignment | None = None
    files: tuple[OutputFile, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def labels(self) -> list[str]:
        return [s.label for s in self.sources]

    def close(self) -> None:
        """Release every checkpoint's cached tensors."""
        self.base.close()
        for s in self.sources:
            s.close()

    def mergeable(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.kind != "copy"]

    def counts(self) -> dict[str, int]:
        """Entries per treatment, the task-specific tensors of all models, the matrices inside
        ``experts`` tensors and the vocabulary tensors whose rows are aligned by token string."""
        counts = dict.fromkeys(KINDS, 0)
        for e in self.entries:
            counts[e.kind] += 1
        counts["task_specific"] = sum(len(s.task_specific) for s in self.sources)
        counts["expert_matrices"] = sum(e.view[0] for e in self.entries if e.kind == "experts")
        aligned = self.vocabulary is not None and self.vocabulary.aligned
        counts["vocab_aligned"] = len(self.vocabulary.tensors) if aligned else 0
        return counts

    def copied(self, entry: PlanEntry) -> tuple[Tensor, dict[str, Tensor]]:
        """A ``copy`` entry's stored value and companions: as the base stores it when the output keeps
        its format, else the base's value in the output's format."""
        stored = getattr(self.base, "stored", None)
        if entry.storage is not None and stored is not None:
            tensors = stored(entry.name)
            return tensors.pop(entry.name), tensors
        value = self.base.load(entry.name)
        if value.dtype == entry.dtype:
            return value, {}
        return entry.store(value.float())

    def subset(self, tasks: int) -> Plan:
        """The same plan restricted to the first ``tasks`` models."""
        return dataclasses.replace(self, sources=self.sources[:tasks])

    def with_transform(self, transform: TaskVectorTransform | None) -> Plan:
        """The same plan with every task vector passed through ``transform`` (e.g. PAVE)."""
        return dataclasses.replace(self, transform=transform)

    def task_vectors(self, entry: PlanEntry, device: torch.device, *, summed: bool = False
                     ) -> tuple[torch.Tensor, TaskStack]:
        """θ₀ (float32) and the weighted task vectors of ``entry`` (only their sum with ``summed``)."""
        read = read_sum if summed else read_stack
        return read(self.base, self.sources, entry, device, self.transform)


def open_sources(recipe: Recipe, base: Checkpoint, labels: list[str]) -> tuple[TaskVectorSource, ...]:
    """Every model opened and checked against the base; the problems of all models in one error."""
    sources, problems = [], []
    for entry, label in zip(recipe.models, labels):
        try:
            sources.append(open_source(base, entry.path, label, entry.weight, allow_pickle=recipe.allow_pickle,
                                       is_task_specific=recipe.is_task_specific))
        except InputError as exc:
            problems.append(str(exc))
    if len(problems) > 1:
        raise InputError(f"{len(problems)} models cannot be merged with this base:\n" +
                         "\n".join(f"  - {p}" for p in problems))
    if problems:
        raise InputError(problems[0])
    return tuple(sources)


def stored_as(recipe: Recipe, dtype: torch.dtype, scheme: Fp8Blocks | None) -> tuple[torch.dtype, Fp8Blocks | None]:
    """The output dtype and quantized format of a base tensor stored as ``dtype`` (``scheme``: FP8
    blocks): ``output.dtype`` for floating tensors, else as stored (FP8 quantized again in a
    model folder; bfloat16 values in a LoRA adapter)."""
    if not dtype.is_floating_point:
        return dtype, None
    if recipe.output.dtype != "auto":
        return getattr(torch, recipe.output.dtype), None
    if scheme is not None:
        return (scheme.dtype, scheme) if recipe.output.format == "model" else (torch.bfloat16, None)
    return dtype, None


def config_changes(recipe: Recipe, base: Checkpoint, entries: list[PlanEntry], quantized: bool
                   ) -> dict[tuple[str, ...], Any]:
    """config.json changes the stored formats ask for: the dtype of ``output.dtype``, and no
    ``quantization_config`` once FP8 weights are written as floats."""
    config = read_config(base.folder)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    changes: dict[tuple[str, ...], Any] = {}
    dequantized = quantized and not any(e.storage for e in entries)
    if dequantized:
        changes[("quantization_config",)] = None
    if recipe.output.dtype != "auto" or dequantized:
        dtype = recipe.output.dtype if recipe.output.dtype != "auto" else "bfloat16"
        changes.update({(k,): dtype for k in keys})
    return changes


def plan_entries(recipe: Recipe, base: Checkpoint, schemes: dict[str, Fp8Blocks]) -> list[PlanEntry]:
    """One entry per base tensor: treatment, view and stored format."""
    entries = []
    for name in base.names:
        info = base.info(name)
        kind, view = classify(recipe, name, info.shape, info.dtype)
        dtype, storage = stored_as(recipe, info.dtype, schemes.get(name))
        entries.append(PlanEntry(name, kind, info.shape, dtype, view, storage))
    if recipe.spec.per_task and any(e.storage for e in entries):
        raise RecipeError(f"method '{recipe.method}' rebuilds every task's weights from the unified model, "
                          f"which FP8 storage would round twice; add output: {{dtype: bfloat16}}.")
    return entries


def _support(sources: tuple[TaskVectorSource, ...]) -> list[list]:
    return [s.checkpoint.support if isinstance(s, FullFineTune) else [] for s in sources]


def build_plan(recipe: Recipe, *, shard_size: int = DEFAULT_SHARD_SIZE,
               transform: TaskVectorTransform | None = None) -> Plan:
    """Open every checkpoint lazily and check it against the base; no tensor is read (except the
    heads a model may store as tied duplicates, compared with its embedding)."""
    if is_adapter(recipe.base):
        raise InputError(f"{recipe.base}: the base is a LoRA adapter; give the full base model it "
                         f"was trained on (its base_model_name_or_path).")
    base = open_weights(recipe.base, allow_pickle=recipe.allow_pickle)
    schemes = base.schemes if isinstance(base, Fp8Checkpoint) else {}
    labels = recipe.model_labels()
    opened = open_sources(recipe, base, labels)
    base, sources, vocabulary = align_vocabulary(recipe.tokenizer, base, opened, labels)
    if vocabulary.changed and recipe.output.format != "model":
        raise RecipeError(f"tokenizer: {recipe.tokenizer} changes the vocabulary rows, which a "
                          f"{recipe.output.format} output of the base cannot carry; write a model folder.")
    entries = plan_entries(recipe, base, schemes)
    scales = None
    if recipe.lines is not None:
        scales = layer_scales([e.name for e in entries if e.kind != "copy"], recipe.lines)
    out = vocabulary.out if vocabulary.changed else None
    chosen = opened[labels.index(recipe.tokenizer)] if recipe.tokenizer in labels and out is not None else None
    files = output_files(base.support, out, _support(opened), chosen.checkpoint.support if chosen else None,
                         config_changes(recipe, base, entries, bool(schemes)))
    notes = tuple(n for s in opened for n in (f"{s.label}: {x}" for x in s.notes)) + vocabulary.notes
    if schemes:
        written = next(e for e in entries if e.name in schemes)
        stored = "FP8 again (the base's blocks)" if written.storage else str(written.dtype)
        notes += (f"base: {len(schemes)} FP8 block-scaled weights dequantized for the merge, written as "
                  f"{stored.removeprefix('torch.')}",)
    return Plan(recipe, base, sources, tuple(entries), tuple(shard_units(entries, shard_size)), transform, scales,
                vocabulary, files, notes)
