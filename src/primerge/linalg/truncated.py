"""The top-r singular triplets every SVD method asks for: ``SVD_r(X)`` with ``svd: auto | exact |
randomized`` (docs/algorithms.md, "Truncated SVDs")."""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from torch import Tensor

from primerge.linalg.certificate import TOLERANCE, OutputPrecision
from primerge.linalg.choice import choose_svd
from primerge.linalg.core import SVD, svd
from primerge.linalg.krylov import KrylovSVD, block_krylov_svd, block_width
from primerge.linalg.outcomes import exact_flops, krylov_flops, record

SVDMode = Literal["auto", "exact", "randomized"]


def exact_top(x: Tensor, rank: int) -> SVD:
    """The first ``rank`` triplets of the exact thin SVD."""
    full = svd(x)
    return SVD(full.U[..., :rank], full.S[..., :rank], full.V[..., :rank])


def takes_exact(shape: tuple[int, ...], rank: int, mode: SVDMode, precision: OutputPrecision | None = None) -> bool:
    """Whether :func:`truncated_svd` takes the exact path for this batch shape, rank, mode and output."""
    tolerant = precision is not None and precision.tolerant
    return mode == "exact" or (mode == "auto" and choose_svd(shape, rank, tolerant).mode == "exact")


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
    and the exact SVD for the others. On CPU the result is bit-for-bit reproducible for a given ``seed``.
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
    allowance = precision.allowance(shape) if precision is not None and mode == "auto" else None
    found = block_krylov_svd(x, rank, seed=seed, tol=tol, allowance=allowance)
    flops = krylov_flops(shape, block_width(rank, shape), found.passes)
    if mode == "randomized":
        record("krylov", "svd: randomized, unchecked", members, passes=members * found.passes, flops=flops,
               seconds=time.perf_counter() - start)
        return found.factors
    _record_krylov(found, members, precision, flops, time.perf_counter() - start)
    if bool(found.converged.all()):
        return found.factors
    start = time.perf_counter()
    kept = _exact_where(x, rank, found.factors, ~found.converged)
    redone = members - int(found.converged.sum())
    record("exact", _rejection(found, precision), redone, flops=exact_flops((redone, *shape[-2:])),
           seconds=time.perf_counter() - start)
    return kept


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
               backward=float(verdict.share[chosen].max()))


def _rejection(found: KrylovSVD, precision: OutputPrecision | None) -> str:
    """Why ``auto`` redid members exactly: the tests their Ritz triplets failed."""
    if precision is not None and precision.tolerant:
        return f"residual check and certificate failed after {found.passes} passes"
    written = f"{precision.dtype} output" if precision is not None else "output precision not given"
    return f"residual check failed after {found.passes} passes ({written}: strict)"


def _exact_where(x: Tensor, rank: int, factors: SVD, redo: Tensor) -> SVD:
    """``factors`` with the members selected by ``redo`` replaced by their exact top-``rank`` SVD."""
    if x.dim() == 2:
        return exact_top(x, rank)
    batch = x.shape[:-2]
    flat = [t.reshape(-1, *t.shape[len(batch):]).clone() for t in factors]
    index = torch.nonzero(redo.reshape(-1)).squeeze(-1)
    exact = exact_top(x.reshape(-1, *x.shape[-2:])[index], rank)
    for part, value in zip(flat, exact):
        part[index] = value
    return SVD(*(t.reshape(*batch, *t.shape[1:]) for t in flat))
