"""Vocabulary alignment and tied embeddings on tiny real transformers models (primerge.core.vocabulary,
primerge.core.tensor_names): fine-tunes that added tokens (special and not, embeddings padded to a multiple of
8), merged with tokenizer: base | union | MODEL, every output reloaded with transformers and
checked row by row against a float64 reference of the same rule (tests/realmodels.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import primerge
from primerge.util.errors import InputError, RecipeError
from primerge.core.recipe import build_recipe

from realmodels import aligned_reference, assert_close, build_base, fine_tune, save_state, state, vocab

transformers = pytest.importorskip("transformers")

CHAT = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
LM_VOCAB = {"model.embed_tokens.weight": 0, "lm_head.weight": 0}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama base (60 tokens, 64 rows), 'chat' (+2 special tokens, same 64 rows), 'tools' (+5
    tokens, one shared with chat, one not special: 65 tokens padded to 72 rows, its own chat
    template and eos), 'plain' (the base's tokenizer)."""
    root = tmp_path_factory.mktemp("llama")
    build_base(root / "base", "llama")
    fine_tune(root / "base", root / "chat", "llama", 1, ["<|im_start|>", "<|im_end|>"])
    fine_tune(root / "base", root / "tools", "llama", 2, ["<|im_end|>", "<tool>", "</tool>", "<call>"],
              chat_template=CHAT)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "tools")
    tok.add_tokens(["newword"])  # not special
    tok.save_pretrained(root / "tools")
    _, cls = __import__("realmodels").tiny_config("llama")
    model = cls.from_pretrained(root / "tools")
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=8, mean_resizing=False)
    model.config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.save_pretrained(root / "tools")
    fine_tune(root / "base", root / "plain", "llama", 3)
    return root


def _merge(root, models, tokenizer, out, method="task_arithmetic", weights=None, **extra):
    entries = [{"path": str(root / m), "weight": w} for m, w in zip(models, weights or [1.0] * len(models))]
    recipe = build_recipe({"base": str(root / "base"), "models": entries, "method": method,
                           "tokenizer": tokenizer, **extra})
    return primerge.merge_recipe(recipe, out=out)


def _reference(root, models, weights, scale, out, pad_source=None, names=LM_VOCAB):
    return aligned_reference(state(root / "base"), [state(root / m) for m in models], weights, scale, names,
                             vocab(out), state(out)[next(iter(names))].shape[0], vocab(root / "base"),
                             [vocab(root / m) for m in models], state(root / pad_source) if pad_source else None)


def test_union_aligns_rows_by_token_string(llama, tmp_path):
    models, weights = ["chat", "tools", "plain"], [1.0, 0.5, 1.0]
    out = tmp_path / "union"
    result = _merge(llama, models, "union", out, weights=weights, parameters={"scale": 0.4})
    assert result.counts["vocab_aligned"] == 2
    tokens = vocab(out)
    # base ids kept; new tokens appended in recipe order, each model's in id order, once
    assert {t: tokens[t] for t in vocab(llama / "base")} == vocab(llama / "base")
    new = ["<|im_start|>", "<|im_end|>", "<tool>", "</tool>", "<call>", "newword"]
    assert [tokens[t] for t in new] == list(range(60, 66))
    expected = _reference(llama, models, weights, 0.4, out)
    assert_close(state(out), expected)
    assert state(out)["model.embed_tokens.weight"].shape == (66, 32)  # max(64 base rows, 66 tokens)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 66
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert_close({k: v for k, v in model.state_dict().items()}, expected)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == 66
    assert tok("w3 <|im_start|> <tool> newword")["input_ids"] == [3, 60, 62, 65]
    assert tok.added_tokens_decoder[60].special and not tok.added_tokens_decoder[65].special
    assert tok.chat_template == CHAT  # the base has none: the first model's that has one


def test_an_aligned_plan_travels_to_a_worker(llama):
    """The plan of an aligned merge pickles (as the Ray backend sends it) and merges the same there."""
    import pickle

    from primerge.engine.stream import merge_tensor
    from primerge.core.plan import build_plan

    recipe = build_recipe({"base": llama / "base", "models": [llama / "chat", llama / "tools"], "tokenizer": "union",
                           "method": "ties"})
    plan = build_plan(recipe)
    copy = pickle.loads(pickle.dumps(plan))
    for entry in plan.entries[:1] + plan.entries[-1:]:
        assert torch.equal(merge_tensor(plan, entry, torch.device("cpu")).value,
                           merge_tensor(copy, entry, torch.device("cpu")).value)


