"""When a block Krylov result is as good as the exact SVD for the tensor being written.

The Ritz triplets of :func:`primerge.linalg.krylov.block_krylov_svd` are accepted per matrix by
one of two tests, both computed from the iteration alone.

**Residual check (strict; every output dtype).** r_i = A v_i − θ_i u_i for the top k + 1 Ritz
triplets (θ_i Ritz values, u_i = K w_i, v_i = Aᵀ u_i / θ_i, so Aᵀ u_i = θ_i v_i exactly):
max_i ‖r_i‖ ≤ tol · θ_1 (``TOLERANCE`` = 1e-5). Every θ_i then lies within ‖r_i‖ of a singular
value, and where the spectrum has a gap δ = θ_k − σ_{k+1} > 0 at the cut, Wedin's sin Θ theorem
puts the kept Ritz subspaces within sin∠ ≤ ‖R_k‖_F / δ of the exact ones, so the merge agrees
with the exact path; without a gap the check fails and, for float32/float64 outputs, the matrix
gets the exact SVD.

**Certificate (16-bit outputs: bfloat16, float16, FP8).** On a gap-free spectrum (a few strong
directions over a noise floor, the k-th direction inside its Marchenko–Pastur edge) the exact
top-k subspace is ill-conditioned: the noise-edge vectors never converge, yet any near-optimal
choice serves the merge. What is certified instead, with R_k = [r_1 … r_k], D = (I − U_kU_kᵀ)
A (I − V_kV_kᵀ) and ρ_i = ‖r_i‖:

1. *Backward error.* U_kᵀ r_i = 0 (i ≤ k + 1), so Ã = A − R_k V_kᵀ = U_k Θ_k V_kᵀ + D with
   U_kᵀ D = 0 and D V_k = 0: the Ritz triplets are exact singular triplets of Ã. D has the
   approximate triplet (u_{k+1}, θ_{k+1}, v_{k+1}) with Dᵀu_{k+1} = θ_{k+1} v_{k+1} and residual
   ≤ ρ_{k+1}, hence a singular value within ρ_{k+1} of θ_{k+1}. Hypothesis (H): it is D's
   largest, ‖D‖₂ ≤ θ_{k+1} + ρ_{k+1} — the Krylov space missed no direction stronger than its
   own (k+1)-th, the hypothesis of every residual-based Krylov stopping test; for a Gaussian start
   block of ℓ ≥ k + 10 columns it fails only if the block is nearly orthogonal to such a
   direction, and after ≥ ``CERTIFIED_STEPS`` steps that direction's weight has been amplified
   by the Krylov polynomial (the gap-independent analysis of block Krylov, Musco & Musco 2015,
   Theorem 1). Raising θ_i to θ̂_i = max(θ_i, θ_{k+1} + ρ_{k+1}) (ζ_i = θ̂_i − θ_i)
   gives Â = U_k Θ̂ V_kᵀ + D whose exact top-k triplets are (u_i, θ̂_i, v_i), and since
   A − Â = (R_k − U_k diag(ζ)) V_kᵀ with U_kᵀ R_k = 0 (Pythagoras, column by column),

       β = ‖A − Â‖_F = √(‖R_k‖_F² + ‖ζ‖₂²),    ‖A − Â‖₂ ≤ √(‖R_k‖₂² + max_i ζ_i²).

   The Ritz triplets are Â's exact top-k triplets with their values lowered by ζ_i ≤ ρ_{k+1}
   (inside the same bound): a merge computed from them is the exact-SVD merge of task vectors
   within β of the given ones, up to those values.
2. *Energy (Musco & Musco's per-vector guarantee, a posteriori).* Weyl on A = Â + (A − Â):
   σ_i ≤ θ_i + δ_i with δ_i = ζ_i + √(‖R_k‖₂² + max_j ζ_j²). The captured energy Σ_{i≤k} θ_i² is within
   Σ((θ_i + δ_i)² − θ_i²) of the optimum, i.e. ‖A − U_kU_kᵀA‖_F² = ‖A‖_F² − Σθ_i² ≤ (1 + ε)
   ‖A − A_k‖_F² with ε = Σ((θ_i + δ_i)² − θ_i²) / (‖A‖_F² − Σ(θ_i + δ_i)²).
3. *Combination: how the members' backward errors reach the written tensor* (:class:`Combination`,
   set by the method from its own formula). E_t = A_t − Â_t = (R_k − U_k diag(ζ)) V_kᵀ = E_t V_kV_kᵀ
   lies in member t's kept row space: it changes only what the method takes from the member, its
   kept part P_t = U_k Θ V_kᵀ. To first order, with the members' kept subspaces mutually
   orthogonal (Whitening at its identity point, the regime it is built to reach) and the cut
   separated (dropped: the gap factors 1/(1 − σ_{k+1}²/θ_k²) and PRIME's cross terms below, what
   makes the exact path itself ill-conditioned on a gap-free cut, which is not bounded here), the
   written update moves by Σ_t Δ_t with ‖Δ_t‖_F ≤ g_t β_t, g_t the member's gain:

   - values written as they are, g = |α|: TSV's α Û Σ_s V̂ᵀ = α Σ_t Û_t Θ_t V̂_tᵀ (TSV Eq. 4) is the
     SUM of the T whitened kept parts, so Δ_t = α δP_t, δP_t ≈ −R_k V_kᵀ (the Ritz vectors are off
     by R_kΘ⁻¹; the values are second-order accurate). PRIME's M_p is the same whitened sum (PRIME
     Algorithm 1, Eq. 20); its residual term P⊥(τ̄ − Σ_t P_t/T) = P⊥ τ̄ (P⊥ U_t = 0) sees the
     members only through P⊥ = I − ÛÛᵀ, whose rotation moves it by R_kV_kᵀ/T through τ̄'s part
     U_tΘV_kᵀ/T — with M_p's term α(1 − 1/T)R_kV_kᵀ, within g = |α| — and by cross terms
     (τ̄'s other parts against R_kΘ⁻¹, relative size ‖(I − U_tU_tᵀ)τ̄‖₂/θ_k). So PRIME's members
     are summed, not averaged over T as this certificate first assumed: its allowance per member
     was T times too large. (Exactly, not to first order: PRIME's merge from the Ritz triplets is
     its exact-SVD merge of the Â_t less α Û diag(ζ) V̂ᵀ, plus α P⊥ mean_t(A_t − Â_t), since its
     residual term takes the given A_t.)
   - values flattened to one level, g = |α| · hypot(s̄/θ_k, 1): Iso-CTS writes α s̄ Û V̂ᵀ, s̄ the
     mean of its r_full kept values, so a member's kept part reaches it through its polar factor
     U_k V_kᵀ, which E_t moves by (I − U_kU_kᵀ) R_k Θ⁻¹ V_kᵀ (U_kᵀ E_t V_k = −diag(ζ) is symmetric
     and does not rotate it), while ζ lowers s̄ by ≤ Σζ_i / r_full: ‖Δ_t‖_F ≤ |α| (s̄ ‖R_k‖_F / θ_k
     + ‖ζ‖₂ √(k / r_full)) ≤ g β_t, with s̄ ≤ ``level``, the method's bound from what it knows
     before the SVD (Ritz values interlace below the singular values, so the bound holds for them).

   Worst case, whatever the directions of the Δ_t, ‖Σ_t Δ_t‖_F ≤ Σ_t g_t β_t. Where the values are
   written as they are (TSV, PRIME) the directions are known: the exact merges of the Â_t and of
   the A_t differ, to first order, by α Σ_t E_t (E_t = E_t V_kV_kᵀ lies in the kept part), so the
   norm of the sum can be computed instead of bounded (the *summed test*,
   :meth:`Allowance.summed_share`), from two (N·k)² Gram matrices of the concatenated factors:

       ‖Σ_t E_t‖_F² = Σ_{s,t} ⟨F_sᵀF_t, V_sᵀV_t⟩,     F_t = R_{k,t} − U_{k,t} diag(ζ_t).

   It counts directions the members share (the cross terms) as they are, and it is (Σ_t β_t²)^½
   where their errors are uncorrelated, √T below the worst case for T like members (on the bench's
   realistic zoo at hidden 4096: 0.35 of Σ_t β_t at every step, the cross terms below 10⁻³ of it).
   Its first-order model takes the Whitening at its identity point, which holds while the members'
   kept directions fill a small part of the space. Measured where the exact path is well defined
   (task vectors with a gap at the cut, the merge from Ritz triplets after two Krylov steps against
   the exact merge; T ∈ {2, 4, 8}, square and oblong): the written update moved by 0.94–1.09× the
   summed norm where T·k ≤ ¼ min(m, n), 1.1–1.3× at ½, and 2.3–2.9× where the members fill the
   space (TSV: T·k = r_full), there up to 1.04× even Σ_t β_t where U_s and V_s are both square.
   So the summed test is taken where T·k ≤ ``SUMMED_FILL`` · min(m, n) — PRIME at its ~1% rank —
   and each member's share elsewhere. TSV, which fills the space by construction, keeps the worst
   case, though its Whitening is far from the identity point the model assumes (the orthogonality
   is a model there, not a hypothesis checked); where the inputs are themselves 16-bit, each
   fine-tune's own storage rounding (≈ that of θ₀) already exceeds the β_t ≤
   ``ROUNDING_FRACTION`` · rounding / T certified here.

A member is accepted when, after at least ``CERTIFIED_STEPS`` Krylov steps, ε ≤ ``ENERGY_EPSILON``
and either g_t β_t ≤ its share of the allowance or, where the summed test is taken, |α| ‖Σ_t E_t‖_F
≤ the whole allowance, the sum running over the batch's members that may be kept (strict, or
within ε; a member sent to the exact SVD adds nothing). The allowance is what the written tensor's
own rounding makes invisible (:class:`OutputPrecision`): ``ROUNDING_FRACTION`` × the Frobenius
rounding that storing θ₀ in the output dtype introduces, shared equally by the ``members`` SVD
members behind the tensor (whichever path each takes), so that the written tensor moves by
Σ_t g_t β_t ≤ ``ROUNDING_FRACTION`` × that rounding in the worst case, or, by the summed test, by
a computed first-order change within it. Round-to-nearest with unit roundoff u moves a value x
whose mantissa is m ∈ [1, 2) by a relative error uniform on ±u/m; with logarithmically distributed
mantissas (Hamming 1970) E[1/m²] = 3/(8 ln 2), so ‖fl(θ) − θ‖_F ≈ u ‖θ‖_F / √(8 ln 2)
(0.425 u; measured 0.4248 u on N(0, 0.02²) weights in bf16 and fp16). The written tensor is
θ₀ + Δ with ‖θ₀‖ ≫ ‖Δ‖ for fine-tunes, so the certified members' effect is a small fraction of
what the cast itself does to the tensor. float32 and float64 outputs keep the residual check
only (:attr:`OutputPrecision.tolerant`).

Not bounded, and not meant to be: the distance to the exact path's output. On a gap-free cut the
exact noise-edge directions are one choice among equally good ones; measured on the bench's
realistic zoo (hidden 1024, noise floor ½, rank 1%: six strong directions, four from the edge),
a certified PRIME merge differs from the exact one by 2–5% of the update (1.5–2.7× the bf16
rounding of the output; 22–24%, 13–14×, under the earlier per-member allowance), all of it in
which edge directions were kept, while the exact path itself moves by ~2–4% when its inputs are
perturbed by 1% at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from primerge.linalg.core import null_mask

#: Default residual tolerance: ‖A v_i − σ_i u_i‖ ≤ TOLERANCE · σ_1 for the top k + 1 triplets.
TOLERANCE = 1e-5
#: Σ_t g_t β_t over a tensor's members may be at most this fraction of the Frobenius rounding of θ₀
#: in the output dtype.
ROUNDING_FRACTION = 0.5
#: Largest share of min(m, n) the kept directions of a tensor's members (members × k) may fill for the
#: certificate to take their summed backward error (module docstring, 3: measured within 0.94–1.09×
#: of the written update's movement up to this fill, 1.1–1.3× at ½, 2.3–2.9× when they fill it).
SUMMED_FILL = 0.25
#: Largest certified ε of the (1 + ε) Frobenius bound (Musco & Musco's regime of interest).
ENERGY_EPSILON = 0.25
#: Krylov steps (blocks after the first) before the certificate may accept (at least two power
#: iterations, docs/algorithms.md, "Truncated SVDs"); the residual check may accept earlier.
CERTIFIED_STEPS = 2
#: Output dtypes with at least this unit roundoff get the certificate (16-bit floats and FP8).
TOLERANT_ROUNDOFF = 2.0**-11
#: ‖fl(θ) − θ‖_F / (u ‖θ‖_F) for logarithmically distributed mantissas: 1 / √(8 ln 2).
ROUNDING_RMS = 1.0 / math.sqrt(8.0 * math.log(2.0))


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p of a floating dtype with p significand bits (half the spacing at 1.0)."""
    return torch.finfo(dtype).eps / 2


