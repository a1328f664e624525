"""Tensors that are not plain 2-D floats, on tiny real transformers models: fused 3-D experts merged
as E matrices (Qwen3-MoE, Mixtral), convolutions flattened on request (ViT), FP8 block-scaled
weights dequantized and written as FP8 or bf16 (Qwen3), and every other quantized format refused.
Outputs are reloaded with transformers and checked against float64 references (NumPy TSV per matrix,
Task Arithmetic of the dequantized weights)."""

from __future__ import annotations

import json
import math
import shutil
import struct

import numpy as np
import pytest
import torch

import primerge
from primerge.cli import main as cli
from primerge.util.errors import InputError, RecipeError
from primerge.io.quantized import Fp8Blocks
from primerge.core.recipe import build_recipe

from realmodels import assert_close, build_base, save_state, state, tiny_config

transformers = pytest.importorskip("transformers")


def np_tsv(taus: np.ndarray) -> np.ndarray:
    """TSV-M in NumPy (float64): ⌊r/T⌋ triplets per task, bases whitened by their polar factor."""
    T, m, n = taus.shape
    k = min(m, n) // T
    us, ss, vs = zip(*[np.linalg.svd(t, full_matrices=False) for t in taus])
    U = np.concatenate([u[:, :k] for u in us], 1)
    V = np.concatenate([v[:k].T for v in vs], 1)
    S = np.concatenate([s[:k] for s in ss])

    def polar(x):
        p, _, qt = np.linalg.svd(x, full_matrices=False)
        return p @ qt
    return polar(U) @ np.diag(S) @ polar(V).T


def tsv_reference(base: dict, models: list[dict], views: dict[str, tuple[int, int, int]]) -> dict:
    """θ₀ + TSV of every matrix (2-D, or each matrix of a (B, m, n) view), θ₀ + mean elsewhere."""
    out = {}
    for name, theta in base.items():
        taus = np.stack([m[name].double().numpy() - theta.double().numpy() for m in models])
        if name in views:
            B, m, n = views[name]
            merged = np.stack([np_tsv(taus.reshape(len(models), B, m, n)[:, b]) for b in range(B)])
        elif theta.dim() == 2 and not any(k in name for k in ("embed", "lm_head")):
            merged = np_tsv(taus)
        else:
            merged = taus.mean(0)
        out[name] = theta.double() + torch.from_numpy(merged.reshape(theta.shape))
    return out


def fused_zoo(root, arch: str, count: int = 2) -> dict:
    """A base and fine-tunes saved as their in-memory state dicts (fused [E, m, n] experts on disk)."""
    config, cls = tiny_config(arch)
    folders = []
    for t in range(count + 1):
        torch.manual_seed(0)
        model = cls(config)
        if t:
            gen = torch.Generator().manual_seed(t)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=gen))
        folder = root / ("base" if t == 0 else f"ft{t}")
        folder.mkdir(parents=True)
        save_state(folder, {k: v.contiguous() for k, v in model.state_dict().items()}, config.to_dict())
        model.save_pretrained(root / ("per_expert_" + folder.name))
        folders.append(folder)
    return {"base": folders[0], "models": folders[1:], "root": root}


def test_fused_experts_merge_as_matrices(tmp_path):
    zoo = fused_zoo(tmp_path, "qwen3_moe")
    out = tmp_path / "out"
    result = primerge.merge(zoo["base"], zoo["models"], "tsv", out=out, svd="exact")
    base = state(zoo["base"])
    experts = [n for n in base if base[n].dim() == 3]
    assert len(experts) == 4 and result.counts["experts"] == 4 and result.counts["expert_matrices"] == 16
    views = {n: tuple(base[n].shape) for n in experts}
    expected = tsv_reference(base, [state(m) for m in zoo["models"]], views)
    assert_close(state(out), expected, atol=2e-5)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[n], state(out)[n]) for n in experts)
    card = (out / "README.md").read_text()
    assert "expert tensors [E, m, n], merged matrix by matrix: 4 (16 matrices)" in card


