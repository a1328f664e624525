"""EMR-Merging: election, masks, rescalers, per-task output format and rebuilt task models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import primerge
from primerge.methods.base import TensorContext
from primerge.methods.emr import RescalePrepass, elect, merge
from primerge.methods.stack import TaskStack
from primerge.output.per_task import load_task_state, pack_mask, unpack_mask
from helpers import run_passes

TAUS = torch.tensor([
    [1.0, -2.0, 0.5, 0.0],
    [3.0, 1.0, -0.5, 0.0],
    [-1.0, -4.0, 0.25, 2.0],
])


def test_elect_hand_case():
    # sums: [3, -5, 0.25, 2] -> flag [+, -, +, +]
    unified, masks = elect(TAUS)
    assert torch.equal(masks, torch.tensor([
        [True, True, True, False],
        [True, False, False, False],
        [False, True, True, True],
    ]))
    assert torch.equal(unified, torch.tensor([3.0, -4.0, 0.5, 2.0]))


def test_rescalers_hand_case():
    scales = run_passes(RescalePrepass(), [(TAUS[:, :2], TensorContext("a", "matrix")),
                                           (TAUS[:, 2:], TensorContext("b", "fallback"))]).scales
    # λ_t = Σ|τ_t| / Σ|m_t ⊙ τ_uni|, summed over both tensors
    expected = [3.5 / (3 + 4 + 0.5), 4.5 / 3.0, 7.25 / (4 + 0.5 + 2)]
    assert scales == pytest.approx(expected)


def test_merge_returns_unified_and_masks():
    out = merge(TaskStack.of(TAUS), TensorContext("w", "matrix"), primerge.get_method("emr").parameters({}))
    unified, masks = elect(TAUS)
    assert torch.equal(out.update, unified) and torch.equal(out.task_tensors["mask"], masks)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), ()])
def test_mask_packing_roundtrip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (max(mask.numel(), 1) + 7) // 8
    assert torch.equal(unpack_mask(packed, tuple(shape)), mask)


def emr_reference(bert_zoo) -> tuple[dict, dict]:
    """Independent whole-model EMR from the files: per-task states θ₀ + λ_t m_t ⊙ τ_uni."""
    base = load_file(str(bert_zoo["base"] / "model.safetensors"))
    models = [load_file(str(p / "model.safetensors")) for p in bert_zoo["models"]]
    num = torch.zeros(3, dtype=torch.float64)
    den = torch.zeros(3, dtype=torch.float64)
    parts = {}
    for name, b in base.items():
        if not b.dtype.is_floating_point:
            continue
        taus = torch.stack([m[name].float() - b.float() for m in models])
        flag = torch.sign(taus.sum(0))
        masks = taus * flag > 0
        uni = flag * (taus.abs() * masks).amax(0)
        num += taus.abs().flatten(1).sum(1).double()
        den += (masks * uni.abs()).flatten(1).sum(1).double()
        parts[name] = (uni, masks)
    lam = (num / den).tolist()
    states = {}
    for t in range(3):
        states[f"task{t}"] = {n: (base[n].float() + lam[t] * m[t].float() * u.to(base[n].dtype).float()).to(base[n].dtype)
                              for n, (u, m) in parts.items()}
    return states, {n: (base[n].float() + u).to(base[n].dtype) for n, (u, _) in parts.items()}


def test_emr_folder_output_rebuilds_every_task(bert_zoo, tmp_path):
    result = primerge.merge(bert_zoo["base"], bert_zoo["models"], "emr",
                            task_specific=r"^classifier\.", out=tmp_path / "emr")
    expected_states, expected_unified = emr_reference(bert_zoo)
    unified = load_file(str(tmp_path / "emr" / "model.safetensors"))
    for name, tensor in expected_unified.items():
        assert torch.allclose(unified[name], tensor, atol=1e-6), name
    meta = json.loads((tmp_path / "emr" / "per_task" / "per_task.json").read_text())
    assert meta["method"] == "emr" and meta["tasks"] == ["task0", "task1", "task2"]
    assert meta["tensors"] == {"mask": "bool-packbits"}
    assert (tmp_path / "emr" / "per_task" / "task1" / "mask.safetensors").is_file()
    for task, expected in expected_states.items():
        state = load_task_state(tmp_path / "emr", task)
        for name, tensor in expected.items():
            assert torch.allclose(state[name], tensor, atol=1e-5), (task, name)
    card = (tmp_path / "emr" / "README.md").read_text()
    assert "## Per-task models" in card and "EMR rescalers" in card
    assert result.per_task


def test_emr_in_memory_equals_folder(bert_zoo, tmp_path):
    memory = primerge.merge(bert_zoo["base"], bert_zoo["models"], "emr", task_specific=r"^classifier\.")
    primerge.merge(bert_zoo["base"], bert_zoo["models"], "emr", task_specific=r"^classifier\.",
                   out=tmp_path / "emr", shard_size=30_000)
    assert len(list((tmp_path / "emr" / "per_task").glob("task_vector-*-of-*.safetensors"))) > 1
    for task in ("task0", "task2"):
        folder_state = load_task_state(tmp_path / "emr", task)
        for name, tensor in memory.task_states[task].items():
            assert torch.equal(folder_state[name], tensor), (task, name)


def test_load_task_state_errors(bert_zoo, tmp_path):
    with pytest.raises(primerge.InputError, match="not a per-task merge output"):
        load_task_state(bert_zoo["base"], "task0")
    primerge.merge(bert_zoo["base"], bert_zoo["models"], "emr", task_specific=r"^classifier\.",
                   out=tmp_path / "emr")
    with pytest.raises(primerge.InputError, match="no task 'nope'"):
        load_task_state(tmp_path / "emr", "nope")