def tolerant(dtype: torch.dtype) -> bool:
    """Whether outputs stored as ``dtype`` get the certificate (16-bit and narrower floats)."""
    return dtype.is_floating_point and unit_roundoff(dtype) >= TOLERANT_ROUNDOFF


@dataclass(frozen=True)
class Combination:
    """How the backward errors of the SVD members behind one written tensor reach it (module
    docstring, 3): the ``members`` share the allowance equally, and each reaches the written update
    with the gain ``scale`` (|α|) when its kept values are written as they are (TSV, PRIME), or
    ``scale`` · hypot(s̄/θ_k, 1) when every kept direction is written with one value s̄ ≤ ``level``
    (Iso-CTS). The default is one member written as it is."""

    members: int = 1
    scale: float = 1.0
    level: float | None = None

    def summed(self, rank: int, shape: tuple[int, ...]) -> bool:
        """Whether the certificate computes the norm of the members' summed backward errors, Σ_t |α| E_t
        (module docstring, 3), for top-``rank`` SVDs of m × n matrices: several members' kept parts
        written as they are into one tensor (no ``level``), their kept directions filling at most
        ``SUMMED_FILL`` of min(m, n)."""
        return self.members > 1 and self.level is None and self.members * rank <= SUMMED_FILL * min(shape[-2:])

    def gain(self, kept: Tensor) -> Tensor:
        """g per member from its kept Ritz values ``kept`` (batch..., k), null ones given as 0."""
        if self.level is None:
            return torch.full_like(kept[..., 0], self.scale)
        smallest = torch.where(kept > 0, kept, torch.full_like(kept, math.inf)).amin(-1)
        return self.scale * torch.hypot(self.level / smallest, torch.ones_like(smallest))


