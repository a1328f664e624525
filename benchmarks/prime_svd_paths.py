"""Experiment: PRIME's time per layer and distance from its exact path for three truncated SVDs,
interleaved in one process on the cached bench zoo (nothing in src/ is modified):

- ``lowrank``: the path before issue 18 (torch.svd_lowrank, 10 oversampling columns, 4 power
  iterations, no accuracy check), patched into primerge.methods.stack for this process only;
- ``auto``: ``svd: auto`` (block Krylov with the residual check, exact for members that fail it);
- ``exact``: LAPACK's SVD.

    python benchmarks/prime_svd_paths.py --layers 1 --repeats 3

Needs the zoo of ``primerge bench`` (built on its first run). The machine is shared: compare the
columns of one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors import safe_open

import primerge.methods.stack as stack
from primerge.bench.zoo import ZooSpec, build_zoo
from primerge.util.deterministic import ThreadIndependent
from primerge.linalg import SVD
from primerge.methods import get_method
from primerge.methods.base import TensorContext

PATHS = ("lowrank", "auto", "exact")
AUTO = stack.truncated_svd


def lowrank(x: torch.Tensor, rank: int, *, mode: str = "auto", seed: int = 0) -> SVD:
    """The pre-issue-18 randomized SVD (exact where the sketch exceeded a quarter of min(m, n))."""
    if rank + 10 > min(x.shape[-2:]) // 4:
        return AUTO(x, rank, mode="exact")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        U, S, V = torch.svd_lowrank(x, q=rank + 10, niter=4)
    return SVD(U[..., :rank], S[..., :rank], V[..., :rank])


def task_vectors(folder, layers: int) -> list[torch.Tensor]:
    """(T, m, n) float32 task vectors of every matrix of the first ``layers`` layers."""
    base = safe_open(str(folder / "base" / "model.safetensors"), "pt")
    tunes = [safe_open(str(p / "model.safetensors"), "pt") for p in sorted(folder.glob("ft-*"))]
    names = [k for k in base.keys() if any(f"layers.{i}." in k for i in range(layers))
             and len(base.get_slice(k).get_shape()) == 2]
    return [torch.stack([t.get_tensor(k).float() for t in tunes]) - base.get_tensor(k).float() for k in names]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data = task_vectors(build_zoo(ZooSpec()), args.layers)
    spec, ctx = get_method("prime"), TensorContext("w", "matrix", seed=1)
    seconds: dict[str, list[float]] = {p: [] for p in PATHS}
    outputs: dict[str, list[torch.Tensor]] = {}
    with ThreadIndependent():
        for _ in range(args.repeats):
            for path in PATHS:
                stack.truncated_svd = lowrank if path == "lowrank" else AUTO
                params = spec.parameters({"svd": "exact" if path == "exact" else "auto"})
                start = time.perf_counter()
                outputs[path] = [spec.apply(x, ctx, params) for x in data]
                seconds[path].append(time.perf_counter() - start)
    stack.truncated_svd = AUTO
    for path in PATHS:
        error = max(float((a - e).norm() / e.norm()) for a, e in zip(outputs[path], outputs["exact"]))
        print(f"{path:8s} seconds {[round(s, 2) for s in seconds[path]]}  max relative to exact {error:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
