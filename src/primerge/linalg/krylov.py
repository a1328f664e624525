"""Randomized truncated SVD: block Krylov iteration, checked a posteriori at every step.

For a batch of matrices A (p × q after transposing so that p ≥ q) and a wanted rank k, a block of
ℓ = k + ``OVERSAMPLE`` columns grows a Krylov basis (block Lanczos with full reorthogonalisation;
Musco & Musco 2015, "Randomized block Krylov methods", Algorithm 2)::

    Q_0 = orth(A Ω)                        Ω: q × ℓ Gaussian, drawn from ``seed``
    Z_j = Aᵀ Q_j,  X_j = A Z_j             two passes over A per step
    Q_{j+1} = orth((I − K Kᵀ) X_j)          K = [Q_0 … Q_j], Gram–Schmidt applied twice (the first
                                           time with Kᵀ X_j = [Z_0 … Z_j]ᵀ Z_j from the Gram matrix)

Rayleigh–Ritz on span(K) needs no further pass: B = Kᵀ A = [Z_0 … Z_j]ᵀ = W Σ Vᵀ gives the
Ritz triplets u_i = K w_i, σ_i, v_i. They satisfy Aᵀ u_i = σ_i v_i exactly, and their residuals
r_i = A v_i − σ_i u_i = [X_0 … X_j] w_i / σ_i − σ_i u_i come from products already made, so every
step is checked for free against the acceptance tests of :mod:`primerge.linalg.certificate`: the
residual check ‖r_i‖ ≤ ``tol`` · σ_1 on the top k + 1 triplets (the extra one makes sure the k-th
direction is separated from the (k+1)-th, so a small gap at the cut cannot hide a mixed
direction), or, given an ``allowance`` (16-bit outputs), the certificate's backward error, as it
reaches the written tensor, and (1 + ε) energy bound. Triplets whose σ is numerically null
(:func:`primerge.linalg.core.null_mask`) need no check.

**Stopping rule.** Each step costs two passes over A, so a call of j steps makes 2·j + 3 passes.
The iteration stops as soon as every member is accepted, when the basis would outgrow p, after
``steps`` steps — for ``svd: auto`` the budget of its cost model
(:func:`primerge.linalg.choice.affordable_steps`: the steps that cost at most ``MARGIN`` of the
exact SVD; ``MAX_STEPS`` without an allowance) — or as soon as no pending member (excess > 1,
:class:`primerge.linalg.certificate.Certificate`) can reach acceptance (excess ≤ 1) by then:
with e_j its excess after step j and J the budget, a member is given up when

    e_j · ϱ^(J − j) > 1,     ϱ = its best contraction per step,

extrapolated geometrically. Without an allowance (the residual check) ϱ is the last step's
e_j / e_{j−1}: the residual check passes only where the spectrum has a gap, where Krylov
convergence is geometric at a rate the last step measures. With an allowance, ϱ = min(e_j /
e_{j−1}, e^{−μ}), the faster of the last step's and the gap-free floor's rate μ (below: one slow
step does not condemn a trajectory the model expects to go faster). The excess is compared from
step 1 on (step 0 cannot be accepted, and its (1 + ε) bound rarely has room), so a trajectory is
judged at its second certified step: one point would not do, as the ε part of the excess can
fall 30-fold in a step where most of A's energy lies above the cut. Before the iteration,
:func:`primerge.linalg.choice.certificate_steps` sends to the exact SVD the members the same
model puts beyond J, so a member given up is one the model misjudged; it wastes the passes made
until then, c(j) ≤ c(J) ≤ ``MARGIN`` of its exact SVD as the cost model prices them
(docs/algorithms.md, "Truncated SVDs").

**Gap-free floor model** (:class:`GapFreeFloor`: the certificate's trajectory where it is
slowest). Let all of A's energy lie in a Gaussian floor, p × q i.i.d. entries (p ≥ q, y = q/p).
The eigenvalues of AᵀA are λ ‖A‖_F² / q with λ Marchenko–Pastur distributed on [λ₋, λ₊] =
[(1 − √y)², (1 + √y)²] (mean 1); σ_i² ≈ λ_i ‖A‖_F² / q with λ_i the quantile that leaves
(i − ½)/q of the law above it. Block Krylov with ℓ columns resolves the i-th direction against
the (ℓ + 1)-th at the Chebyshev rate of their gap (Saad 1980, "On the rates of convergence of
the Lanczos and the block-Lanczos methods"; the same Chebyshev amplification, T_j(1 + γ) ≥
2^{j√γ − 1}, gives Musco & Musco 2015 their gap-independent bound ε ~ 1/j²): tan ∠(u_i, K_j)
≤ C / T_j(1 + 2γ), γ = (λ_{k+1} − λ_{ℓ+1}) / (λ_{ℓ+1} − λ₋) for the
last checked direction i = k + 1, and T_j(1 + 2γ) grows as e^{jμ}, μ = arccosh(1 + 2γ) ≈ 2√γ.
The residuals ρ_i, hence β and the excess e = g β / b (b the member's share of the allowance, g
its gain), contract by e^{−μ} per step, from about ``FLOOR_RESIDUAL`` · σ_{k+1} per kept
direction after the first step:

    e_j ≈ κ √(k λ_{k+1} / q) · D · e^{−μ (j − 1)},     D = g ‖A‖_F / b  (the member's demand),

the rate and the form derived, κ measured: on Gaussian floors (p × q ∈ {1024², 2816 × 1024,
1024 × 256}, k ∈ {3, 10, 32, 64, 128}, 1/D ∈ {2·10⁻³, 2.5·10⁻⁴}) e_j over the model with κ = 1
lies in 0.19–0.32 from step 1 until the basis nears q (then lower: it exhausts A's range; one
case, 1024 × 256 at k = 3 and the larger 1/D, rose to 0.7 over its last steps); with half the
energy in six strong directions above the floor 0.12–0.18, with a fifth 0.07–0.11. So the floor
holding all the energy is the slow case the model prices (κ = ¼), and strong directions above
the cut bring the certificate sooner. Measured e^{−μ}: 0.64 per step at 1024², k = 10, against
the model's 0.638. Not modelled: a member of rank below q (e.g. Iso-CTS's k/v task vectors
projected off the common subspace), whose basis exhausts its range, and so is certified, sooner.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

from primerge.linalg.certificate import TOLERANCE, Allowance, Certificate, KeptErrors, certify
from primerge.linalg.core import SVD

#: Oversampling columns (docs/algorithms.md, "Truncated SVDs").
OVERSAMPLE = 10
#: Krylov steps (each adds one block of ℓ columns to the basis) without a budget from the cost model.
MAX_STEPS = 8
#: κ: the gap-free floor's residual per kept direction after the first step, over σ_{k+1} (module
#: docstring: 0.19–0.32 measured on Gaussian floors holding all the energy).
FLOOR_RESIDUAL = 0.25
#: Midpoints of the quadrature over the Marchenko–Pastur law (its integrand is smooth in φ).
_QUADRATURE = 2048


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


class GapFreeFloor(NamedTuple):
    """The certificate's trajectory on a gap-free floor (module docstring): the excess after step j ≥ 1
    is about ``lead`` · D · e^{−``rate``·(j − 1)} for a member of demand D, and the floor's k-th
    singular value is ``kept`` · ‖A‖_F."""

    lead: float  # κ √(k λ_{k+1} / q)
    rate: float  # μ = arccosh(1 + 2γ)
    kept: float  # √(λ_k / q)

    def excess(self, demand: Tensor) -> Tensor:
        """e₁, the excess the model expects after the first step, of members of ``demand`` D."""
        return self.lead * demand


def gap_free_floor(rank: int, shape: tuple[int, ...]) -> GapFreeFloor:
    """:class:`GapFreeFloor` of top-``rank`` SVDs of m × n matrices (shape (..., m, n)) by blocks of
    ℓ = :func:`block_width` columns."""
    p, q = sorted(shape[-2:], reverse=True)
    return _floor(rank, block_width(rank, shape), p, q)


@lru_cache(maxsize=256)
def _floor(rank: int, width: int, p: int, q: int) -> GapFreeFloor:
    kth, cut, block, lowest = marchenko_pastur(q / p, tuple((i - 0.5) / q for i in (rank, rank + 1, width + 1)))
    gap = (cut - block) / max(block - lowest, 1e-300) if width < q else math.inf
    return GapFreeFloor(FLOOR_RESIDUAL * math.sqrt(rank * cut / q), math.acosh(1 + 2 * gap),
                        math.sqrt(kth / q))


def marchenko_pastur(ratio: float, above: tuple[float, ...]) -> tuple[float, ...]:
    """λ with the share ``above`` of the Marchenko–Pastur law of ratio y = ``ratio`` ≤ 1 (mean 1,
    support [λ₋, λ₊] = [(1 − √y)², (1 + √y)²]) above it, one per share, then λ₋.

    With λ(φ) = λ₊ − (λ₊ − λ₋)(1 − cos φ)/2, the density √((λ₊ − λ)(λ − λ₋)) / (2π y λ) dλ becomes
    (λ₊ − λ₋)² sin²φ / (8π y λ(φ)) dφ on [0, π], smooth (y = 1: (1 − cos φ)/π), integrated by
    midpoints and inverted by linear interpolation."""
    lo, hi = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    h = math.pi / _QUADRATURE

    def at(phi: float) -> float:
        return hi - (hi - lo) * (1 - math.cos(phi)) / 2

    mass = [0.0]
    for j in range(_QUADRATURE):
        phi = (j + 0.5) * h
        mass.append(mass[-1] + h * (hi - lo) ** 2 * math.sin(phi) ** 2 / (8 * math.pi * ratio * at(phi)))
    out = []
    for share in above:
        target = min(max(share, 0.0), 1.0) * mass[-1]
        j = min(_QUADRATURE - 1, bisect_left(mass, target, 1) - 1)
        frac = (target - mass[j]) / max(mass[j + 1] - mass[j], 1e-300)
        out.append(at((j + min(max(frac, 0.0), 1.0)) * h))
    return (*out, lo)


def sketch(q: int, width: int, seed: int, like: Tensor) -> Tensor:
    """The Gaussian test matrix Ω (q × width), drawn on the CPU from ``seed`` (the same numbers on
    every device), in ``like``'s dtype and device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q, width, generator=g, dtype=torch.float64).to(dtype=like.dtype, device=like.device)


