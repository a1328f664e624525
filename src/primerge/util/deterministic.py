"""Results that do not depend on the number of CPU threads.

LAPACK decompositions in MKL and OpenBLAS (SVD, QR, eigendecompositions, Cholesky,
inverses, solves) split their work by thread count, so the same input gives slightly
different bits with 1 and with 2 threads (measured on this project's CPU torch: the U of
``torch.linalg.svd`` of a 384 × 200 matrix differs), and so do matrix products whose left
operand has a handful of rows (:data:`PRODUCTS`); wider products and reductions do not.
:class:`ThreadIndependent` is a torch function mode that runs exactly those decompositions and
products with one thread each and leaves everything else (large products, element-wise work) on
all threads; a batched decomposition (the T task vectors' SVDs) is split into its
matrices, which run side by side on the available threads, so the threads still work and the
bits are those of one-thread decompositions whatever their number. The engine merges under
it, so a recipe and seed give byte-identical files whatever ``torch.set_num_threads``,
``OMP_NUM_THREADS`` or the machine's core count.

A single large decomposition (an exact SVD of one big matrix) loses LAPACK's own threading, which
is why large batches are spread over the threads (docs/benchmarks.md, "Measurements behind design
decisions", has the cost); PRIME's decompositions are thin (m × T·r) or small batches, which stay one
call (:data:`SPLIT_WORK`). Bits still differ between machine kinds (:mod:`primerge.util.platform`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from torch.overrides import TorchFunctionMode

#: Decompositions whose LAPACK results depend on the thread count.
DECOMPOSITIONS = frozenset({
    torch.linalg.svd, torch.linalg.svdvals, torch.svd, torch.linalg.qr, torch.linalg.eigh,
    torch.linalg.eigvalsh, torch.linalg.eig, torch.linalg.cholesky, torch.linalg.cholesky_ex,
    torch.linalg.inv, torch.linalg.inv_ex, torch.linalg.solve, torch.linalg.solve_triangular,
    torch.linalg.lstsq, torch.linalg.pinv, torch.linalg.matrix_rank, torch.linalg.det,
    torch.linalg.slogdet,
})


#: Matrix products. The CPU BLAS splits a product's rows over the threads with a remainder kernel
#: whose summation order differs from the full-width one, so a product whose left operand has few
#: rows gives other bits with 2 threads than with 1 (measured on this project's CPU torch: 5–11
#: rows, e.g. Ûᵀ M_r with T·r = 6 whitened directions; wider ones and the column count do not
#: matter). Such products run on one thread; they are small, so that costs nothing measurable.
PRODUCTS = frozenset({
    torch.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm, torch.einsum,
    torch.Tensor.__matmul__, torch.Tensor.matmul, torch.Tensor.mm, torch.Tensor.bmm, torch.Tensor.addmm,
    torch.Tensor.addmm_, torch.Tensor.baddbmm,
})
#: Products whose left operand has fewer rows than this run on one thread (einsum always does).
FEW_ROWS = 32

#: Decompositions of one (possibly batched) matrix whose batch elements are independent: a batch
#: is split into matrices, each decomposed on one thread, the matrices spread over the threads.
BATCHABLE = frozenset({
    torch.linalg.svd, torch.linalg.svdvals, torch.linalg.qr, torch.linalg.eigh, torch.linalg.eigvalsh,
    torch.linalg.cholesky, torch.linalg.inv,
})


#: Split a batch only when one matrix's decomposition costs at least this many m·n·min(m, n)
#: flops: smaller ones (the QRs inside a randomized SVD) are cheaper as one batched call.
SPLIT_WORK = 2**26


class ThreadIndependent(TorchFunctionMode):
    """Run :data:`DECOMPOSITIONS` on one CPU thread each; every other torch call is untouched.

    A batched decomposition from :data:`BATCHABLE` whose matrices are large (:data:`SPLIT_WORK`;
    e.g. the T task vectors' exact SVDs) is split into its matrices, which run in parallel on
    ``torch.get_num_threads()`` workers, one LAPACK thread each; the bits are those of each
    matrix's one-thread decomposition, whatever the number of workers. Usage:
    ``with ThreadIndependent(): ...``. CUDA decompositions are left alone (their determinism is
    the GPU libraries' business).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pool: ThreadPoolExecutor | None = None

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _on_gpu(args) or (func not in DECOMPOSITIONS and not _few_rows(func, args)):
            return func(*args, **kwargs)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if not _split(func, args):
                return func(*args, **kwargs)
            batch = args[0]
            if self._pool is None:
                # each worker's own OpenMP/MKL setting: one thread (a new thread starts at the default)
                self._pool = ThreadPoolExecutor(max_workers=threads, initializer=torch.set_num_threads, initargs=(1,))
            matrices = batch.reshape(-1, *batch.shape[-2:]).unbind(0)
            return _stack(list(self._pool.map(lambda m: func(m, **kwargs), matrices)), batch.shape[:-2])
        finally:
            torch.set_num_threads(threads)


def _few_rows(func, args) -> bool:
    """Whether ``func`` is a product (:data:`PRODUCTS`) whose left operand has few rows."""
    if func not in PRODUCTS:
        return False
    if func is torch.einsum:
        return True
    left = args[1] if func in (torch.addmm, torch.baddbmm, torch.Tensor.addmm, torch.Tensor.addmm_,
                               torch.Tensor.baddbmm) else args[0]
    return isinstance(left, torch.Tensor) and left.dim() >= 2 and left.shape[-2] < FEW_ROWS


def _split(func, args) -> bool:
    """Whether a decomposition is a batch of large matrices to spread over the threads."""
    if len(args) != 1 or func not in BATCHABLE or args[0].dim() < 3 or args[0].shape[:-2].numel() < 2:
        return False
    m, n = args[0].shape[-2:]
    return m * n * min(m, n) >= SPLIT_WORK


def _stack(parts: list, batch_shape: torch.Size):
    """Reassemble per-matrix results (tensors or torch's named result tuples) into a batch."""
    def join(tensors):
        return torch.stack(tensors).reshape(*batch_shape, *tensors[0].shape)

    first = parts[0]
    if isinstance(first, torch.Tensor):
        return join(parts)
    return type(first)([join(list(group)) for group in zip(*parts)])


def _on_gpu(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
