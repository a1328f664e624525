"""RegMean and RegMean++ on PEFT LoRA adapters (primerge.purify.covariance, primerge.io.hf), and the
calibration block's prompt template: a zoo of real peft adapters of a tiny Llama merges as the same
zoo saved in full (peft's merge_and_unload), within a float32 bound derived below; the template runs
each text as its fitted prompt; the errors name the adapter, the base or the field."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import primerge
from primerge.calibration.grams import own_grams
from primerge.data.prompts import Verbaliser, fit_text
from primerge.purify.covariance import covariance_file
from primerge.util.errors import InputError, RecipeError
from test_regmean import (EPS32, assert_gram_close, calibration, merge_zoo, reference_grams, regmean_pp_grams,
                          texts_of, write_task, zoo_plan)

pytest.importorskip("peft")

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8
TEXTS = [["the position on the net", "a pos it", "net on the position here"],
         ["there the other note on it", "pose it", "the note on position"]]


def lora_model(base: Path, task_type: str | None, seed: int):
    """A peft LoRA (r 4, α 8, every linear layer of the decoder) of ``base`` with random A and B."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=MODULES, task_type=task_type)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory):
    """A tiny Llama base, two LoRA adapters of it (one with peft's task_type, one without) and the
    same two merged into full models by peft and saved as folders; one CSV of texts per task."""
    from llm_fixtures import save_tiny_llama
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("regmean_lora")
    base = save_tiny_llama(root / "base")
    adapters, dense, data = [], [], {}
    for t, task_type in enumerate(("CAUSAL_LM", None)):
        name = f"task{t}"
        lora_model(base, task_type, seed=10 + t).save_pretrained(root / "adapters" / name)
        merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), root / "adapters" / name)
        merged.merge_and_unload().save_pretrained(root / "dense" / name)
        adapters.append(root / "adapters" / name)
        dense.append(root / "dense" / name)
        data[name] = write_task(root / f"{name}.csv", [f"{x} {i}" for i in range(4) for x in TEXTS[t]])
    return {"root": root, "base": base, "adapters": {"base": base, "models": adapters, "data": data},
            "dense": {"base": base, "models": dense, "data": data}}


def grams_of(zoo: dict, method: str, cache: Path, parameters: dict):
    """The Grams the merge of ``zoo`` read: the covariance files (RegMean) or the cached walk (RegMean++)."""
    if method == "regmean_pp":
        return regmean_pp_grams(zoo, cache, parameters)
    plan = zoo_plan(zoo, method, parameters)
    try:
        return own_grams(plan)
    finally:
        plan.close()


def first_order_bound(G: np.ndarray, dG: np.ndarray, taus: list[np.ndarray], U: np.ndarray,
                      E: list[np.ndarray]) -> np.ndarray:
    """Entrywise bound on |δU| when U solves A Uᵀ = Σ_t G_t τ_tᵀ (A = Σ_t G_t) and the inputs move by
    δG_t (known) and δτ_t (|δτ_t| ≤ E_t entrywise). To first order A δUᵀ = Σ_t G_t δτ_tᵀ +
    Σ_t δG_t (τ_t − U)ᵀ, so |δUᵀ| ≤ Σ_t |A⁻¹G_t| E_tᵀ + |A⁻¹| Σ_t |δG_t| |τ_t − U|ᵀ."""
    inverse = np.linalg.inv(G.sum(0))
    total = sum(np.abs(inverse @ g) @ e.T for g, e in zip(G, E))
    total = total + np.abs(inverse) @ sum(np.abs(d) @ np.abs(t - U).T for d, t in zip(dG, taus))
    return total.T


