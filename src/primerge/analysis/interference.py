"""Task-vector interference: Frobenius inner products |⟨τ_i, τ_j⟩_F| and cosines (PRIME Section 3.2).

⟨τ_i, τ_j⟩_F = Σ over every entry of τ_i ⊙ τ_j; cos(τ_i, τ_j) = ⟨τ_i, τ_j⟩_F / (‖τ_i‖_F ‖τ_j‖_F).
Whole-model values sum the Gram matrices of every merged tensor; per-layer values keep each
tensor's Gram matrix. Computed in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def gram(taus: Tensor) -> Tensor:
    """G_ij = ⟨τ_i, τ_j⟩_F of a stack (T, *shape), float64 (T × T)."""
    flat = taus.reshape(taus.shape[0], -1).double()
    return flat @ flat.mT


def cosine(g: Tensor) -> Tensor:
    """cos_ij = G_ij / sqrt(G_ii G_jj); 0 where a norm is 0."""
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, g / torch.where(denom > 0, denom, 1.0), torch.zeros_like(g))


def mean_off_diagonal(m: Tensor) -> float:
    """Mean of |m_ij| over i ≠ j (0 for a 1 × 1 matrix)."""
    T = m.shape[0]
    if T < 2:
        return 0.0
    mask = ~torch.eye(T, dtype=torch.bool, device=m.device)
    return float(m.abs()[mask].mean())


class Interference:
    """Accumulates whole-model and per-tensor Gram matrices of the task vectors."""

    def __init__(self, tasks: int) -> None:
        self.total = torch.zeros(tasks, tasks, dtype=torch.float64)
        self.layers: list[tuple[str, Tensor]] = []

    def observe(self, name: str, taus: Tensor, per_layer: bool) -> None:
        g = gram(taus).cpu()
        self.total += g
        if per_layer:
            self.layers.append((name, g))

    def layer_rows(self) -> list[dict]:
        """One row per tensor: mean off-diagonal |cos| and |⟨τ_i, τ_j⟩_F|."""
        return [{"tensor": name, "mean_abs_cosine": mean_off_diagonal(cosine(g)),
                 "mean_abs_inner": mean_off_diagonal(g)} for name, g in self.layers]