def orthonormal_complement(basis: Tensor | None, block: Tensor, coefficients: Tensor | None = None) -> Tensor:
    """Orthonormal columns spanning ``block`` with span(``basis``) removed (Gram–Schmidt twice;
    each ``block − K (Kᵀ block)`` one fused multiply-add). ``coefficients``: Kᵀ block when the caller
    already has it (the Krylov block X = A Z: Kᵀ A Z = ZᵀZ, a block of the Gram matrix), used by the
    first pass instead of a product with K.

    Twice is enough while the block keeps as many independent directions as columns. Once A's
    range is exhausted (a member of rank below the basis width, e.g. Iso-CTS's task vectors projected
    off the common subspace) the block is numerically rank-deficient and QR completes it with
    arbitrary directions that are not orthogonal to K; a member whose new columns overlap K by more
    than √ε is orthogonalised once more (its new columns then lie outside A's range, so Z = AᵀQ ≈ 0
    and they leave the Ritz triplets as they are). The others keep their bits.
    """
    if basis is None:
        return torch.linalg.qr(block).Q
    if coefficients is not None:
        block = torch.baddbmm(block, basis, coefficients.to(block.dtype), alpha=-1)
    Q = torch.linalg.qr(_without(basis, block, 1 if coefficients is not None else 2)).Q
    lost = (basis.mT @ Q).abs().amax(dim=(-2, -1)) > torch.finfo(Q.dtype).eps ** 0.5
    if bool(lost.any()):
        Q = torch.where(lost[..., None, None], torch.linalg.qr(_without(basis, Q)).Q, Q)
    return Q