def test_a_new_row_is_the_weighted_mean_whatever_the_method(llama, tmp_path):
    """Rows the base lacks have zero task vectors, so every method leaves them at the |w|-weighted mean."""
    models, weights = ["chat", "tools"], [1.0, -0.5]
    means = {}
    for method in ("ties", "tsv", "prime", "dare"):
        out = tmp_path / method
        _merge(llama, models, "union", out, method=method, weights=weights,
               matrices={"lm_head": "matrix", "embed": "matrix"})
        merged = state(out)
        tokens, chat, tools = vocab(out), state(llama / "chat"), state(llama / "tools")
        for name in LM_VOCAB:
            both = (vocab(llama / "chat")["<|im_end|>"], vocab(llama / "tools")["<|im_end|>"])
            mean = (chat[name][both[0]].double() + 0.5 * tools[name][both[1]].double()) / 1.5
            assert torch.allclose(merged[name][tokens["<|im_end|>"]].double(), mean, atol=1e-6)
            only = merged[name][tokens["<call>"]]
            assert torch.equal(only, tools[name][vocab(llama / "tools")["<call>"]])
            means[method, name] = merged[name][60:]
    assert all(torch.equal(means["ties", n], means[m, n]) for m in ("tsv", "prime", "dare") for n in LM_VOCAB)


def test_tokenizer_model_takes_that_models_vocabulary_and_files(llama, tmp_path):
    models, weights = ["chat", "tools"], [1.0, 1.0]
    out = tmp_path / "tools_tok"
    _merge(llama, models, "tools", out, weights=weights, parameters={"scale": 0.5})
    assert vocab(out) == vocab(llama / "tools")
    assert (out / "tokenizer.json").read_bytes() == (llama / "tools" / "tokenizer.json").read_bytes()
    assert (out / "chat_template.jinja").read_text() == CHAT
    config = json.loads((out / "config.json").read_text())
    tools_config = json.loads((llama / "tools" / "config.json").read_text())
    assert config["vocab_size"] == 72 and config["eos_token_id"] == tools_config["eos_token_id"]
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tools_config["eos_token_id"]
    expected = _reference(llama, models, weights, 0.5, out, pad_source="tools")
    assert_close(state(out), expected)  # <|im_start|> (chat only) is not in the output; padding is tools'
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.model.embed_tokens.weight.shape == (72, 32)


def test_tokenizer_base_keeps_the_base_rows(llama, tmp_path):
    out = tmp_path / "base_tok"
    result = _merge(llama, ["chat", "tools", "plain"], "base", out, parameters={"scale": 0.3})
    assert result.counts["vocab_aligned"] == 2 and vocab(out) == vocab(llama / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out / name).read_bytes() == (llama / "base" / name).read_bytes()
    expected = _reference(llama, ["chat", "tools", "plain"], [1.0] * 3, 0.3, out)
    assert_close(state(out), expected)
    transformers.AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("arch, names, loader", [
    ("gpt2", {"transformer.wte.weight": 0}, "AutoModelForCausalLM"),
    ("t5", {"shared.weight": 0}, "AutoModelForSeq2SeqLM"),
    ("bert", {"bert.embeddings.word_embeddings.weight": 0, "cls.predictions.bias": 0}, "AutoModelForMaskedLM"),
    ("qwen3", {"model.embed_tokens.weight": 0, "lm_head.weight": 0}, "AutoModelForCausalLM"),
    ("mistral", {"model.embed_tokens.weight": 0, "lm_head.weight": 0}, "AutoModelForCausalLM"),
])
def test_union_on_other_architectures(arch, names, loader, tmp_path):
    """GPT-2 (tied wte, Conv1D), T5 (the PRIME paper's encoder-decoder, shared embedding), BERT (MLM
    bias per token), Qwen3 and Mistral: a fine-tune with added tokens and one without, merged with union."""
    root = tmp_path / arch
    build_base(root / "base", arch)
    fine_tune(root / "base", root / "added", arch, 1, ["<extra_a>", "<extra_b>", "<extra_c>"])
    fine_tune(root / "base", root / "other", arch, 2)
    out = tmp_path / "out"
    result = _merge(root, ["added", "other"], "union", out, weights=[1.0, 0.5], parameters={"scale": 0.7})
    assert result.counts["vocab_aligned"] == len(names)
    expected = _reference(root, ["added", "other"], [1.0, 0.5], 0.7, out, names=names)
    assert_close(state(out), expected)
    model = getattr(transformers, loader).from_pretrained(out)
    loaded = model.state_dict()
    for name in names:
        assert torch.allclose(loaded[name].double(), expected[name], atol=2e-6)
    assert len(vocab(out)) == 63 and model.get_input_embeddings().weight.shape[0] == 64  # base padding rows kept


