"""The top-r singular triplets every SVD method asks for: ``SVD_r(X)`` with ``svd: auto | exact |
randomized`` (docs/algorithms.md, "Truncated SVDs")."""

from __future__ import annotations

import math
import time
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from primerge.linalg.certificate import TOLERANCE, Allowance, OutputPrecision
from primerge.linalg.choice import SVDChoice, certificate_steps, choose_svd
from primerge.linalg.core import SVD, svd
from primerge.linalg.krylov import KrylovSVD, block_krylov_svd, block_width, frobenius_norms, gap_free_floor
from primerge.linalg.outcomes import exact_flops, krylov_flops, record

SVDMode = Literal["auto", "exact", "randomized"]


def exact_top(x: Tensor, rank: int) -> SVD:
    """The first ``rank`` triplets of the exact thin SVD."""
    full = svd(x)
    return SVD(full.U[..., :rank], full.S[..., :rank], full.V[..., :rank])


def takes_exact(shape: tuple[int, ...], rank: int, mode: SVDMode, precision: OutputPrecision | None = None) -> bool:
    """Whether :func:`truncated_svd` takes the exact path for this batch shape, rank, mode and output
    before looking at the members (a 16-bit output may still send some of them to it:
    :func:`primerge.linalg.choice.certificate_steps`)."""
    return mode == "exact" or (mode == "auto" and _choice(shape, rank, precision).mode == "exact")


def _choice(shape: tuple[int, ...], rank: int, precision: OutputPrecision | None) -> SVDChoice:
    return choose_svd(shape, rank, precision is not None and precision.tolerant)


def truncated_svd(x: Tensor, rank: int, *, mode: SVDMode = "auto", seed: int = 0,
                  tol: float = TOLERANCE, precision: OutputPrecision | None = None,
                  exact: SVD | None = None) -> SVD:
    """Top-``rank`` singular triplets ``SVD_r(X)`` of a matrix or a batch of matrices.

    ``exact`` slices LAPACK's full thin SVD. ``randomized`` is the seeded block Krylov SVD
    (:func:`primerge.linalg.krylov.block_krylov_svd`) with the residual check at ``tol`` as its
    stopping rule, kept as it comes out. ``auto`` takes the exact SVD or, where the cost model
    prefers it for this output (:func:`primerge.linalg.choice.choose_svd`), the block Krylov SVD,
    kept for every matrix that passes the residual check at ``tol`` or — when ``precision`` says
    the result is written in a 16-bit dtype — the certificate of :mod:`primerge.linalg.certificate`,
    and the exact SVD for the others; for a 16-bit output the members whose certificate the cost
    model expects beyond the attempt's budget get the exact SVD without an attempt
    (:func:`primerge.linalg.choice.certificate_steps`). On CPU the result is bit-for-bit
    reproducible for a given ``seed``.
    ``exact``: x's exact top-r₀ triplets (r₀ ≥ ``rank``, :func:`exact_top`) when an earlier pass
    already computed them; the exact path then slices them, with the bits it would compute.
    Every matrix solved is recorded, with its flops and seconds (:mod:`primerge.linalg.outcomes`).
    """
    r_full = min(x.shape[-2:])
    if not 1 <= rank <= r_full:
        raise ValueError(f"rank must be in [1, {r_full}] for shape {tuple(x.shape)}, got {rank}")
    if mode not in ("auto", "exact", "randomized"):
        raise ValueError(f"unknown SVD mode {mode!r}; use auto, exact or randomized")
    shape = tuple(x.shape)
    members = math.prod(shape[:-2])
    start = time.perf_counter()
    if takes_exact(shape, rank, mode, precision):
        why = "svd: exact" if mode == "exact" else "cost model"
        if exact is not None:
            record("exact", f"{why}; computed by an earlier pass, reused", members)
            return SVD(exact.U[..., :rank], exact.S[..., :rank], exact.V[..., :rank])
        found = exact_top(x, rank)
        record("exact", why, members, flops=exact_flops(shape), seconds=time.perf_counter() - start)
        return found
    if mode == "randomized":
        found = block_krylov_svd(x, rank, seed=seed, tol=tol)
        record("krylov", "svd: randomized, unchecked", members, passes=members * found.passes,
               flops=krylov_flops(shape, block_width(rank, shape), found.passes),
               seconds=time.perf_counter() - start)
        return found.factors
    flat = x.reshape(-1, *shape[-2:])
    choice = _choice(shape, rank, precision)
    allowance = precision.allowance(shape) if precision is not None else None
    factors = _auto(flat, _Attempt(rank, seed, tol, precision, allowance, choice.steps))
    return SVD(*(t.reshape(*shape[:-2], *t.shape[1:]) for t in factors))


class _Attempt(NamedTuple):
    """What ``auto``'s Krylov branch needs: the rank, seed and tolerance, the output's precision and
    each member's allowance (None: the residual check only), and the budget of Krylov steps."""

    rank: int
    seed: int
    tol: float
    precision: OutputPrecision | None
    allowance: Allowance | None
    steps: int


