"""PRIME: ultra-low-rank principal–residual merging (PRIME paper, Section 3.3, Algorithm 1).

Per matrix parameter with T task vectors τ_t (m × n), r_full = min(m, n):

1. r = max(1, round(ρ·r_full)) for a fractional ``rank`` ρ (default 0.01), or the
   integer ``rank`` itself; if T·r > r_full then r = ⌊r_full/T⌋ (as TSV truncates).
   ``rank: auto`` selects one shared ρ by the F(r) objective in a whole-model
   pre-pass (Section 4.1, :mod:`primerge.methods.prime_rank`).
2. Principal parts τ_t^[r] = U_t^r Σ_t^r V_t^rᵀ (truncated SVD, batched over tasks);
   residuals R_t = τ_t − τ_t^[r].
3. Principal merge (TSV on the principal parts): M_p = Û Σ_s V̂ᵀ, Û = Whitening(U_s).
4. Residual merge M_r = Merge({R_t}): ``mean`` (default), ``ties`` (TIES on the
   residuals), or ``s_sb`` (Scaled Subspace Boosting, Appendix N, Eq. 33: the mean
   residual's singular values all set to a·σ₁, a = ``s_sb_scale``).
5. M_r⊥ = M_r − Û(ÛᵀM_r) (Eq. 20, never forming P⊥), and τ = α (M_p + M_r⊥).

The mean residual is computed without materialising any R_t:
mean_t R_t = mean_t τ_t − U_s Σ_s V_sᵀ / T.

LoRA task vectors stay factored (:class:`primerge.methods.stack.TaskStack`): their principal
triplets come from the factored thin SVD, and a task of rank k ≤ r has R_t = 0 (its r − k
extra triplets are null, zero columns of U_s, as in TSV). Only ``residual: ties`` needs the
dense residuals and materialises the stack; a task with a null principal triplet (rank ≤ r)
has R_t = 0 exactly there, so TIES never elects rounding noise.
"""

from __future__ import annotations

from typing import Annotated, Literal, NamedTuple

from pydantic import Field, field_validator
from torch import Tensor

from primerge.linalg import SVD, OutputPrecision, drop_null, flatten_spectrum, project_out, svd
from primerge.linalg.certificate import combined
from primerge.methods.base import SVDParams, TensorContext, merge_method
from primerge.methods.prime_rank import AutoRank, AutoRankPrepass, candidate_ranks
from primerge.methods.stack import TaskStack
from primerge.methods.ties import tensor_thresholds, ties_merge
from primerge.methods.tsv import concat_factors, summed_parts, whiten


class PrimeParams(SVDParams):
    rank: Literal["auto"] | Annotated[float, Field(gt=0)] = Field(
        0.01, description="fraction ρ of min(m, n) if < 1 (or 'N%'), a whole rank if >= 1 (1.0 is rank 1, "
        "not 100%), or auto (F(r)); capped at min(m, n), then lowered to ⌊min(m, n)/T⌋ when T·r exceeds it"
    )
    residual: Literal["mean", "ties", "s_sb"] = Field("mean", description="residual merge")
    s_sb_scale: float = Field(1.7, gt=0, description="a in S-SB: singular values set to a·σ₁")
    ties_density: float = Field(0.2, ge=0, le=1, description="TIES density for residual: ties")
    auto_step: float = Field(0.01, gt=0, lt=1, description="β: spacing of auto-rank candidates")
    auto_max_fraction: float = Field(0.125, gt=0, lt=1, description="largest auto-rank candidate")
    auto_tolerance: float = Field(0.025, ge=0, description="κ of the auto-rank tolerance rule")

    @field_validator("rank", mode="before")
    @classmethod
    def _percent(cls, value: object) -> object:
        """``"5%"`` is the fraction 0.05 (a percentage must lie strictly between 0% and 100%)."""
        if not (isinstance(value, str) and value.strip().endswith("%")):
            return value
        try:
            fraction = float(value.strip()[:-1]) / 100
        except ValueError:
            raise ValueError(f"'{value}' is not a percentage such as 5%") from None
        if not 0 < fraction < 1:
            raise ValueError(f"a percentage rank must lie between 0% and 100% (exclusive), not {value.strip()}")
        return fraction

    @field_validator("rank")
    @classmethod
    def _whole_if_absolute(cls, value: float | str) -> float | str:
        if value != "auto" and value >= 1 and value != int(value):
            raise ValueError("a rank >= 1 is an absolute rank and must be a whole number")
        return value


def principal_rank(rank: float, r_full: int, tasks: int) -> int:
    """Per-task principal rank r for one matrix (PRIME Section 4; docs/algorithms.md, "prime", step 1).

    ρ < 1 gives max(1, round(ρ·r_full)) (halves round up); a whole ``rank`` ≥ 1 is used
    as is, capped at r_full. If T·r > r_full, r = ⌊r_full/T⌋ (0 when T > r_full).
    """
    r = max(1, int(rank * r_full + 0.5)) if rank < 1 else min(int(rank), r_full)
    return r if tasks * r <= r_full else r_full // tasks


