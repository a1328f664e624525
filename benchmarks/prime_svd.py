"""Experiment: where PRIME's time goes per matrix, and the accuracy/time trade-off of the
randomized truncated SVD (oversampling, power iterations) against PRIME's exact path.

Monkeypatches primerge.linalg.OVERSAMPLE / POWER_ITERATIONS only inside this process.
Uses the matrices of the first ``--layers`` layers of the cached bench zoo.

    python benchmarks/prime_svd.py --layers 1
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from primerge import linalg
from primerge.bench.zoo import ZooSpec, build_zoo
from primerge.engine import context
from primerge.methods import get_method, prime, tsv
from primerge.plan import build_plan
from primerge.recipe import build_recipe

VARIANTS = [("randomized os=10 it=2 (current)", 10, 2), ("randomized os=10 it=4", 10, 4),
            ("randomized os=20 it=4", 20, 4), ("randomized os=10 it=6", 10, 6)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=1, help="layers of the zoo to use")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--zoo-layers", type=int, default=8)
    args = parser.parse_args()
    folder = build_zoo(ZooSpec(layers=args.zoo_layers, scale=args.scale))
    recipe = build_recipe({"base": str(folder / "base"), "models": [str(folder / f"ft-{t}") for t in range(8)],
                           "method": "prime"})
    plan = build_plan(recipe)
    keep = tuple(f"model.layers.{i}." for i in range(args.layers))
    entries = [e for e in plan.entries if e.kind == "matrix" and e.name.startswith(keep)]
    sums = {}
    err = {v[0]: [0.0, 0.0] for v in VARIANTS}
    stage = {"read+f32": 0.0, "truncated svd": 0.0, "polar U,V": 0.0, "residual+project": 0.0}
    for entry in entries:
        t0 = time.perf_counter()
        _, taus = plan.task_vectors(entry, torch.device("cpu"))
        stage["read+f32"] += time.perf_counter() - t0
        ctx = context(plan, entry)
        p_exact = get_method("prime").parameters({"svd": "exact"})
        t0 = time.perf_counter()
        exact = prime.merge(taus, ctx, p_exact).double()
        sums["exact"] = sums.get("exact", 0.0) + time.perf_counter() - t0
        r = prime.principal_rank(0.01, min(taus.shape[-2:]), taus.T)
        for label, os_, it in VARIANTS:
            linalg.OVERSAMPLE, linalg.POWER_ITERATIONS = os_, it
            t0 = time.perf_counter()
            fast = prime.merge(taus, ctx, get_method("prime").parameters({"svd": "randomized"})).double()
            sums[label] = sums.get(label, 0.0) + time.perf_counter() - t0
            err[label][0] += float((fast - exact).square().sum())
            err[label][1] += float(exact.square().sum())
        linalg.OVERSAMPLE, linalg.POWER_ITERATIONS = 10, 2
        # stage breakdown of the current default path
        t0 = time.perf_counter()
        factors = taus.truncated_svd(r, mode="randomized", seed=ctx.seed)
        t1 = time.perf_counter()
        stacked = tsv.concat_factors(factors)
        U_hat, _ = tsv.whiten(stacked)
        t2 = time.perf_counter()
        linalg.project_out(U_hat, prime.merge_residual(taus, stacked, factors, p_exact))
        t3 = time.perf_counter()
        stage["truncated svd"] += t1 - t0
        stage["polar U,V"] += t2 - t1
        stage["residual+project"] += t3 - t2
        print(f"{entry.name} {tuple(entry.shape)} r={r} done", flush=True)
    print(f"\n{len(entries)} matrices, T=8, rank 1%")
    print("| SVD path | PRIME seconds | x exact time | rel. error vs exact |\n|---|---|---|---|")
    print(f"| exact | {sums['exact']:.2f} | 1.00 | 0 |")
    for label, _, _ in VARIANTS:
        e = math.sqrt(err[label][0] / err[label][1])
        print(f"| {label} | {sums[label]:.2f} | {sums[label] / sums['exact']:.3f} | {e:.2e} |")
    print("\n| stage (current default path) | seconds |\n|---|---|")
    for k, v in stage.items():
        print(f"| {k} | {v:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