def lora_delta_bound(adapter: Path, name: str, base_w: np.ndarray, dense_w: np.ndarray) -> np.ndarray:
    """Entrywise bound on |τ_lora − τ_dense| for one weight. τ_lora = fl(s·B) A (primerge's factored
    product) and peft's P = fl(B A)·s both lie within γ_{k+2}·s·|B||A| of s·B A (k = 4 products per
    entry, the scaling), so they differ by at most 2γ_{k+2}·s·|B||A|; the full model stores
    fl(W₀ + P) (one rounding, ε|W_t|) and its task vector is fl(W_t − W₀) (one more, ε|τ_dense|)."""
    state = load_file(str(adapter / "adapter_model.safetensors"))
    module = "base_model.model." + name.removesuffix(".weight")
    a, b = state[f"{module}.lora_A.weight"].double().numpy(), state[f"{module}.lora_B.weight"].double().numpy()
    gamma = (RANK + 2) * EPS32 / (1 - (RANK + 2) * EPS32)
    return 2 * gamma * (ALPHA / RANK) * (np.abs(b) @ np.abs(a)) + EPS32 * (np.abs(dense_w) + np.abs(dense_w - base_w))


@pytest.mark.parametrize("method", ["regmean", "regmean_pp"])
def test_a_lora_zoo_merges_as_its_adapters_merged_into_full_models(method, lora_zoo, tmp_path, monkeypatch):
    """Every matrix of the RegMean (RegMean++) merge of two peft adapters equals that of the same
    adapters merged into full models by peft and saved as folders, within a float32 bound.

    Both merges solve Uᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t τ_tᵀ in float64. The inputs differ only by round-off:
    δτ_t (entrywise, :func:`lora_delta_bound`) and δG_t (measured: RegMean runs the same float32
    forward on the same weights, peft's merge kept in memory or saved and read back; RegMean++ on
    weights that differ by δτ). :func:`first_order_bound` bounds δU; twice it covers the higher
    orders (every relative perturbation is below 1e-4, :func:`assert_gram_close`). Each output is
    fl(W₀ + fl(U)): 2ε(|W| + |U|) per entry on each side, and the float64 solves differ by less
    than 1e-8·max|U| (κ(A) < 1e6, checked)."""
    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    parameters = {"off_diagonal": 0.9}
    lora, dense = merge_zoo(lora_zoo["adapters"], method, parameters), merge_zoo(lora_zoo["dense"], method, parameters)
    lora_grams = grams_of(lora_zoo["adapters"], method, tmp_path / "cache", parameters)
    dense_grams = grams_of(lora_zoo["dense"], method, tmp_path / "cache", parameters)
    base = load_file(str(lora_zoo["base"] / "model.safetensors"))
    fulls = [load_file(str(m / "model.safetensors")) for m in lora_zoo["dense"]["models"]]
    checked = 0
    for name in sorted(dense.state_dict):
        if not any(f".{m}.weight" in name for m in MODULES):
            assert torch.allclose(lora.state_dict[name], dense.state_dict[name], atol=1e-6), name
            continue
        G_l, G_d = lora_grams(name), dense_grams(name)
        for t in range(2):
            assert_gram_close(G_l[t], G_d[t])
        G = (0.9 * G_d + 0.1 * torch.diag_embed(G_d.diagonal(dim1=-2, dim2=-1))).numpy()
        dG = 0.9 * (G_l - G_d).numpy() + 0.1 * np.stack([np.diag(np.diag(g)) for g in (G_l - G_d).numpy()])
        assert np.linalg.cond(G.sum(0)) < 1e6
        w0 = base[name].double().numpy()
        taus = [f[name].double().numpy() - w0 for f in fulls]
        U = dense.state_dict[name].double().numpy() - w0
        E = [lora_delta_bound(a, name, w0, f[name].double().numpy())
             for a, f in zip(lora_zoo["adapters"]["models"], fulls)]
        W_l, W_d = lora.state_dict[name].double().numpy(), dense.state_dict[name].double().numpy()
        bound = (2 * first_order_bound(G, dG, taus, U, E) + 2 * EPS32 * (np.abs(W_l) + np.abs(W_d) + 2 * np.abs(U))
                 + 1e-8 * np.abs(U).max())
        assert (np.abs(W_l - W_d) <= bound).all(), (name, float((np.abs(W_l - W_d) - bound).max()))
        checked += 1
    assert checked == 2 * len(MODULES)
    name = "model.layers.1.mlp.down_proj.weight"
    mean = torch.stack([f[name] for f in fulls]).mean(0)
    assert (lora.state_dict[name] - mean).abs().max() > 1e-3  # the Grams shaped it: not the mean


