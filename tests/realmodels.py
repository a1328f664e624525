"""Tiny real-architecture checkpoints built with transformers, tokenizers built locally, and the
float64 reference of a Task Arithmetic merge aligned by token string (tests/test_checkpoints_*.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WORDS = 56
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def word_tokenizer():
    """A WordLevel tokenizer of 56 words and 4 special tokens (60 ids), as transformers saves it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(WORDS)}
    vocab.update({s: WORDS + k for k, s in enumerate(SPECIALS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_config(arch: str):
    """(config, model class) of a tiny model of ``arch`` with a 64-row vocabulary."""
    import transformers as tf

    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=64)
    table = {
        "llama": (tf.LlamaConfig(**small), tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig(**small), tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config(**small, tie_word_embeddings=True), tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config(**small, head_dim=16), tf.Qwen3ForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig(**{**small, "intermediate_size": 32}, head_dim=16, moe_intermediate_size=16,
                                        num_experts=4, num_experts_per_tok=2), tf.Qwen3MoeForCausalLM),
        "mixtral": (tf.MixtralConfig(**small, num_local_experts=4, num_experts_per_tok=2), tf.MixtralForCausalLM),
        "gpt2": (tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=57,
                               eos_token_id=58), tf.GPT2LMHeadModel),
        "t5": (tf.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=48, num_layers=2, num_heads=2,
                           decoder_start_token_id=59, pad_token_id=59, eos_token_id=58), tf.T5ForConditionalGeneration),
        "bert": (tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=48, max_position_embeddings=32, pad_token_id=59), tf.BertForMaskedLM),
    }
    return table[arch]


def build_base(folder: Path, arch: str, seed: int = 0, tokenizer: bool = True):
    """A randomly initialised tiny model of ``arch`` (64 rows, 60 tokens: 4 padding rows) saved with
    save_pretrained, with the word tokenizer; returns the model."""
    config, cls = tiny_config(arch)
    torch.manual_seed(seed)
    model = cls(config)
    model.save_pretrained(folder)
    if tokenizer:
        word_tokenizer().save_pretrained(folder)
    return model


def fine_tune(base: Path, folder: Path, arch: str, seed: int, added: list[str] = (), special: bool = True,
              pad_to: int | None = 8, chat_template: str | None = None, scale: float = 0.02):
    """Load ``base``, add tokens (resizing the embeddings, padded to a multiple of ``pad_to``),
    perturb every floating parameter and save model and tokenizer; returns the model."""
    from transformers import AutoTokenizer

    _, cls = tiny_config(arch)
    model = cls.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if added:
        tokenizer.add_tokens(list(added), special_tokens=special)
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=pad_to, mean_resizing=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    if chat_template:
        tokenizer.chat_template = chat_template
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's model.safetensors."""
    return load_file(str(folder / "model.safetensors"))


def save_state(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> None:
    """Overwrite a folder's weights (and config) with ``tensors``."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), {"format": "pt"})
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))


def vocab(folder: Path) -> dict[str, int]:
    """Token string -> id of a folder's tokenizer.json."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab(with_added_tokens=True)


def aligned_reference(base: dict, models: list[dict], weights: list[float], scale: float, vocab_names: dict[str, int],
                      out_vocab: dict[str, int], out_rows: int, base_vocab: dict[str, int],
                      model_vocabs: list[dict[str, int]], pad_source: dict | None = None) -> dict[str, torch.Tensor]:
    """Float64 Task Arithmetic θ₀ + λ Σ_t w_t τ_t with vocabulary rows aligned by token string
    (primerge.core.vocabulary's rule): a base token's row gets τ_t from the models that have it; a token
    the base lacks the |w|-weighted mean of the models that have it; a padding row the tokenizer
    source's row (``pad_source``, default the base) at that index. ``vocab_names`` maps each
    vocabulary tensor to its token axis."""
    out = {}
    for name, theta in base.items():
        if not theta.dtype.is_floating_point:
            out[name] = theta
            continue
        if name not in vocab_names:
            out[name] = theta.double() + scale * sum(w * (m[name].double() - theta.double())
                                                     for m, w in zip(models, weights))
            continue
        axis = vocab_names[name]
        rows = torch.zeros((out_rows, *theta.movedim(axis, 0).shape[1:]), dtype=torch.float64)
        source = (pad_source or base)[name].double().movedim(axis, 0)
        rows[: min(out_rows, source.shape[0])] = source[:out_rows]  # padding rows (tokens overwrite)
        theirs = [m[name].double().movedim(axis, 0) for m in models]
        for token, i in out_vocab.items():
            have = [(w, r[v[token]]) for w, r, v in zip(weights, theirs, model_vocabs) if token in v]
            if token in base_vocab:
                b = theta.double().movedim(axis, 0)[base_vocab[token]]
                rows[i] = b + scale * sum((w * (r - b) for w, r in have), torch.zeros_like(b))
            else:
                rows[i] = sum(abs(w) * r for w, r in have) / sum(abs(w) for w, _ in have)
        out[name] = rows.movedim(0, axis)
    return out


def assert_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float = 2e-6) -> None:
    """Same keys; every floating tensor within ``atol`` of the reference (relative to its scale)."""
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        got = actual[name]
        assert got.shape == value.shape, (name, got.shape, value.shape)
        if not value.dtype.is_floating_point:
            assert torch.equal(got, value), name
            continue
        err = (got.double() - value.double()).abs().max().item()
        assert err <= atol * max(1.0, value.double().abs().max().item()), (name, err)