def _without(basis: Tensor, block: Tensor, times: int = 2) -> Tensor:
    """(I − K Kᵀ) applied ``times`` times to ``block``."""
    for _ in range(times):
        block = torch.baddbmm(block, basis, basis.mT @ block, alpha=-1)
    return block


class _Ritz(NamedTuple):
    W: Tensor  # (batch..., c, checked) float64: Ritz vectors in the basis' coordinates
    S: Tensor  # (batch..., checked) float64 Ritz values
    residual: Tensor  # (batch..., checked) ‖r_i‖, float64
    spectral: Tensor  # (batch...) ‖[r_1 … r_k]‖₂, float64
    head: Tensor  # (batch..., p, k) the residuals R_k = [r_1 … r_k], in A's dtype
    left: Tensor  # (batch..., p, checked) the Ritz vectors u_i = basis·w_i, in A's dtype


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
    # r = X (w / σ) − u σ, u = basis·w (kept for the triplets)
    left = basis @ W.to(basis.dtype)
    R = torch.baddbmm(left * S.unsqueeze(-2).to(basis.dtype), X, (W / safe).to(basis.dtype), beta=-1)
    head = R[..., :rank]
    spectral = torch.linalg.eigvalsh((head.mT @ head).double())[..., -1].clamp_min(0).sqrt()
    return _Ritz(W, S, R.norm(dim=-2).double(), spectral, head, left)


