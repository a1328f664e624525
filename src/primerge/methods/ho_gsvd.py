"""HO-GSVD and Higher-Order Subspace Boosting (SB paper, Section 4.2, Eqs. 5–7; Appendix G,
Algorithm 2, Eqs. 31–32; Kempf et al. 2023 for the stable QR formulation).

**HO-GSVD.** N matrices A_i (m × n) are decomposed as A_i = U_i Σ_i Vᵀ with one *shared* V.
Kempf et al.'s formulation avoids forming the pairwise quotients of Eq. 31: stack
A = [A_1; …; A_N] = Q R and split Q into row blocks Q_i (so A_i = Q_i R and Σ_i Q_iᵀQ_i = I).
With the regularisation of Eq. 32 (D_i = A_iᵀA_i + π AᵀA = Rᵀ(Q_iᵀQ_i + π I)R), the shared
directions are the eigenvectors Z of the regularised mean T = (1/N) Σ_i (Q_iᵀQ_i + π I)⁻¹; then
B_i = Q_i Z, σ_{i,k} = ‖B_i[:, k]‖, U_i = B_i / σ_{i,k} and V = RᵀZ, so A_i = U_i Σ_i Vᵀ exactly.
π = 1e-2 (the paper's default). An eigenvalue of T equal to 1/(1/N + π) marks a *common*
direction (σ_{i,k} equal for every i); the largest possible value, (1/N)((N−1)/π + 1/(1+π)),
marks an *isolated* direction present in one matrix only.

[decision] Presentation, following Ponnappalli et al. (2011): V's columns are scaled to unit
length and the norms folded into every Σ_i (ratios σ_{i,k}/σ_{j,k}, hence the alignment
matrix, are unchanged), and components are ordered by their energy Σ_i σ_{i,k}² descending.
[decision] Eigenvalues of T that coincide (relative gap ≤ 1e-6) leave the eigenbasis free
inside their eigenspace — e.g. the isolated directions of two different tasks share one
eigenvalue. Such a cluster is rotated to diagonalise Σ_i (i+1) Q_iᵀQ_i restricted to it, which
separates directions that belong to different matrices, and where that still ties, to
diagonalise R Rᵀ, which makes those shared directions orthogonal (for N = 1 this is the SVD).
Both rotations keep Z orthonormal and A_i = U_i Σ_i Vᵀ exact.
[decision] The shared side is the smaller dimension: a wide matrix (m < n) is decomposed
through its transpose, so the number of shared components is r_full = min(m, n) and both
factors of Higher-Order SB can be orthonormalised.

**Alignment matrix** (Eq. 7): A_ij = (1/L) Σ_l (1/M_l) Σ_p |log((σ_{i,p}^(l) + ε)/(σ_{j,p}^(l) + ε))|,
ε = 1e-12; higher = the two rely on different directions (less interference, easier to merge).

**Higher-Order Subspace Boosting** (Algorithm 2): per matrix parameter, HO-GSVD of the task
vectors; Σ_sum = λ Σ_i Σ_i (λ = 1/T by default, as Task Arithmetic); boost Σ_sum with
Subspace Boosting's lift (:func:`primerge.linalg.flatten_spectrum`, β = 0 by default, the
paper's setting); rebuild α · U_o diag(Σ_boost) V_oᵀ with orthonormal factors from the
generalized orthogonal Procrustes problems: V_o = polar(V) and, [decision], U_o = polar(Σ_i U_i Σ_i),
the orthonormal U maximising Σ_i tr(Uᵀ U_i Σ_i) (agreement with every task's left factor,
weighted by its generalized singular values). Non-matrix parameters take α · λ Σ_t τ_t.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from pydantic import Field
from torch import Tensor

from primerge.linalg import flatten_spectrum, null_mask, polar, svd
from primerge.methods.base import TensorContext, merge_method, reads_sum, scale_field, uniform_scale
from primerge.methods.fused import FusedQKVParams, fused_qkv_axis, per_slice
from primerge.methods.stack import TaskStack

#: π of Eq. 32 (SB paper, Appendix G.1).
PI = 1e-2
#: ε of the alignment matrix, Eq. 7.
EPS = 1e-12
#: Relative gap under which eigenvalues of T count as one cluster.
CLUSTER_TOL = 1e-6


class HOGSVD(NamedTuple):
    """A_i = U[i] diag(S[i]) Vᵀ for every i.

    ``U``: (N, m, k) unit-norm columns (not orthogonal in general); ``S``: (N, k) generalized
    singular values; ``V``: (n, k) shared directions with unit-norm columns; ``eigenvalues``: (k,)
    eigenvalues of T for the same components. Components are ordered by Σ_i S[i]² descending.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    eigenvalues: Tensor

    def reconstruct(self) -> Tensor:
        """The stack (N, m, n) of U_i diag(S_i) Vᵀ."""
        return (self.U * self.S.unsqueeze(-2)) @ self.V.mT


