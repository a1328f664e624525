"""Helpers shared by the method tests."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from primerge.methods import get_method
from primerge.methods.base import Prepass, TensorContext, fold_statistics
from primerge.methods.stack import TaskStack
from primerge.util.deterministic import ThreadIndependent

MATRIX = TensorContext("layer.weight", "matrix", seed=3)


def run(method: str, taus: torch.Tensor, ctx: TensorContext = MATRIX, **params) -> torch.Tensor:
    """One method's merged update of ``taus`` with validated ``params``."""
    spec = get_method(method)
    return spec.apply(taus, ctx, spec.parameters(params))


def run_passes(prepass: Prepass, tensors: list[tuple[torch.Tensor, TensorContext]]):
    """Every pass of a method's whole-model ``prepass`` over (task vectors, context) pairs; its result."""
    for i in range(prepass.passes):
        prepass.end_pass(i, fold_statistics(prepass, i, ((TaskStack.of(t), ctx) for t, ctx in tensors)))
    return prepass.result()


def random_taus(T: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Task vectors with a shared rank-1 part, a rank-2 part per task and noise (float64)."""
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    shared = torch.randn(m, 1, generator=g, dtype=f64) @ torch.randn(1, n, generator=g, dtype=f64)
    out = []
    for _ in range(T):
        own = torch.randn(m, 2, generator=g, dtype=f64) @ torch.randn(2, n, generator=g, dtype=f64)
        out.append(shared + own + 0.1 * torch.randn(m, n, generator=g, dtype=f64))
    return torch.stack(out)


def np_elect_disjoint_mean(x: np.ndarray) -> np.ndarray:
    """Sign of the sum, then the mean of the non-zero entries agreeing with it (0 if none)."""
    elected = np.sign(x.sum(0))
    agree = (np.sign(x) == elected) & (x != 0)
    count = np.maximum(agree.sum(0), 1)
    return np.where(agree, x, 0.0).sum(0) / count


def np_ties(taus: np.ndarray, density: float) -> np.ndarray:
    """TIES in NumPy: per-task top-k trim by magnitude, then sign election and disjoint mean."""
    flat = taus.reshape(len(taus), -1)
    k = int(round(density * flat.shape[1]))
    trimmed = np.zeros_like(flat)
    for t, row in enumerate(flat):
        if k:
            thr = np.sort(np.abs(row))[::-1][k - 1]
            keep = (np.abs(row) >= thr) & (row != 0)
            trimmed[t, keep] = row[keep]
    return np_elect_disjoint_mean(trimmed).reshape(taus.shape[1:])


def on_thread_counts(compute: Callable[[], torch.Tensor], counts: tuple[int, ...] = (1, 2, 2)) -> list[torch.Tensor]:
    """``compute()`` under ThreadIndependent with each torch thread count in turn (the count restored)."""
    threads = torch.get_num_threads()
    outputs = []
    try:
        for count in counts:
            torch.set_num_threads(count)
            with ThreadIndependent():
                outputs.append(compute())
    finally:
        torch.set_num_threads(threads)
    return outputs


@contextmanager
def fails_after(seconds: int) -> Iterator[None]:
    """An AssertionError instead of a blocked suite when the block hangs (a FIFO, an unbounded input)."""
    def hung(*_):
        raise AssertionError(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
