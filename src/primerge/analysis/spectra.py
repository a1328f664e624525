"""Spectral diagnostics: PRIME's F(r), retention and subspace cosines; rank collapse.

PRIME (prime.txt Section 4.1, Appendix B; Figures 9–11), reusing the methods layer:
- F(r) = Σ_i (J_i + G_i) averaged over matrix parameters, over the candidate ranks, with r* chosen
  by the tolerance rule (:mod:`primerge.methods.prime_rank`).
- Retention of task t at r*: Σ_l ‖τ_t^{l,[r]}‖_F² / Σ_l ‖τ_t^l‖_F² (r per layer from
  :func:`primerge.methods.prime.principal_rank`).
- Cosine matrix among the T principal parts and the merged residual, before PRIME (τ_t^[r] and
  M_r = mean_t R_t) and after (the whitened blocks Û_t Σ_t V̂_tᵀ and M_r⊥ = P⊥ M_r), summed over
  matrices as Frobenius inner products.

Rank collapse (SB paper, Section 3): stable rank ‖A‖_F²/‖A‖₂² and cumulative-energy rank
(q = 0.5) of the merged task vector per matrix, and their means over matrices as the number of
merged models grows (the first 1..T models).
"""

from __future__ import annotations

import torch
from torch import Tensor

from primerge.analysis.interference import cosine
from primerge.linalg import energy_rank, project_out, stable_rank
from primerge.methods.base import TensorContext
from primerge.methods.prime import PrimeParams, decompose, principal_rank
from primerge.methods.prime_rank import AutoRank, AutoRankPrepass, candidate_ranks
from primerge.methods.stack import TaskStack


class PrimeDiagnostics:
    """Pass 1: F(r) terms and the per-task spectra; pass 2 (:meth:`observe_cosines`) at r*."""

    def __init__(self, tasks: int, params: PrimeParams | None = None) -> None:
        self.params = params or PrimeParams(rank="auto")
        self.prepass = AutoRankPrepass(candidate_ranks(self.params.auto_step, self.params.auto_max_fraction),
                                       self.params.auto_tolerance, self.params.svd, principal_rank)
        self.tasks = tasks
        self.before = torch.zeros(tasks + 1, tasks + 1, dtype=torch.float64)
        self.after = torch.zeros(tasks + 1, tasks + 1, dtype=torch.float64)
        self.terms: list = []
        self._auto: AutoRank | None = None

    def observe(self, taus: Tensor, ctx: TensorContext) -> None:
        self.terms = self.prepass.combine(self.terms, self.prepass.observe(0, TaskStack.of(taus), ctx))

    @property
    def auto(self) -> AutoRank:
        if self._auto is None:
            self.prepass.end_pass(0, self.terms)
            self._auto = self.prepass.result()
        return self._auto

    def rank_of(self, r_full: int) -> int:
        return principal_rank(self.auto.rank, r_full, self.tasks)

    def retention(self) -> list[float]:
        """‖τ_t^[r*]‖² / ‖τ_t‖² over all matrices, per task (from the F(r) pass's spectra)."""
        return self.auto.retention

    def observe_cosines(self, taus: Tensor, ctx: TensorContext) -> None:
        """Inner products of the principal parts and merged residual before and after PRIME, from
        PRIME's own decomposition (:func:`primerge.methods.prime.decompose`) at r*."""
        T = taus.shape[0]
        r = self.rank_of(min(taus.shape[-2:]))
        if r == 0:
            return
        parts = decompose(TaskStack.of(taus), r, PrimeParams(svd=self.params.svd), ctx.seed)
        S = parts.stacked.S
        blocks = []
        for t in range(T):
            cols = slice(t * r, (t + 1) * r)
            blocks.append((parts.U_hat[:, cols] * S[cols]) @ parts.V_hat[:, cols].mT)
        before = torch.cat([parts.factors.reconstruct(), parts.residual.unsqueeze(0)])
        after = torch.cat([torch.stack(blocks), project_out(parts.U_hat, parts.residual).unsqueeze(0)])
        for items, acc in ((before, self.before), (after, self.after)):
            flat = items.reshape(T + 1, -1).double()
            acc += (flat @ flat.mT).cpu()

    def cosines(self) -> tuple[Tensor, Tensor]:
        return cosine(self.before), cosine(self.after)


def rank_metrics(matrix: Tensor, q: float = 0.5) -> tuple[float, int]:
    """(stable rank, cumulative-energy rank) of one matrix."""
    s = torch.linalg.svdvals(matrix.double())
    return stable_rank(s), energy_rank(s, q)


class RankCollapse:
    """Per-matrix metrics of the merged update, and their means for 1..T merged models."""

    def __init__(self, tasks: int) -> None:
        self.tasks = tasks
        self.layers: list[dict] = []
        self.growth_stable = torch.zeros(tasks, dtype=torch.float64)
        self.growth_energy = torch.zeros(tasks, dtype=torch.float64)
        self.count = 0

    def observe(self, name: str, merged_by_count: list[Tensor]) -> None:
        """``merged_by_count[t-1]``: the update merged from the first t models."""
        r_full = min(merged_by_count[-1].shape)
        for t, merged in enumerate(merged_by_count):
            sr, er = rank_metrics(merged)
            self.growth_stable[t] += sr / r_full
            self.growth_energy[t] += er / r_full
            if t == len(merged_by_count) - 1:
                self.layers.append({"tensor": name, "r_full": r_full, "stable_rank": sr, "energy_rank": er})
        self.count += 1

    def growth_rows(self) -> list[dict]:
        n = max(self.count, 1)
        return [{"models": t + 1, "stable_rank_fraction": float(self.growth_stable[t] / n),
                 "energy_rank_fraction": float(self.growth_energy[t] / n)} for t in range(self.tasks)]