def hopeless(history: list[Tensor], steps_left: int, rate: float | None = None) -> bool:
    """Whether no member still pending (excess > 1) can reach acceptance (excess ≤ 1) in
    ``steps_left`` more steps at its best contraction per step (module docstring, "Stopping rule"):
    the last step's e_j / e_{j−1}, or, given the floor's ``rate`` μ, the faster of that and e^{−μ}."""
    if len(history) < 2:
        return False
    now = history[-1].double()
    pending = now > 1
    if not bool(pending.any()):
        return False
    now = now[pending]
    contraction = (now / history[-2].double()[pending].clamp_min(1e-300)).clamp(max=1.0)
    if rate is not None:
        contraction = contraction.clamp(max=math.exp(-rate))
    needed = torch.log(1 / now) / torch.log(contraction.clamp(min=1e-300, max=1 - 1e-12))
    return bool((needed > steps_left).all())


def block_krylov_svd(x: Tensor, rank: int, *, seed: int = 0, tol: float = TOLERANCE,
                     steps: int = MAX_STEPS, allowance: Allowance | None = None,
                     frobenius: Tensor | None = None) -> KrylovSVD:
    """Top-``rank`` triplets of ``x`` (..., m, n) by block Krylov iteration (module docstring), at most
    ``steps`` steps; ``allowance``: the certificate's, per member (None: residual check only);
    ``frobenius``: the members' :func:`frobenius_norms` when the caller has them."""
    batch = x.shape[:-2]
    if len(batch) != 1:  # the iteration runs on one batch axis (batched BLAS calls)
        norms = None if frobenius is None else frobenius.reshape(-1)
        found = block_krylov_svd(x.reshape(-1, *x.shape[-2:]), rank, seed=seed, tol=tol, steps=steps,
                                 allowance=allowance, frobenius=norms)
        factors = SVD(*(t.reshape(*batch, *t.shape[1:]) for t in found.factors))
        verdict = Certificate(*(t.reshape(batch) for t in found.certificate))
        return KrylovSVD(factors, verdict.accepted, verdict.residual, found.passes, verdict)
    A, flip = _oriented(x)  # (..., p, q), p ≥ q: Z = Aᵀ·basis, kept in float64, is on the smaller side
    shape = tuple(A.shape)
    width = block_width(rank, shape)
    checked = min(rank + 1, width)
    limit = max_steps(rank, shape, steps)
    if allowance is not None and frobenius is None:
        frobenius = frobenius_norms(x)
    rate = gap_free_floor(rank, shape).rate if allowance is not None else None
    summed = allowance is not None and allowance.combination.summed(rank, shape)
    space = _KrylovSpace(A, (max_steps(rank, shape) + 1) * width, (limit + 1) * width)
    omega = sketch(shape[-1], width, seed, A).expand(*shape[:-2], shape[-1], width)
    Q = orthonormal_complement(None, thin_product(A, omega))
    history: list[Tensor] = []  # the excess per step; with an allowance from step 1 on (module docstring)
    for step in range(limit + 1):
        space.extend(Q)
        found = ritz(space.basis, space.X, space.gram, checked, rank)
        norm = frobenius if frobenius is not None else found.S.new_zeros(found.S.shape[:-1])
        kept = space.triplets(found, rank) if summed and step >= 1 else None  # excess compared from step 1
        errors = None if kept is None else KeptErrors(found.head, kept.U, kept.V)
        verdict = certify(found.S, found.residual, found.spectral, norm, rank, shape, tol=tol,
                          allowance=allowance, steps=step, errors=errors)
        if rate is None or step >= 1:
            history.append(verdict.excess)
        if bool(verdict.accepted.all()) or step == limit or hopeless(history, limit - step, rate):
            break
        Q = orthonormal_complement(space.basis, space.X[..., -width:], space.gram[..., :, -width:])
    factors = kept if kept is not None else space.triplets(found, rank)
    if flip:
        factors = SVD(factors.V, factors.S, factors.U)
    return KrylovSVD(factors, verdict.accepted, verdict.residual, 3 + 2 * step, verdict)


