"""Task-vector sources: how τ_t of one tensor is obtained from one input model.

Every model of a recipe becomes one :class:`TaskVectorSource`, aligned with the base once (key
set, shapes, dtype class, one added or removed name prefix) before any tensor is read:

- :class:`FullFineTune`: a checkpoint of the base's architecture; τ = θ_t − θ₀.
- :class:`LoraAdapter`: a PEFT LoRA adapter folder (:mod:`primerge.io.adapters`); τ = s·B A on
  the modules it adapts (kept as factors for matrix parameters), θ_saved − θ₀ on what it stores
  in full (``modules_to_save``, biases), and zero elsewhere (rank-0 factors for matrices).

A new kind of input is one more subclass registered with :func:`source_kind`: it says which
paths it reads (:meth:`TaskVectorSource.claims`), how it is opened and aligned with the base
(:meth:`TaskVectorSource.open`), how to write τ of an entry (:meth:`TaskVectorSource.delta`),
optionally as factors (:meth:`TaskVectorSource.factors`), and where its task-specific tensors are.
A path no registered kind claims is read as a full fine-tune.

:func:`read_stack` builds the :class:`~primerge.methods.stack.TaskStack` of one tensor: every
model's τ_t (float32, on the merge device), transformed when a transform is set (PAVE
purification), then multiplied by the model's weight w_t; :func:`read_sum` accumulates
Σ_t w_t τ_t one model at a time for merges that read only the sum.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

from primerge.util.errors import InputError
from primerge.io.adapters import Adapter, is_adapter, open_adapter
from primerge.io.files import load_json
from primerge.io.manifest import non_finite
from primerge.io.quantized import Fp8Blocks, open_weights
from primerge.io.readers import Checkpoint, open_checkpoint
from primerge.methods.stack import LowRank, TaskStack
from primerge.core.tensor_names import map_names, prefix_map, rows_differ

#: What happens to one output tensor: the one vocabulary of the plan, pre-flight, the card and the CLI's
#: counts. ``matrix``: the method's matrix merge; ``experts``: a stack of E matrices, each merged as a
#: matrix; ``reshaped``: flattened to one matrix; ``fallback``: the method's non-matrix merge; ``copy``:
#: the base's tensor as it is. The recipe's ``matrices:`` words choose among the first four
#: (``matrix``, ``experts``, ``flatten`` -> reshaped, ``mean`` -> fallback: :func:`primerge.core.treatments.classify`).
Treatment = Literal["matrix", "experts", "reshaped", "fallback", "copy"]
#: Every treatment, in the order reports list them.
TREATMENTS: tuple[Treatment, ...] = get_args(Treatment)

#: (model label, tensor name, θ₀ in float32, τ_t in float32) -> replacement τ_t, applied to every
#: mergeable tensor before model weights (e.g. PAVE purification, :mod:`primerge.purify`).
TaskVectorTransform = Callable[[str, str, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class PlanEntry:
    """One output tensor: its base name, treatment, shape and storage dtype; ``view`` (B, m, n) for
    a tensor merged as B matrices (:mod:`primerge.core.treatments`); ``storage`` a quantized format the
    merged value is encoded in (:class:`~primerge.io.quantized.Fp8Blocks`), else a cast to ``dtype``."""

    name: str
    kind: Treatment
    shape: tuple[int, ...]
    dtype: torch.dtype
    view: tuple[int, int, int] | None = None
    storage: Fp8Blocks | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensor (with its scales when quantized)."""
        if self.storage is not None:
            return self.storage.stored_bytes(self.shape)
        return math.prod(self.shape) * self.dtype.itemsize

    def store(self, value: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """A merged float32 value in the stored format, on the CPU, with its companion tensors."""
        if self.storage is None:
            return value.to(dtype=self.dtype, device="cpu"), {}
        return self.storage.encode(self.name, value)


def finite(tensor: Tensor, where: object, name: str) -> Tensor:
    """``tensor``, refused with the file and tensor named when it holds NaN or Inf."""
    if non_finite(tensor):
        raise InputError(f"{where}: tensor '{name}' contains NaN or Inf values; fix or re-export it.")
    return tensor


class TaskVectorSource(ABC):
    """One fine-tuned model as a source of task vectors.

    ``names`` maps the base names it provides τ for to its own tensor names; ``task_specific``
    lists its own names of the tensors kept per task (heads); ``weight`` w multiplies τ; ``notes``
    say what opening reconciled with the base (shown by ``primerge plan``).
    """

    def __init__(self, label: str, weight: float, names: dict[str, str], task_specific: list[str]):
        self.label = label
        self.weight = weight
        self.names = names
        self.task_specific = task_specific
        self.notes: list[str] = []  # what opening reconciled (tied names, ...), for the pre-flight report

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether ``path`` is an input of this kind."""
        return False

    @classmethod
    @abstractmethod
    def open(cls, base: Checkpoint, path: Path, label: str, weight: float, *, allow_pickle: bool,
             is_task_specific: Callable[[str], bool]) -> TaskVectorSource:
        """Open ``path`` lazily and align it with the base (no tensor is read)."""

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
    def files(self) -> list[Path]:
        """Every file this model is read from (a distributed merge checks each node sees them)."""

    def architectures(self) -> list[str] | None:
        """The transformers classes the model was saved as (its ``config.json``), when known."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release file handles and cached tensors."""


#: Registered input kinds, tried in order (:func:`open_source`).
SOURCE_KINDS: list[type[TaskVectorSource]] = []


def source_kind(cls: type[TaskVectorSource]) -> type[TaskVectorSource]:
    """Class decorator: register an input kind (see the module docstring)."""
    SOURCE_KINDS.append(cls)
    return cls


class FullFineTune(TaskVectorSource):
    """A full fine-tune: τ = θ_t − θ₀. Any path no registered kind claims is read as one."""

    def __init__(self, checkpoint: Checkpoint, label: str, weight: float, names: dict[str, str],
                 task_specific: list[str]):
        super().__init__(label, weight, names, task_specific)
        self.checkpoint = checkpoint

    @classmethod
    def open(cls, base: Checkpoint, path: Path, label: str, weight: float, *, allow_pickle: bool,
             is_task_specific: Callable[[str], bool]) -> FullFineTune:
        """Check the checkpoint against the base (key set, shapes, dtype class) and map its names
        (one prefix, tied embeddings: :func:`primerge.core.tensor_names.map_names`). The base's integer buffers
        (e.g. BERT's ``position_ids``) are copied from the base, so a fine-tune saved without them is fine."""
        model = open_weights(path, allow_pickle=allow_pickle)
        shared = [n for n in base.names if not is_task_specific(n)]
        heads = [n for n in model.names if is_task_specific(n)]
        names, notes = map_names(base, model, shared, heads, label)
        for b, m in names.items():
            _check_tensor(base, model, b, m)
        source = cls(model, label, weight, names, heads)
        source.notes = notes + _dtype_notes(base, model, names)
        return source

    def delta(self, entry: PlanEntry, base: Tensor, out: Tensor) -> None:
        name = self.names[entry.name]
        tensor = finite(self.checkpoint.load(name), self.checkpoint.info(name).file, name)
        torch.sub(tensor.to(device=out.device, dtype=torch.float32), base, out=out)

    def head(self, name: str) -> Tensor:
        return self.checkpoint.load(name)

    def files(self) -> list[Path]:
        return sorted({self.checkpoint.info(n).file for n in self.checkpoint.names})

    def architectures(self) -> list[str] | None:
        config = next((f for f in self.checkpoint.support if f.name == "config.json"), None)
        if config is None:
            return None
        data = load_json(config, "config.json")  # vetted when opened; read again defensively
        architectures = data.get("architectures") if isinstance(data, dict) else None
        return [str(a) for a in architectures] if isinstance(architectures, list) else None

    def close(self) -> None:
        self.checkpoint.close()


@source_kind
class LoraAdapter(TaskVectorSource):
    """A PEFT LoRA adapter: τ = s·B A (factors for matrix parameters), stored values − θ₀, or 0."""

    def __init__(self, adapter: Adapter, label: str, weight: float, names: dict[str, str],
                 task_specific: list[str]):
        super().__init__(label, weight, names, task_specific)
        self.adapter = adapter

    @classmethod
    def claims(cls, path: Path) -> bool:
        return is_adapter(path)

    @classmethod
    def open(cls, base: Checkpoint, path: Path, label: str, weight: float, *, allow_pickle: bool,
             is_task_specific: Callable[[str], bool]) -> LoraAdapter:
        """Map the adapter's targets onto base names (one prefix added or removed) and check shapes."""
        adapter = open_adapter(path, partial(open_checkpoint, allow_pickle=allow_pickle))
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
        return cls(adapter, label, weight, {b: t for t, b in mapping.items()}, heads)

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

    def files(self) -> list[Path]:
        weights = self.adapter.weights
        return sorted({self.adapter.config_file, *(weights.info(n).file for n in weights.names)})

    def close(self) -> None:
        self.adapter.close()


class VocabAligned(TaskVectorSource):
    """A full fine-tune whose vocabulary differs from the output's (:mod:`primerge.core.vocabulary`):
    vocabulary tensors are matched row by row by token string, every other tensor is ``inner``'s.

    ``rows[name] = (axis, r)``: r[i] is the model's row of output row i along ``axis``, −1 where the
    base or the model lacks the token or the row is padding; τ[i] = θ_t[r[i]] − θ₀[i] where
    r[i] ≥ 0, else 0 (θ₀ is the base aligned to the output rows).
    """

    def __init__(self, inner: TaskVectorSource, rows: dict[str, tuple[int, Tensor]]):
        super().__init__(inner.label, inner.weight, inner.names, inner.task_specific)
        self.inner, self.rows, self.notes = inner, rows, inner.notes

    @classmethod
    def open(cls, base, path, label, weight, *, allow_pickle, is_task_specific) -> TaskVectorSource:
        raise TypeError("VocabAligned wraps an opened source: see primerge.core.vocabulary.align_vocabulary")

    def delta(self, entry: PlanEntry, base: Tensor, out: Tensor) -> None:
        if entry.name not in self.rows:
            return self.inner.delta(entry, base, out)
        axis, rows = self.rows[entry.name]
        name = self.names[entry.name]
        theta = finite(self.inner.head(name), f"model '{self.label}'", name).to(out.device, torch.float32)
        keep = (rows >= 0).nonzero().squeeze(1).to(out.device)
        out.zero_()
        out.index_copy_(axis, keep, theta.index_select(axis, rows.to(out.device)[keep]) - base.index_select(axis, keep))

    def factors(self, entry: PlanEntry, device: torch.device) -> LowRank | None:
        return None if entry.name in self.rows else self.inner.factors(entry, device)

    def head(self, name: str) -> Tensor:
        return self.inner.head(name)

    def files(self) -> list[Path]:
        return self.inner.files()

    def close(self) -> None:
        self.inner.close()


# ------------------------------------------------------------------------------------ reading


def base_tensor(base: Checkpoint, entry: PlanEntry, device: torch.device) -> Tensor:
    """θ₀ of ``entry`` in float32 on ``device``."""
    tensor = finite(base.load(entry.name), base.info(entry.name).file, entry.name)
    return tensor.to(device=device, dtype=torch.float32)


def weighted_delta(source: TaskVectorSource, entry: PlanEntry, base: Tensor, out: Tensor,
                   transform: TaskVectorTransform | None, weighted: bool = True, weight: float | None = None) -> Tensor:
    """Write w·τ of one model into ``out``: its τ, the ``transform`` if any, then the weight
    (``weight``, else the model's; none when ``weighted`` is false: the method applies the weights itself)."""
    source.delta(entry, base, out)
    if transform is not None:
        out.copy_(transform(source.label, entry.name, base, out))
    weight = source.weight if weight is None else weight
    if weighted and weight != 1.0:
        out.mul_(weight)
    return out


def model_weights(sources: Sequence[TaskVectorSource], weights: Sequence[float] | None) -> tuple[float, ...]:
    """The models' weights for one tensor: ``weights`` (resolved per tensor by the plan), else each model's."""
    return tuple(weights) if weights is not None else tuple(s.weight for s in sources)


def read_stack(base: Checkpoint, sources: Sequence[TaskVectorSource], entry: PlanEntry, device: torch.device,
               transform: TaskVectorTransform | None = None, weighted: bool = True,
               weights: Sequence[float] | None = None) -> tuple[Tensor, TaskStack]:
    """θ₀ (float32) and the :class:`TaskStack` of w_t τ_t (τ_t when not ``weighted``), carrying the
    weights (``weights``, else the models'); low-rank τ_t stay factors unless a ``transform`` needs them dense."""
    theta = base_tensor(base, entry, device)
    w = model_weights(sources, weights)
    lowrank: dict[int, LowRank] = {}
    if transform is None:
        for t, source in enumerate(sources):
            low = source.factors(entry, device)
            if low is not None:
                lowrank[t] = low.scaled(w[t]) if weighted else low
    dense_index = [t for t in range(len(sources)) if t not in lowrank]
    rows = torch.empty((len(dense_index), *entry.shape), dtype=torch.float32, device=device)
    for i, t in enumerate(dense_index):
        weighted_delta(sources[t], entry, theta, rows[i], transform, weighted, w[t])
    return theta, TaskStack(rows, dense_index, lowrank, w)


def read_sum(base: Checkpoint, sources: Sequence[TaskVectorSource], entry: PlanEntry, device: torch.device,
             transform: TaskVectorTransform | None = None, weighted: bool = True,
             weights: Sequence[float] | None = None) -> tuple[Tensor, TaskStack]:
    """θ₀ (float32) and Σ_t w_t τ_t (Σ_t τ_t when not ``weighted``) as :meth:`TaskStack.of_sum`,
    accumulated one model at a time: three tensors in memory whatever the number of models."""
    theta = base_tensor(base, entry, device)
    total = torch.zeros_like(theta)
    scratch = torch.empty_like(theta)
    w = model_weights(sources, weights)
    for source, weight in zip(sources, w):
        total += weighted_delta(source, entry, theta, scratch, transform, weighted, weight)
    return theta, TaskStack.of_sum(total, len(sources), w)


# ------------------------------------------------------------------------------------ opening


def _shape_hint(model_shape: tuple[int, ...], base_shape: tuple[int, ...]) -> str:
    """Which dimension differs, and what that means."""
    if len(model_shape) != len(base_shape):
        return (f"It has {len(model_shape)} dimensions in the model and {len(base_shape)} in the base: the "
                f"architectures differ.")
    dims = [d for d, (a, b) in enumerate(zip(model_shape, base_shape)) if a != b]
    what = "; ".join(f"dimension {d} is {model_shape[d]} in the model, {base_shape[d]} in the base" for d in dims)
    return (f"{what}: the model's architecture (hidden size, heads or MLP width) differs from the base's, "
            f"so it is not a fine-tune of this base.")


def _dtype_notes(base: Checkpoint, model: Checkpoint, names: dict[str, str]) -> list[str]:
    """A note per stored dtype of the model that differs from the base's (merged in float32 anyway)."""
    pairs = {(str(base.info(b).dtype), str(model.info(m).dtype)) for b, m in names.items()}
    return [f"stored as {mine.removeprefix('torch.')} where the base has {theirs.removeprefix('torch.')}: "
            f"read as float32, written as the base's" for theirs, mine in sorted(pairs) if theirs != mine]


def _check_tensor(base: Checkpoint, model: Checkpoint, b: str, m: str) -> None:
    """Same shape and dtype class for base tensor ``b`` and model tensor ``m``."""
    bi, mi = base.info(b), model.info(m)
    if bi.shape != mi.shape and not rows_differ(b, bi.shape, mi.shape):  # vocabulary rows: primerge.core.vocabulary
        raise InputError(f"tensor '{b}': shape {list(mi.shape)} in {mi.file} but {list(bi.shape)} "
                         f"in the base {bi.file}. {_shape_hint(tuple(mi.shape), tuple(bi.shape))}")
    if bi.dtype.is_floating_point != mi.dtype.is_floating_point:
        raise InputError(f"tensor '{b}': dtype {mi.dtype} in {mi.file} but {bi.dtype} in the base {bi.file}.")


def open_source(base: Checkpoint, path: Path, label: str, weight: float, *, allow_pickle: bool,
                is_task_specific: Callable[[str], bool]) -> TaskVectorSource:
    """The first registered kind that claims ``path`` (:data:`SOURCE_KINDS`), else a full fine-tune."""
    kind = next((k for k in SOURCE_KINDS if k.claims(path)), FullFineTune)
    return kind.open(base, path, label, weight, allow_pickle=allow_pickle, is_task_specific=is_task_specific)
