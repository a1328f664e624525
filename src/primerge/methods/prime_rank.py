"""PRIME's adaptive principal rank: the interference–retention objective F(r).

PRIME paper Section 4.1 and Appendix B (Eqs. 10–17), on normalised task vectors
τ̄_t = τ_t / ‖τ_t‖_F ([decision] in docs/algorithms.md, "prime": it makes layers comparable):

- J_i(r) = (Σ_{j≠i} ⟨τ̄_i^[r], τ̄_j^[r]⟩_F)²        interference inside the principal subspace
- G_i(r) = (Σ_{k>r} σ̄_{i,k}²)²                    retention loss, falling as r grows
- F(r) = Σ_i (J_i(r) + G_i(r)), averaged over matrix parameters (one shared rank).

⟨τ̄_i^[r], τ̄_j^[r]⟩_F = Σ_{a,b<r} σ_{i,a} (U_iᵀU_j)_{ab} σ_{j,b} (V_iᵀV_j)_{ab}, so the top-r_max
factors are computed once per layer and every candidate r is read from 2-D prefix sums.

Candidates (Eq. 14): {1} ∪ {k·β : k = 1, 2, ...} with β = 0.01, capped at a largest
fraction (default 0.125). Selection (Eqs. 15–16): scan ascending with a running
(r*, F_min); if F(r) < F_min·(1 + κ), κ = 0.025, then r* ← r, F_min ← min(F_min, F(r)).
The optional integer refinement of Eq. 17 is not applied: with one rank shared by
layers of different widths, an integer neighbourhood has no single meaning.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from primerge.linalg import SVD, OutputPrecision, SVDMode, SVDOutcomes, recording, takes_exact, truncated_svd
from primerge.methods.base import TensorContext
from primerge.methods.stack import TaskStack


def candidate_ranks(step: float = 0.01, max_fraction: float = 0.125) -> list[float]:
    """The candidate set S of Eq. 14: absolute rank 1, then fractions k·β up to the cap."""
    count = int(max_fraction / step + 1e-9)
    return [1.0] + [round(k * step, 10) for k in range(1, count + 1)]


def select_rank(objective: list[float], tolerance: float = 0.025) -> int:
    """Index of r* in an ascending candidate scan with the tolerance rule of Eqs. 15–16."""
    best, f_min = 0, objective[0]
    for i, value in enumerate(objective[1:], start=1):
        if value < f_min * (1 + tolerance):
            best, f_min = i, min(f_min, value)
    return best


class LayerTerms(NamedTuple):
    """One matrix's F(r) terms for each requested rank, and the spectra they came from.

    ``J``, ``G``: Σ_i J_i(r), Σ_i G_i(r) per rank; ``energy``: (T, r_max) cumulative σ² of
    the (unnormalised) τ_t; ``total``: (T,) ‖τ_t‖_F². Retention ‖τ_t^[r]‖²/‖τ_t‖² is
    ``energy[:, r-1] / total``.
    """

    J: Tensor
    G: Tensor
    energy: Tensor
    total: Tensor


def layer_terms(taus: Tensor, ranks: list[int], *, mode: SVDMode = "auto", seed: int = 0,
                precision: OutputPrecision | None = None) -> LayerTerms:
    """Σ_i J_i(r) and Σ_i G_i(r) of one matrix for each per-layer rank in ``ranks`` (all ≥ 1)
    (``precision``: how finely the merge is written, for ``svd: auto``'s certificate)."""
    factors = truncated_svd(taus, max(ranks), mode=mode, seed=seed, precision=precision)
    return terms_of(taus, factors, ranks)


def terms_of(taus: Tensor, factors: SVD, ranks: list[int]) -> LayerTerms:
    """:func:`layer_terms` from the task vectors' own top-max(ranks) triplets: τ̄_t = τ_t / ‖τ_t‖ has
    τ_t's singular vectors and values σ / ‖τ_t‖, so one SVD of τ serves F(r) and, reused, the merge
    (:class:`ExactMemo`)."""
    T = taus.shape[0]
    norms = taus.reshape(T, -1).norm(dim=1)
    U, S, V = factors.U, factors.S / torch.where(norms > 0, norms, 1.0).unsqueeze(-1), factors.V
    gram = torch.einsum("ima,jmb->ijab", U, U) * torch.einsum("ina,jnb->ijab", V, V)
    weighted = gram * S[:, None, :, None] * S[None, :, None, :]
    prefix = torch.diagonal(weighted.cumsum(-1).cumsum(-2), dim1=-2, dim2=-1)  # (T, T, R)
    head = (S.square()).cumsum(-1)  # (T, R) energy in the top r
    total = (norms > 0).to(taus.dtype)  # ‖τ̄_i‖² is 1, or 0 for a zero task vector
    J, G = [], []
    for r in ranks:
        inner = prefix[..., r - 1]
        cross = inner.sum(1) - inner.diagonal()
        J.append(cross.square().sum())
        G.append((total - head[:, r - 1]).clamp_min(0).square().sum())
    squared_norms = norms.square()
    return LayerTerms(torch.stack(J), torch.stack(G), head * squared_norms[:, None], squared_norms)


class ExactMemo:
    """Exact truncated SVDs the pre-pass computed, by matrix name, kept in this process for the merge.

    [decision] When ``svd: auto`` (or ``exact``) takes the exact SVD both in the pre-pass (rank
    r_max) and in the merge (rank r* ≤ r_max), the merge's triplets are the first r* of the
    pre-pass' — the same LAPACK call on the same task vectors — so they are kept rather than
    recomputed: the merge of a matrix then costs no SVD, with the same bits. At most ``budget``
    bytes are kept (first come; a 7B-class model's r_max factors are tens of GB); a matrix not
    kept, or a merge on another process (the memo is not pickled: Ray workers start empty), simply
    recomputes them.
    """

    def __init__(self, budget: int = 1 << 30) -> None:
        self.budget, self.used, self.kept = budget, 0, {}

    def keep(self, name: str, factors: SVD) -> None:
        size = sum(t.numel() * t.element_size() for t in factors)
        if self.used + size <= self.budget:
            self.kept[name] = SVD(*(t.clone() for t in factors))  # not views of the full SVD's U and V
            self.used += size

    def take(self, name: str) -> SVD | None:
        """The factors kept for ``name`` (forgotten once taken), or None."""
        return self.kept.pop(name, None)

    def __getstate__(self) -> dict:
        return {"budget": self.budget, "used": 0, "kept": {}}


@dataclass
class AutoRank:
    """The F(r) table (layer-averaged Σ_i J_i, Σ_i G_i, F) and the selected candidate."""

    candidates: list[float]
    J: list[float]
    G: list[float]
    layers: int
    tolerance: float
    retention: list[float] = field(default_factory=list)  # per task, ‖τ_t^[r*]‖² / ‖τ_t‖² over matrices
    svd_outcomes: SVDOutcomes = field(default_factory=SVDOutcomes)  # what the pass' truncated SVDs did
    memo: ExactMemo = field(default_factory=ExactMemo, repr=False, compare=False)  # its exact SVDs, for the merge

    @property
    def F(self) -> list[float]:
        return [j + g for j, g in zip(self.J, self.G)]

    @property
    def index(self) -> int:
        return select_rank(self.F, self.tolerance) if self.layers else 0

    @property
    def rank(self) -> float:
        """The selected ``rank`` value (1 = absolute rank 1, else a fraction of min(m, n))."""
        return self.candidates[self.index]

    @staticmethod
    def label(candidate: float) -> str:
        return "1" if candidate >= 1 else f"{candidate * 100:g}%"

    def _rows(self) -> list[tuple[list[int], float, float]]:
        """Candidates grouped where they give the same (J, G): on small matrices several fractions
        round to the same ranks, and one row per distinct outcome is shown."""
        rows: list[tuple[list[int], float, float]] = []
        for i, (j, g) in enumerate(zip(self.J, self.G)):
            if rows and (rows[-1][1], rows[-1][2]) == (j, g):
                rows[-1][0].append(i)
            else:
                rows.append(([i], j, g))
        return rows

    def to_markdown(self) -> str:
        lines = []
        for members, j, g in self._rows():
            label = "–".join(dict.fromkeys(self.label(self.candidates[i]) for i in (members[0], members[-1])))
            lines.append(f"| {'**' + label + '**' if self.index in members else label} "
                         f"| {j:.4f} | {g:.4f} | {j + g:.4f} |")
        note = []
        if self.layers and self.index == len(self.candidates) - 1:
            note = ["", f"r* is the largest candidate ({self.label(self.rank)}): F(r) may fall further beyond "
                        f"the grid; raise auto_max_fraction to search there."]
        return "\n".join([
            f"PRIME adaptive rank: r* = {self.label(self.rank)} "
            f"(F(r) averaged over {self.layers} matrices, κ = {self.tolerance})",
            "",
            "| r | Σ J_i | Σ G_i | F(r) |",
            "|---|---|---|---|",
            *lines,
            *note,
        ])


class AutoRankPrepass:
    """Whole-model pass that averages F(r) over matrix parameters and selects r*.

    Each matrix contributes its Σ_i J_i(r), Σ_i G_i(r) per candidate and its spectra; the
    contributions are kept in plan order and summed in that order, so any split of the model into
    units gives the same table and r*.
    """

    passes = 1

    def __init__(self, candidates: list[float], tolerance: float, mode: SVDMode,
                 rank_of) -> None:
        self.candidates = candidates
        self.tolerance = tolerance
        self.mode = mode
        self.rank_of = rank_of  # (candidate, r_full, T) -> per-layer rank
        self.J = torch.zeros(len(candidates), dtype=torch.float64)
        self.G = torch.zeros(len(candidates), dtype=torch.float64)
        self.spectra: list[tuple[int, int, Tensor, Tensor]] = []  # (r_full, T, energy, total) per matrix
        self.outcomes = SVDOutcomes()
        self.memo = ExactMemo()

    def observe(self, pass_index: int, taus: TaskStack, ctx: TensorContext) -> list[tuple]:
        """[(Σ_i J_i, Σ_i G_i, (r_full, T, energy, total), SVD outcomes)] of one matrix, or [] when it has none."""
        if ctx.kind != "matrix":
            return []
        r_full, T = min(taus.shape[-2:]), taus.T
        ranks = [self.rank_of(c, r_full, T) for c in self.candidates]
        if min(ranks) == 0:
            return []  # T > r_full: this matrix has no principal part at any rank
        dense = taus.dense()
        with recording() as outcomes:
            factors = truncated_svd(dense, max(ranks), mode=self.mode, seed=ctx.seed, precision=ctx.precision)
        terms = terms_of(dense, factors, ranks)
        if not taus.factored and takes_exact(tuple(taus.shape), max(ranks), self.mode, ctx.precision):
            self.memo.keep(ctx.name, factors)
        spectrum = (r_full, T, terms.energy.double().cpu(), terms.total.double().cpu())
        return [(terms.J.double().cpu(), terms.G.double().cpu(), spectrum, outcomes)]

    def combine(self, first: list, second: list) -> list:
        return first + second

    def end_pass(self, pass_index: int, total: list[tuple] | None) -> None:
        for J, G, spectrum, outcomes in total or []:
            self.J += J
            self.G += G
            self.spectra.append(spectrum)
            self.outcomes += outcomes

    def result(self) -> AutoRank:
        layers = len(self.spectra)
        n = max(layers, 1)
        auto = AutoRank(self.candidates, (self.J / n).tolist(), (self.G / n).tolist(), layers, self.tolerance,
                        svd_outcomes=self.outcomes, memo=self.memo)
        if self.spectra:
            head = sum(e[:, self.rank_of(auto.rank, r_full, T) - 1] for r_full, T, e, _ in self.spectra)
            total = sum(t for *_, t in self.spectra)
            auto.retention = torch.where(total > 0, head / torch.where(total > 0, total, 1.0), 0.0).tolist()
        return auto