def _runs(keys: Tensor, groups: Tensor) -> list[tuple[int, int]]:
    """Contiguous runs [start, end) with the same group id and keys equal within CLUSTER_TOL."""
    scale = float(keys.abs().max()) if keys.numel() else 0.0
    runs, start = [], 0
    for i in range(1, keys.numel() + 1):
        if i == keys.numel() or groups[i] != groups[i - 1] or keys[i] - keys[i - 1] > CLUSTER_TOL * scale:
            runs.append((start, i))
            start = i
    return runs


def _rotate_runs(Z: Tensor, runs: list[tuple[int, int]], M: Tensor) -> Tensor:
    """Inside each run of size > 1, rotate Z's columns to diagonalise Zᵀ M Z; returns the new keys."""
    keys = torch.zeros(Z.shape[1], dtype=Z.dtype, device=Z.device)
    for start, end in runs:
        block = Z[:, start:end]
        if end - start > 1:
            w, rot = torch.linalg.eigh(block.mT @ M @ block)
            Z[:, start:end] = block @ rot
            keys[start:end] = w
    return keys


def _canonical_basis(Z: Tensor, lam: Tensor, grams: Tensor, R: Tensor) -> Tensor:
    """Fix the free rotation inside eigenspaces of T (see the module docstring): first separate
    directions of different matrices (diagonalise Σ_i (i+1) Q_iᵀQ_i), then, where that still ties,
    make the shared directions orthogonal (diagonalise R Rᵀ, so V = RᵀZ has orthogonal columns)."""
    groups = torch.zeros(lam.numel(), dtype=torch.long)
    runs = _runs(lam, groups)
    for g, (start, end) in enumerate(runs):
        groups[start:end] = g
    weights = torch.arange(1, grams.shape[0] + 1, dtype=grams.dtype, device=grams.device)
    keys = _rotate_runs(Z, runs, (weights[:, None, None] * grams).sum(0))
    sub = _runs(keys, groups)
    _rotate_runs(Z, sub, R @ R.mT)
    return Z