def _auto(flat: Tensor, attempt: _Attempt) -> SVD:
    """``auto``'s Krylov branch for the members of ``flat`` (N, m, n): for a 16-bit output the members
    that :func:`primerge.linalg.choice.certificate_steps` puts beyond the budget get the exact SVD
    without an attempt; the others are tried (:func:`_tried`)."""
    norms = frobenius_norms(flat) if attempt.allowance is not None else None
    needed = _needed_steps(flat, attempt, norms)
    beyond = needed > attempt.steps
    if not bool(beyond.any()):
        return _tried(flat, attempt, norms)
    start, count = time.perf_counter(), int(beyond.sum())
    factors = _exact_where(flat, attempt.rank, _unset(flat, attempt.rank), beyond)
    record("exact", f"certificate expected after {_steps(needed[beyond])} Krylov steps, beyond the "
           f"{attempt.steps} budgeted (gap-free model)", count, flops=exact_flops((count, *flat.shape[-2:])),
           seconds=time.perf_counter() - start)
    tried = torch.nonzero(~beyond).squeeze(-1)
    if tried.numel():
        for part, value in zip(factors, _tried(flat[tried], attempt, norms[tried])):
            part[tried] = value
    return factors


def _needed_steps(flat: Tensor, attempt: _Attempt, norms: Tensor | None) -> Tensor:
    """n̂ per member (:func:`primerge.linalg.choice.certificate_steps`) from its demand D = g‖A‖_F / b
    (:meth:`~primerge.linalg.certificate.Allowance.share` of a backward error of ‖A‖_F, the gain at
    the floor's θ_k), or the members' summed demand where that is lower
    (:meth:`~primerge.linalg.certificate.Allowance.expected`); 0 without an allowance (the residual
    check: nothing to estimate)."""
    if attempt.allowance is None:
        return torch.zeros(flat.shape[0], dtype=torch.float64)
    shape = tuple(flat.shape)
    kept = norms * gap_free_floor(attempt.rank, shape).kept
    demand = attempt.allowance.share(norms, kept.unsqueeze(-1))
    return certificate_steps(shape, attempt.rank, attempt.allowance.expected(demand, attempt.rank, shape))


def _tried(members: Tensor, attempt: _Attempt, norms: Tensor | None) -> SVD:
    """The block Krylov attempt on ``members`` (N, m, n) within the budget, kept where accepted, the
    exact SVD where not; both recorded."""
    start, shape = time.perf_counter(), tuple(members.shape)
    found = block_krylov_svd(members, attempt.rank, seed=attempt.seed, tol=attempt.tol, steps=attempt.steps,
                             allowance=attempt.allowance, frobenius=norms)
    _record_krylov(found, shape[0], attempt.precision,
                   krylov_flops(shape, block_width(attempt.rank, shape), found.passes), time.perf_counter() - start)
    if bool(found.converged.all()):
        return found.factors
    start, redone = time.perf_counter(), int((~found.converged).sum())
    kept = _exact_where(members, attempt.rank, found.factors, ~found.converged)
    record("exact", _rejection(found, attempt.precision), redone, flops=exact_flops((redone, *shape[-2:])),
           seconds=time.perf_counter() - start)
    return kept


def _steps(needed: Tensor) -> str:
    """The range of a few members' expected steps, e.g. "13" or "12–14" ("∞" where never)."""
    low, high = (("∞" if math.isinf(v) else str(int(v))) for v in (float(needed.min()), float(needed.max())))
    return low if low == high else f"{low}–{high}"


def _unset(flat: Tensor, rank: int) -> SVD:
    """Zero factors for the N members of ``flat`` (N, m, n), to be filled member by member."""
    N, m, n = flat.shape
    return SVD(flat.new_zeros(N, m, rank), flat.new_zeros(N, rank), flat.new_zeros(N, n, rank))


def _record_krylov(found: KrylovSVD, members: int, precision: OutputPrecision | None,
                   flops: float, seconds: float) -> None:
    """Record the members ``auto``'s Krylov attempt kept, by the test that accepted them, with their
    passes (the attempt's flops and seconds go to the Krylov path, whatever happened to its members)."""
    verdict = found.certificate
    strict, certified = int(verdict.strict.sum()), int(verdict.certified.sum())
    record("krylov", "residual check", strict, passes=strict * found.passes, flops=flops, seconds=seconds)
    if certified:
        chosen = verdict.certified
        record("krylov", f"certified for {precision.dtype} output", certified, passes=certified * found.passes,
               epsilon=float(verdict.epsilon[chosen].max()),
               backward=float(verdict.used[chosen].max()))


def _rejection(found: KrylovSVD, precision: OutputPrecision | None) -> str:
    """Why ``auto`` redid members exactly: the tests their Ritz triplets failed."""
    if precision is not None and precision.tolerant:
        return f"residual check and certificate failed after {found.passes} passes"
    written = f"{precision.dtype} output" if precision is not None else "output precision not given"
    return f"residual check failed after {found.passes} passes ({written}: strict)"


def _exact_where(flat: Tensor, rank: int, factors: SVD, redo: Tensor) -> SVD:
    """``factors`` of the members of ``flat`` (N, m, n) with those selected by ``redo`` replaced by
    their exact top-``rank`` SVD."""
    kept = [t.clone() for t in factors]
    index = torch.nonzero(redo).squeeze(-1)
    for part, value in zip(kept, exact_top(flat[index], rank)):
        part[index] = value
    return SVD(*kept)
