"""Experiment: the constants of `svd: auto`'s cost model (primerge.linalg.choice), measured here.

Times (CPU seconds, under primerge.util.deterministic.ThreadIndependent as in a merge) of
- exact thin SVDs of one matrix on one LAPACK thread, fitted as a·q·p² + b·p³ (p = min(m, n),
  q = max(m, n));
- one pass of the block Krylov SVD over a batch of T matrices (A Z with Z of ℓ columns, as
  primerge.linalg.krylov.thin_product computes it), fitted as
  m·n·T·(c + d·ℓ).

    python benchmarks/svd_cost.py            # prints the fitted constants and the fit's errors

The machine is shared: run it when it is quiet, more than once, and compare before changing the
constants (the choice only needs them to within a factor of ~2).
"""

from __future__ import annotations

import argparse
import time

import torch

from primerge.linalg.krylov import thin_product
from primerge.util.deterministic import ThreadIndependent

EXACT_SHAPES = [(256, 768), (768, 768), (2048, 768), (1024, 1024), (2736, 1024), (2048, 2048)]
PASS_SHAPES = [(8, 2048, 768), (4, 5472, 2048), (8, 768, 768)]
WIDTHS = [8, 18, 32, 64, 128, 266]


def cpu_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def least_squares(rows: list[list[float]], target: list[float]) -> list[float]:
    A = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(target, dtype=torch.float64)
    # relative errors matter: weight every row by 1/target
    w = 1.0 / b
    return torch.linalg.lstsq(A * w[:, None], b * w).solution.tolist()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with ThreadIndependent(), torch.no_grad():
        exact_rows, exact_t = [], []
        for m, n in EXACT_SHAPES:
            x = torch.randn(m, n)
            t = cpu_seconds(lambda: torch.linalg.svd(x, full_matrices=False), args.repeats)
            p, q = min(m, n), max(m, n)
            exact_rows.append([q * p * p, p**3])
            exact_t.append(t)
            print(f"exact svd {m}x{n}: {t:.3f} s", flush=True)
        a, b = least_squares(exact_rows, exact_t)
        pass_rows, pass_t = [], []
        for T, m, n in PASS_SHAPES:
            A = torch.randn(T, m, n)
            for width in WIDTHS:
                Z = torch.randn(T, n, width)
                t = cpu_seconds(lambda: thin_product(A, Z), args.repeats)
                pass_rows.append([T * m * n, T * m * n * width])
                pass_t.append(t)
                print(f"pass {T}x{m}x{n} width {width}: {t * 1e3:.1f} ms", flush=True)
        c, d = least_squares(pass_rows, pass_t)
    print(f"\nEXACT_QPP = {a:.3e}  # s per q·p²\nEXACT_PPP = {b:.3e}  # s per p³")
    print(f"PASS_READ = {c:.3e}  # s per element\nPASS_COLUMN = {d:.3e}  # s per element per column")
    for (row, t) in zip(exact_rows, exact_t):
        print(f"exact fit {row[0] * a + row[1] * b:.3f} vs {t:.3f}")
    for (row, t) in zip(pass_rows, pass_t):
        print(f"pass fit {(row[0] * c + row[1] * d) * 1e3:.1f} vs {t * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
