"""Mixtures of experts from a base and dense fine-tunes (primerge.core.moe): Mixtral, Qwen2-MoE and
Qwen3-MoE checkpoints that transformers loads, routers from prompts, one read per MLP."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llm_fixtures import byte_level_tokenizer, vocabulary
from primerge.api import dry_run, merge_recipe
from primerge.cli.main import main as cli
from primerge.core.moe import MoeRecipe, from_mergekit
from primerge.core.recipe import build_recipe
from primerge.io.readers import Checkpoint
from primerge.util.errors import InputError, RecipeError

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=2)
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
#: each expert's prompts: distinct last words, so their last-position states differ from the first block on
PROMPTS = {"code": ["import os"], "math": ["solve two"], "prose": ["the cat sat"]}
LIKE = {"code": "print os", "math": "add two", "prose": "a dog sat"}  # prompts ending like each expert's own


def save_family(root: Path, family: str) -> dict[str, Path]:
    """A base of ``family`` (transformers' initialisation: std 0.02) with the byte-level tokenizer,
    and three fine-tunes (every tensor + 0.02·N(0, 1))."""
    import transformers

    config_class, model_class = (getattr(transformers, n) for n in FAMILIES[family])
    torch.manual_seed(0)
    base = model_class(config_class(vocab_size=len(vocabulary()[0]), **TINY)).eval()
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    byte_level_tokenizer().save_pretrained(paths["base"])
    generator = torch.Generator().manual_seed(1)
    for name in PROMPTS:
        tuned = model_class.from_pretrained(paths["base"])
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        tuned.save_pretrained(root / name)
        paths[name] = root / name
    return paths


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    return save_family(tmp_path_factory.mktemp("moe_llama"), "llama")


def mergekit_config(zoo: dict[str, Path], **fields) -> dict:
    experts = [{"source_model": str(zoo[n]), "positive_prompts": PROMPTS[n]} for n in PROMPTS]
    return {"base_model": str(zoo["base"]), "experts": experts, "experts_per_token": 2, **fields}


def build(config: dict, out: Path, **overrides) -> Path:
    merge_recipe(build_recipe({**from_mergekit(config), **overrides}), out=out)
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_mixtral_from_llama_fine_tunes(tmp_path, llama):
    """Expert e of block i is block i's MLP of expert e's model (w1 gate, w2 down, w3 up), bit for
    bit; everything else is the base's; the config is Mixtral's; transformers loads and generates."""
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    out = build(mergekit_config(llama), tmp_path / "out")
    written, base = tensors(out), tensors(llama["base"])
    for e, name in enumerate(PROMPTS):
        model = tensors(llama[name])
        for i in range(3):
            for projection, w in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
                assert torch.equal(written[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"],
                                   model[f"model.layers.{i}.mlp.{projection}.weight"])
    kept = [n for n in base if ".mlp." not in n]
    assert all(torch.equal(written[n], base[n]) for n in kept)
    assert len(written) == len(kept) + 3 * (3 * 3 + 1)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["architectures"], config["num_local_experts"], config["num_experts_per_tok"]) \
        == ("mixtral", ["MixtralForCausalLM"], 3, 2)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, MixtralForCausalLM)
    assert model.generate(torch.tensor([[1, 40, 50]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def router_choices(folder: Path, prompt: str) -> list[int]:
    """The expert of highest router logit at the prompt's last position, in every block."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = byte_level_tokenizer()
    ids = tokenizer(tokenizer.bos_token + prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(ids, output_router_logits=True).router_logits
    return [int(block[-1].argmax()) for block in logits]


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_prompts_like_an_experts_own_go_to_that_expert(tmp_path, llama, mode):
    """With gates from the prompts, an expert's own prompt, and a prompt ending like it, are routed
    to that expert in every block. Why it holds here: block i's gate row e is the unit vector of the
    expert's prompt state (the last position's block input; for cheap_embed its tokens' embedding
    sum); the router sees that state after attention, which transformers' initialisation (std 0.02)
    keeps near it, and the three prompts' states point apart (their last words differ)."""
    out = build(mergekit_config(llama, gate_mode=mode), tmp_path / "out")
    for e, name in enumerate(PROMPTS):
        assert router_choices(out, PROMPTS[name][0]) == [e] * 3, name
        if mode == "hidden":
            assert router_choices(out, LIKE[name]) == [e] * 3, name


def test_each_models_mlp_is_read_once(tmp_path, llama, monkeypatch):
    """Streaming: the build reads every expert MLP tensor of a fine-tune exactly once and none of
    its other tensors (cheap_embed: no forward pass)."""
    reads: dict[tuple[str, str], int] = {}
    load = Checkpoint.load

    def counted(self, name):
        key = (Path(self.path).parent.name, name)
        reads[key] = reads.get(key, 0) + 1
        return load(self, name)

    monkeypatch.setattr(Checkpoint, "load", counted)
    build(mergekit_config(llama, gate_mode="cheap_embed"), tmp_path / "out")
    for name in PROMPTS:
        mine = {n: c for (model, n), c in reads.items() if model == name}
        assert sorted(mine) == sorted(f"model.layers.{i}.mlp.{p}.weight" for i in range(3)
                                      for p in ("gate_proj", "up_proj", "down_proj"))
        assert set(mine.values()) == {1}


def test_cheap_embed_gates_are_the_normalised_embedding_sums(tmp_path, llama):
    """cheap_embed's row e, in every block: u(s⁺) with s⁺ the sum of the embedding rows of the
    expert's prompt tokens (BOS text first) and u(v) = v/‖v‖; with negative prompts, u(u(s⁺) − u(s⁻)).
    Against a float64 reference, float32 sums of at most 12 rows of magnitude ≤ 1 err by well under 1e-5."""
    config = mergekit_config(llama, gate_mode="cheap_embed")
    config["experts"][0]["negative_prompts"] = ["solve two"]
    out = build(config, tmp_path / "out")
    embedding = tensors(llama["base"])["model.embed_tokens.weight"].double()
    tokenizer = byte_level_tokenizer()

    def unit_sum(prompts: list[str]) -> torch.Tensor:
        rows = [embedding[tokenizer(tokenizer.bos_token + p, add_special_tokens=False)["input_ids"]].sum(0)
                for p in prompts]
        total = torch.stack(rows).sum(0)
        return total / total.norm()

    first = unit_sum(PROMPTS["code"]) - unit_sum(["solve two"])
    want = torch.stack([first / first.norm(), unit_sum(PROMPTS["math"]), unit_sum(PROMPTS["prose"])])
    written = tensors(out)
    for i in range(3):
        torch.testing.assert_close(written[f"model.layers.{i}.block_sparse_moe.gate.weight"].double(), want,
                                   rtol=0, atol=1e-5)


def test_random_gates_follow_the_seed(tmp_path, llama):
    config = mergekit_config(llama, gate_mode="random")
    gate = "model.layers.1.block_sparse_moe.gate.weight"
    first = tensors(build(config, tmp_path / "a", seed=3))[gate]
    assert first.shape == (3, 32)
    assert torch.equal(first, tensors(build(config, tmp_path / "b", seed=3))[gate])
    assert not torch.equal(first, tensors(build(config, tmp_path / "c", seed=4))[gate])


def test_noise_and_residual_scale(tmp_path, llama):
    """noise_scale σ adds σ·N(0, 1) draws to the expert's MLP weights (seeded: the same build gives
    the same bytes; the mean |draw| of a 48 × 32 matrix, 1536 draws, is σ·√(2/π) within 10%, 5 standard
    errors; the draws are the same on any machine: a seeded CPU generator),
    residual_scale multiplies its down_proj, after the noise (as mergekit-moe)."""
    config = mergekit_config(llama, gate_mode="random")
    config["experts"][0].update(noise_scale=0.1, residual_scale=0.5)
    first, again = (tensors(build(config, tmp_path / k)) for k in ("a", "b"))
    source = tensors(llama["code"])
    up = first["model.layers.0.block_sparse_moe.experts.0.w3.weight"] - source["model.layers.0.mlp.up_proj.weight"]
    assert abs(up.abs().mean().item() / (0.1 * (2 / torch.pi) ** 0.5) - 1) < 0.1
    down = first["model.layers.0.block_sparse_moe.experts.0.w2.weight"] / 0.5 - source["model.layers.0.mlp.down_proj.weight"]
    assert abs(down.abs().mean().item() / (0.1 * (2 / torch.pi) ** 0.5) - 1) < 0.1
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert torch.equal(first["model.layers.0.block_sparse_moe.experts.1.w3.weight"],
                       tensors(llama["math"])["model.layers.0.mlp.up_proj.weight"])


def test_qwen2_moe_with_a_shared_expert_from_llama(tmp_path, llama):
    """One shared expert makes a Qwen2-MoE: experts and the shared expert are MLPs of their
    models, the shared expert's gate is its gate vector (1 × H), q/k/v biases are zeros (the Llama
    base has none), and transformers loads it and generates."""
    from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM

    config = mergekit_config(llama, shared_experts=[{"source_model": str(llama["base"]),
                                                     "positive_prompts": ["hello there"]}])
    out = build(config, tmp_path / "out")
    written, base = tensors(out), tensors(llama["base"])
    assert torch.equal(written["model.layers.2.mlp.shared_expert.up_proj.weight"], base["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(written["model.layers.0.mlp.experts.1.down_proj.weight"],
                       tensors(llama["math"])["model.layers.0.mlp.down_proj.weight"])
    assert written["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 32)
    assert not written["model.layers.0.self_attn.k_proj.bias"].any()
    settings = json.loads((out / "config.json").read_text())
    assert (settings["model_type"], settings["num_experts"], settings["shared_expert_intermediate_size"],
            settings["moe_intermediate_size"]) == ("qwen2_moe", 3, 48, 48)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, Qwen2MoeForCausalLM)
    assert model.generate(torch.tensor([[1, 40, 50]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


@pytest.mark.parametrize(("family", "model_class"), [("qwen3", "Qwen3MoeForCausalLM"), ("qwen2", "Qwen2MoeForCausalLM")])
def test_qwen_families_load_and_generate(tmp_path, family, model_class):
    from transformers import AutoModelForCausalLM

    zoo = save_family(tmp_path / "zoo", family)
    shared = {"shared_experts": [{"source_model": str(zoo["base"]), "positive_prompts": ["hi"]}]} if family == "qwen2" else {}
    out = build(mergekit_config(zoo, **shared), tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == model_class
    written = tensors(out)
    assert torch.equal(written["model.layers.1.mlp.experts.2.gate_proj.weight"],
                       tensors(zoo["prose"])["model.layers.1.mlp.gate_proj.weight"])
    assert model.generate(torch.tensor([[1, 40, 50]]), max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_a_method_merges_the_shared_tensors(tmp_path, llama):
    """method: task_arithmetic (λ = 1/3) merges attention, norms and embeddings over the three
    models: θ₀ + (1/3) Σ_t τ_t. Against float64, float32 arithmetic (4 roundings of relative 2⁻²⁴
    on values of magnitude at most Σ|θ|) errs by under 5·2⁻²⁴·Σ|θ|; experts stay copies."""
    native = {**from_mergekit(mergekit_config(llama, gate_mode="random")), "method": "task_arithmetic",
              "parameters": {"scale": 1 / 3}}
    out = tmp_path / "out"
    merge_recipe(build_recipe(native), out=out)
    written = tensors(out)
    thetas = [tensors(llama[n]) for n in ("base", *PROMPTS)]
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        theta0, *others = (t[name].double() for t in thetas)
        want = theta0 + sum(o - theta0 for o in others) / 3
        bound = 5 * 2.0**-24 * sum(t.abs() for t in (theta0, *others))
        assert bool(((written[name].double() - want).abs() <= bound).all()), name
    assert torch.equal(written["model.layers.1.block_sparse_moe.experts.0.w3.weight"],
                       thetas[1]["model.layers.1.mlp.up_proj.weight"])


def test_plan_and_card_describe_the_experts(tmp_path, llama):
    recipe = build_recipe(from_mergekit(mergekit_config(llama)))
    assert isinstance(recipe, MoeRecipe)
    text = dry_run(recipe, out=tmp_path / "out").to_text()
    assert "MixtralForCausalLM: 3 blocks, 3 experts (2 per token)" in text
    assert "expert 1: the MLPs of math (1 positive, 0 negative prompts)" in text
    assert "router: hidden: hidden states in bfloat16 of 3 prompts through the base" in text
    merge_recipe(recipe, out=tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Expert map" in card and "| expert 2 | `prose` | 1 / 0 |" in card


def test_cli_builds_from_a_mergekit_moe_file(tmp_path, llama, capsys):
    config = mergekit_config(llama, gate_mode="cheap_embed", dtype="bfloat16")
    file = tmp_path / "moe.yaml"
    file.write_text(yaml.safe_dump(config))
    assert cli(["moe", str(file), "--dry-run"]) == 0
    assert "MixtralForCausalLM" in capsys.readouterr().out
    assert cli(["moe", str(file), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert {t.dtype for t in tensors(tmp_path / "out").values()} == {torch.bfloat16}
    assert cli(["verify", str(tmp_path / "out")]) == 0
    file.write_text(yaml.safe_dump({**config, "experts_per_token": 4}))
    assert cli(["moe", str(file), "--out", str(tmp_path / "bad")]) == 2
    assert "experts_per_token 4 exceeds the 3 experts" in capsys.readouterr().err


def test_primerge_merge_takes_a_mergekit_moe_file(tmp_path, llama):
    """``primerge merge`` on mergekit-moe's configuration writes what ``primerge moe`` writes."""
    config = mergekit_config(llama, gate_mode="cheap_embed")
    file = tmp_path / "moe.yaml"
    file.write_text(yaml.safe_dump(config))
    assert cli(["moe", str(file), "--out", str(tmp_path / "moe"), "--quiet"]) == 0
    assert cli(["merge", str(file), "--out", str(tmp_path / "merge"), "--quiet"]) == 0
    a, b = tensors(tmp_path / "moe"), tensors(tmp_path / "merge")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(("change", "error", "match"), [
    ({"experts_per_token": 4}, RecipeError, "exceeds the 3 experts"),
    ({"gate_mode": "hidden", "experts": "unprompted"}, RecipeError, "have no positive_prompts"),
    ({"experts": "same prompts"}, RecipeError, "every expert has the same prompts"),
    ({"architecture": "mixtral", "shared_experts": [{"source_model": "BASE", "positive_prompts": ["x"]}]},
     RecipeError, "no MoE architecture"),
    ({"architecture": "qwen3"}, RecipeError, "qwen3_moe takes qwen3 models"),
    ({"architecture": "switch"}, RecipeError, "none of mixtral, qwen2_moe, qwen3_moe"),
    ({"gate_mode": "sparse"}, RecipeError, "gate_mode"),
    ({"experts": "wide"}, InputError, "the experts' MLPs must have the base's shapes"),
])
def test_refusals(tmp_path, llama, change, error, match):
    config = mergekit_config(llama)
    if change.get("experts") == "unprompted":
        config["experts"][1]["positive_prompts"] = []
    elif change.get("experts") == "same prompts":
        for expert in config["experts"]:
            expert["positive_prompts"] = ["one"]
    elif change.get("experts") == "wide":
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig(vocab_size=len(vocabulary()[0]), **{**TINY, "intermediate_size": 64})).save_pretrained(
            tmp_path / "wide")
        config["experts"][2]["source_model"] = str(tmp_path / "wide")
    for key, value in change.items():
        if key != "experts":
            config[key] = [{**e, "source_model": str(llama["base"])} for e in value] if key == "shared_experts" else value
    with pytest.raises(error, match=match):
        build(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
