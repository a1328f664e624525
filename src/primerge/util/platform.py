"""The kind of machine a computation ran on: what decides the bits of its floating-point results.

Two runs of the same merge give the same bytes when the inputs, primerge's version and this kind are
the same (thread count and backend do not matter: :mod:`primerge.util.deterministic`). The kind is
torch's version, the ATen kernels it dispatched to (``torch.backends.cpu.get_cpu_capability()``:
DEFAULT, AVX2, AVX512, ...), the BLAS/LAPACK it was built with, the CPU model (MKL and oneDNN pick
their kernels by vendor, model and features such as AMX, which ATen's capability does not tell
apart) and, for a merge on a GPU, the GPU's name. Across kinds, element-wise methods still agree bit
for bit on inputs whose bytes agree; SVD and reduction paths agree to float32 round-off amplified by
the conditioning of the SVD; methods that select at thresholds may flip a few entries that sit at one
(docs/architecture.md, "Reproducibility").
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, with ``+AMX`` when it has AMX tiles ("unknown CPU"
    where /proc/cpuinfo does not exist)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 "unknown CPU")
    return model + (" +AMX" if re.search(r"\bamx_tile\b", info) else "")


@lru_cache(maxsize=1)
def blas() -> str:
    """The BLAS torch was built with (``BLAS_INFO`` of its build configuration)."""
    found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return found.group(1) if found else "unknown"


def machine_kind(device: torch.device | str = "cpu") -> str:
    """One line naming this process's kind (see the module docstring), e.g. ``torch 2.13.0+cpu, AVX512,
    BLAS mkl, AMD EPYC``; a CUDA device adds its name."""
    kind = f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, BLAS {blas()}, {cpu_model()}"
    device = torch.device(device)
    if device.type == "cuda":
        kind += f", {torch.cuda.get_device_name(device)}"
    return kind


def mixed_kinds_note(kinds: dict[str, int]) -> str | None:
    """A sentence when a merge's units ran on more than one machine kind (``{kind: units}``): their
    bytes may then differ from a run on one kind by the round-off that the kinds compute differently."""
    if len(kinds) < 2:
        return None
    listed = "; ".join(f"{kind}: {count} units" for kind, count in sorted(kinds.items()))
    return (f"units merged on {len(kinds)} kinds of node ({listed}); byte-identity holds within a kind, "
            f"across kinds outputs agree to round-off (run every node on one torch build and CPU kind for "
            f"identical bytes).")
