"""LoRA / PEFT adapters as merge inputs and outputs, checked against real peft.

The adapters are made with peft (``tests/lora_zoo.py``); every expected value comes from peft
itself (``merge_and_unload``) or from the same merge run on the materialised full fine-tunes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import primerge
from primerge.cli import main as cli
from primerge.core.plan import build_plan
from primerge.util.errors import InputError, RecipeError
from primerge.linalg import drop_null, factored_svd, fit_rank, svd
from primerge.methods.base import TensorContext
from primerge.methods.stack import LowRank, TaskStack
from primerge.core.recipe import build_recipe
from primerge.testing import run_check

from lora_zoo import ADAPTERS, bert_base, edit_adapter, lora_zoo, state  # noqa: F401  (fixture)

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402  (lora_zoo skips without peft)



def rel(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> float:
    """‖a − b‖ / ‖b − base‖: error of a merged tensor relative to its update."""
    scale = (b.double() - base.double()).norm().clamp_min(1e-12)
    return float((a.double() - b.double()).norm() / scale)


def assert_same_merge(a: dict, b: dict, base: dict, tol: float = 1e-4) -> None:
    for name, value in base.items():
        if value.dtype.is_floating_point:
            assert rel(a[name], b[name], value) <= tol, name


# --------------------------------------------------------------------------- linear algebra


@pytest.mark.parametrize("m,n,k", [(20, 12, 5), (12, 20, 5), (9, 7, 15), (16, 16, 16)])
def test_factored_svd_matches_lapack(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    left = torch.randn(m, k, generator=g, dtype=torch.float64)
    right = torch.randn(k, n, generator=g, dtype=torch.float64)
    f = factored_svd(left, right)
    q = min(m, n, k)
    assert f.U.shape == (m, q) and f.S.shape == (q,) and f.V.shape == (n, q)
    eye = torch.eye(q, dtype=torch.float64)
    torch.testing.assert_close(f.U.mT @ f.U, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(f.V.mT @ f.V, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(f.S, torch.linalg.svdvals(left @ right)[:q], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(f.reconstruct(), left @ right, atol=1e-10, rtol=1e-10)


def test_factored_svd_of_zero_factors_is_null_not_nan():
    zero_b = factored_svd(torch.zeros(10, 4), torch.randn(4, 8))  # peft's initial lora_B
    assert torch.isfinite(zero_b.U).all() and bool((zero_b.S == 0).all())
    empty = factored_svd(torch.zeros(10, 0), torch.zeros(0, 8))
    assert empty.U.shape == (10, 0) and empty.S.shape == (0,) and empty.V.shape == (8, 0)
    padded = fit_rank(drop_null(zero_b, (10, 8)), 6)
    assert padded.U.shape == (10, 6) and not padded.U.any() and not padded.S.any()


def test_drop_null_zeroes_rounding_directions_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g) @ torch.randn(3, 20, generator=g)  # rank 3, float32
    f = drop_null(svd(x), x.shape)
    assert int((f.S != 0).sum()) == 3
    assert not f.U[:, 3:].any() and not f.V[:, 3:].any()
    torch.testing.assert_close(f.reconstruct(), x, atol=1e-5, rtol=0)


def lowrank_stack(seed: int = 0) -> TaskStack:
    """Four tasks of a 40 × 24 matrix: LoRA ranks 3 and 6, a zero B (rank 4), one dense task."""
    g = torch.Generator().manual_seed(seed)
    rows = {t: LowRank(torch.randn(40, k, generator=g), torch.randn(k, 24, generator=g) * 0.1)
            for t, k in ((0, 3), (2, 6))}
    rows[3] = LowRank(torch.zeros(40, 4), torch.randn(4, 24, generator=g))
    dense = torch.randn(1, 40, 24, generator=g) * 0.05
    return TaskStack(dense, [1], rows)


RANK_EQUAL_TO_R = ("a factored task of rank r has a zero residual but its dense product one of rounding noise, "
                   "which residual: ties keeps and counts in its disjoint mean (prime.py zeroes only the "
                   "residuals of tasks of rank < r)")


@pytest.mark.parametrize("method,params", [("prime", {"rank": 5}), ("prime", {"rank": 2}),
                                           ("prime", {"rank": 5, "residual": "ties"}),
                                           pytest.param("prime", {"rank": 3, "residual": "ties"},  # rank 3 = r
                                                        marks=pytest.mark.xfail(strict=True, reason=RANK_EQUAL_TO_R)),
                                           ("prime", {"rank": 3, "residual": "s_sb"}),
                                           ("subspace_boosting", {"beta": 0.5, "base_params": {"scale": -0.7}})])
def test_factored_methods_equal_their_dense_path(method, params):
    """The method contract's 'factored' check (LoRA factors merge like their dense product, within
    1e-4) at parameters beyond the defaults; every method at its defaults: tests/test_method_contract.py."""
    run_check("factored", method, params)


@pytest.mark.parametrize("params", [{}, {"beta": 0.3, "alpha": 1.5, "base_params": {"scale": 0.4}}])
def test_subspace_boosting_of_all_lowrank_tasks_uses_the_factored_sum(params, monkeypatch):
    """Boost(λ Σ τ_t) = λ Boost(Σ τ_t) from the factored sum's SVD: no dense stack is formed."""
    g = torch.Generator().manual_seed(3)
    stack = TaskStack(torch.zeros(0, 40, 24), [], {t: LowRank(torch.randn(40, k, generator=g),
                                                             torch.randn(k, 24, generator=g))
                                                   for t, k in enumerate((2, 5, 3))})
    spec, ctx = primerge.get_method("subspace_boosting"), TensorContext("layer.weight", "matrix")
    dense = spec.apply(stack.dense(), ctx, spec.parameters(params))
    monkeypatch.setattr(TaskStack, "dense", lambda self: pytest.fail("materialised the stack"))
    factored = spec.apply(stack, ctx, spec.parameters(params))
    assert float((factored - dense).norm() / dense.norm()) <= 1e-4