def _column_space(Q: Tensor, R: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A = Q R with the numerically null part of A removed.

    [decision] When A is rank-deficient (ρ < k; low-rank task vectors such as LoRA deltas), the
    QR's trailing columns of Q are an arbitrary completion that would leak into every
    component. With R = P Σ Wᵀ and ρ the numerical rank in the input's ``dtype``
    (:func:`primerge.linalg.null_mask`), A = (Q P_ρ)(Σ_ρ W_ρᵀ) exactly, with orthonormal
    Q P_ρ; the decomposition then has ρ components. Full-rank A is returned unchanged.
    """
    f = svd(R)
    rank = int((~null_mask(f.S.to(dtype), (Q.shape[0], R.shape[1]))).sum())
    if rank == f.S.numel():
        return Q, R
    return Q @ f.U[:, :rank], f.S[:rank, None] * f.V[:, :rank].mT


def ho_gsvd(matrices: Tensor, pi: float = PI) -> HOGSVD:
    """HO-GSVD of a stack (N, m, n) of matrices sharing their right space (SB paper Eqs. 5, 31–32,
    in Kempf et al.'s QR form; see the module docstring). Computed in float64, returned in the
    input's dtype. The number of components is k = min(N·m, n), or the numerical rank of the
    stack when it is rank-deficient."""
    if matrices.dim() != 3:
        raise ValueError(f"ho_gsvd expects a stack (N, m, n), got shape {tuple(matrices.shape)}")
    dtype = matrices.dtype
    A = matrices.double()
    N, m, n = A.shape
    Q, R = _column_space(*torch.linalg.qr(A.reshape(N * m, n)), dtype)
    k = Q.shape[1]
    Qi = Q.reshape(N, m, k)
    grams = Qi.mT @ Qi  # (N, k, k), Σ_i = I
    eye = torch.eye(k, dtype=A.dtype, device=A.device)
    T = torch.linalg.inv(grams + pi * eye).mean(0)  # k × k, small: the inverse is of Q_iᵀQ_i + πI
    T = 0.5 * (T + T.mT)
    lam, Z = torch.linalg.eigh(T)
    Z = _canonical_basis(Z, lam, grams, R)
    B = Qi @ Z  # (N, m, k)
    sigma = B.norm(dim=1)  # (N, k)
    U = B / torch.where(sigma > 0, sigma, 1.0).unsqueeze(1)
    V = R.mT @ Z  # (n, k)
    d = V.norm(dim=0)
    V = V / torch.where(d > 0, d, 1.0)
    S = sigma * d
    order = S.square().sum(0).argsort(descending=True)
    return HOGSVD(U[..., order].to(dtype), S[:, order].to(dtype), V[:, order].to(dtype),
                  lam[order].to(dtype))


def shared_side_gsvd(taus: Tensor, pi: float = PI) -> tuple[HOGSVD, bool]:
    """HO-GSVD of task vectors (T, m, n) sharing the smaller side: returns (decomposition,
    transposed) where ``transposed`` means the decomposition is of the (T, n, m) transposes."""
    transposed = taus.shape[-2] < taus.shape[-1]
    return ho_gsvd(taus.mT if transposed else taus, pi), transposed


def alignment_matrix(layer_values: Sequence[Tensor], eps: float = EPS) -> Tensor:
    """Alignment matrix of Eq. 7 from per-layer generalized singular values.

    ``layer_values``: one (N, M_l) tensor per layer. Returns the (N, N) mean over layers of the
    mean over p of |log((σ_i,p + ε)/(σ_j,p + ε))| (float64); zero on the diagonal.
    """
    if not layer_values:
        raise ValueError("alignment_matrix needs at least one layer")
    total = None
    for values in layer_values:
        logs = torch.log(values.double() + eps)  # (N, M)
        term = (logs[:, None, :] - logs[None, :, :]).abs().mean(-1)
        total = term if total is None else total + term
    return total / len(layer_values)


class HOSubspaceBoostingParams(FusedQKVParams):
    pi: float = Field(PI, gt=0, description="π: HO-GSVD regularisation (Eq. 32)")
    beta: float = Field(0.0, ge=0.0, le=1.0, description="β: cumulative-spectrum cutoff of the boost")
    scale: float | None = scale_field(None, "λ multiplying Σ_i Σ_i, hence the boosted update; unset means 1/T "
                                            "(alias: alpha)")
    split_qkv: bool = Field(True, description="boost fused Q/K/V weights per slice")


def ho_boost(taus: Tensor, pi: float = PI, beta: float = 0.0, scale: float | None = None) -> Tensor:
    """U_o diag(Boost_β(λ Σ_i Σ_i)) V_oᵀ for one matrix (SB paper Algorithm 2)."""
    lam = uniform_scale(scale, taus.shape[0])
    dec, transposed = shared_side_gsvd(taus, pi)
    total = lam * dec.S.sum(0)  # already ordered by energy; sort by value for the lift
    order = total.argsort(descending=True)
    total, U, V = total[order], dec.U[..., order], dec.V[:, order]
    U_o = polar((U * dec.S[:, order].unsqueeze(1)).sum(0))
    V_o = polar(V)
    lifted = flatten_spectrum(total, beta) * ~null_mask(total, taus.shape)  # null components stay 0
    out = (U_o * lifted) @ V_o.mT
    return out.mT if transposed else out


@reads_sum
def scaled_sum(taus: TaskStack, ctx: TensorContext, params: HOSubspaceBoostingParams) -> Tensor:
    """Non-matrix parameters: λ Σ_t τ_t (Task Arithmetic, unboosted)."""
    return uniform_scale(params.scale, taus.T) * taus.sum()


@merge_method("ho_subspace_boosting", HOSubspaceBoostingParams,
              "Higher-Order SB: HO-GSVD shared space, summed generalized singular values boosted", other=scaled_sum)
def merge(taus: TaskStack, ctx: TensorContext, params: HOSubspaceBoostingParams) -> Tensor:
    """Higher-Order SB of one matrix parameter (per Q/K/V slice when fused)."""
    axis = fused_qkv_axis(ctx.name, tuple(taus.shape[1:]), params.qkv_pattern) if params.split_qkv else None
    return per_slice(lambda part: ho_boost(part, params.pi, params.beta, params.scale), taus.dense(), axis, tasks=True)
