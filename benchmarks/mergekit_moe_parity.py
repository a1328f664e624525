"""Parity with mergekit-moe: the same mixtures of experts built by mergekit-moe 0.1.5 and by
primerge, from one mergekit-moe configuration, compared tensor by tensor.

    python benchmarks/mergekit_moe_parity.py /tmp/mk-venv/bin/mergekit-moe [--work DIR] [--only NAME ...]

mergekit is never imported: it runs as its own ``mergekit-moe`` executable (a separate virtualenv,
e.g. ``python -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install torch==2.13.0 &&
/tmp/mk-venv/bin/pip install mergekit==0.1.5``), so it is no dependency of primerge or its tests.

The zoos are built here: for Llama, Qwen2 and Qwen3, a tiny base (transformers' initialisation,
float32) with a byte-level tokenizer, and three fine-tunes (every tensor + 0.02·N(0, 1)). Each case
is one mergekit-moe configuration, run by ``mergekit-moe`` and by ``primerge moe`` on the same file.
mergekit-moe 0.1.5 writes the experts fused (``mlp.experts.gate_up_proj``), primerge per expert as
transformers saves them; both are loaded with transformers (``AutoModelForCausalLM``) and the
models' state dicts compared: max over tensors of max|θ_primerge − θ_mergekit| / max|θ_mergekit|
(target ≤ 1e-5), and the MoE keys of the two configs. The deterministic gate modes are compared
(``hidden``, ``hidden_avg``, ``cheap_embed``); ``random`` draws from other generators.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from mergekit_parity import relative_difference  # the sibling script (benchmarks/ is on sys.path)
import yaml

from primerge.cli.main import main as primerge_cli

TARGET = 1e-5
EXPERTS = {"code": (["def f(x): return x", "import os"], ["the cat sat"]),
           "math": (["2 + 2 = 4", "solve for x"], []),
           "prose": (["once upon a time", "the cat sat on the mat"], [])}
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
CONFIG_KEYS = ("model_type", "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
               "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "hidden_size",
               "num_hidden_layers", "sliding_window")


def tokenizer():
    """A byte-level BPE tokenizer (the 256 byte symbols, no merges) with BOS/EOS specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    symbols = ["<unk>", "<s>", "</s>", *sorted(ByteLevel.alphabet())]
    backend = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build_zoo(root: Path, family: str) -> None:
    """base/ and the experts' fine-tunes under ``root``."""
    import transformers
    from transformers.utils import logging

    logging.disable_progress_bar()
    config_class, model_class = (getattr(transformers, n) for n in FAMILIES[family])
    torch.manual_seed(0)
    vocab = tokenizer()
    config = config_class(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                          bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, dtype="float32")
    model = model_class(config)
    model.save_pretrained(root / "base")
    vocab.save_pretrained(root / "base")
    generator = torch.Generator().manual_seed(1)
    for name in EXPERTS:
        tuned = model_class.from_pretrained(root / "base")
        with torch.no_grad():
            for p in tuned.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=generator))
        tuned.save_pretrained(root / name)


def moe_config(zoo: Path, **fields: Any) -> dict[str, Any]:
    experts = [{"source_model": str(zoo / name), "positive_prompts": positive,
                **({"negative_prompts": negative} if negative else {})} for name, (positive, negative) in EXPERTS.items()]
    return {"base_model": str(zoo / "base"), "gate_mode": "hidden", "experts_per_token": 2, "experts": experts, **fields}


def cases(zoos: dict[str, Path]) -> list[tuple[str, dict[str, Any]]]:
    """(label, mergekit-moe configuration) of every compared build."""
    llama = zoos["llama"]
    shared = [{"source_model": str(zoos["qwen2"] / "base"), "positive_prompts": ["hello there", "general text"]}]
    scaled = moe_config(llama)
    scaled["experts"][2]["residual_scale"] = 0.5
    return [
        ("mixtral hidden", moe_config(llama)),
        ("mixtral hidden_avg", moe_config(llama, gate_mode="hidden_avg")),
        ("mixtral cheap_embed", moe_config(llama, gate_mode="cheap_embed")),
        ("mixtral residual_scale", scaled),
        ("mixtral 1 per token, bfloat16", moe_config(llama, experts_per_token=1, dtype="bfloat16")),
        ("qwen2_moe shared expert", moe_config(zoos["qwen2"], shared_experts=shared)),
        ("qwen2_moe from llama", moe_config(llama, shared_experts=[dict(shared[0], source_model=str(llama / "base"))])),
        ("qwen3_moe hidden", moe_config(zoos["qwen3"])),
        ("qwen3_moe cheap_embed", moe_config(zoos["qwen3"], gate_mode="cheap_embed")),
    ]


def loaded(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The model's state dict as transformers loads it, and its config."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    return model.state_dict(), model.config.to_dict()


def run_case(label: str, config: dict[str, Any], work: Path, mergekit: str) -> tuple[float, str, list[str], float, float]:
    slug = label.replace(" ", "_").replace(",", "")
    file = work / f"{slug}.yml"
    file.write_text(yaml.safe_dump(config, sort_keys=False))
    outputs = {who: work / f"{slug}-{who}" for who in ("mergekit", "primerge")}
    for folder in outputs.values():
        shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run([mergekit, str(file), str(outputs["mergekit"]), "--device", "cpu"], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"mergekit-moe failed on {label}:\n{result.stderr[-3000:]}")
    mergekit_s = time.perf_counter() - start
    start = time.perf_counter()
    if primerge_cli(["moe", str(file), "--out", str(outputs["primerge"]), "--quiet"]) != 0:
        raise SystemExit(f"primerge moe failed on {label}")
    primerge_s = time.perf_counter() - start
    (ours, our_config), (theirs, their_config) = loaded(outputs["primerge"]), loaded(outputs["mergekit"])
    error, where = relative_difference(ours, theirs)
    differing = [f"{k}: {our_config.get(k)} vs {their_config.get(k)}" for k in CONFIG_KEYS
                 if our_config.get(k) != their_config.get(k)]
    return error, where, differing, mergekit_s, primerge_s


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mergekit", help="path of mergekit's mergekit-moe executable")
    parser.add_argument("--work", help="folder for the zoos and the outputs (default: a temporary one)")
    parser.add_argument("--only", nargs="*", help="run only the cases whose label starts with these")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        zoos = {family: work / f"zoo-{family}" for family in FAMILIES}
        for family, zoo in zoos.items():
            if not (zoo / "prose").exists():
                build_zoo(zoo, family)
        selected = [c for c in cases(zoos) if not args.only or any(c[0].startswith(o) for o in args.only)]
        print(f"{'build':<32} {'max rel. diff':>13}  {'worst tensor':<46} {'config':<8} {'mergekit s':>10} "
              f"{'primerge s':>10}")
        failures = 0
        for label, config in selected:
            error, where, differing, mk_s, pm_s = run_case(label, config, work, args.mergekit)
            failures += error > TARGET or bool(differing)
            flag = "" if error <= TARGET else "  > 1e-5"
            print(f"{label:<32} {error:>13.2e}  {where:<46} {'same' if not differing else 'DIFFERS':<8} {mk_s:>10.1f} "
                  f"{pm_s:>10.1f}{flag}", flush=True)
            for line in differing:
                print(f"    config {line}")
        print(f"{len(selected) - failures}/{len(selected)} builds within {TARGET:g} of mergekit-moe 0.1.5, configs equal")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
