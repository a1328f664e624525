"""Task-vector sources: how τ_t of one tensor is obtained from one input model.

Every model of a recipe becomes one :class:`TaskVectorSource`, aligned with the base once (key
set, shapes, dtype class, one added or removed name prefix) before any tensor is read:

- :class:`FullFineTune`: a checkpoint of the base's architecture; τ = θ_t − θ₀.
- :class:`LoraAdapter`: a PEFT LoRA adapter folder (:mod:`primerge.io.adapters`); τ = s·B A on
  the modules it adapts (kept as factors for matrix parameters), θ_saved − θ₀ on what it stores
  in full (``modules_to_save``, biases), and zero elsewhere (rank-0 factors for matrices).

A new kind of input (vocabulary-aligned rows, dequantized weights) is one more subclass: it
says how to write τ of an entry (:meth:`TaskVectorSource.delta`), optionally as factors
(:meth:`TaskVectorSource.factors`), and where its task-specific tensors are.

:func:`read_stack` builds the :class:`~primerge.methods.stack.TaskStack` of one tensor: every
model's τ_t (float32, on the merge device), transformed when a transform is set (PAVE
purification), then multiplied by the model's weight w_t; :func:`read_sum` accumulates
Σ_t w_t τ_t one model at a time for merges that read only the sum.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from primerge.errors import InputError
from primerge.io.adapters import Adapter, is_adapter, open_adapter
from primerge.io.readers import Checkpoint, open_checkpoint
from primerge.methods.stack import LowRank, TaskStack

EntryKind = Literal["matrix", "fallback", "copy"]

#: (model label, tensor name, θ₀ in float32, τ_t in float32) -> replacement τ_t, applied to every
#: mergeable tensor before model weights (e.g. PAVE purification, :mod:`primerge.purify`).
TaskVectorTransform = Callable[[str, str, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PlanEntry:
    """One output tensor: its base name, treatment, shape and storage dtype."""

    name: str
    kind: EntryKind
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensor."""
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


def finite(tensor: Tensor, where: object, name: str) -> Tensor:
    """``tensor``, refused with the file and tensor named when it holds NaN or Inf."""
    if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
        raise InputError(f"{where}: tensor '{name}' contains NaN or Inf values; fix or re-export it.")
    return tensor


class TaskVectorSource(ABC):
    """One fine-tuned model as a source of task vectors.

    ``names`` maps the base names it provides τ for to its own tensor names; ``task_specific``
    lists its own names of the tensors kept per task (heads); ``weight`` w multiplies τ.
    """

    def __init__(self, label: str, weight: float, names: dict[str, str], task_specific: list[str]):
        self.label = label
        self.weight = weight
        self.names = names
        self.task_specific = task_specific

    @abstractmethod
    def delta(self, entry: PlanEntry, base: Tensor, out: Tensor) -> None:
        """Write τ of ``entry`` (float32, unweighted) into ``out``; ``base`` is θ₀ in float32."""

    def factors(self, entry: PlanEntry, device: torch.device) -> LowRank | None:
        """τ of ``entry`` as low-rank factors (unweighted) when it is low-rank by construction."""
        return None

    @abstractmethod
    def head(self, name: str) -> Tensor:
        """A task-specific tensor under its name in this model."""

    @abstractmethod
    def close(self) -> None:
        """Release file handles and cached tensors."""


class FullFineTune(TaskVectorSource):
    """A full fine-tune: τ = θ_t − θ₀."""

    def __init__(self, checkpoint: Checkpoint, label: str, weight: float, names: dict[str, str],
                 task_specific: list[str]):
        super().__init__(label, weight, names, task_specific)
        self.checkpoint = checkpoint

    def delta(self, entry: PlanEntry, base: Tensor, out: Tensor) -> None:
        name = self.names[entry.name]
        tensor = finite(self.checkpoint.load(name), self.checkpoint.info(name).file, name)
        torch.sub(tensor.to(device=out.device, dtype=torch.float32), base, out=out)

    def head(self, name: str) -> Tensor:
        return self.checkpoint.load(name)

    def close(self) -> None:
        self.checkpoint.close()


class LoraAdapter(TaskVectorSource):
    """A PEFT LoRA adapter: τ = s·B A (factors for matrix parameters), stored values − θ₀, or 0."""

    def __init__(self, adapter: Adapter, label: str, weight: float, names: dict[str, str],
                 task_specific: list[str]):
        super().__init__(label, weight, names, task_specific)
        self.adapter = adapter

    def delta(self, entry: PlanEntry, base: Tensor, out: Tensor) -> None:
        target = self.names.get(entry.name)
        if target is None:
            out.zero_()
        else:
            out.copy_(finite(self.adapter.delta(target, base), self.adapter.path, target))

    def factors(self, entry: PlanEntry, device: torch.device) -> LowRank | None:
        if entry.kind != "matrix":
            return None
        target = self.names.get(entry.name)
        if target is None:
            return LowRank.zero(entry.shape, device)
        if not self.adapter.is_lowrank(target):
            return None
        left, right = (finite(f, self.adapter.path, target).to(device) for f in self.adapter.factors(target))
        return LowRank(left, right)

    def head(self, name: str) -> Tensor:
        return self.adapter.full_value(name)

    def close(self) -> None:
        self.adapter.close()


# ------------------------------------------------------------------------------------ reading


def base_tensor(base: Checkpoint, entry: PlanEntry, device: torch.device) -> Tensor:
    """θ₀ of ``entry`` in float32 on ``device``."""
    tensor = finite(base.load(entry.name), base.info(entry.name).file, entry.name)
    return tensor.to(device=device, dtype=torch.float32)