def test_an_adapters_covariances_are_keyed_by_its_base(lora_zoo, tmp_path):
    """The same adapter on another base is another model: another cache file, other Grams."""
    from llm_fixtures import save_tiny_llama

    other = save_tiny_llama(tmp_path / "other-base", seed=1)
    adapter = lora_zoo["adapters"]["models"][0]
    texts = texts_of(lora_zoo["adapters"]["data"][adapter.name])
    first, key = covariance_file(adapter, texts, base=lora_zoo["base"], cache=tmp_path)
    again, same = covariance_file(adapter, texts, base=lora_zoo["base"], cache=tmp_path)
    moved, other_key = covariance_file(adapter, texts, base=other, cache=tmp_path)
    assert (again, same) == (first, key) and other_key != key
    ours, theirs = load_file(str(first)), load_file(str(moved))
    assert not torch.allclose(ours["layers.0.self_attn.q_proj|cov"], theirs["layers.0.self_attn.q_proj|cov"])


def test_adapter_errors_name_the_adapter_and_the_fix(lora_zoo, tmp_path):
    """No base folder to apply the adapter to, and an adapter whose keys fit no module of the class
    its task_type names (peft would only warn and leave the base as it is)."""
    adapter = lora_zoo["adapters"]["models"][0]
    with pytest.raises(InputError, match=f"{adapter}: running the task's data through a LoRA adapter.*model folder"):
        covariance_file(adapter, ["a text"], base=None, cache=tmp_path)
    wrong = tmp_path / "wrong"
    shutil.copytree(adapter, wrong)
    config = (wrong / "adapter_config.json").read_text().replace('"CAUSAL_LM"', '"FEATURE_EXTRACTION"')
    (wrong / "adapter_config.json").write_text(config)
    with pytest.raises(InputError, match=f"{wrong}: some of the adapter's weights fit no module of the LlamaModel"):
        covariance_file(wrong, ["a text"], base=lora_zoo["base"], cache=tmp_path)


