"""Dense building blocks: exact SVD, polar-factor whitening, projection onto the orthogonal
complement of an orthonormal basis, spectrum flattening (Subspace Boosting), spectral metrics,
the factored SVD of a product and the handling of null singular triplets. All functions accept
float32/float64 tensors on any device and never form an m x m projector.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

class SVD(NamedTuple):
    """Thin singular triplets ``X = U diag(S) V^T`` (batched over leading axes).

    ``U``: (..., m, k) orthonormal columns; ``S``: (..., k) descending; ``V``: (..., n, k).
    """

    U: Tensor
    S: Tensor
    V: Tensor

    def reconstruct(self) -> Tensor:
        """Return ``U diag(S) V^T``."""
        return (self.U * self.S.unsqueeze(-2)) @ self.V.mT


def svd(x: Tensor) -> SVD:
    """Exact thin SVD ``X = U Σ V^T`` via LAPACK (``torch.linalg.svd``)."""
    U, S, Vh = torch.linalg.svd(x, full_matrices=False)
    return SVD(U, S, Vh.mT)


def polar(x: Tensor) -> Tensor:
    """Orthonormal polar factor: for ``X = P S Q^T`` return ``P Q^T``.

    This is TSV's "Whitening" (PRIME Algorithm 1, Û = Whitening(U_s)): the
    closest matrix with orthonormal columns to ``X`` in Frobenius norm. Zero
    singular values (rank-deficient ``X``) are kept as they are by LAPACK's
    completion, so the result always has orthonormal columns when m >= k.

    [decision] LAPACK's SVD of X, not X (W Λ^(-1/2) Wᵀ) from the k × k Gram matrix XᵀX = W Λ Wᵀ:
    on PRIME's m × T·r bases the Gram route was measured no faster, and the polar step is a few
    percent of PRIME's time; the truncated SVD dominates (docs/benchmarks.md, "Measurements behind
    design decisions").
    """
    P, _, Qh = torch.linalg.svd(x, full_matrices=False)
    return P @ Qh


def live_polar(X: Tensor, S: Tensor) -> Tensor:
    """Whitening (:func:`polar`) of the columns of X whose σ ≠ 0; zero columns where σ = 0.

    For X = [Y, 0] with Y of full column rank, polar(X) restricted to Y's columns is polar(Y),
    and its other columns are an arbitrary completion that must not reach a merge; whitening
    only Y gives the same result and costs O(m·k_live²) (LoRA tasks of rank k ≪ r).
    """
    live = S != 0
    if bool(live.all()):
        return polar(X)
    out = torch.zeros_like(X)
    if bool(live.any()):
        out[:, live] = polar(X[:, live])
    return out


def project_out(basis: Tensor, x: Tensor) -> Tensor:
    """Project ``X`` onto the orthogonal complement of span(``basis``).

    ``P⊥ X = X − B (Bᵀ X)`` for ``B`` with orthonormal columns (PRIME Eq. 20);
    costs O(m·k·n) and never forms the m x m matrix ``I − B Bᵀ``.
    """
    return x - basis @ (basis.mT @ x)


def flatten_spectrum(S: Tensor, beta: float = 0.0, scale: float = 1.0) -> Tensor:
    """Subspace Boosting's spectrum lift (SB paper Algorithm 1; PRIME Eqs. 31, 33).

    With ``c = cumsum(S)/sum(S)`` and ``i`` the first index where ``c_i >= beta``
    (the last index if none), return ``scale * max(S, S[i])``. ``beta = 0`` raises
    every value to ``σ₁``; ``scale = 1.7`` with ``beta = 0`` is PRIME's S-SB.
    Singular values that are exactly zero (null triplets zeroed by :func:`drop_null`) stay
    zero: a rank-deficient matrix gains nothing along directions it does not have. An
    all-zero spectrum stays zero.
    """
    total = S.sum(-1, keepdim=True)
    if bool((total == 0).all()):
        return S.clone()
    c = S.cumsum(-1) / total.clamp_min(torch.finfo(S.dtype).tiny)
    reached = c >= beta
    idx = torch.where(reached.any(-1), reached.float().argmax(-1), S.shape[-1] - 1)
    floor = S.gather(-1, idx.unsqueeze(-1))
    return scale * torch.maximum(S, floor) * (S != 0)


def stable_rank(singular_values: Tensor) -> float:
    """Stable rank ``‖A‖_F² / ‖A‖₂² = Σσ² / σ₁²`` from A's singular values (SB paper,
    rank-collapse diagnostic); 0 for A = 0."""
    s = singular_values.double()
    return 0.0 if s.max() == 0 else float((s.square().sum() / s.max().square()).item())


def energy_rank(singular_values: Tensor, q: float = 0.5) -> int:
    """Smallest ``k`` with ``Σ_{i≤k} σ_i² >= q · Σ σ²`` (cumulative-energy rank); 0 for zeros."""
    e = singular_values.double().square()
    total = e.sum()
    if total == 0:
        return 0
    return min(int((e.cumsum(0) < q * total).sum().item()) + 1, e.numel())


def factored_svd(left: Tensor, right: Tensor) -> SVD:
    """Thin SVD of a product ``X = L R`` from its factors, never forming X.

    ``L``: (..., m, k), ``R``: (..., k, n) (a LoRA task vector τ = s·B A has L = s·B, R = A).
    Reduced QRs L = Q_L R_L and Rᵀ = Q_R R_R give X = Q_L (R_L R_Rᵀ) Q_Rᵀ; the small core
    C = R_L R_Rᵀ has the SVD C = U_c S V_cᵀ, so X = (Q_L U_c) S (Q_R V_c)ᵀ. Cost
    O((m + n) k² + k³) instead of O(m n min(m, n)) for the SVD of X. Returns
    min(m, n, k) triplets (so k > min(m, n) is fine); zero factors give zero singular values
    and no division anywhere.
    """
    m, k, n = left.shape[-2], left.shape[-1], right.shape[-1]
    if k == 0:
        batch = left.shape[:-2]
        return SVD(left.new_zeros((*batch, m, 0)), left.new_zeros((*batch, 0)), left.new_zeros((*batch, n, 0)))
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.mT)
    core = svd(r_left @ r_right.mT)
    return SVD(q_left @ core.U, core.S, q_right @ core.V)


def fit_rank(factors: SVD, rank: int) -> SVD:
    """The first ``rank`` triplets, padded with zero triplets (σ = 0, zero vectors) when fewer exist.

    A rank-k matrix has exactly k non-zero singular values; its top-r SVD for r > k is its k
    triplets and r − k null ones. Zero vectors make the null triplets contribute nothing to any
    product, whatever basis LAPACK would have completed them with.
    """
    k = factors.S.shape[-1]
    if k >= rank:
        return SVD(factors.U[..., :rank], factors.S[..., :rank], factors.V[..., :rank])
    pad = rank - k
    return SVD(
        torch.nn.functional.pad(factors.U, (0, pad)),
        torch.nn.functional.pad(factors.S, (0, pad)),
        torch.nn.functional.pad(factors.V, (0, pad)),
    )


def null_mask(S: Tensor, shape: tuple[int, ...], scale: Tensor | None = None) -> Tensor:
    """Which singular values are numerically zero: σ ≤ scale · max(m, n) · eps.

    ``scale`` defaults to σ₁ of each matrix (LAPACK / NumPy ``matrix_rank`` convention); pass
    a reference scale (shape (...,)) when the matrix is a projection of a larger one whose
    rounding noise must not count as signal. An all-zero matrix is entirely null.
    """
    m, n = shape[-2:]
    ref = S[..., :1] if scale is None else scale.unsqueeze(-1)
    return S <= ref * (max(m, n) * torch.finfo(S.dtype).eps)


def drop_null(factors: SVD, shape: tuple[int, ...], scale: Tensor | None = None) -> SVD:
    """Zero the numerically null triplets (:func:`null_mask`): σ and both singular vectors.

    [decision] A rank-deficient task vector (every LoRA delta) has singular directions that
    LAPACK fills with an arbitrary orthonormal completion, or with rounding noise when the delta
    was materialised. SVD methods that whiten or flatten spectra would pass those arbitrary
    directions into the merge; zeroing them makes the result a function of the task vector alone,
    and identical whether it was given as factors or as a dense matrix.
    """
    keep = ~null_mask(factors.S, shape, scale)
    vec = keep.unsqueeze(-2).to(factors.U.dtype)
    return SVD(factors.U * vec, factors.S * keep.to(factors.S.dtype), factors.V * vec)