def test_all_lowrank_iso_c_uses_the_concatenated_factors():
    stack = lowrank_stack()
    only_lowrank = TaskStack(torch.empty(0, 40, 24), [], {0: stack.lowrank[0], 1: stack.lowrank[2]})
    total = only_lowrank.sum_svd()
    assert total.S.numel() == 9  # ranks 3 + 6, never an SVD of the 40 × 24 sum
    torch.testing.assert_close(total.reconstruct(), only_lowrank.dense().sum(0), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- reading adapters


def test_task_vectors_equal_peft_merge_and_unload(lora_zoo):
    base = state(lora_zoo["base"])
    for name, adapter in lora_zoo["adapters"].items():
        full = state(lora_zoo["full"][name])
        recipe = build_recipe({"base": lora_zoo["base"], "models": [adapter], "method": "task_arithmetic"})
        plan = build_plan(recipe)
        try:
            for entry in plan.mergeable():
                tau = plan.task_vectors(entry, torch.device("cpu"))[1].dense()[0]
                expected = full[entry.name].float() - base[entry.name].float()
                torch.testing.assert_close(tau, expected, atol=2e-7, rtol=1e-5, msg=f"{name}: {entry.name}")
        finally:
            plan.close()


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()
    model.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(GPT2Model.from_pretrained(tmp_path / "base"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                           fan_in_fan_out=True))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    base = state(tmp_path / "base")
    result = primerge.merge(tmp_path / "base", [tmp_path / "adapter"], "task_arithmetic", scale=1.0)
    changed = 0
    for name, value in base.items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(result.state_dict[name], merged[name], atol=1e-6, rtol=1e-5)
            changed += not torch.equal(value, merged[name])
    assert changed == 3  # c_attn, mlp.c_proj (oriented by shape), attn.c_proj (square: fan_in_fan_out)


# --------------------------------------------------------------------------- merging adapters


@pytest.mark.parametrize("method,params", [("tsv", {}), ("prime", {"rank": 8})])  # 8 > the adapters' ranks 4, 2
def test_svd_methods_on_adapters_equal_materialised_fine_tunes(lora_zoo, method, params):
    """Adapters read as factors (plain, rsLoRA, saved modules) merge like their materialised fine-tunes.
    What each method does with factors is the method contract's ('factored'): tests/test_method_contract.py."""
    adapters = list(lora_zoo["adapters"].values())
    full = list(lora_zoo["full"].values())
    got = primerge.merge(lora_zoo["base"], adapters, method, **params).state_dict
    expected = primerge.merge(lora_zoo["base"], full, method, **params).state_dict
    assert_same_merge(got, expected, state(lora_zoo["base"]))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])  # read as the sum, read as the stack
