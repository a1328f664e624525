"""Projection: eight LLaMA-3-70B-shaped fine-tunes merged with PRIME on 1, 4 and 16 GPU nodes.

A projection, not a measurement. What is measured, on this machine and the cached bench zoo
(PRIME rank 1%, T = 8): per unit, the seconds spent reading the T + 1 inputs, merging, and writing
the shard; from them the machine's read and write rates (page cache: an upper bound for a disk)
and its effective merge throughput in flops per second under a stated flop model of PRIME. What is
assumed (edit the constants): the nodes' read/write bandwidth to the shared filesystem, the
filesystem's aggregate bandwidth, and a GPU's effective throughput on PRIME's kernels (GEMMs, QR
and small SVDs in float32). Every unit is independent, so with N nodes the wall time is the
larger of (the per-node work divided by N) and (all bytes moved divided by the aggregate
bandwidth); the table says which bound applies.

    python benchmarks/ray_projection.py --layers 8 --scale 1.0
"""

from __future__ import annotations

import argparse
import time

import torch
from safetensors.torch import save_file

from primerge.bench.zoo import ZooSpec, build_zoo
from primerge.util.deterministic import ThreadIndependent
from primerge.engine.stream import context
from primerge.linalg import OVERSAMPLE, POWER_ITERATIONS
from primerge.core.plan import build_plan
from primerge.core.recipe import build_recipe

#: Assumptions of the projection (not measured here).
NODE_BANDWIDTH = 2.0e9  # bytes/s each node reads or writes from the shared filesystem
AGGREGATE_BANDWIDTH = 40.0e9  # bytes/s the shared filesystem serves to all nodes together
GPU_FLOPS = 10.0e12  # effective float32 flop/s of one GPU on PRIME's GEMM/QR/SVD kernels
TASKS = 8
LLAMA_70B = dict(layers=80, hidden=8192, intermediate=28672, kv=1024, vocab=128256)


def prime_flops(m: int, n: int, tasks: int, rank_fraction: float = 0.01) -> float:
    """Flop model of PRIME on one m × n matrix: per task a randomized SVD of rank r (sketch width
    r + p, q power iterations: (2q + 2) products of m × n by n × (r + p)), the polar factors of the
    m × T·r and n × T·r bases (≈ 4 (m + n)(T r)²), the mean residual (T m n) and its projection
    (4 m n T r)."""
    r = max(1, round(rank_fraction * min(m, n)))
    width = r + OVERSAMPLE
    svd = tasks * (2 * POWER_ITERATIONS + 2) * 2 * m * n * width
    polar = 4 * (m + n) * (tasks * r) ** 2
    return svd + polar + tasks * m * n + 4 * m * n * tasks * r


def llama_matrices(layers: int, hidden: int, intermediate: int, kv: int, vocab: int) -> list[tuple[int, int]]:
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
                 (intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]
    return per_layer * layers


def llama_bytes(layers: int, hidden: int, intermediate: int, kv: int, vocab: int) -> int:
    """Stored bf16 bytes of one checkpoint (matrices, norms, embeddings and head)."""
    params = sum(m * n for m, n in llama_matrices(layers, hidden, intermediate, kv, vocab))
    return 2 * (params + 2 * vocab * hidden + (2 * layers + 1) * hidden)


def measure(spec: ZooSpec) -> dict[str, float]:
    """Seconds reading, merging and writing, bytes read and written, and PRIME flops, on the zoo."""
    folder = build_zoo(spec)
    recipe = build_recipe({"base": str(folder / "base"), "models": [str(folder / f"ft-{t}") for t in range(TASKS)],
                           "method": "prime"})
    plan = build_plan(recipe, shard_size=512 * 1024**2)
    device, spent = torch.device("cpu"), {"read": 0.0, "merge": 0.0, "write": 0.0}
    flops, out = 0.0, folder.parent / "projection-shard.safetensors"
    merge = recipe.spec.merge
    with ThreadIndependent():
        for unit in plan.units:
            values = {}
            for entry in unit.entries:
                start = time.perf_counter()
                base, taus = plan.task_vectors(entry, device)
                read = time.perf_counter()
                if entry.kind == "matrix":
                    update = merge(taus, context(plan, entry), recipe.params)
                    flops += prime_flops(*entry.shape, TASKS)
                else:
                    update = taus.mean()
                values[entry.name] = (base + update).to(entry.dtype)
                spent["read"] += read - start
                spent["merge"] += time.perf_counter() - read
            start = time.perf_counter()
            save_file(values, str(out))
            spent["write"] += time.perf_counter() - start
    out.unlink()
    stored = sum(e.nbytes for e in plan.entries)
    return {**spent, "read_bytes": stored * (TASKS + 1), "write_bytes": stored, "flops": flops}


def project(nodes: int) -> tuple[float, str, dict[str, float]]:
    """Projected wall seconds of the 70B merge on ``nodes`` GPU nodes, its bound, and the parts."""
    stored = llama_bytes(**LLAMA_70B)
    read, write = stored * (TASKS + 1), stored
    flops = sum(prime_flops(m, n, TASKS) for m, n in llama_matrices(**LLAMA_70B))
    per_node = {"read": read / nodes / NODE_BANDWIDTH, "merge": flops / nodes / GPU_FLOPS,
                "write": write / nodes / NODE_BANDWIDTH}
    shared = (read + write) / AGGREGATE_BANDWIDTH
    work = sum(per_node.values())
    if shared > work:
        return shared, "shared filesystem bandwidth", per_node
    return work, max(per_node, key=per_node.get) + " per node", per_node


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()
    m = measure(ZooSpec(layers=args.layers, scale=args.scale, tasks=TASKS))
    print(f"measured on the bench zoo (L={args.layers}, scale {args.scale}, T={TASKS}, PRIME): "
          f"read {m['read']:.1f}s ({m['read_bytes'] / m['read'] / 1e9:.2f} GB/s from the page cache), "
          f"merge {m['merge']:.1f}s ({m['flops'] / m['merge'] / 1e9:.1f} Gflop/s on this CPU), "
          f"write {m['write']:.1f}s ({m['write_bytes'] / m['write'] / 1e9:.2f} GB/s)")
    stored = llama_bytes(**LLAMA_70B)
    flops = sum(prime_flops(a, b, TASKS) for a, b in llama_matrices(**LLAMA_70B))
    print(f"\n8 x LLaMA-3-70B shapes: {stored / 1e9:.0f} GB per checkpoint, {stored * 9 / 1e12:.2f} TB read, "
          f"PRIME {flops / 1e15:.1f} Pflop; this CPU would merge it in {flops / (m['flops'] / m['merge']) / 3600:.1f} h "
          f"of compute alone")
    print(f"assumed: {NODE_BANDWIDTH / 1e9:g} GB/s per node, {AGGREGATE_BANDWIDTH / 1e9:g} GB/s shared filesystem, "
          f"{GPU_FLOPS / 1e12:g} Tflop/s effective per GPU\n")
    print("| GPU nodes | projected wall | read / node | merge / node | write / node | bound by |")
    print("|---|---|---|---|---|---|")
    for nodes in (1, 4, 16):
        wall, bound, parts = project(nodes)
        print(f"| {nodes} | {wall / 60:.0f} min | {parts['read'] / 60:.0f} min | {parts['merge'] / 60:.1f} min | "
              f"{parts['write'] / 60:.1f} min | {bound} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
