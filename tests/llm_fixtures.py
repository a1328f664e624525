"""Tiny real causal LMs for the LLM-suite tests: a LLaMA GGUF written with the gguf writer, and a
random LlamaForCausalLM folder with a byte-level BPE tokenizer (tokenizers library)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TINY_LLAMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "o n", "e r", "Ġ p", "Ġ n", "o s", "i t", "Ġp os", "Ġpos it", "Ġn e"]


def vocabulary() -> tuple[list[str], list[str]]:
    """Special tokens, the 256 byte-level symbols, then one token per merge (GPT-2 style BPE)."""
    from tokenizers.pre_tokenizers import ByteLevel

    merged = [m.replace(" ", "") for m in MERGES]
    return SPECIALS + sorted(ByteLevel.alphabet()) + merged, list(MERGES)


def byte_level_tokenizer():
    """A transformers fast tokenizer with :func:`vocabulary`'s BPE (no BOS added, pad = eos)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, merges = vocabulary()
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges])
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=SPECIALS[1], eos_token=SPECIALS[2],
                                   unk_token=SPECIALS[0], pad_token=SPECIALS[2])


def tiny_llama(seed: int = 0, vocab_size: int | None = None, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size or len(vocabulary()[0]), tie_word_embeddings=tie,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, **TINY_LLAMA)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the default init, so outputs differ between inputs
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    model = tiny_llama(seed)
    model.save_pretrained(folder)
    byte_level_tokenizer().save_pretrained(folder)
    return folder


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of Q/K rows for its rotary layout (the GGUF convention)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's tensors under GGUF names, Q and K permuted as llama.cpp writes them."""
    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        for gguf_name, hf_name in names.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                w = llama_cpp_permute(w, cfg.num_attention_heads)
            elif gguf_name == "attn_k":
                w = llama_cpp_permute(w, cfg.num_key_value_heads)
            out[f"blk.{i}.{gguf_name}.weight"] = w
    return out


def write_llama_gguf(path: Path, model, quantize: dict[str, object] | None = None) -> Path:
    """Write ``model`` (a LlamaForCausalLM) and :func:`vocabulary` as a GGUF file with the gguf writer.

    ``quantize`` maps GGUF tensor names to a GGMLQuantizationType: the tensor is quantized with the
    gguf package, or (for a type it cannot quantize) written as that many zero bytes of that type."""
    import gguf

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    tokens, merges = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    for name, array in gguf_tensors(model).items():
        qtype = (quantize or {}).get(name)
        if qtype is None:
            writer.add_tensor(name, array)
            continue
        try:
            writer.add_tensor(name, gguf.quantize(array, qtype), raw_dtype=qtype)
        except NotImplementedError:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((array.shape[0], array.shape[1] // block * size), dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