def weighted_delta(source: TaskVectorSource, entry: PlanEntry, base: Tensor, out: Tensor,
                   transform: TaskVectorTransform | None) -> Tensor:
    """Write w·τ of one model into ``out``: its τ, the ``transform`` if any, then the weight."""
    source.delta(entry, base, out)
    if transform is not None:
        out.copy_(transform(source.label, entry.name, base, out))
    if source.weight != 1.0:
        out.mul_(source.weight)
    return out


def read_stack(base: Checkpoint, sources: Sequence[TaskVectorSource], entry: PlanEntry, device: torch.device,
               transform: TaskVectorTransform | None = None) -> tuple[Tensor, TaskStack]:
    """θ₀ (float32) and the :class:`TaskStack` of w_t τ_t; low-rank τ_t stay factors unless a
    ``transform`` needs them dense."""
    theta = base_tensor(base, entry, device)
    lowrank: dict[int, LowRank] = {}
    if transform is None:
        for t, source in enumerate(sources):
            low = source.factors(entry, device)
            if low is not None:
                lowrank[t] = low.scaled(source.weight)
    dense_index = [t for t in range(len(sources)) if t not in lowrank]
    rows = torch.empty((len(dense_index), *entry.shape), dtype=torch.float32, device=device)
    for i, t in enumerate(dense_index):
        weighted_delta(sources[t], entry, theta, rows[i], transform)
    return theta, TaskStack(rows, dense_index, lowrank)


def read_sum(base: Checkpoint, sources: Sequence[TaskVectorSource], entry: PlanEntry, device: torch.device,
             transform: TaskVectorTransform | None = None) -> tuple[Tensor, TaskStack]:
    """θ₀ (float32) and Σ_t w_t τ_t as :meth:`TaskStack.of_sum`, accumulated one model at a time:
    three tensors in memory whatever the number of models."""
    theta = base_tensor(base, entry, device)
    total = torch.zeros_like(theta)
    scratch = torch.empty_like(theta)
    for source in sources:
        total += weighted_delta(source, entry, theta, scratch, transform)
    return theta, TaskStack.of_sum(total, len(sources))


# ------------------------------------------------------------------------------------ opening


def prefix_map(base_names: list[str], model_names: set[str]) -> dict[str, str] | None:
    """Map base names to model names, allowing one added or removed leading prefix.

    A model saved with a task wrapper (``bert.encoder...`` for a base ``encoder...``) or the
    reverse is recognised; returns ``None`` when no single prefix fits.
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


def _check_tensor(base: Checkpoint, model: Checkpoint, b: str, m: str) -> None:
    """Same shape and dtype class for base tensor ``b`` and model tensor ``m``."""
    bi, mi = base.info(b), model.info(m)
    if bi.shape != mi.shape:
        vocab = re.search(r"embed|wte|lm_head|shared", b) and bi.shape[1:] == mi.shape[1:]
        hint = (" A resized vocabulary? Resize the base's embeddings to the model's (or the model's "
                "to the base's) before merging." if vocab else " Models must share the base's architecture.")
        raise InputError(f"tensor '{b}': shape {list(mi.shape)} in {mi.file} but {list(bi.shape)} "
                         f"in the base {bi.file}.{hint}")
    if bi.dtype.is_floating_point != mi.dtype.is_floating_point:
        raise InputError(f"tensor '{b}': dtype {mi.dtype} in {mi.file} but {bi.dtype} in the base {bi.file}.")


def open_full(base: Checkpoint, model: Checkpoint, label: str, weight: float,
              is_task_specific: Callable[[str], bool]) -> FullFineTune:
    """Check a full fine-tune against the base (key set, shapes, dtype class) and map its names."""
    shared = [n for n in base.names if not is_task_specific(n)]
    names = prefix_map(shared, set(model.names))
    if names is None:
        missing = [n for n in shared if n not in model]
        raise InputError(f"{model.path}: {len(missing)} tensors of the base {base.path} are missing "
                         f"(first: '{missing[0]}'). Is '{label}' a fine-tune of this base?")
    heads = [n for n in model.names if is_task_specific(n)]
    extra = sorted(set(model.names) - set(names.values()) - set(heads))
    if extra:
        raise InputError(f"{model.path}: {len(extra)} tensors are not in the base {base.path} "
                         f"(first: '{extra[0]}'). If they are per-task heads, name them with "
                         f"task_specific: REGEX in the recipe.")
    for b, m in names.items():
        _check_tensor(base, model, b, m)
    return FullFineTune(model, label, weight, names, heads)


def open_lora(base: Checkpoint, adapter: Adapter, label: str, weight: float,
              is_task_specific: Callable[[str], bool]) -> LoraAdapter:
    """Map an adapter's targets onto base names (one prefix added or removed) and check shapes."""
    heads = [n for n in adapter.targets() if is_task_specific(n)]
    shared = [n for n in adapter.targets() if n not in heads]
    mapping = prefix_map(shared, set(base.names)) if shared else {}
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
        if not info.dtype.is_floating_point or is_task_specific(name):
            raise InputError(f"{adapter.path}: the adapter changes '{target}', which the base "
                             f"{base.path} keeps unmerged (task-specific or not floating).")
    return LoraAdapter(adapter, label, weight, {b: t for t, b in mapping.items()}, heads)


def open_source(base: Checkpoint, path: Path, label: str, weight: float, *, allow_pickle: bool,
                is_task_specific: Callable[[str], bool]) -> TaskVectorSource:
    """A full fine-tune (any checkpoint :func:`open_checkpoint` reads) or a LoRA adapter folder."""
    if is_adapter(path):
        opener = partial(open_checkpoint, allow_pickle=allow_pickle)
        return open_lora(base, open_adapter(path, opener), label, weight, is_task_specific)
    model = open_checkpoint(path, allow_pickle=allow_pickle)
    return open_full(base, model, label, weight, is_task_specific)
