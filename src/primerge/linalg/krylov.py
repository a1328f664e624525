"""Randomized truncated SVD: block Krylov iteration, checked a posteriori at every step.

For a batch of matrices A (p × q after transposing so that p ≥ q) and a wanted rank k, a block of
ℓ = k + ``OVERSAMPLE`` columns grows a Krylov basis (block Lanczos with full reorthogonalisation;
Musco & Musco 2015, "Randomized block Krylov methods", Algorithm 2)::

    Q_0 = orth(A Ω)                        Ω: q × ℓ Gaussian, drawn from ``seed``
    Z_j = Aᵀ Q_j,  X_j = A Z_j             two passes over A per step
    Q_{j+1} = orth((I − K Kᵀ) X_j)          K = [Q_0 … Q_j], Gram–Schmidt applied twice

Rayleigh–Ritz on span(K) needs no further pass: B = Kᵀ A = [Z_0 … Z_j]ᵀ = W Σ Vᵀ gives the
Ritz triplets u_i = K w_i, σ_i, v_i. They satisfy Aᵀ u_i = σ_i v_i exactly, and their residuals
r_i = A v_i − σ_i u_i = [X_0 … X_j] w_i / σ_i − σ_i u_i come from products already made, so every
step is checked for free against the acceptance tests of :mod:`primerge.linalg.certificate`: the
residual check ‖r_i‖ ≤ ``tol`` · σ_1 on the top k + 1 triplets (the extra one makes sure the k-th
direction is separated from the (k+1)-th, so a small gap at the cut cannot hide a mixed
direction), or, given an ``allowance`` (16-bit outputs), the certificate's backward error, as it
reaches the written tensor, and (1 + ε) energy bound. Triplets whose σ is numerically null
(:func:`primerge.linalg.core.null_mask`) need no check.

The iteration stops as soon as every member is accepted (the certificate usually allows fewer
passes than the residual check on gap-free spectra), when the basis would outgrow p, after
``max_steps`` steps, or early when no member still pending approaches acceptance fast enough to
reach it by then (each one's geometric rate of the last step, extrapolated). Each step costs two
passes over A, so the whole call makes 2·steps + 3 passes. Products are batched over the members
(one BLAS call per pass for the T task vectors) on A as it is stored: a transposed view is passed
to BLAS as such, never copied.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from primerge.linalg.certificate import TOLERANCE, Allowance, Certificate, certify
from primerge.linalg.core import SVD

#: Oversampling columns (docs/algorithms.md, "Truncated SVDs").
OVERSAMPLE = 10
#: Largest number of Krylov steps (each adds one block of ℓ columns to the basis).
MAX_STEPS = 8


class KrylovSVD(NamedTuple):
    """Top-k Ritz triplets of every batch member and how far they are from exact.

    ``converged``: (batch...) bool, accepted (residual check or certificate); ``residual``:
    (batch...) the largest checked ‖r_i‖ / σ_1; ``passes``: passes over A made; ``certificate``:
    the last step's tests (:class:`primerge.linalg.certificate.Certificate`).
    """

    factors: SVD
    converged: Tensor
    residual: Tensor
    passes: int
    certificate: Certificate


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
    """Orthonormal columns spanning ``block`` with span(``basis``) removed (Gram–Schmidt twice;
    each ``block − K (Kᵀ block)`` one fused multiply-add).

    Twice is enough while the block keeps as many independent directions as columns. Once A's
    range is exhausted (a member of rank below the basis width, e.g. Iso-CTS's task vectors projected
    off the common subspace) the block is numerically rank-deficient and QR completes it with
    arbitrary directions that are not orthogonal to K; a member whose new columns overlap K by more
    than √ε is orthogonalised once more (its new columns then lie outside A's range, so Z = AᵀQ ≈ 0
    and they leave the Ritz triplets as they are). The others keep their bits.
    """
    if basis is None:
        return torch.linalg.qr(block).Q
    Q = torch.linalg.qr(_without(basis, block)).Q
    lost = (basis.mT @ Q).abs().amax(dim=(-2, -1)) > torch.finfo(Q.dtype).eps ** 0.5
    if bool(lost.any()):
        Q = torch.where(lost[..., None, None], torch.linalg.qr(_without(basis, Q)).Q, Q)
    return Q


def _without(basis: Tensor, block: Tensor) -> Tensor:
    """(I − K Kᵀ) applied twice to ``block``."""
    for _ in range(2):
        block = torch.baddbmm(block, basis, basis.mT @ block, alpha=-1)
    return block


class _Ritz(NamedTuple):
    W: Tensor  # (batch..., c, checked) float64: Ritz vectors in the basis' coordinates
    S: Tensor  # (batch..., checked) float64 Ritz values
    residual: Tensor  # (batch..., checked) ‖r_i‖, float64
    spectral: Tensor  # (batch...) ‖[r_1 … r_k]‖₂, float64


def ritz(basis: Tensor, X: Tensor, gram: Tensor, checked: int, rank: int) -> _Ritz:
    """Ritz values and vectors of A on span(basis) and their residuals, from the Gram matrix
    ZᵀZ = W Σ² Wᵀ of Z = Aᵀ basis and X = A Z: u = basis·w, v = Z w / σ, r = X w / σ − σ u.

    The Gram matrix is c × c (c = the basis width), so Rayleigh–Ritz costs an O(c³)
    eigendecomposition instead of an SVD of a q × c matrix; in float64 its eigenvalues are exact
    for the float32 Z far below float32 rounding. ‖R_k‖₂ of the top ``rank`` residuals comes from
    their k × k Gram matrix.
    """
    lam, W = torch.linalg.eigh(gram)
    lam, W = lam.flip(-1)[..., :checked], W.flip(-1)[..., :checked]
    S = lam.clamp_min(0).sqrt()
    safe = torch.where(S > 0, S, torch.ones_like(S)).unsqueeze(-2)
    # r = X (w / σ) − basis (w σ): the c × checked coefficients are scaled, not the p × checked products
    R = torch.baddbmm(basis @ (W * S.unsqueeze(-2)).to(basis.dtype), X, (W / safe).to(basis.dtype), beta=-1)
    head = R[..., :rank]
    spectral = torch.linalg.eigvalsh((head.mT @ head).double())[..., -1].clamp_min(0).sqrt()
    return _Ritz(W, S, R.norm(dim=-2).double(), spectral)


def hopeless(history: list[Tensor], steps_left: int) -> bool:
    """Whether no member still pending (excess > 1) can reach acceptance (excess ≤ 1) in
    ``steps_left`` more steps at its excess' last geometric rate of decrease."""
    if len(history) < 2:
        return False
    now, before = history[-1].double(), history[-2].double()
    pending = now > 1
    if not bool(pending.any()):
        return False
    rate = (now[pending] / before[pending].clamp_min(1e-300)).clamp(max=1.0)
    needed = torch.log(1 / now[pending]) / torch.log(rate.clamp(min=1e-300, max=1 - 1e-12))
    return bool((needed > steps_left).all())