class Allowance(NamedTuple):
    """One member's ``budget``, its equal share of ``ROUNDING_FRACTION`` × the output's rounding, and
    the ``combination`` that carries its backward error to the written tensor."""

    budget: float
    combination: Combination

    def share(self, backward: Tensor, kept: Tensor) -> Tensor:
        """g·β / budget per member: the part of its share that its backward error β uses (≤ 1: within)."""
        return self.combination.gain(kept) * backward / max(self.budget, torch.finfo(backward.dtype).tiny)

    def summed_share(self, errors: Tensor, right: Tensor) -> Tensor:
        """|α| ‖Σ_t E_t‖_F over the whole allowance (budget × members), E_t = F_t V_tᵀ for the
        members' ``errors`` F_t (N, p, k) and kept right singular vectors ``right`` V_t (N, q, k)
        (module docstring, 3): ‖Σ_t F_t V_tᵀ‖_F² = Σ_{s,t} ⟨F_sᵀF_t, V_sᵀV_t⟩, from the two
        (N·k)² Gram matrices of the concatenated factors, never from an m × n product."""
        F, V = (t.transpose(0, 1).reshape(t.shape[1], -1) for t in (errors, right))
        squared = ((F.mT @ F).double() * (V.mT @ V).double()).sum().clamp_min(0)
        total = self.budget * self.combination.members
        return self.combination.scale * squared.sqrt() / max(total, torch.finfo(torch.float64).tiny)

    def expected(self, demand: Tensor, rank: int, shape: tuple[int, ...]) -> Tensor:
        """The demand the certificate is expected to meet per member, from each member's own
        (:meth:`share` of a backward error of ‖A‖_F): its own, or where the members are summed
        (:meth:`Combination.summed`) the excess their sum would have if their errors were
        uncorrelated, (Σ_t D_t²)^½ / members, when that is lower (the model, not the test: the test
        computes the sum)."""
        if not self.combination.summed(rank, shape):
            return demand
        return demand.clamp_max(float(demand.norm()) / self.combination.members)


