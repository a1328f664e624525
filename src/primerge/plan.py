"""recipe -> :class:`Plan`: everything a merge needs to know before reading a single tensor.

The plan is checked once, from the headers: the base and every model opened lazily and aligned
(:mod:`primerge.taskvectors`), one :class:`~primerge.taskvectors.PlanEntry` per output tensor
with its treatment (``matrix``: the method's matrix merge; ``fallback``: every other floating
tensor; ``copy``: taken from the base), LiNeS scales, and a deterministic partition of the entries
into :class:`WorkUnit` s — the tensors of one output shard each, in base order. Executing a unit
is a pure function of (plan, unit, pre-pass result), which is what lets units run on any worker.
A plan holds only checkpoint metadata (readers open files per read), so it can be pickled and
sent to a remote worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from primerge.errors import InputError
from primerge.io.adapters import is_adapter
from primerge.io.readers import Checkpoint, open_checkpoint
from primerge.io.writer import DEFAULT_SHARD_SIZE
from primerge.methods.lines import layer_scales
from primerge.methods.stack import TaskStack
from primerge.recipe import Recipe
from primerge.taskvectors import (
    EntryKind,
    PlanEntry,
    TaskVectorSource,
    TaskVectorTransform,
    open_source,
    read_stack,
    read_sum,
)

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
    units, the optional task-vector ``transform`` and LiNeS ``scales``."""

    recipe: Recipe
    base: Checkpoint
    sources: tuple[TaskVectorSource, ...]
    entries: tuple[PlanEntry, ...]
    units: tuple[WorkUnit, ...]
    transform: TaskVectorTransform | None = None
    scales: dict[str, float] | None = None  # LiNeS λ(ℓ) per mergeable tensor, when asked for

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
        """Entries per treatment, and the task-specific tensors of all models."""
        counts = {"matrix": 0, "fallback": 0, "copy": 0}
        for e in self.entries:
            counts[e.kind] += 1
        counts["task_specific"] = sum(len(s.task_specific) for s in self.sources)
        return counts

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


def classify(recipe: Recipe, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> EntryKind:
    """matrix / fallback / copy for one base tensor (ALGORITHMS.md Conventions).

    Empty tensors (a zero-sized dimension) have nothing to merge and are copied.
    """
    if recipe.is_task_specific(name) or not dtype.is_floating_point or 0 in shape:
        return "copy"
    if len(shape) == 2 and recipe.is_matrix_name(name):
        return "matrix"
    return "fallback"


def build_plan(recipe: Recipe, *, shard_size: int = DEFAULT_SHARD_SIZE,
               transform: TaskVectorTransform | None = None) -> Plan:
    """Open every checkpoint lazily and check it against the base; no tensor is read."""
    if is_adapter(recipe.base):
        raise InputError(f"{recipe.base}: the base is a LoRA adapter; give the full base model it "
                         f"was trained on (its base_model_name_or_path).")
    base = open_checkpoint(recipe.base, allow_pickle=recipe.allow_pickle)
    sources = tuple(
        open_source(base, entry.path, label, entry.weight, allow_pickle=recipe.allow_pickle,
                    is_task_specific=recipe.is_task_specific)
        for entry, label in zip(recipe.models, recipe.model_labels())
    )
    entries = []
    for name in base.names:
        info = base.info(name)
        entries.append(PlanEntry(name, classify(recipe, name, info.shape, info.dtype), info.shape, info.dtype))
    scales = None
    if recipe.lines is not None:
        scales = layer_scales([e.name for e in entries if e.kind != "copy"], recipe.lines)
    return Plan(recipe, base, sources, tuple(entries), tuple(shard_units(entries, shard_size)), transform, scales)