def block_krylov_svd(x: Tensor, rank: int, *, seed: int = 0, tol: float = TOLERANCE,
                     steps: int = MAX_STEPS, allowance: Allowance | None = None) -> KrylovSVD:
    """Top-``rank`` triplets of ``x`` (..., m, n) by block Krylov iteration (module docstring);
    ``allowance``: the certificate's, per member (None: residual check only)."""
    batch = x.shape[:-2]
    if len(batch) != 1:  # the iteration runs on one batch axis (batched BLAS calls)
        found = block_krylov_svd(x.reshape(-1, *x.shape[-2:]), rank, seed=seed, tol=tol, steps=steps,
                                 allowance=allowance)
        factors = SVD(*(t.reshape(*batch, *t.shape[1:]) for t in found.factors))
        verdict = Certificate(*(t.reshape(batch) for t in found.certificate))
        return KrylovSVD(factors, verdict.accepted, verdict.residual, found.passes, verdict)
    flip = x.shape[-2] < x.shape[-1]
    A = x.mT if flip else x  # (..., p, q), p ≥ q: Z = Aᵀ·basis, kept in float64, is on the smaller side
    shape = tuple(A.shape)
    width = block_width(rank, shape)
    checked = min(rank + 1, width)
    limit = max_steps(rank, shape, steps)
    frobenius = A.norm(dim=(-2, -1)).double() if allowance is not None else None  # no float64 copy of A
    space = _KrylovSpace(A, (limit + 1) * width)
    omega = sketch(shape[-1], width, seed, A).expand(*shape[:-2], shape[-1], width)
    Q = orthonormal_complement(None, A @ omega)
    history: list[Tensor] = []
    for step in range(limit + 1):
        space.extend(Q)
        found = ritz(space.basis, space.X, space.gram, checked, rank)
        norm = frobenius if frobenius is not None else found.S.new_zeros(found.S.shape[:-1])
        verdict = certify(found.S, found.residual, found.spectral, norm, rank, shape, tol=tol,
                          allowance=allowance, steps=step)
        history.append(verdict.excess)
        if bool(verdict.accepted.all()) or step == limit or hopeless(history, limit - step):
            break
        Q = orthonormal_complement(space.basis, space.X[..., -width:])
    factors = space.triplets(found, rank)
    if flip:
        factors = SVD(factors.V, factors.S, factors.U)
    return KrylovSVD(factors, verdict.accepted, verdict.residual, 1 + 2 * len(history), verdict)


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
