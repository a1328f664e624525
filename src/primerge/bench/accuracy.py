"""How far a fast path is from the exact one: PRIME's truncated SVD against its exact path."""

from __future__ import annotations

import math

import torch

from primerge.bench.runs import Inputs, MethodRun


def truncation_error(inputs: Inputs, fast: MethodRun, exact: MethodRun) -> tuple[float, float]:
    """‖θ_fast − θ_exact‖ / ‖θ_exact − θ₀‖ over every matrix parameter, on float32 updates.

    Returns (relative error over all matrices, worst single-matrix relative error).
    Computed in this process with the engine's own reader and methods, before the cast
    to the storage dtype (bf16 rounding of θ would otherwise swamp the comparison).
    """
    from primerge.engine.stream import context
    from primerge.core.plan import build_plan
    from primerge.core.recipe import build_recipe

    def recipe(run: MethodRun):
        return build_recipe({**inputs.extra, "base": str(inputs.base), "models": list(
            m if isinstance(m, dict) else str(m) for m in inputs.models), "method": run.method,
            "parameters": run.parameters})

    r_fast, r_exact = recipe(fast), recipe(exact)
    p_fast, p_exact = r_fast.params, r_exact.params
    plan = build_plan(r_exact)
    diff2 = ref2 = 0.0
    worst = 0.0
    try:
        with torch.no_grad():
            for entry in plan.entries:
                if entry.kind != "matrix":
                    continue
                ctx = context(plan, entry)
                _, taus = plan.task_vectors(entry, torch.device("cpu"))
                u_exact = r_exact.spec.apply(taus, ctx, p_exact).double()
                u_fast = r_fast.spec.apply(taus, ctx, p_fast).double()
                d2, e2 = float((u_fast - u_exact).square().sum()), float(u_exact.square().sum())
                diff2, ref2 = diff2 + d2, ref2 + e2
                worst = max(worst, math.sqrt(d2 / e2) if e2 > 0 else 0.0)
    finally:
        plan.close()
    return math.sqrt(diff2 / ref2) if ref2 > 0 else 0.0, worst

