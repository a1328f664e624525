"""Randomized truncated SVD: block Krylov iteration with an a posteriori residual check.

For a batch of matrices A (p × q after transposing so that p ≥ q) and a wanted rank k, a block of
ℓ = k + ``OVERSAMPLE`` columns grows a Krylov basis (block Lanczos with full reorthogonalisation;
Musco & Musco 2015, "Randomized block Krylov methods", Algorithm 2)::

    Q_0 = orth(A Ω)                        Ω: q × ℓ Gaussian, drawn from ``seed``
    Z_j = Aᵀ Q_j,  X_j = A Z_j             two passes over A per step
    Q_{j+1} = orth((I − K Kᵀ) X_j)          K = [Q_0 … Q_j], Gram–Schmidt applied twice

Rayleigh–Ritz on span(K) needs no further pass: B = Kᵀ A = [Z_0 … Z_j]ᵀ = W Σ Vᵀ gives the
Ritz triplets u_i = K w_i, σ_i, v_i. They satisfy Aᵀ u_i = σ_i v_i exactly, and their residuals
r_i = A v_i − σ_i u_i = [X_0 … X_j] w_i / σ_i − σ_i u_i come from products already made, so every
step is checked for free: a batch member is *converged* when ‖r_i‖ ≤ ``tol`` · σ_1 for its top
k + 1 triplets (the extra one makes sure the k-th direction is separated from the (k+1)-th, so a
small gap at the cut cannot hide a mixed direction). Triplets whose σ is numerically null
(:func:`primerge.linalg.core.null_mask`) need no check.

The iteration stops when every member has converged, when the basis would outgrow p, after
``max_steps`` steps, or early when no unconverged member's residual shrinks fast enough to reach
``tol`` by then (each one's geometric rate of the last step, extrapolated). Each step costs two
passes over A, so the whole call makes 2·steps + 3 passes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from primerge.linalg.core import SVD, null_mask

#: Oversampling columns (ALGORITHMS.md Conventions: at least 10).
OVERSAMPLE = 10
#: Largest number of Krylov steps (each adds one block of ℓ columns to the basis).
MAX_STEPS = 8
#: Default residual tolerance: ‖A v_i − σ_i u_i‖ ≤ TOLERANCE · σ_1 for the top k + 1 triplets.
TOLERANCE = 1e-5


class KrylovSVD(NamedTuple):
    """Top-k Ritz triplets of every batch member and how far they are from exact.

    ``converged``: (batch...) bool, the residual check passed; ``residual``: (batch...) the largest
    checked ‖r_i‖ / σ_1; ``passes``: passes over A made.
    """

    factors: SVD
    converged: Tensor
    residual: Tensor
    passes: int


def block_width(rank: int, shape: tuple[int, ...]) -> int:
    """ℓ = rank + OVERSAMPLE, capped at min(m, n)."""
    return min(rank + OVERSAMPLE, min(shape[-2:]))


def max_steps(rank: int, shape: tuple[int, ...], limit: int = MAX_STEPS) -> int:
    """Steps after the first block while the basis (steps + 1)·ℓ still fits in min(m, n)."""
    width = block_width(rank, shape)
    return max(0, min(limit, min(shape[-2:]) // width - 1))


def sketch(q: int, width: int, seed: int, like: Tensor) -> Tensor:
    """The Gaussian test matrix Ω (q × width), drawn on the CPU from ``seed`` (the same numbers on
    every device), in ``like``'s dtype and device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, width, generator=g, dtype=torch.float64).to(dtype=like.dtype, device=like.device)


def orthonormal_complement(basis: Tensor | None, block: Tensor) -> Tensor:
    """Orthonormal columns spanning ``block`` with span(``basis``) removed (Gram–Schmidt twice)."""
    if basis is not None:
        for _ in range(2):
            block = block - basis @ (basis.mT @ block)
    return torch.linalg.qr(block).Q


class _Ritz(NamedTuple):
    W: Tensor  # (batch..., c, checked) float64: Ritz vectors in the basis' coordinates
    S: Tensor  # (batch..., checked) float64 Ritz values
    residual: Tensor  # (batch..., checked) ‖r_i‖


def ritz(basis: Tensor, X: Tensor, gram: Tensor, checked: int) -> _Ritz:
    """Ritz values and vectors of A on span(basis) and their residuals, from the Gram matrix
    ZᵀZ = W Σ² Wᵀ of Z = Aᵀ basis and X = A Z: u = basis·w, v = Z w / σ, r = X w / σ − σ u.

    The Gram matrix is c × c (c = the basis width), so Rayleigh–Ritz costs an O(c³)
    eigendecomposition instead of an SVD of a q × c matrix; in float64 its eigenvalues are exact
    for the float32 Z far below float32 rounding.
    """
    lam, W = torch.linalg.eigh(gram)
    lam, W = lam.flip(-1)[..., :checked], W.flip(-1)[..., :checked]
    S = lam.clamp_min(0).sqrt()
    W32, S32 = W.to(basis.dtype), S.to(basis.dtype)
    safe = torch.where(S32 > 0, S32, torch.ones_like(S32)).unsqueeze(-2)
    residual = ((X @ W32) / safe - (basis @ W32) * S32.unsqueeze(-2)).norm(dim=-2)
    return _Ritz(W, S, residual)