@dataclass(frozen=True)
class OutputPrecision:
    """How finely a merged tensor is written: its dtype's unit roundoff and the RMS of θ₀'s elements,
    and how the method's SVD members reach it (:class:`Combination`, set by the method)."""

    dtype: str
    unit_roundoff: float
    rms: float
    combination: Combination = Combination()

    @classmethod
    def of(cls, dtype: torch.dtype, base: Tensor) -> OutputPrecision:
        """The precision of a tensor stored as ``dtype`` whose base values are ``base``."""
        rms = float(base.detach().float().square().mean().sqrt()) if base.numel() else 0.0
        return cls(str(dtype).removeprefix("torch."), unit_roundoff(dtype), rms)

    @property
    def tolerant(self) -> bool:
        """Whether the certificate applies (16-bit and narrower floats); else the residual check only."""
        return self.unit_roundoff >= TOLERANT_ROUNDOFF

    def rounding(self, elements: int) -> float:
        """‖fl(θ₀) − θ₀‖_F of ``elements`` values of θ₀ (module docstring)."""
        return ROUNDING_RMS * self.unit_roundoff * self.rms * math.sqrt(elements)

    def allowance(self, shape: tuple[int, ...]) -> Allowance | None:
        """Each member's allowance for m × n matrices, or None (residual check only)."""
        if not self.tolerant:
            return None
        total = ROUNDING_FRACTION * self.rounding(shape[-2] * shape[-1])
        return Allowance(total / self.combination.members, self.combination)


