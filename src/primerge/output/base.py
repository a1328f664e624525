"""What the stream hands to an output, the output protocol, and what a merge reports.

The stream yields one :class:`MergedTensor` per output tensor, in plan order: copied tensors as
:class:`MergedTensor`, merged ones as :class:`MergedUpdate` (with the float32 update Δ, which a
LoRA export approximates), per-task methods' as :class:`PerTaskTensor` (with τ_uni and the
per-task tensors). A :class:`Sink` receives them: ``session`` opens it (a folder output creates
its temporary folder there and publishes it when the session ends without error), ``add`` takes
each tensor, ``finish`` writes what remains and fills the :class:`MergeResult`.

Units may run in other processes or on other machines (:mod:`primerge.engine.executors`). What runs
beside a unit is the sink's :meth:`Sink.unit_writer`: a small picklable object that turns the
unit's tensors into a *receipt* there (by default the tensors themselves; a model folder writes
the unit's shard file and returns its hashes), which the sink then takes in unit order with
:meth:`Sink.receive`. Local and distributed merges share this path, so they write the same bytes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from primerge.linalg import SVDOutcomes

if TYPE_CHECKING:
    from primerge.core.plan import Plan, WorkUnit


@dataclass(frozen=True)
class MergedTensor:
    """One output tensor in its stored dtype on the CPU; ``kind`` is its plan treatment;
    ``companions`` are tensors stored beside it (an FP8 weight's block scales)."""

    name: str
    value: Tensor
    kind: str
    companions: dict[str, Tensor] = field(default_factory=dict, kw_only=True)

    def stored(self) -> dict[str, Tensor]:
        """Every tensor this output tensor is stored as, by name."""
        return {self.name: self.value, **self.companions}


@dataclass(frozen=True)
class MergedUpdate(MergedTensor):
    """A merged tensor θ₀ + Δ, with the merged update Δ in float32 (on the merge device)."""

    update: Tensor


@dataclass(frozen=True)
class PerTaskTensor(MergedTensor):
    """A per-task method's tensor: ``unified`` τ_uni (stored dtype, CPU) and ``task_tensors``
    (key -> (T, *shape) on the CPU) from which each task's own update is rebuilt."""

    unified: Tensor
    task_tensors: dict[str, Tensor]


@dataclass
class MergeResult:
    """What a merge produced: the output folder, or the tensors when no folder was asked for."""

    method: str
    parameters: dict
    out: Path | None = None
    state_dict: dict[str, Tensor] | None = None
    task_tensors: dict[str, dict[str, Tensor]] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    report: str | None = None  # what a whole-model pre-pass decided (e.g. PRIME's F(r) table)
    task_states: dict[str, dict[str, Tensor]] | None = None  # per-task methods, in memory
    per_task: bool = False  # the method gives every task its own model (see primerge.output.per_task)
    lora: dict | None = None  # LoRA output: rank and per-module errors (primerge.output.lora)
    execution: dict = field(default_factory=dict)  # where it ran: backend, device, workers
    decisions: list[str] = field(default_factory=list)  # from the shapes alone: svd: auto, rank caps (engine)
    svd: SVDOutcomes = field(default_factory=SVDOutcomes)  # after the merge: matrices per SVD path, and why
    prepass_svd: SVDOutcomes = field(default_factory=SVDOutcomes)  # the same for the whole-model pre-pass
    parameter_table: list[str] = field(default_factory=list)  # parameters resolved per tensor class and blocks
    inputs: list[dict] = field(default_factory=list)  # each input's files with their SHA-256 (the card's front matter)


class UnitWriter(Protocol):
    """Runs where a unit runs: the unit's tensors -> a receipt for :meth:`Sink.receive` (picklable)."""

    def write(self, unit: WorkUnit, tensors: Iterable[MergedTensor]) -> Any: ...


class KeepTensors:
    """The default unit writer: the receipt is the unit's tensors, which the sink then ``add`` s."""

    def write(self, unit: WorkUnit, tensors: Iterable[MergedTensor]) -> list[MergedTensor]:
        return list(tensors)


class Sink(ABC):
    """An output: receives the merged tensors of a plan in order (see the module docstring)."""

    @contextmanager
    def session(self, plan: Plan, prepass: Any) -> Iterator[None]:
        """Open the output for ``plan`` (``prepass`` is the method's pre-pass result, if any)."""
        yield

    def unit_writer(self) -> UnitWriter:
        """What turns a unit's tensors into this sink's receipt, where the unit runs."""
        return KeepTensors()

    @abstractmethod
    def receive(self, unit: WorkUnit, receipt: Any) -> None:
        """Take one unit's receipt, in unit order."""

    @abstractmethod
    def finish(self, result: MergeResult) -> None:
        """Write what remains (inside the session) and record the outcome in ``result``."""


class TensorSink(Sink):
    """A sink that takes the merged tensors one by one (:meth:`add`), whatever unit they came in."""

    def receive(self, unit: WorkUnit, receipt: list[MergedTensor]) -> None:
        for merged in receipt:
            self.add(merged)

    @abstractmethod
    def add(self, merged: MergedTensor) -> None:
        """Take one output tensor."""


#: Registered folder outputs by name (``output: {format: NAME}`` in a recipe).
FORMATS: dict[str, type[Sink]] = {}


def output_format(name: str):
    """Class decorator: register a folder output under ``name``."""
    def register(cls: type[Sink]) -> type[Sink]:
        if name in FORMATS:
            raise ValueError(f"output format {name!r} is registered twice")
        FORMATS[name] = cls
        return cls
    return register


def task_heads(plan: Plan) -> dict[str, dict[str, Tensor]]:
    """Each model's task-specific tensors, under their names in that model."""
    return {s.label: {n: s.head(n).contiguous() for n in s.task_specific} for s in plan.sources if s.task_specific}