def test_a_template_runs_each_text_as_its_fitted_prompt(lora_zoo, tmp_path, monkeypatch):
    """With ``template`` each training text runs as the prompt the template makes of it, cut at a
    word end so the prompt has at most ``max_length`` tokens (fit_text, the LLM track's rule): the
    Grams are those of these prompts (recomputed one prompt at a time, as in test_regmean), some of
    which were cut, and differ from the raw texts'."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    zoo = lora_zoo["dense"]
    template, max_length = "Note: {text}\nIs it a pos or a net?\nAnswer:", 28
    tokenizer = AutoTokenizer.from_pretrained(zoo["base"])
    plan = zoo_plan(zoo, "regmean", template={"task0": template}, max_length=max_length)
    try:
        grams = own_grams(plan)
    finally:
        plan.close()
    modules = ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]
    texts = texts_of(zoo["data"]["task0"])
    fitted = [fit_text(t, Verbaliser(template), tokenizer, max_length) for t in texts]
    assert any(f != t for f, t in zip(fitted, texts)) and all(fitted)
    prompts = [template.replace("{text}", f) for f in fitted]
    assert all(len(tokenizer.encode(p)) <= max_length for p in prompts)
    state = load_file(str(zoo["models"][0] / "model.safetensors"))
    refs = reference_grams(zoo["base"], state, prompts, modules, max_length=max_length)
    raw = reference_grams(zoo["base"], state, texts, modules, max_length=max_length)
    for module in modules:
        assert_gram_close(grams(f"model.{module}.weight")[0], refs[module])
        assert not torch.allclose(refs[module], raw[module], rtol=0.1)
    # model task1 has no template: its raw texts, as without the option
    plain = zoo_plan(zoo, "regmean", max_length=max_length)
    try:
        assert torch.equal(own_grams(plain)("model.layers.0.self_attn.q_proj.weight")[1],
                           grams("model.layers.0.self_attn.q_proj.weight")[1])
    finally:
        plain.close()


def test_template_errors_name_the_field(lora_zoo, tmp_path, monkeypatch):
    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    zoo = lora_zoo["dense"]
    with pytest.raises(RecipeError, match=r"calibration.template.task1: 'Answer:' has no \{text\} field"):
        zoo_plan(zoo, "regmean", template={"task1": "Answer:"})
    with pytest.raises(RecipeError, match="calibration.template: 'no field' has no"):
        zoo_plan(zoo, "regmean", template="no field")
    with pytest.raises(RecipeError, match="calibration.template: 'task7' is not a model"):
        zoo_plan(zoo, "regmean", template={"task7": "{text}"})
    with pytest.raises(InputError, match="calibration template .* leaving no room .* raise calibration.max_length"):
        primerge.merge(zoo["base"], [str(p) for p in zoo["models"]], "regmean",
                       calibration=calibration(zoo, template="A long frame around {text} that fills it", max_length=6))


def test_the_llm_demo_calibrates_regmean_on_the_prompts_it_scores(lora_zoo, tmp_path, monkeypatch):
    """The LLM demo's merge inputs (:func:`merge_inputs`) of a LoRA zoo: RegMean gets each model's task
    as the user named it with its task's template and the prompt budget, so the Grams of its merge are
    those of the very prompts the demo casts from the training split (the zoo's training prompts);
    a data-free method gets no block."""
    from transformers import AutoTokenizer

    from primerge.core.plan import build_plan
    from primerge.core.recipe import build_recipe
    from primerge.data.tasks import load_splits
    from primerge.evaluation.llm.demo import Suite, merge_inputs
    from primerge.evaluation.llm.prompts import cast_task
    from primerge.evaluation.llm.zoo import LLMZoo, LLMZooEntry

    monkeypatch.setenv("PRIMERGE_CACHE", str(tmp_path / "cache"))
    base, zoo_inputs = lora_zoo["base"], lora_zoo["adapters"]
    tokenizer = AutoTokenizer.from_pretrained(base)
    specs = [zoo_inputs["data"][p.name] for p in zoo_inputs["models"]]
    tasks = [cast_task(s, tokenizer, 48, len(s.train_texts), 2) for s in load_splits(specs)]
    suite = Suite(base, tasks, tmp_path, "cpu", 8, tokenizer, {}, {t.name: s for t, s in zip(tasks, specs)}, 48)
    entries = [LLMZooEntry(t.name, p, {}, True) for t, p in zip(tasks, zoo_inputs["models"])]
    zoo = LLMZoo("lora", base, tmp_path, entries)
    assert merge_inputs(suite, zoo, "ties")["calibration"] is None
    inputs = merge_inputs(suite, zoo, "regmean")
    assert inputs["calibration"] == {"data": dict(zip(suite.specs, specs)), "max_length": 48,
                                     "template": {t.name: t.verbaliser.template for t in tasks}}
    primerge.merge(base, method="regmean", **inputs)
    plan = build_plan(build_recipe({"base": str(base), "models": inputs["models"], "method": "regmean",
                                    "calibration": inputs["calibration"]}))
    try:
        grams = own_grams(plan)
    finally:
        plan.close()
    modules = ["layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"]
    for t, (task, dense) in enumerate(zip(tasks, lora_zoo["dense"]["models"])):
        refs = reference_grams(base, load_file(str(dense / "model.safetensors")), list(task.train_prompts), modules)
        for module in modules:
            assert_gram_close(grams(f"model.{module}.weight")[t], refs[module])