def combined(precision: OutputPrecision | None, combination: Combination) -> OutputPrecision | None:
    """``precision`` for SVD members that reach the written tensor by ``combination`` (None stays None)."""
    return None if precision is None else replace(precision, combination=combination)


class KeptErrors(NamedTuple):
    """What the summed test needs of every member's top-k Ritz triplets: the ``residuals`` R_k
    (N, p, k), and the kept singular vectors ``left`` U_k (N, p, k) and ``right`` V_k (N, q, k), so
    that E_t = (R_k − U_k diag ζ) V_kᵀ (module docstring, 1 and 3)."""

    residuals: Tensor
    left: Tensor
    right: Tensor


class Certificate(NamedTuple):
    """Per batch member: ``strict`` (the residual check passed), ``residual`` max_i ‖r_i‖ / θ_1 over
    the live checked triplets, ``floor`` θ_{k+1} + ρ_{k+1} (hypothesis (H)'s bound on ‖D‖₂; 0 when
    the basis spans A's row space), ``backward`` β, ``share`` g·β over the member's allowance
    (:meth:`Allowance.share`; inf without one), ``summed`` |α| ‖Σ_t E_t‖_F over the whole allowance
    (:meth:`Allowance.summed_share`, the same for every member of the batch; inf where not computed),
    ``epsilon`` ε, ``accepted`` (strict, or certified) and ``excess`` (≤ 1 when accepted; the
    stopping rule's measure of distance to acceptance)."""

    strict: Tensor
    residual: Tensor
    floor: Tensor
    backward: Tensor
    share: Tensor
    summed: Tensor
    epsilon: Tensor
    accepted: Tensor
    excess: Tensor

    @property
    def certified(self) -> Tensor:
        """Accepted by the certificate, not by the residual check."""
        return self.accepted & ~self.strict

    @property
    def used(self) -> Tensor:
        """The part of its allowance each member's backward error uses by the test that passes more
        easily: its own share, or the members' sum."""
        return torch.minimum(self.share, self.summed)