def merge_residual(taus: TaskStack, stacked: SVD, factors: SVD, params: PrimeParams) -> Tensor:
    """Merge({R_t}) of PRIME Eq. 20 for the chosen ``residual`` rule."""
    if params.residual == "ties":
        residuals = taus.dense() - factors.reconstruct()
        residuals[(factors.S == 0).any(-1)] = 0  # rank ≤ r: the principal part is all of τ_t
        return ties_merge(residuals, tensor_thresholds(residuals, params.ties_density))
    mean_residual = taus.mean().sub_(stacked.reconstruct().div_(taus.shape[0]))  # in place: no m × n temporaries
    if params.residual == "mean":
        return mean_residual
    # judged against the principal spectrum: a residual that is rounding noise stays zero
    full = drop_null(svd(mean_residual), mean_residual.shape, stacked.S.max())
    return SVD(full.U, flatten_spectrum(full.S, 0.0, params.s_sb_scale), full.V).reconstruct()


class PrimeParts(NamedTuple):
    """PRIME's decomposition of one matrix at principal rank r (Algorithm 1, Eq. 20).

    ``factors``: per-task top-r triplets (T, m, r), (T, r), (T, n, r); ``stacked``: them
    concatenated task by task (U_s, Σ_s, V_s); ``U_hat``, ``V_hat``: the whitened bases Û, V̂;
    ``principal``: M_p = Û Σ_s V̂ᵀ; ``residual``: M_r = Merge({R_t}) before its projection.
    """

    factors: SVD
    stacked: SVD
    U_hat: Tensor
    V_hat: Tensor
    principal: Tensor
    residual: Tensor

    def merged(self) -> Tensor:
        """M_p + P⊥ M_r, with P⊥ M_r = M_r − Û(ÛᵀM_r) (Eq. 20), summed in place."""
        return project_out(self.U_hat, self.residual).add_(self.principal)


def decompose(taus: TaskStack, r: int, params: PrimeParams, seed: int = 0,
              precision: OutputPrecision | None = None, exact: SVD | None = None) -> PrimeParts:
    """Principal triplets, whitened principal merge and merged residual of one matrix at rank r ≥ 1
    (``precision``: how finely the merge is written, for ``svd: auto``'s certificate, whose members
    reach it as TSV's do: M_p is their whitened sum, and M_r⊥ = P⊥ τ̄ sees them only through P⊥
    (:func:`primerge.methods.tsv.summed_parts`); ``exact``: the task vectors' exact top-r₀
    triplets, r₀ ≥ r, when the rank pre-pass computed them)."""
    precision = combined(precision, summed_parts(taus.T, params.scale))
    factors = taus.truncated_svd(r, mode=params.svd, seed=seed, precision=precision, exact=exact)
    stacked = concat_factors(factors)
    U_hat, V_hat = whiten(stacked)
    principal = (U_hat * stacked.S) @ V_hat.mT
    return PrimeParts(factors, stacked, U_hat, V_hat, principal, merge_residual(taus, stacked, factors, params))


def make_prepass(params: PrimeParams) -> AutoRankPrepass | None:
    """The F(r) pass when ``rank: auto``, else none."""
    if params.rank != "auto":
        return None
    candidates = candidate_ranks(params.auto_step, params.auto_max_fraction)
    return AutoRankPrepass(candidates, params.auto_tolerance, params.svd, principal_rank)


def prime_svds(shape: tuple[int, int], tasks: int, params: PrimeParams,
               prepass: AutoRank | None = None) -> list[tuple[tuple[int, ...], int]]:
    """PRIME's one truncated SVD: the T task vectors at principal rank r. With ``rank: auto`` r
    is the F(r) pass' choice, so nothing is known before it has run."""
    rank = params.rank if params.rank != "auto" else prepass.rank if prepass is not None else None
    r = 0 if rank is None else principal_rank(rank, min(shape), tasks)
    return [((tasks, *shape), r)] if r > 0 else []


def rank_note(shape: tuple[int, int], tasks: int, params: PrimeParams) -> str | None:
    """What ``rank`` becomes on an m × n matrix when that is not what it asks for (step 1's caps)."""
    if params.rank == "auto":
        return None
    r_full, asked = min(shape), params.rank
    wanted = max(1, int(asked * r_full + 0.5)) if asked < 1 else int(asked)
    r = principal_rank(asked, r_full, tasks)
    if r == wanted:
        return None
    steps = [f"capped at min(m, n) = {r_full}"] if wanted > r_full else []
    if r < min(wanted, r_full):
        steps.append(f"lowered to ⌊{r_full}/T⌋ = {r} so that T·r ≤ min(m, n) for T = {tasks}")
    return f"prime: rank {asked:g} on {shape[0]}×{shape[1]} matrices is {wanted}, {', then '.join(steps)}"


@merge_method("prime", PrimeParams, "PRIME: ~1% principal directions merged by TSV + residuals projected off them",
              prepass=make_prepass, svd_requests=prime_svds, shape_note=rank_note)
def merge(taus: TaskStack, ctx: TensorContext, params: PrimeParams) -> Tensor:
    """α (Û Σ_s V̂ᵀ + P⊥ Merge({R_t})) for one matrix parameter (PRIME Algorithm 1)."""
    rank = ctx.prepass.rank if params.rank == "auto" else params.rank
    r = principal_rank(rank, min(taus.shape[-2:]), taus.shape[0])
    if r == 0:
        return params.scale * taus.mean()
    exact = ctx.prepass.memo.take(ctx.name) if params.rank == "auto" else None
    return decompose(taus, r, params, ctx.seed, ctx.precision, exact).merged().mul_(params.scale)
