"""What no merge of the inputs can beat, measured on the machine running the bench.

- **I/O floor**: the seconds to read every weight file of the base and the models (one
  ``readinto`` sweep through a reused buffer, from the page cache once a merge has read them)
  and to write as many bytes as the base's weight files hold (the merged model's size, into the
  page cache as a merge writes). The least of ``repeats`` sweeps is reported.
- **Compute floor** of a merge: the flops of its SVD work (:class:`primerge.linalg.SVDOutcomes`:
  Krylov passes at 2·m·n·ℓ, exact SVDs at about 4·q·p² + 8·p³) at the machine's float32 GEMM rate,
  measured here on square products of :data:`GEMM_SIZE` with all of torch's threads (the best of
  ``repeats``): the time the SVDs would take if they ran as fast as one large GEMM.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

#: Side of the square float32 GEMM that measures the machine's rate.
GEMM_SIZE = 2048
#: Bytes read or written per call.
CHUNK = 64 << 20


def weight_files(folder: Path) -> list[Path]:
    """The checkpoint's weight files (safetensors, or PyTorch pickles when there are none)."""
    found = sorted(folder.glob("*.safetensors"))
    return found or sorted(folder.glob("*.bin"))


def io_floor(folders: Iterable[Path], written: int, workdir: Path, repeats: int = 3) -> float:
    """Least seconds of reading every weight file of ``folders`` and writing ``written`` bytes."""
    files = [f for folder in folders for f in weight_files(Path(folder))]
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):  # read to the end; the bytes themselves are not needed
                    continue
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".io-floor-") as out:
            left = written
            while left > 0:
                left -= out.write(view[:min(CHUNK, left)])
            out.flush()
        best = min(best, time.perf_counter() - start)
    return best


def output_bytes(base: Path) -> int:
    """The merged model's size: the bytes of the base's weight files."""
    return sum(os.path.getsize(f) for f in weight_files(base))


def gemm_rate(repeats: int = 3, size: int = GEMM_SIZE) -> float:
    """The machine's float32 GEMM rate in flop/s: the best of ``repeats`` size³ products."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and BLAS kernels
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best