def certify(S: Tensor, residual: Tensor, spectral: Tensor, frobenius: Tensor, rank: int,
            shape: tuple[int, ...], *, tol: float, allowance: Allowance | None, steps: int,
            errors: KeptErrors | None = None) -> Certificate:
    """The tests of the module docstring for one Krylov step.

    ``S``, ``residual``: (batch..., checked) Ritz values θ_i and ‖r_i‖ of the top ``checked`` ≤ k + 1
    triplets (float64); ``spectral``: (batch...) ‖R_k‖₂; ``frobenius``: (batch...) ‖A‖_F; ``steps``:
    the Krylov steps made; ``allowance``: each member's (None: the residual check only); ``errors``:
    the members' residuals and kept vectors, for the summed test of members summed into one tensor
    (:meth:`Combination.summed`; batch of one axis). ``checked`` = k means the basis spans all of A's
    row space (no (k+1)-th).
    """
    live = ~null_mask(S, shape)
    scale = torch.where(S[..., :1] > 0, S[..., :1], torch.ones_like(S[..., :1]))
    relative = torch.where(live, residual / scale, torch.zeros_like(residual)).amax(-1)
    strict_ratio = relative / tol
    theta, rho = S[..., :rank], residual[..., :rank]
    floor = S[..., rank] + residual[..., rank] if S.shape[-1] > rank else torch.zeros_like(S[..., 0])
    zeta = (floor.unsqueeze(-1) - theta).clamp_min(0)
    backward = torch.hypot(rho.norm(dim=-1), zeta.norm(dim=-1))
    delta = zeta + torch.hypot(spectral, zeta.amax(-1)).unsqueeze(-1)
    head, bound = theta.square().sum(-1), (theta + delta).square().sum(-1)
    room = frobenius.square() - bound
    epsilon = torch.where(room > 0, (bound - head) / room.clamp_min(torch.finfo(room.dtype).tiny),
                          torch.full_like(room, math.inf))
    share = summed = certified_ratio = torch.full_like(relative, math.inf)
    strict = strict_ratio <= 1
    if allowance is not None:
        share = allowance.share(backward, torch.where(live[..., :rank], theta, torch.zeros_like(theta)))
        if errors is not None:
            # the members that may be kept: strict, or within the energy bound (the others go exact)
            kept = (live[..., :rank] & (strict | (epsilon <= ENERGY_EPSILON)).unsqueeze(-1)).unsqueeze(-2)
            F = (errors.residuals - errors.left * zeta.unsqueeze(-2).to(errors.left.dtype)) * kept
            summed = allowance.summed_share(F, errors.right).expand_as(share)
        certified_ratio = torch.maximum(torch.minimum(share, summed), epsilon / ENERGY_EPSILON)
    accepted = strict | ((certified_ratio <= 1) & (steps >= CERTIFIED_STEPS))
    excess = torch.minimum(strict_ratio, certified_ratio)
    return Certificate(strict, relative, floor, backward, share, summed, epsilon, accepted, excess)
