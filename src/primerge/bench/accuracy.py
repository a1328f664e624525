"""How far a fast path is from the exact one: PRIME's truncated SVD against its exact path."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from primerge.bench.runs import Inputs, MethodRun


class Truncation(NamedTuple):
    """Relative distances of a fast path's merged updates from the exact path's, over every matrix
    parameter and on the worst one, and, beside them, what storing the exact path's result in the
    output dtype does to its update (the rounding a difference should be small against)."""

    total: float
    worst: float
    rounding: float


def truncation_error(inputs: Inputs, fast: MethodRun, exact: MethodRun) -> Truncation:
    """‖Δ_fast − Δ_exact‖ / ‖Δ_exact‖ over every matrix parameter (and the worst single matrix), on
    float32 updates, and ‖fl(θ₀ + Δ_exact) − θ₀ − Δ_exact‖ / ‖Δ_exact‖ with fl the cast to the stored dtype.

    Computed in this process with the engine's own reader, contexts (the output precision that
    ``svd: auto``'s certificate reads included) and methods, before the cast to the storage dtype
    (bf16 rounding of θ would otherwise swamp the comparison).
    """
    from primerge.core.plan import build_plan
    from primerge.core.recipe import build_recipe
    from primerge.engine.stream import method_inputs

    def recipe(run: MethodRun):
        return build_recipe({**inputs.extra, "base": str(inputs.base), "models": list(
            m if isinstance(m, dict) else str(m) for m in inputs.models), "method": run.method,
            "parameters": run.parameters})

    r_fast, r_exact = recipe(fast), recipe(exact)
    p_fast, p_exact = r_fast.params, r_exact.params
    plan = build_plan(r_fast)
    diff2 = ref2 = round2 = 0.0
    worst = 0.0
    try:
        with torch.no_grad():
            for entry in plan.entries:
                if entry.kind != "matrix":
                    continue
                base, taus, ctx = method_inputs(plan, entry, torch.device("cpu"))
                u_exact = r_exact.spec.apply(taus, ctx, p_exact)
                u_fast = r_fast.spec.apply(taus, ctx, p_fast).double()
                stored = entry.store(base + u_exact)[0].double() - base.double()
                u_exact = u_exact.double()
                d2, e2 = float((u_fast - u_exact).square().sum()), float(u_exact.square().sum())
                diff2, ref2 = diff2 + d2, ref2 + e2
                round2 += float((stored - u_exact).square().sum())
                worst = max(worst, math.sqrt(d2 / e2) if e2 > 0 else 0.0)
    finally:
        plan.close()
    if ref2 == 0:
        return Truncation(0.0, worst, 0.0)
    return Truncation(math.sqrt(diff2 / ref2), worst, math.sqrt(round2 / ref2))
