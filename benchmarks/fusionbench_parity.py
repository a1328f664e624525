"""Parity with FusionBench: TSV-M, Iso-C and Iso-CTS by fusion-bench 0.2.33 and by primerge, compared tensor by tensor.

    python benchmarks/fusionbench_parity.py /tmp/fb-venv/bin/python [--work DIR]

fusion-bench is never imported here: its merge functions (``compute_and_sum_svd_mem_reduction``,
``iso_c``, ``iso_cts``) run in its own interpreter, a separate virtualenv (e.g. ``python -m venv
/tmp/fb-venv && /tmp/fb-venv/bin/pip install torch==2.13.0 fusion-bench==0.2.33``), on the task
vectors this script writes, and return their merged task vectors as a safetensors file. So it is no
dependency of primerge or its tests.

The zoo is :func:`mergekit_parity.build_zoo`'s: a tiny Llama (hidden 128, MLP 256, 2 layers, float32)
and three fine-tunes whose task vectors share a direction and add their own noise, so every spectrum
is gap-free. FusionBench computes in float32 on all threads; primerge computes in float32 with
one thread per decomposition, by the exact path (``svd: exact``) and by ``svd: auto``, and merges
in memory with α = 1 (FusionBench's merges are unscaled). FusionBench treats every 2-D tensor as a
matrix, the embedding and the LM head too, which primerge's rule averages (docs/algorithms.md,
"Conventions"); here primerge is told FusionBench's rule (``matrices: .*``).

Printed per merge: max over tensors of ‖W_primerge − W_fusionbench‖_F / ‖W_fusionbench‖_F (each
merged task vector against its own norm), and the tensor where it is reached. Two float32 exact SVDs
of one matrix computed with different thread counts differ by ~1e-7 of its norm; on a gap-free
spectrum the kept subspace moves by that over the relative gap at the cut (Wedin), so the target is
1e-4, not float32 rounding.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import primerge
from mergekit_parity import FINE_TUNES, build_zoo, tensors

TARGET = 1e-4
#: (label, primerge method, its parameters, the FusionBench call on ``task_vectors``)
CASES = (
    ("tsv", "tsv", {}, "TSVM_utils.compute_and_sum_svd_mem_reduction(task_vectors, accelerator='cpu')"),
    ("iso_c", "iso_c", {}, "iso_utils.iso_c(task_vectors, accelerator='cpu')"),
    ("iso_cts", "iso_cts", {"common_ratio": 0.8}, "iso_utils.iso_cts(task_vectors, 0.8, accelerator='cpu')"),
)
FUSIONBENCH = """
import sys, contextlib, io
from safetensors.torch import load_file, save_file
from fusion_bench.method.task_singular_vector.utils import TSVM_utils
from fusion_bench.method.isotropic_merging import iso_utils
stacked = load_file(sys.argv[1])
tasks = sorted({key.split('/', 1)[0] for key in stacked})
task_vectors = [{key.split('/', 1)[1]: value for key, value in stacked.items() if key.startswith(t + '/')} for t in tasks]
with contextlib.redirect_stdout(io.StringIO()):
    merged = {call}
save_file({key: value.contiguous() for key, value in merged.items()}, sys.argv[2])
"""


def task_vectors(zoo: Path) -> dict[str, torch.Tensor]:
    """τ_t = θ_t − θ₀ of every fine-tune, keyed ``<fine-tune>/<tensor>`` (float32)."""
    base = tensors(zoo / "base")
    return {f"{name}/{key}": (value - base[key]).contiguous()
            for name in FINE_TUNES for key, value in tensors(zoo / name).items()}


def fusionbench_merge(python: str, call: str, inputs: Path, output: Path) -> dict[str, torch.Tensor]:
    result = subprocess.run([python, "-c", FUSIONBENCH.replace("{call}", call), str(inputs), str(output)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"fusion-bench failed on {call}:\n{result.stderr[-3000:]}")
    return load_file(output)


def primerge_update(zoo: Path, method: str, parameters: dict, svd: str) -> dict[str, torch.Tensor]:
    """primerge's merged task vectors θ − θ₀ (α = 1), merged in memory."""
    base = tensors(zoo / "base")
    merged = primerge.merge(zoo / "base", [zoo / name for name in FINE_TUNES], method, matrices=".*",
                            parameters=dict(parameters, scale=1.0, svd=svd), quiet=True)
    return {key: value.float() - base[key] for key, value in merged.state_dict.items()}


def relative_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max over tensors of ‖a − b‖_F / ‖b‖_F, and the tensor where it is reached."""
    worst, where = 0.0, ""
    for name, b in theirs.items():
        a, b = ours[name].double(), b.double()
        error = float((a - b).norm() / b.norm().clamp(min=1e-30))
        if error > worst:
            worst, where = error, name
    return worst, where


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("python", help="the Python interpreter of a virtualenv with fusion-bench 0.2.33")
    parser.add_argument("--work", help="folder for the zoo and the outputs (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        zoo = work / "zoo"
        if not (zoo / FINE_TUNES[-1]).exists():
            build_zoo(zoo)
        inputs = work / "task_vectors.safetensors"
        save_file(task_vectors(zoo), inputs)
        print(f"{'merge':<20} {'max rel. diff':>13}  {'worst tensor'}")
        failures = 0
        for label, method, parameters, call in CASES:
            theirs = fusionbench_merge(args.python, call, inputs, work / f"{label}-fusionbench.safetensors")
            for svd in ("exact", "auto"):
                error, where = relative_difference(primerge_update(zoo, method, parameters, svd), theirs)
                failures += error > TARGET
                flag = "" if error <= TARGET else f"  > {TARGET:g}"
                print(f"{label + ' (svd: ' + svd + ')':<20} {error:>13.2e}  {where}{flag}", flush=True)
        print(f"{2 * len(CASES) - failures}/{2 * len(CASES)} merges within {TARGET:g} of fusion-bench 0.2.33")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