def thin_product(A: Tensor, block: Tensor) -> Tensor:
    """A · ``block`` for a block of few columns (the passes over A), computed as (blockᵀ Aᵀ)ᵀ: the
    CPU BLAS multiplies with the thin operand on the left 1.1–1.6× faster, whichever of A and Aᵀ is
    contiguous (measured with 20–64 columns on 11008 × 4096, 4096² and 4096 × 1024 matrices in
    batches of 8: 115–176 against 71–162 GFLOP/s on 2 cores), with the same bits for 1 and 2
    threads."""
    return (block.mT @ A.mT).mT


def frobenius_norms(x: Tensor) -> Tensor:
    """‖A‖_F per member of ``x`` (..., m, n) in float64, as the certificate takes it (computed on A as
    the iteration orients it, without a float64 copy)."""
    return _oriented(x)[0].norm(dim=(-2, -1)).double()


def _oriented(x: Tensor) -> tuple[Tensor, bool]:
    """(A, flipped): ``x`` or its transposed view, whichever has at least as many rows as columns."""
    flip = x.shape[-2] < x.shape[-1]
    return (x.mT if flip else x), flip


class _KrylovSpace:
    """The growing basis K (p × c), Z = Aᵀ K (float64, q × c), X = A Z (p × c) and ZᵀZ, in
    buffers of ``columns`` columns (``MAX_STEPS`` steps' worth, whatever the budget: the same
    layout, so the same bits, for every budget that fits), enlarged (doubled, up to ``largest``)
    only when a budget beyond ``MAX_STEPS`` outgrows them."""

    def __init__(self, A: Tensor, columns: int, largest: int) -> None:
        self.A, self.c, self.largest = A, 0, max(columns, largest)
        self._basis, self._X, self._Z, self._gram = self._buffers(columns)

    def _buffers(self, columns: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, (p, q) = self.A.shape[:-2], self.A.shape[-2:]
        return (self.A.new_empty((*batch, p, columns)), self.A.new_empty((*batch, p, columns)),
                self.A.new_empty((*batch, q, columns), dtype=torch.float64),
                self.A.new_empty((*batch, columns, columns), dtype=torch.float64))

    def _reserve(self, columns: int) -> None:
        if columns <= self._basis.shape[-1]:
            return
        larger = self._buffers(min(max(columns, 2 * self._basis.shape[-1]), self.largest))
        c = self.c
        for new, old in zip(larger[:3], (self._basis, self._X, self._Z)):
            new[..., :c] = old[..., :c]
        larger[3][..., :c, :c] = self._gram[..., :c, :c]
        self._basis, self._X, self._Z, self._gram = larger

    basis = property(lambda self: self._basis[..., :self.c])
    X = property(lambda self: self._X[..., :self.c])
    gram = property(lambda self: self._gram[..., :self.c, :self.c])

    def extend(self, Q: Tensor) -> None:
        """Add the orthonormal block Q: two passes over A (Z = AᵀQ, X = A Z), the Gram's new rows."""
        self._reserve(self.c + Q.shape[-1])
        start, self.c = self.c, self.c + Q.shape[-1]
        Z = thin_product(self.A.mT, Q)
        self._basis[..., start:self.c] = Q
        self._X[..., start:self.c] = thin_product(self.A, Z)
        self._Z[..., start:self.c] = Z
        cross = self._Z[..., :self.c].mT @ self._Z[..., start:self.c]  # (c, ℓ)
        self._gram[..., :self.c, start:self.c] = cross
        self._gram[..., start:self.c, :start] = cross[..., :start, :].mT

    def triplets(self, found: _Ritz, rank: int) -> SVD:
        """The top ``rank`` Ritz triplets (u = K w, σ, v = Z w / σ; v = 0 where σ = 0)."""
        W, S = found.W[..., :rank], found.S[..., :rank]
        safe = torch.where(S > 0, S, torch.ones_like(S)).unsqueeze(-2)
        V = ((self._Z[..., :self.c] @ W) / safe * (S > 0).unsqueeze(-2)).to(self.A.dtype)
        return SVD(found.left[..., :rank], S.to(self.A.dtype), V)