def test_resized_vocabulary_without_tokenizers_is_refused_with_the_fix(llama, tmp_path):
    copy = tmp_path / "tools_no_tok"
    shutil.copytree(llama / "tools", copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(InputError, match=r"shape \[72, 32\].*\[64, 32\].*tokenizer.json.*tokenizer: base \| union"):
        primerge.merge(llama / "base", [llama / "chat", copy], "task_arithmetic")
    union = tmp_path / "base_no_tok"
    shutil.copytree(llama / "base", union)
    (union / "tokenizer.json").unlink()
    with pytest.raises(InputError, match="tokenizer: union needs the base's tokenizer.json"):
        primerge.merge_recipe(build_recipe({"base": union, "models": [llama / "chat"], "tokenizer": "union"}))
    with pytest.raises(RecipeError, match="tokenizer 'tool' is not base, union or a model's name"):
        build_recipe({"base": union, "models": [llama / "tools"], "tokenizer": "tool"})
    with pytest.raises(RecipeError, match="changes the vocabulary rows"):
        primerge.merge_recipe(build_recipe({"base": llama / "base", "models": [llama / "tools"], "tokenizer": "union",
                                            "output": {"lora_rank": 2}}), out=tmp_path / "lora")
    assert not (tmp_path / "lora").exists()


# ------------------------------------------------------------------------------- tied embeddings


def test_tied_heads_saved_with_and_without_merge_the_same(tmp_path):
    """Qwen2 with tie_word_embeddings: the base saved as transformers does (no lm_head), one fine-tune
    saved with a duplicate lm_head, one without: the output stores no head and reloads tied."""
    root = tmp_path / "qwen2"
    build_base(root / "base", "qwen2")
    fine_tune(root / "base", root / "with_head", "qwen2", 1)
    fine_tune(root / "base", root / "without", "qwen2", 2)
    tensors = state(root / "with_head")
    save_state(root / "with_head", {**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()})
    out = tmp_path / "out"
    primerge.merge(root / "base", [root / "with_head", root / "without"], "task_arithmetic", out=out, scale=0.5)
    merged = state(out)
    assert "lm_head.weight" not in merged
    expected = aligned_reference(state(root / "base"), [tensors, state(root / "without")], [1.0, 1.0], 0.5, {},
                                 {}, 0, {}, [])
    assert_close(merged, expected)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.allclose(model.lm_head.weight.double(), expected["model.embed_tokens.weight"], atol=2e-6)


def test_a_head_the_model_does_not_store_is_its_embedding(tmp_path):
    """A base that stores lm_head (saved untied) and a fine-tune saved tied (no lm_head): the model's
    head task vector is its embedding minus the base's head."""
    root = tmp_path / "qwen2"
    build_base(root / "base", "qwen2")
    fine_tune(root / "base", root / "ft", "qwen2", 1)
    base = state(root / "base")
    save_state(root / "base", {**base, "lm_head.weight": base["model.embed_tokens.weight"].clone()})
    out = tmp_path / "out"
    primerge.merge(root / "base", [root / "ft"], "task_arithmetic", out=out, scale=0.5)
    merged, ft = state(out), state(root / "ft")
    head = base["model.embed_tokens.weight"].double()
    assert torch.allclose(merged["lm_head.weight"].double(),
                          head + 0.5 * (ft["model.embed_tokens.weight"].double() - head), atol=2e-6)
    assert torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"])


def test_an_untied_head_on_a_tied_base_is_refused_with_the_fix(tmp_path):
    root = tmp_path / "qwen2"
    build_base(root / "base", "qwen2")
    fine_tune(root / "base", root / "ft", "qwen2", 1)
    tensors = state(root / "ft")
    save_state(root / "ft", {**tensors, "lm_head.weight": torch.randn_like(tensors["model.embed_tokens.weight"])})
    with pytest.raises(InputError, match=r"tensor 'lm_head.weight' differs from the input embedding.*"
                                         r"untie the base"):
        primerge.merge(root / "base", [root / "ft"], "task_arithmetic")
