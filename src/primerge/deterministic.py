"""Results that do not depend on the number of CPU threads.

LAPACK decompositions in MKL and OpenBLAS (SVD, QR, eigendecompositions, Cholesky,
inverses, solves) split their work by thread count, so the same input gives slightly
different bits with 1 and with 2 threads (measured on this project's CPU torch: the U of
``torch.linalg.svd`` of a 384 × 200 matrix differs; matrix products and reductions do
not). :class:`ThreadIndependent` is a torch function mode that runs exactly those
decompositions on one thread and leaves everything else (products, element-wise work) on
all threads; the engine merges under it, so a recipe and seed give byte-identical files
whatever ``torch.set_num_threads``, ``OMP_NUM_THREADS`` or the machine's core count.

The decompositions primerge runs are thin (m × T·r, r ≪ m) or batched small ones, where
one thread costs little; on a busy 2-core machine one thread was even faster (an SVD of a
4096 × 328 matrix: 0.065 s on one thread, 2.5 s on two while another process ran).
Bits still differ between CPU instruction sets (AVX2 vs AVX-512) and between CPU and GPU.
"""

from __future__ import annotations

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


class ThreadIndependent(TorchFunctionMode):
    """Run :data:`DECOMPOSITIONS` on one CPU thread; every other torch call is untouched.

    Usage: ``with ThreadIndependent(): ...``. CUDA decompositions are left alone (their
    determinism is the GPU libraries' business).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        threads = torch.get_num_threads()
        if func not in DECOMPOSITIONS or threads == 1 or _on_gpu(args):
            return func(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return func(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)


def _on_gpu(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in args)
