"""``svd: auto``: exact or randomized truncated SVD, chosen from a cost model of the shapes and, for
a 16-bit output, of the steps each member's certificate needs.

The choice never depends on a timing taken during the merge, so a recipe gives the same bytes on
every run and thread count. Costs are CPU seconds on one core of the machine the constants were
measured on (``benchmarks/svd_cost.py``, 2-core AMD EPYC, MKL; fits within ~30% then; on 2026-12-07
LAPACK ran 2× faster than E prices it while the Krylov steps matched c(j): docs/benchmarks.md):

- exact: LAPACK's thin SVD of each matrix, E = ``EXACT_QPP``·q·p² + ``EXACT_PPP``·p³ (p = min(m, n),
  q = max(m, n));
- randomized, c(j) for j steps of :func:`primerge.linalg.krylov.block_krylov_svd`: 2·j + 3 passes
  over the batch, each ``PASS_READ``·m·n + ``PASS_COLUMN``·m·n·ℓ (a pass is bound by reading A for
  narrow blocks), plus step i's Rayleigh–Ritz: a float64 Gram update of max(m, n)·c·ℓ (c = (i+1)·ℓ,
  priced as two pass columns) and a c × c eigendecomposition (priced as ``EXACT_PPP``·c³); they
  matter when ℓ is a sizeable part of min(m, n).

[decision] Both tests spend at most the budget MARGIN·E on an attempt (``MARGIN`` = ½: a Krylov
path is worth its risk only when it saves at least half the exact SVD).

- float32/float64 outputs (the residual check): convergence needs a gap at the cut, at a rate no
  model of the shapes knows, so the attempt is made only when every step the basis allows
  (``MAX_STEPS`` at most) fits the budget: c(max_steps) ≤ MARGIN·E, and at least ``MIN_STEPS``
  steps fit. auto then costs at most (1 + MARGIN)·E and agrees with the exact path within the
  check's tolerance.
- 16-bit outputs (the certificate, :mod:`primerge.linalg.certificate`): the attempt is budgeted
  J = :func:`affordable_steps` steps, the most with c(J) ≤ MARGIN·E (the basis' room permitting,
  beyond ``MAX_STEPS`` where it is cheap), and needs J ≥ ``CERTIFIED_STEPS``. Each member's need is
  estimated before any pass (:func:`certificate_steps`) from the gap-free floor model of
  :mod:`primerge.linalg.krylov` — the case where the certificate is slowest; its rate is
  Chebyshev's, the gap-dependent form of Musco & Musco 2015's gap-independent ε ~ 1/j² — with the
  member's demand D = g·‖A‖_F / b (its Frobenius norm through the method's gain g, over its share
  b of the allowance: the rank/size ratio and the share enter through the model's lead
  κ √(k λ_{k+1}/q) and D; where the certificate's summed test is taken, the members' (Σ_t D_t²)^½ / T
  when that is lower, their errors taken as uncorrelated:
  :meth:`primerge.linalg.certificate.Allowance.expected`):

      e₁ = κ √(k λ_{k+1} / q) · D,   n̂ = max(CERTIFIED_STEPS, 1 + ⌈ln e₁ / μ⌉)   (n̂ = CERTIFIED_STEPS if e₁ ≤ 1).

  A member with n̂ > J goes to the exact SVD at once, since its expected Krylov cost c(n̂) exceeds
  the budget; the others are tried, and the stopping rule gives a member up as soon as its own
  trajectory cannot reach acceptance by step J (:mod:`primerge.linalg.krylov`, "Stopping rule"),
  so one that fails wastes at most c(J) ≤ MARGIN·E before its exact SVD (the members of a batch
  share its passes until the last one stops). A member that succeeds costs c(n) ≤ MARGIN·E.
  The model prices the slow case, so it errs towards the exact SVD: strong directions above the
  cut bring the certificate sooner than n̂ (on the bench's realistic zoo by one step).

How many matrices took each path, and why, is reported after the merge
(:mod:`primerge.linalg.outcomes`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from primerge.linalg.certificate import CERTIFIED_STEPS
from primerge.linalg.krylov import block_width, gap_free_floor, max_steps

EXACT_QPP = 2.8e-10
EXACT_PPP = 2.4e-10
PASS_READ = 1.6e-9
PASS_COLUMN = 4.2e-11
#: An attempt may cost at most this fraction of the exact SVDs (module docstring).
MARGIN = 0.5
#: ... and at least this many Krylov steps fit (docs/algorithms.md, "Truncated SVDs").
MIN_STEPS = CERTIFIED_STEPS


class SVDChoice(NamedTuple):
    """What ``svd: auto`` does for one (batched) truncated SVD, and the estimates behind it."""

    mode: Literal["exact", "randomized"]
    exact_seconds: float
    randomized_seconds: float  # every step of the budget; 0 when not applicable
    steps: int  # the attempt's budget of Krylov steps
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


@lru_cache(maxsize=1024)
def affordable_steps(shape: tuple[int, ...], rank: int) -> int:
    """J: the most Krylov steps that the basis' room allows and that cost at most ``MARGIN`` of the
    exact SVDs (−1 when not even the first block does)."""
    budget = MARGIN * exact_seconds(shape)
    room = max_steps(rank, shape, limit=min(shape[-2:]))
    return max((j for j in range(room + 1) if randomized_seconds(shape, rank, j) <= budget), default=-1)


def certificate_steps(shape: tuple[int, ...], rank: int, demand: Tensor) -> Tensor:
    """n̂ per member of demand D = g‖A‖_F / b (module docstring): the Krylov steps after which the
    gap-free floor model expects the certificate to accept (float64; inf where it never does)."""
    floor = gap_free_floor(rank, shape)
    first = floor.excess(demand.double())
    beyond = 1 + torch.ceil(torch.log(first.clamp_min(1.0)) / floor.rate)
    return beyond.clamp_min(CERTIFIED_STEPS)


def choose_svd(shape: tuple[int, ...], rank: int, tolerant: bool = False) -> SVDChoice:
    """Exact or randomized top-``rank`` SVD of a batch of matrices of ``shape`` (module docstring);
    ``tolerant``: the result is written in a 16-bit dtype (the certificate may accept it, member by
    member within the budget of ``steps``)."""
    exact = exact_seconds(shape)
    steps = max_steps(rank, shape)
    if steps < MIN_STEPS:
        return SVDChoice("exact", exact, 0.0, steps,
                         f"rank {rank} of {min(shape[-2:])} leaves no room for {MIN_STEPS} Krylov steps")
    if tolerant:
        return _certified_choice(shape, rank, exact)
    randomized = randomized_seconds(shape, rank, steps)
    ratio = randomized / exact
    if ratio <= MARGIN:
        return SVDChoice("randomized", exact, randomized, steps,
                         f"block Krylov costs at most {ratio:.0%} of the exact SVD; members passing neither "
                         f"the residual check nor (16-bit outputs) the certificate fall back to exact")
    return SVDChoice("exact", exact, randomized, steps,
                     f"block Krylov could cost {ratio:.0%} of the exact SVD (above {MARGIN:.0%})")


def _certified_choice(shape: tuple[int, ...], rank: int, exact: float) -> SVDChoice:
    """The 16-bit output's choice: an attempt of J = :func:`affordable_steps` steps, for the members
    whose demand the gap-free floor model certifies within J (module docstring)."""
    budget = affordable_steps(shape, rank)
    if budget < CERTIFIED_STEPS:
        ratio = randomized_seconds(shape, rank, CERTIFIED_STEPS) / exact
        return SVDChoice("exact", exact, 0.0, budget,
                         f"16-bit output: {CERTIFIED_STEPS} certified Krylov steps would cost {ratio:.0%} of the "
                         f"exact SVD (above {MARGIN:.0%})")
    floor = gap_free_floor(rank, shape)
    reach = math.exp(floor.rate * (budget - 1)) / floor.lead
    return SVDChoice("randomized", exact, randomized_seconds(shape, rank, budget), budget,
                     f"16-bit output: block Krylov for the members whose certificate the gap-free model "
                     f"expects within {budget} steps (at most {MARGIN:.0%} of the exact SVD): gain × ‖τ‖_F "
                     f"≤ {reach:.3g} × their share of the allowance; the others, and those it gives up, exact")
