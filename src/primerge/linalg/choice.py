"""``svd: auto``: exact or randomized truncated SVD, chosen from a cost model of the shapes.

The choice is a pure function of (shape, rank) — never of a timing taken during the merge — so a
recipe gives the same bytes on every run and thread count. Costs are CPU seconds on one core of
the machine the constants were measured on (``benchmarks/svd_cost.py``, 2-core AMD EPYC, MKL;
fits within ~30%):

- exact: LAPACK's thin SVD of each matrix, ``EXACT_QPP``·q·p² + ``EXACT_PPP``·p³ (p = min(m, n),
  q = max(m, n));
- randomized, in the worst case: every step of :func:`primerge.linalg.krylov.block_krylov_svd`,
  2·steps + 3 passes over the batch, each ``PASS_READ``·m·n + ``PASS_COLUMN``·m·n·ℓ (a pass is
  bound by reading A for narrow blocks), plus step j's Rayleigh–Ritz: a float64 Gram update of
  max(m, n)·c·ℓ (c = (j+1)·ℓ, priced as two pass columns) and a c × c eigendecomposition
  (priced as ``EXACT_PPP``·c³); they matter when ℓ is a sizeable part of min(m, n).

[decision] ``auto`` tries the randomized SVD when its worst case costs at most ``MARGIN`` of the
exact SVDs and the basis can grow for at least ``MIN_STEPS`` steps. For a 16-bit output
(``tolerant``) the certificate usually accepts after ``CERTIFIED_STEPS`` steps on any spectrum, so
the attempt is priced there instead — at most ``MARGIN`` of the exact SVDs — while its worst case
(every step, then the exact SVD) stays within twice the exact cost. Its result is only kept where
it passes the residual check, or, for a 16-bit output, the certificate
(:mod:`primerge.linalg.certificate`); the members that fail get the exact SVD, so ``auto`` costs
at most (1 + ``MARGIN``) × exact, agrees with the exact path within the check's tolerance where
the spectrum has a gap, and is certified within the output's rounding where it has none. How
many matrices took each path is reported after the merge (:mod:`primerge.linalg.outcomes`).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

from primerge.linalg.certificate import CERTIFIED_STEPS
from primerge.linalg.krylov import block_width, max_steps

EXACT_QPP = 2.8e-10
EXACT_PPP = 2.4e-10
PASS_READ = 1.6e-9
PASS_COLUMN = 4.2e-11
#: The randomized SVD is tried when its worst case costs at most this fraction of the exact one.
MARGIN = 0.5
#: ... and at least this many Krylov steps fit (docs/algorithms.md, "Truncated SVDs").
MIN_STEPS = CERTIFIED_STEPS


class SVDChoice(NamedTuple):
    """What ``svd: auto`` does for one (batched) truncated SVD, and the estimates behind it."""

    mode: Literal["exact", "randomized"]
    exact_seconds: float
    randomized_seconds: float  # worst case (every Krylov step); 0 when not applicable
    steps: int  # Krylov steps available
    reason: str


def exact_seconds(shape: tuple[int, ...]) -> float:
    """Estimated CPU seconds of the exact thin SVDs of a batch of matrices."""
    p, q = sorted(shape[-2:])
    return math.prod(shape[:-2]) * (EXACT_QPP * q * p * p + EXACT_PPP * p**3)


def randomized_seconds(shape: tuple[int, ...], rank: int, steps: int) -> float:
    """Estimated CPU seconds of ``steps`` block Krylov steps (2·steps + 3 passes and steps + 1
    Rayleigh–Ritz steps) over a batch."""
    width = block_width(rank, shape)
    passes = (2 * steps + 3) * math.prod(shape) * (PASS_READ + PASS_COLUMN * width)
    batch, q = math.prod(shape[:-2]), max(shape[-2:])
    bases = [(j + 1) * width for j in range(steps + 1)]
    return passes + batch * sum(2 * PASS_COLUMN * q * c * width + EXACT_PPP * c**3 for c in bases)


def choose_svd(shape: tuple[int, ...], rank: int, tolerant: bool = False) -> SVDChoice:
    """Exact or randomized top-``rank`` SVD of a batch of matrices of ``shape`` (module docstring);
    ``tolerant``: the result is written in a 16-bit dtype (the certificate may accept it)."""
    exact = exact_seconds(shape)
    steps = max_steps(rank, shape)
    if steps < MIN_STEPS:
        return SVDChoice("exact", exact, 0.0, steps,
                         f"rank {rank} of {min(shape[-2:])} leaves no room for {MIN_STEPS} Krylov steps")
    randomized = randomized_seconds(shape, rank, steps)
    ratio = randomized / exact
    if ratio <= MARGIN:
        return SVDChoice("randomized", exact, randomized, steps,
                         f"block Krylov costs at most {ratio:.0%} of the exact SVD; members passing neither "
                         f"the residual check nor (16-bit outputs) the certificate fall back to exact")
    likely = randomized_seconds(shape, rank, CERTIFIED_STEPS) / exact
    if tolerant and likely <= MARGIN and ratio <= 1:
        return SVDChoice("randomized", exact, randomized, steps,
                         f"16-bit output: block Krylov costs {likely:.0%} of the exact SVD when certified after "
                         f"{2 * CERTIFIED_STEPS + 3} passes, at most {ratio:.0%} before falling back to exact")
    return SVDChoice("exact", exact, randomized, steps,
                     f"block Krylov could cost {ratio:.0%} of the exact SVD (above {MARGIN:.0%})")
