"""Outputs stay what they were: every golden case (tests/golden/cases.py) is run and compared.

Everywhere, each tensor is compared with its recorded value under the case's declared tolerance
(:class:`golden.cases.Tolerance`: exact for element-wise methods, round-off bounded for SVD and
reduction paths, a fraction of flipped entries for methods that select at thresholds), and every file
that holds no computed number is compared byte for byte. On the recording platform (same torch,
ATen CPU capability, BLAS and CPU model: :func:`primerge.util.platform.machine_kind`) every file and tensor must moreover have
the recorded SHA-256: byte identity.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from golden.cases import CASES, build_zoo, digest, tensor_name
from primerge.util.platform import machine_kind

HERE = Path(__file__).parent / "golden"
RECORD = json.loads((HERE / "hashes.json").read_text())
SAME_PLATFORM = RECORD["platform"] == machine_kind()
#: Files whose bytes carry numbers computed by the merge (their tensors are compared instead).
COMPUTED = (".safetensors", "lora_report.json")


@pytest.fixture(scope="module")
def golden_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("golden") / "zoo")


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(HERE / "reference.safetensors"), "pt") as f:
        yield f


def test_every_case_is_recorded():
    assert sorted(RECORD["cases"]) == sorted(CASES)


def test_the_zoo_is_the_same_on_every_cpu(golden_zoo):
    """The zoo's bytes depend on no CPU feature: built again under ATen's ``default`` kernels (a
    subprocess), every input file has the same hash."""
    import subprocess
    import sys

    code = ("import sys, tempfile, pathlib; sys.path.insert(0, 'tests')\n"
            "from golden.cases import build_zoo, digest\n"
            "root = pathlib.Path(tempfile.mkdtemp()) / 'zoo'; build_zoo(root)\n"
            "print(sorted((str(p.relative_to(root)), digest(p.read_bytes())) for p in root.rglob('*') if p.is_file()))")
    env = {**__import__("os").environ, "ATEN_CPU_CAPABILITY": "default"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                           cwd=Path(__file__).parent.parent).stdout.strip()
    root = golden_zoo["base"].parent
    here = sorted((str(p.relative_to(root)), digest(p.read_bytes())) for p in root.rglob("*") if p.is_file())
    assert there == str(here)


def _base_tensors(zoo: dict[str, Path], name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(zoo[name] / "model.safetensors"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_matches_the_reference(case, golden_zoo, reference, tmp_path):
    spec = CASES[case]
    recorded = RECORD["cases"][case]
    output = spec.run(golden_zoo, tmp_path / "out" / "merged")
    assert sorted(output) == sorted(recorded), "the output's files and tensors changed"
    base = _base_tensors(golden_zoo, spec.base)
    problems = []
    for key, value in output.items():
        if isinstance(value, torch.Tensor):
            problem = spec.tolerance.problem(key, value, reference.get_tensor(f"{case}|{key}"),
                                             base.get(tensor_name(key)))
            if problem:
                problems.append(problem)
        elif not key.endswith(COMPUTED) and digest(value) != recorded[key]:
            problems.append(f"{key}: bytes differ")
    assert not problems, f"{case}: " + "; ".join(problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
    if SAME_PLATFORM:
        differ = [key for key, value in output.items() if digest(value) != recorded[key]]
        assert not differ, f"{case}: within tolerance but not byte-identical on the recording platform: {differ[:5]}"


def test_the_card_states_the_machine_kind_byte_identity_is_promised_for(golden_zoo, tmp_path):
    import primerge

    primerge.merge(golden_zoo["base"], [golden_zoo["t0"], golden_zoo["t1"]], "task_arithmetic", out=tmp_path / "out",
                   task_specific=r"^score\.")
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"Computed on: `{machine_kind()}`; the same inputs, primerge version and machine kind give the same bytes." in card


# --------------------------------------------------------------------------- the tolerances themselves

def _update_pair(seed: int = 0, n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=gen)
    return base, base + 0.05 * torch.randn(n, generator=gen)


def test_exact_tolerance_refuses_one_ulp():
    from golden.cases import EXACT

    base, ref = _update_pair()
    got = ref.clone()
    got[7] = torch.nextafter(got[7], torch.tensor(float("inf")))
    assert EXACT.problem("k", ref.clone(), ref, base) is None
    assert "0.0% of entries differ" in EXACT.problem("k", got, ref, base)


def test_roundoff_tolerance_is_relative_to_the_update():
    """A float32-round-off-sized move of the update passes; a 1 % change of the update fails, though it
    is far below the weights' own magnitude."""
    from golden.cases import ROUNDOFF, ROUNDOFF_BOUND

    base, ref = _update_pair()
    update = ref - base
    assert ROUNDOFF.problem("k", base + update * (1 + 1e-5), ref, base) is None
    problem = ROUNDOFF.problem("k", base + update * (1 + 1e-2), ref, base)
    assert problem and "of the update" in problem and f"{ROUNDOFF_BOUND:g}" in problem


def test_roundoff_tolerance_allows_one_storage_ulp_in_bf16():
    from golden.cases import ROUNDOFF

    base, ref = (t.to(torch.bfloat16) for t in _update_pair())
    up = torch.nextafter(ref.float(), torch.full_like(ref.float(), float("inf"))).to(torch.bfloat16)
    got = torch.where(torch.arange(ref.numel()) % 3 == 0, torch.maximum(up, ref), ref)
    assert ROUNDOFF.problem("k", got, ref, base) is None


def test_selection_tolerance_counts_flipped_entries():
    from golden.cases import SELECTION, SELECTION_FRACTION

    base, ref = _update_pair()
    flipped = lambda fraction: torch.where(torch.arange(ref.numel()) < fraction * ref.numel(), base, ref)  # noqa: E731
    assert SELECTION.problem("k", flipped(SELECTION_FRACTION / 2), ref, base) is None
    assert "flipped at selection thresholds" in SELECTION.problem("k", flipped(4 * SELECTION_FRACTION), ref, base)


def test_a_changed_shape_or_dtype_is_reported():
    from golden.cases import ROUNDOFF

    base, ref = _update_pair()
    assert "reference is" in ROUNDOFF.problem("k", ref.double(), ref, base)
