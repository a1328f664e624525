"""What the stream hands to an output, the output protocol, and what a merge reports.

The stream yields one :class:`MergedTensor` per output tensor, in plan order: copied tensors as
:class:`MergedTensor`, merged ones as :class:`MergedUpdate` (with the float32 update Δ, which a
LoRA export approximates), per-task methods' as :class:`PerTaskTensor` (with τ_uni and the
per-task tensors). A :class:`Sink` receives them: ``session`` opens it (a folder output creates
its temporary folder there and publishes it when the session ends without error), ``add`` takes
each tensor, ``finish`` writes what remains and fills the :class:`MergeResult`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from primerge.plan import Plan


@dataclass(frozen=True)
class MergedTensor:
    """One output tensor in its stored dtype on the CPU; ``kind`` is its plan treatment."""

    name: str
    value: Tensor
    kind: str


@dataclass(frozen=True)
class MergedUpdate(MergedTensor):
    """A merged tensor θ₀ + Δ, with the merged update Δ in float32 (on the merge device)."""

    update: Tensor


@dataclass(frozen=True)
class PerTaskTensor(MergedUpdate):
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


class Sink(ABC):
    """An output: receives the merged tensors of a plan in order (see the module docstring)."""

    @contextmanager
    def session(self, plan: Plan, prepass: Any) -> Iterator[None]:
        """Open the output for ``plan`` (``prepass`` is the method's pre-pass result, if any)."""
        yield

    @abstractmethod
    def add(self, merged: MergedTensor) -> None:
        """Take one output tensor."""

    @abstractmethod
    def finish(self, result: MergeResult) -> None:
        """Write what remains (inside the session) and record the outcome in ``result``."""


def task_heads(plan: Plan) -> dict[str, dict[str, Tensor]]:
    """Each model's task-specific tensors, under their names in that model."""
    return {s.label: {n: s.head(n).contiguous() for n in s.task_specific} for s in plan.sources if s.task_specific}
