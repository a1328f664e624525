"""EMR-Merging: Elect, Mask & Rescale (Huang et al. 2024).

One unified task vector plus light per-task modulators (docs/algorithms.md, "emr"):

- Elect: flag = sign(Σ_t τ_t); τ_uni = flag ⊙ max_t |τ_t ⊙ [τ_t · flag > 0]|.
- Mask:  m_t = [τ_t · flag > 0]  (one bit per entry and task).
- Rescale: λ_t = Σ|τ_t| / Σ|m_t ⊙ τ_uni|, summed over the whole model (a whole-model pre-pass).

Task t's model is θ₀ + λ_t · m_t ⊙ τ_uni (:func:`rebuild`). The merged output holds the
unified model θ₀ + τ_uni; the engine stores τ_uni, the bit-packed masks and the scalars
beside it (see the model card), and :func:`primerge.load_task_state` rebuilds
any task's weights. EMR is element-wise: it acts on every floating tensor.
"""

from __future__ import annotations

import torch
from torch import Tensor

from primerge.methods.base import MethodParams, PerTaskUpdate, TensorContext, merge_method
from primerge.methods.stack import TaskStack


class EMRParams(MethodParams):
    """EMR is tuning-free: it has no parameters."""


def elect(taus: Tensor) -> tuple[Tensor, Tensor]:
    """(τ_uni, masks): the elected unified vector and the (T, *shape) agreement masks."""
    flag = torch.sign(taus.sum(0))
    masks = taus * flag > 0
    zero = torch.zeros((), dtype=taus.dtype, device=taus.device)
    unified = flag * torch.where(masks, taus.abs(), zero).amax(0)
    return unified, masks


class RescalePrepass:
    """Whole-model sums Σ|τ_t| and Σ|m_t ⊙ τ_uni| per task, for λ_t.

    Each tensor contributes one (Σ|τ_t|, Σ|m_t ⊙ τ_uni|) pair per task (float64); the pairs are
    kept in plan order and summed in that order, so any split into units gives the same λ_t.
    """

    passes = 1

    def __init__(self) -> None:
        self.scales: list[float] = []

    def observe(self, pass_index: int, taus: TaskStack, ctx: TensorContext) -> list[tuple[Tensor, Tensor]]:
        dense = taus.dense()
        unified, masks = elect(dense)
        kept = (masks * unified.abs()).reshape(taus.T, -1).sum(1).double().cpu()
        total = dense.reshape(taus.T, -1).abs().sum(1).double().cpu()
        return [(total, kept)]

    def combine(self, first: list, second: list) -> list:
        return first + second

    def end_pass(self, pass_index: int, total: list[tuple[Tensor, Tensor]] | None) -> None:
        if not total:
            return
        numerator, denominator = total[0]
        for num, den in total[1:]:
            numerator, denominator = numerator + num, denominator + den
        # a task that never agrees with the elected signs (or a zero task vector) keeps λ = 1
        safe = torch.where(denominator > 0, denominator, 1.0)
        self.scales = torch.where(denominator > 0, numerator / safe, 1.0).tolist()

    def result(self) -> EMRScales:
        return EMRScales(self.scales)


class EMRScales:
    """The per-task rescalers λ_t found by the pre-pass."""

    def __init__(self, scales: list[float]) -> None:
        self.scales = scales

    def task_scalars(self) -> list[dict[str, float]]:
        return [{"scale": s} for s in self.scales]

    def to_markdown(self) -> str:
        values = ", ".join(f"λ_{t + 1} = {s:.4f}" for t, s in enumerate(self.scales))
        return f"EMR rescalers (Σ|τ_t| / Σ|m_t ⊙ τ_uni| over the model): {values}"


def rebuild(unified: Tensor, task: dict[str, Tensor], scalars: dict[str, float]) -> Tensor:
    """Task t's update λ_t · m_t ⊙ τ_uni."""
    return scalars["scale"] * task["mask"].to(unified.dtype) * unified


@merge_method("emr", EMRParams, "EMR: one elected task vector + per-task sign masks and rescalers (a model per task)",
              family="elementwise", prepass=lambda params: RescalePrepass(), rebuild=rebuild,
              card="θ₀ + λ_t · m_t ⊙ τ_uni")
def merge(taus: TaskStack, ctx: TensorContext, params: EMRParams) -> PerTaskUpdate:
    """τ_uni for the unified model, with the masks stored per task."""
    unified, masks = elect(taus.dense())
    return PerTaskUpdate(unified, {"mask": masks})