def test_elementwise_methods_on_adapters_equal_materialised(lora_zoo, method):
    adapters = [{"path": p, "weight": w} for p, w in zip(lora_zoo["adapters"].values(), (1.0, 0.5, 2.0))]
    full = [{"path": p, "weight": w} for p, w in zip(lora_zoo["full"].values(), (1.0, 0.5, 2.0))]
    got = primerge.merge(lora_zoo["base"], adapters, method).state_dict
    expected = primerge.merge(lora_zoo["base"], full, method).state_dict
    assert_same_merge(got, expected, state(lora_zoo["base"]), tol=1e-5)


def test_adapter_mixed_with_full_fine_tune(lora_zoo):
    """A stack of factored and dense rows from the files; what methods do with such stacks is the
    method contract's ('factored', mixed stack)."""
    mixed = [lora_zoo["adapters"]["plain"], lora_zoo["full"]["rslora"], lora_zoo["adapters"]["saved"]]
    full = [lora_zoo["full"][n] for n in ("plain", "rslora", "saved")]
    got = primerge.merge(lora_zoo["base"], mixed, "tsv").state_dict
    expected = primerge.merge(lora_zoo["base"], full, "tsv").state_dict
    assert_same_merge(got, expected, state(lora_zoo["base"]))


# --------------------------------------------------------------------------- LoRA output


def forward(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).last_hidden_state


def test_lora_output_loads_in_peft_and_matches_the_full_merge(lora_zoo, tmp_path):
    from transformers import BertModel

    adapters = list(lora_zoo["adapters"].values())
    primerge.merge(lora_zoo["base"], adapters, "tsv", out=tmp_path / "full")
    result = primerge.merge(lora_zoo["base"], adapters, "tsv", out=tmp_path / "lora", lora_rank=32)
    assert result.lora["max_relative_error"] <= 1e-5  # rank 32 ≥ rank of every merged update
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 32
    assert config["bias"] == "lora_only" and "embeddings.LayerNorm" in config["modules_to_save"]
    peft_model = PeftModel.from_pretrained(BertModel.from_pretrained(lora_zoo["base"]), tmp_path / "lora").eval()
    expected = forward(BertModel.from_pretrained(tmp_path / "full").eval())
    got = forward(peft_model)
    assert float((got - expected).norm() / expected.norm()) <= 1e-5


def test_low_rank_output_error_is_the_reported_one(lora_zoo, tmp_path):
    from transformers import BertModel

    adapters = list(lora_zoo["adapters"].values())
    primerge.merge(lora_zoo["base"], adapters, "prime", rank=8, out=tmp_path / "full")
    result = primerge.merge(lora_zoo["base"], adapters, "prime", rank=8, out=tmp_path / "lora", lora_rank=2)
    report = json.loads((tmp_path / "lora" / "lora_report.json").read_text())
    assert report == json.loads(json.dumps(result.lora)) and report["rank"] == 2
    loaded = PeftModel.from_pretrained(BertModel.from_pretrained(lora_zoo["base"]), tmp_path / "lora")
    weights = {k: v.detach() for k, v in loaded.merge_and_unload().state_dict().items()}
    base, full = state(lora_zoo["base"]), state(tmp_path / "full")
    for module, entry in report["modules"].items():
        name = f"{module}.weight"
        delta = full[name] - base[name]
        error = float((weights[name] - full[name]).norm() / delta.norm())
        assert error == pytest.approx(entry["relative_error"], rel=1e-3, abs=1e-6), module
        tail = torch.linalg.svdvals(delta.double())[2:]  # Eckart–Young: the best rank-2 error
        assert entry["relative_error"] == pytest.approx(float(tail.norm() / delta.double().norm()), rel=1e-3, abs=1e-5)
    assert report["max_relative_error"] > 0.1
    for name in report["full_tensors"]:  # carried in full, exactly
        torch.testing.assert_close(weights[name], full[name])
    assert "LoRA adapter (rank 2)" in (tmp_path / "lora" / "README.md").read_text()


