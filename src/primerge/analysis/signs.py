"""Sign agreement (DRM paper, Section 6.2, Table 4 and Appendix F, Figure 5).

At every position kept by pruning, agreement = max(#positive, #negative) / #non-zero over the
tasks, in [0.5, 1]. Three spaces: the parameter space after each task's top-``density`` trim
(TIES's trim), DRM-H's renormalised joint space after its joint prune, and that pruned joint
space projected back to parameters (U Σ_t Ṽ_tᵀ). [decision] Only positions where at least two
tasks are non-zero are counted: a single value agrees with itself trivially.
"""

from __future__ import annotations

import torch
from torch import Tensor

from primerge.methods.drm import joint_prune, joint_space
from primerge.methods.ties import tensor_thresholds

#: Histogram bin edges over [0.5, 1.0].
EDGES = torch.linspace(0.5, 1.0, 11, dtype=torch.float64)
SPACES = ("parameter", "joint", "joint_to_parameter")


def agreement(values: Tensor) -> Tensor:
    """Per-position agreement of a stack (T, ...) at positions with ≥ 2 non-zero tasks (1-D)."""
    flat = values.reshape(values.shape[0], -1)
    pos = (flat > 0).sum(0)
    neg = (flat < 0).sum(0)
    nonzero = pos + neg
    keep = nonzero >= 2
    return (torch.maximum(pos, neg)[keep].double() / nonzero[keep].double())


def histogram(values: Tensor) -> Tensor:
    """Counts of agreement values in the bins of :data:`EDGES` (the last bin includes 1.0)."""
    idx = torch.bucketize(values.double().cpu(), EDGES, right=True) - 1
    idx = idx.clamp(0, len(EDGES) - 2)
    return torch.bincount(idx, minlength=len(EDGES) - 1).to(torch.long)


class SignAgreement:
    """Accumulates the three histograms over matrix parameters."""

    def __init__(self, density: float = 0.2, rank_tol: float = 1e-2) -> None:
        self.density = density
        self.rank_tol = rank_tol
        self.counts = {s: torch.zeros(len(EDGES) - 1, dtype=torch.long) for s in SPACES}

    def observe(self, taus: Tensor) -> None:
        thr = tensor_thresholds(taus, self.density)
        shape = (-1,) + (1,) * (taus.dim() - 1)
        trimmed = torch.where(taus.abs() >= thr.reshape(shape), taus, torch.zeros_like(taus))
        self.counts["parameter"] += histogram(agreement(trimmed))
        space = joint_space(taus, self.rank_tol)
        keep = joint_prune(space.blocks, self.density)
        scaled = space.scales.unsqueeze(-1) * torch.where(keep, space.blocks, torch.zeros_like(space.blocks))
        self.counts["joint"] += histogram(agreement(scaled))
        self.counts["joint_to_parameter"] += histogram(agreement(space.U @ scaled))

    def fractions(self) -> dict[str, list[float]]:
        return {s: (c.double() / max(int(c.sum()), 1)).tolist() for s, c in self.counts.items()}