def test_a_per_task_method_on_fused_experts(tmp_path):
    """EMR (element-wise, a model per task) through the per-matrix split: the unified update equals
    EMR of the whole 3-D tensor, the per-task masks keep the tensor's shape."""
    from primerge.methods import get_method
    from primerge.methods.base import TensorContext

    zoo = fused_zoo(tmp_path, "qwen3_moe")
    result = primerge.merge(zoo["base"], zoo["models"], "emr")
    base, models = state(zoo["base"]), [state(m) for m in zoo["models"]]
    name = "model.layers.1.mlp.experts.gate_up_proj"
    spec = get_method("emr")
    taus = torch.stack([m[name] - base[name] for m in models])
    whole = spec.apply(taus, TensorContext(name, "matrix"), spec.parameters())
    assert torch.equal(result.state_dict[name], base[name] + whole.update)
    assert all(s[name].shape == base[name].shape for s in result.task_states.values())


def test_fused_and_per_expert_layouts_merge_alike(tmp_path):
    """Mixtral saved by transformers (one 2-D tensor per expert) and as its fused state dict merge to
    the same down projections (w2 of expert e = down_proj[e]). That every method merges a fused
    tensor as its matrices apart is the method contract's ('experts'): tests/test_method_contract.py."""
    zoo = fused_zoo(tmp_path, "mixtral")
    fused, split = tmp_path / "fused", tmp_path / "split"
    primerge.merge(zoo["base"], zoo["models"], "tsv", out=fused, svd="exact")
    root = zoo["root"]
    primerge.merge(root / "per_expert_base", [root / "per_expert_ft1", root / "per_expert_ft2"], "tsv", out=split,
                   svd="exact")
    fused_state, split_state = state(fused), state(split)
    for layer in range(2):
        down = fused_state[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(4):
            w2 = split_state[f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2.weight"]
            assert torch.allclose(down[e], w2, atol=1e-6, rtol=0), (layer, e)
    transformers.AutoModelForCausalLM.from_pretrained(split)


def test_convolutions_keep_the_mean_unless_flattened(tmp_path):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
                                    image_size=16, patch_size=4)
    folders = []
    for t in range(3):
        torch.manual_seed(0)
        model = transformers.ViTModel(config)
        gen = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * t * torch.randn(p.shape, generator=gen))
        model.save_pretrained(tmp_path / f"m{t}")
        folders.append(tmp_path / f"m{t}")
    conv = "embeddings.patch_embeddings.projection.weight"
    base, models = state(folders[0]), [state(f) for f in folders[1:]]
    mean = primerge.merge(folders[0], folders[1:], "tsv", svd="exact")
    assert mean.counts["reshaped"] == 0
    expected = base[conv].double() + sum(m[conv].double() - base[conv].double() for m in models) / 2
    assert torch.allclose(mean.state_dict[conv].double(), expected, atol=1e-6)
    out = tmp_path / "flat"
    flat = primerge.merge(folders[0], folders[1:], "tsv", out=out, svd="exact", matrices={"projection": "flatten"})
    assert flat.counts["reshaped"] == 1
    taus = np.stack([(m[conv].double() - base[conv].double()).reshape(32, 48).numpy() for m in models])
    reference = base[conv].double() + torch.from_numpy(np_tsv(taus)).reshape(32, 3, 4, 4)
    assert torch.allclose(state(out)[conv].double(), reference, atol=2e-5)
    assert torch.equal(transformers.ViTModel.from_pretrained(out).state_dict()[conv], state(out)[conv])


# ------------------------------------------------------------------------------------------ FP8

BLOCK = 16


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent block quantizer for the test inputs: per 16 x 16 block s = max|W| / 448."""
    m, n = w.shape
    scales = torch.empty(math.ceil(m / BLOCK), math.ceil(n / BLOCK))
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].double()
            s = block.abs().max().item() / 448
            scales[i, j] = s
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (block / s).to(torch.float32).to(q.dtype)
    return q, scales


def fp8_dequantize(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W = q · s per block, in float64."""
    big = s.double().repeat_interleave(BLOCK, 0)[: q.shape[0]].repeat_interleave(BLOCK, 1)[:, : q.shape[1]]
    return q.double() * big


def to_fp8(folder, out) -> None:
    """Store every linear weight of ``folder`` in FP8 with 16 x 16 block scales (DeepSeek/Qwen layout)."""
    shutil.copytree(folder, out)
    tensors, fp8 = state(folder), {}
    for name, w in tensors.items():
        if name.endswith("proj.weight"):
            fp8[name], fp8[name + "_scale_inv"] = fp8_quantize(w)
        else:
            fp8[name] = w.to(torch.bfloat16)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    save_state(out, fp8, config)