def test_lora_rank_above_a_module_size_is_capped_per_module(lora_zoo, tmp_path):
    """--as-lora 40 on 32-wide matrices: each module gets rank min(m, n) (no zero padding), said in
    rank_pattern / alpha_pattern, and peft loads it to the full merge."""
    from transformers import BertModel

    adapters = list(lora_zoo["adapters"].values())
    primerge.merge(lora_zoo["base"], adapters, "tsv", out=tmp_path / "full")
    result = primerge.merge(lora_zoo["base"], adapters, "tsv", out=tmp_path / "lora", lora_rank=40)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 40 and config["rank_pattern"] and config["rank_pattern"] == config["alpha_pattern"]
    weights = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    ranks = {k: v.shape[0] for k, v in weights.items() if k.endswith("lora_A.weight")}
    assert ranks and max(ranks.values()) == 32 and all(m["rank"] == 32 for m in result.lora["modules"].values())
    peft_model = PeftModel.from_pretrained(BertModel.from_pretrained(lora_zoo["base"]), tmp_path / "lora").eval()
    expected = forward(BertModel.from_pretrained(tmp_path / "full").eval())
    assert float((forward(peft_model) - expected).norm() / expected.norm()) <= 1e-5


def test_a_poorly_approximated_merge_warns_with_the_worst_modules_and_a_rank(lora_zoo, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(lora_zoo["base"]), "method": "prime", "parameters": {"rank": 8},
                                      "models": [str(p) for p in lora_zoo["adapters"].values()]}))
    assert cli.main(["merge", str(recipe), "--out", str(tmp_path / "a"), "--quiet", "--as-lora", "1"]) == 0
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "a" / "lora_report.json").read_text())
    worst = report["large_errors"][0]
    assert "primerge: warning:" in err and worst["module"] in err and f"--as-lora {report['suggested_rank']}" in err
    assert worst["relative_error"] == report["max_relative_error"] > 0.1
    assert cli.main(["merge", str(recipe), "--out", str(tmp_path / "b"), "--quiet", "--as-lora",
                     str(report["suggested_rank"])]) == 0
    fixed = json.loads((tmp_path / "b" / "lora_report.json").read_text())
    assert fixed["max_relative_error"] <= 0.1 and not fixed["large_errors"] and "warning" not in capsys.readouterr().err


