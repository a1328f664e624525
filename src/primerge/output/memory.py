"""In-memory output (the Python API without ``out``): the merged state dict, every task's
task-specific tensors, and for per-task methods every task's rebuilt state dict."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor

from primerge.io.writer import check_finite
from primerge.output.base import MergedTensor, MergedUpdate, MergeResult, PerTaskTensor, TensorSink, task_heads
from primerge.output.per_task import rebuild_task
from primerge.core.plan import Plan, WorkUnit


class KeepValues:
    """A unit's tensors without the float32 updates, which an in-memory result does not keep."""

    def write(self, unit: WorkUnit, tensors: Iterable[MergedTensor]) -> list[MergedTensor]:
        return [MergedTensor(m.name, m.value, m.kind, companions=m.companions) if isinstance(m, MergedUpdate) else m
                for m in tensors]


class MemorySink(TensorSink):
    """Collects the merge into :class:`~primerge.output.base.MergeResult` fields."""

    def unit_writer(self) -> KeepValues:
        return KeepValues()

    @contextmanager
    def session(self, plan: Plan, prepass: Any) -> Iterator[None]:
        self.plan = plan
        self.state: dict[str, Tensor] = {}
        spec = plan.recipe.spec
        self.scalars = prepass.task_scalars() if spec.per_task else None
        self.tasks: dict[str, dict[str, Tensor]] | None = (
            {label: {} for label in plan.labels} if self.scalars is not None else None)
        yield

    def add(self, merged: MergedTensor) -> None:
        stored = merged.stored()
        check_finite(stored, "merge result")  # as the writers check every written tensor
        self.state.update(stored)
        if self.tasks is None:
            return
        for t, label in enumerate(self.plan.labels):
            if isinstance(merged, PerTaskTensor):
                task = {k: v[t] for k, v in merged.task_tensors.items()}
                self.tasks[label][merged.name] = rebuild_task(
                    self.plan.recipe.spec, self.plan.base.load(merged.name), merged.unified, task,
                    self.scalars[t], merged.value.dtype)
            else:
                self.tasks[label][merged.name] = merged.value

    def finish(self, result: MergeResult) -> None:
        result.state_dict = self.state
        result.task_states = self.tasks
        result.task_tensors = task_heads(self.plan)