def dequantized_state(folder) -> dict[str, torch.Tensor]:
    tensors = state(folder)
    return {n: fp8_dequantize(t, tensors[n + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t.double()
            for n, t in tensors.items() if not n.endswith("_scale_inv")}


@pytest.fixture(scope="module")
def fp8_zoo(tmp_path_factory):
    """A Qwen3 base and one fine-tune in FP8 blocks, one fine-tune in plain bf16."""
    root = tmp_path_factory.mktemp("fp8")
    build_base(root / "base_f32", "qwen3")
    from realmodels import fine_tune

    fine_tune(root / "base_f32", root / "ft1_f32", "qwen3", 1)
    fine_tune(root / "base_f32", root / "ft2", "qwen3", 2)
    to_fp8(root / "base_f32", root / "base")
    to_fp8(root / "ft1_f32", root / "ft1")
    save_state(root / "ft2", {k: v.to(torch.bfloat16) for k, v in state(root / "ft2").items()})
    return root


def _ta_reference(zoo, scale: float) -> dict[str, torch.Tensor]:
    base = dequantized_state(zoo / "base")
    models = [dequantized_state(zoo / "ft1"), dequantized_state(zoo / "ft2")]
    return {n: b + scale * sum(m[n] - b for m in models) for n, b in base.items()}


def test_fp8_merges_dequantized_and_is_quantized_again(fp8_zoo, tmp_path):
    out = tmp_path / "fp8"
    primerge.merge(fp8_zoo / "base", [fp8_zoo / "ft1", fp8_zoo / "ft2"], "task_arithmetic", out=out, scale=0.5)
    merged, expected = state(out), _ta_reference(fp8_zoo, 0.5)
    assert sorted(merged) == sorted(state(fp8_zoo / "base"))  # every weight with its scales, nothing else
    for name, ref in expected.items():
        if merged[name].dtype != torch.float8_e4m3fn:
            assert torch.allclose(merged[name].double(), ref, atol=2 ** -8 * ref.abs().max().item()), name
            continue
        scale = merged[name + "_scale_inv"]
        assert scale.shape == (math.ceil(ref.shape[0] / BLOCK), math.ceil(ref.shape[1] / BLOCK))
        got = fp8_dequantize(merged[name], scale)
        step = scale.double().repeat_interleave(BLOCK, 0)[: ref.shape[0]].repeat_interleave(BLOCK, 1)[:, : ref.shape[1]]
        assert bool(((got - ref).abs() <= ref.abs() * 2 ** -4 + step * 2 ** -9 + 1e-7).all()), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [BLOCK, BLOCK]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # no GPU: transformers dequantizes
    loaded = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].double()
    ours = fp8_dequantize(merged["model.layers.0.self_attn.q_proj.weight"],
                          merged["model.layers.0.self_attn.q_proj.weight_scale_inv"])
    assert torch.allclose(loaded, ours, atol=2 ** -7 * ours.abs().max().item())


def test_fp8_written_as_bf16(fp8_zoo, tmp_path):
    out = tmp_path / "bf16"
    recipe = build_recipe({"base": fp8_zoo / "base", "models": [fp8_zoo / "ft1", fp8_zoo / "ft2"],
                           "method": "task_arithmetic", "parameters": {"scale": 0.5}, "output": {"dtype": "bfloat16"}})
    primerge.merge_recipe(recipe, out=out)
    merged, expected = state(out), _ta_reference(fp8_zoo, 0.5)
    assert sorted(merged) == sorted(expected) and all(t.dtype == torch.bfloat16 for t in merged.values())
    for name, ref in expected.items():
        assert torch.allclose(merged[name].double(), ref, atol=2 ** -8 * ref.abs().max().item() + 1e-7), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config.get("dtype", config.get("torch_dtype")) == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.state_dict()["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16),
                       merged["model.layers.1.mlp.down_proj.weight"])


def test_fp8_blocks_round_trip():
    scheme = Fp8Blocks((4, 8))
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 10, 19, generator=gen)  # leading expert axis; partial blocks on both axes
    w[0, :4, :8] = 0.0  # a zero block
    q, s = scheme.quantize(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == scheme.scale_shape(w.shape) == (2, 3, 3)
    assert s[0, 0, 0] == 1.0 and not bool(q[0, :4, :8].float().any())
    back = scheme.dequantize(q, s)
    assert bool(((back - w).abs() <= w.abs() * 2 ** -4 + 2 ** -9 * scheme._expand(s, w.shape)).all())
    again, s2 = scheme.quantize(back)
    assert torch.equal(again.float(), q.float()) and torch.allclose(s2, s)
    assert scheme.stored_bytes(tuple(w.shape)) == 2 * 10 * 19 + 2 * 3 * 3 * 4


def test_fp8_output_refused_for_a_per_task_method(fp8_zoo):
    with pytest.raises(RecipeError, match=r"output: \{dtype: bfloat16\}"):
        primerge.merge(fp8_zoo / "base", [fp8_zoo / "ft1", fp8_zoo / "ft2"], "emr")


# ------------------------------------------------------------------------------ other formats


def _variant(fp8_zoo, tmp_path, name, change) -> object:
    """A copy of the FP8 fine-tune folder with ``change(tensors, config)`` applied."""
    folder = tmp_path / name
    shutil.copytree(fp8_zoo / "ft1", folder)
    tensors = state(folder)
    config = json.loads((folder / "config.json").read_text())
    change(tensors, config)
    save_state(folder, tensors, config)
    return folder


Q = "model.layers.0.self_attn.q_proj"


def _bnb(t, c):
    c["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}


def _gptq(t, c):
    del c["quantization_config"]
    t[Q + ".qweight"] = torch.zeros(4, 32, dtype=torch.int32)
    t[Q + ".scales"] = torch.ones(1, 32, dtype=torch.float16)


def _no_scale(t, c):
    del t[Q + ".weight_scale_inv"]


def _static(t, c):
    t[Q + ".input_scale"] = torch.ones(())


def _mxfp4(t, c):
    del c["quantization_config"]
    t["model.layers.0.mlp.experts.gate_up_proj_blocks"] = torch.zeros(2, 4, 16, dtype=torch.uint8)


@pytest.mark.parametrize("name, change, needles", [
    ("bnb", _bnb, ["config.json", "bitsandbytes", "model.dequantize()"]),
    ("gptq", _gptq, ["'model.layers.0.self_attn.q_proj.qweight'", "gptq", "unquantized original"]),
    ("fp8_no_scale", _no_scale, [f"'{Q}.weight'", "FP8 without block scales", "weight_scale_inv"]),
    ("static", _static, [f"'{Q}.input_scale'", "static FP8 activation scales", "input_scale"]),
    ("mxfp4", _mxfp4, ["gate_up_proj_blocks", "mxfp4", "Mxfp4Config(dequantize=True)"]),
])
def test_other_quantized_formats_are_refused(fp8_zoo, tmp_path, capsys, name, change, needles):
    model = _variant(fp8_zoo, tmp_path, name, change)
    with pytest.raises(InputError) as info:
        primerge.merge(fp8_zoo / "base", [model], "task_arithmetic", out=tmp_path / "out")
    for needle in [str(model), "never quantized codes as numbers", *needles]:
        assert needle in str(info.value), (needle, str(info.value))
    assert not (tmp_path / "out").exists()


def write_gguf(path, tensors: list[tuple[str, int]]) -> None:
    """A GGUF v3 header (one metadata string, the tensor infos), as llama.cpp writes it."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()
    data = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1) + string("general.architecture")
    data += struct.pack("<I", 8) + string("llama")
    for name, kind in tensors:
        data += string(name) + struct.pack("<I", 2) + struct.pack("<QQ", 32, 32) + struct.pack("<IQ", kind, 0)
    path.write_bytes(data + b"\0" * 64)


def test_gguf_is_refused_naming_a_quantized_tensor(fp8_zoo, tmp_path, capsys):
    folder = tmp_path / "gguf_model"
    folder.mkdir()
    write_gguf(folder / "model-q4_k_m.gguf", [("token_embd.weight", 1), ("blk.0.attn_q.weight", 12)])
    with pytest.raises(InputError, match=r"model-q4_k_m.gguf: tensor 'blk.0.attn_q.weight' is stored in GGUF "
                                         r"Q4_K quantized form.*gguf_file=NAME"):
        primerge.merge(fp8_zoo / "base", [folder], "task_arithmetic")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {folder / 'model-q4_k_m.gguf'}\nmodels: [{fp8_zoo / 'ft1'}]\n")
    assert cli.main(["merge", str(recipe), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("primerge: error: ") and "blk.0.attn_q.weight" in err and "Traceback" not in err