def test_as_lora_output_of_a_causal_lm_loads_with_auto_peft_from_anywhere(tmp_path, monkeypatch):
    """The adapter names its base by absolute path and carries the task type (CAUSAL_LM, from the
    base's architecture), so AutoPeftModelForCausalLM loads it from another working directory."""
    from peft import AutoPeftModelForCausalLM
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    base = state(tmp_path / "base")
    gen = torch.Generator().manual_seed(1)
    tuned = []
    for t in range(2):
        folder = tmp_path / f"ft{t}"
        LlamaForCausalLM(config).save_pretrained(folder)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()},
                  str(folder / "model.safetensors"))
        tuned.append(folder)
    monkeypatch.chdir(tmp_path)
    primerge.merge("base", [Path("ft0"), Path("ft1")], "prime", out="merged", lora_rank=4)
    adapter_config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "CAUSAL_LM"
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    merged = model.merge_and_unload().state_dict()
    weights = load_file(str(tmp_path / "merged" / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    A, B = weights[f"base_model.model.{name}.lora_A.weight"], weights[f"base_model.model.{name}.lora_B.weight"]
    torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + B @ A)


def test_cli_as_lora_and_recipe_output(lora_zoo, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": str(lora_zoo["base"]), "models": [str(p) for p in lora_zoo["adapters"].values()],
        "method": "tsv", "output": {"lora_rank": 4},
    }))
    assert cli.main(["merge", str(recipe), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    assert cli.main(["merge", str(recipe), "--out", str(tmp_path / "b"), "--quiet", "--as-lora", "6"]) == 0
    assert json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == 6
    assert "LoRA adapter, rank 6" in capsys.readouterr().out
    with pytest.raises(RecipeError, match="needs an output folder"):
        primerge.merge(lora_zoo["base"], [lora_zoo["adapters"]["plain"]], "tsv", lora_rank=4)
    with pytest.raises(RecipeError):
        primerge.merge(lora_zoo["base"], [lora_zoo["adapters"]["plain"]], "tsv", lora_rank=0, out=tmp_path / "c")


# --------------------------------------------------------------------------- refusals


def merge_one(lora_zoo, adapter, **kw):
    return primerge.merge(lora_zoo["base"], [adapter, lora_zoo["adapters"]["plain"]], "tsv", **kw)


@pytest.mark.parametrize("config,match", [
    ({"use_dora": True}, "DoRA"),
    ({"peft_type": "IA3"}, "LoRA adapters only"),
    ({"init_lora_weights": "pissa"}, "modified base"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ({"r": 5}, "rank 4 in the weights but 5"),
])
def test_unsupported_adapter_configs_are_refused(lora_zoo, tmp_path, config, match):
    bad = edit_adapter(lora_zoo["adapters"]["plain"], tmp_path / "bad", config)
    with pytest.raises(InputError, match=match) as err:
        merge_one(lora_zoo, bad)
    assert str(bad) in str(err.value)


def test_dora_magnitude_and_conv_factors_are_refused(lora_zoo, tmp_path):
    src = lora_zoo["adapters"]["plain"]
    weights = load_file(str(src / "adapter_model.safetensors"))
    key = next(k for k in weights if k.endswith("query.lora_A.weight"))
    for name, extra, match in [
        ("dora", {key.replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(32)}, "DoRA"),
        ("conv", {key: weights[key].reshape(4, 32, 1, 1)}, "convolution"),
    ]:
        folder = edit_adapter(src, tmp_path / name)
        save_file({**weights, **extra}, str(folder / "adapter_model.safetensors"))
        with pytest.raises(InputError, match=match):
            merge_one(lora_zoo, folder)


def test_adapter_of_another_architecture_names_the_module(lora_zoo, tmp_path):
    src = lora_zoo["adapters"]["plain"]
    folder = edit_adapter(src, tmp_path / "other")
    weights = load_file(str(src / "adapter_model.safetensors"))
    save_file({k.replace("layer.1.", "layer.7."): v for k, v in weights.items()},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(InputError, match=r"encoder\.layer\.7\.attention\.self\.(query|value)\.weight"):
        merge_one(lora_zoo, folder)
    wide = edit_adapter(src, tmp_path / "wide")
    save_file({k: (torch.zeros(4, 40) if k.endswith("lora_A.weight") else v) for k, v in weights.items()},
              str(wide / "adapter_model.safetensors"))
    with pytest.raises(InputError, match=r"shape \[32, 40\].*\[32, 32\]"):
        merge_one(lora_zoo, wide)


def test_broken_adapter_folders_are_refused(lora_zoo, tmp_path):
    src = lora_zoo["adapters"]["plain"]
    not_json = edit_adapter(src, tmp_path / "json", raw_config="{r: 4")
    with pytest.raises(InputError, match="not valid JSON"):
        merge_one(lora_zoo, not_json)
    no_weights = edit_adapter(src, tmp_path / "empty")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(InputError, match="no adapter weights"):
        merge_one(lora_zoo, no_weights)
    half = edit_adapter(src, tmp_path / "half", drop="lora_B")
    with pytest.raises(InputError, match="no lora_B factor"):
        merge_one(lora_zoo, half)
    with pytest.raises(InputError, match="the base is a LoRA adapter"):
        primerge.merge(src, [lora_zoo["full"]["plain"]], "tsv")
    linked = edit_adapter(src, tmp_path / "linked")  # weights that are a link out of the folder
    (linked / "adapter_model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    (linked / "adapter_model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(InputError, match="outside the model folder"):
        merge_one(lora_zoo, linked)
    # CLI: one line, exit code 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(lora_zoo["base"]), "models": [str(not_json)]}))
    assert cli.main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
