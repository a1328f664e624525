"""Merges on CUDA (these tests run only where a CUDA device exists; scripts/gpu-check.sh runs them
with the GPU benchmark on a CUDA machine). Bits may differ between CPU and GPU, so the GPU merge
is compared with the CPU one to a tolerance, and GPU merges with each other byte for byte."""

from __future__ import annotations

import pytest
import torch

import primerge

from golden.cases import build_zoo, folder_hashes

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
HEAD = r"^score\."


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp("gpu") / "zoo")


@pytest.mark.parametrize("method", ["prime", "tsv", "ties", "task_arithmetic", "iso_cts"])
def test_cuda_merge_matches_the_cpu_merge(zoo, method):
    models = [zoo["t0"], zoo["t1"], zoo["t2"]]
    cpu = primerge.merge(zoo["base"], models, method, task_specific=HEAD).state_dict
    gpu = primerge.merge(zoo["base"], models, method, task_specific=HEAD, device="cuda").state_dict
    for name, value in cpu.items():
        torch.testing.assert_close(gpu[name].float(), value.float(), atol=1e-4, rtol=1e-3, msg=name)


def test_cuda_merges_repeat_byte_for_byte(zoo, tmp_path):
    models = [zoo["t0"], zoo["t1"], zoo["t2"]]
    for out in ("a", "b"):
        primerge.merge(zoo["base"], models, "prime", task_specific=HEAD, device="cuda", out=tmp_path / out)
    assert folder_hashes(tmp_path / "a", tmp_path) == folder_hashes(tmp_path / "b", tmp_path)


def test_ray_units_on_a_gpu_each_match_the_local_gpu_merge(zoo, tmp_path):
    pytest.importorskip("ray")
    models = [zoo["t0"], zoo["t1"], zoo["t2"]]
    kw = dict(task_specific=HEAD, shard_size=3000)
    primerge.merge(zoo["base"], models, "prime", device="cuda", out=tmp_path / "local", **kw)
    result = primerge.merge(zoo["base"], models, "prime", out=tmp_path / "ray",
                            execution={"backend": "ray", "gpus_per_worker": 1}, **kw)
    assert result.execution["device"] == "cuda"
    assert folder_hashes(tmp_path / "ray", tmp_path) == folder_hashes(tmp_path / "local", tmp_path)