def relative_residual(step: _Ritz, shape: tuple[int, ...]) -> Tensor:
    """max_i ‖r_i‖ / σ_1 over the checked triplets whose σ is not numerically null."""
    S = step.S.to(step.residual.dtype)
    live = ~null_mask(S, shape)
    scale = torch.where(S[..., :1] > 0, S[..., :1], torch.ones_like(S[..., :1]))
    return torch.where(live, step.residual / scale, torch.zeros_like(step.residual)).amax(-1)


def hopeless(history: list[Tensor], tol: float, steps_left: int) -> bool:
    """Whether no unconverged member can reach ``tol`` in ``steps_left`` more steps at its
    residual's last geometric rate of decrease (members that can keep the iteration going)."""
    if len(history) < 2:
        return False
    now, before = history[-1].double(), history[-2].double()
    pending = now > tol
    if not bool(pending.any()):
        return False
    rate = (now[pending] / before[pending].clamp_min(1e-300)).clamp(max=1.0)
    needed = torch.log(tol / now[pending]) / torch.log(rate.clamp(min=1e-300, max=1 - 1e-12))
    return bool((needed > steps_left).all())


def block_krylov_svd(x: Tensor, rank: int, *, seed: int = 0, tol: float = TOLERANCE,
                     steps: int = MAX_STEPS) -> KrylovSVD:
    """Top-``rank`` triplets of ``x`` (..., m, n) by block Krylov iteration (module docstring)."""
    flip = x.shape[-2] < x.shape[-1]
    A = x.mT if flip else x  # (..., p, q), p ≥ q: Z = Aᵀ·basis, kept in float64, is on the smaller side
    shape = tuple(A.shape)
    width = block_width(rank, shape)
    checked = min(rank + 1, width)
    limit = max_steps(rank, shape, steps)
    space = _KrylovSpace(A, (limit + 1) * width)
    Q = orthonormal_complement(None, A @ sketch(shape[-1], width, seed, A))
    history: list[Tensor] = []
    for step in range(limit + 1):
        space.extend(Q)
        found = ritz(space.basis, space.X, space.gram, checked)
        history.append(relative_residual(found, shape))
        if bool((history[-1] <= tol).all()) or step == limit or hopeless(history, tol, limit - step):
            break
        Q = orthonormal_complement(space.basis, space.X[..., -width:])
    factors = space.triplets(found, rank)
    if flip:
        factors = SVD(factors.V, factors.S, factors.U)
    return KrylovSVD(factors, history[-1] <= tol, history[-1], 1 + 2 * len(history))


class _KrylovSpace:
    """The growing basis K (p × c), Z = Aᵀ K (float64, q × c), X = A Z (p × c) and ZᵀZ, in
    buffers of the largest width (no copy as the basis grows)."""

    def __init__(self, A: Tensor, columns: int) -> None:
        batch, (p, q) = A.shape[:-2], A.shape[-2:]
        self.A, self.c = A, 0
        self._basis = A.new_empty((*batch, p, columns))
        self._X = A.new_empty((*batch, p, columns))
        self._Z = A.new_empty((*batch, q, columns), dtype=torch.float64)
        self._gram = A.new_empty((*batch, columns, columns), dtype=torch.float64)

    basis = property(lambda self: self._basis[..., :self.c])
    X = property(lambda self: self._X[..., :self.c])
    gram = property(lambda self: self._gram[..., :self.c, :self.c])

    def extend(self, Q: Tensor) -> None:
        """Add the orthonormal block Q: two passes over A (Z = AᵀQ, X = A Z), the Gram's new rows."""
        start, self.c = self.c, self.c + Q.shape[-1]
        Z = self.A.mT @ Q
        self._basis[..., start:self.c] = Q
        self._X[..., start:self.c] = self.A @ Z
        self._Z[..., start:self.c] = Z
        cross = self._Z[..., :self.c].mT @ self._Z[..., start:self.c]  # (c, ℓ)
        self._gram[..., :self.c, start:self.c] = cross
        self._gram[..., start:self.c, :start] = cross[..., :start, :].mT

    def triplets(self, found: _Ritz, rank: int) -> SVD:
        """The top ``rank`` Ritz triplets (u = K w, σ, v = Z w / σ; v = 0 where σ = 0)."""
        W, S = found.W[..., :rank], found.S[..., :rank]
        safe = torch.where(S > 0, S, torch.ones_like(S)).unsqueeze(-2)
        V = ((self._Z[..., :self.c] @ W) / safe * (S > 0).unsqueeze(-2)).to(self.A.dtype)
        return SVD(self.basis @ W.to(self.A.dtype), S.to(self.A.dtype), V)
