"""Golden merges: a seeded zoo built without transformers or peft (so its bytes depend only on
torch), and the merges whose output hashes ``hashes.json`` records.

Every case runs one merge (every method; full, sharded, bf16, LoRA and mixed inputs; full,
sharded, per-task, LoRA and in-memory outputs; LiNeS, PAVE purification, PRIME rank: auto) and
returns ``{relative file or tensor key: SHA-256}``. Text files have the zoo's root path replaced
by ``<ROOT>`` so hashes do not depend on where the zoo was built. The model card and the manifest
are left out: they record versions and paths, and the manifest re-lists the other files' hashes.

Record new hashes (only when an output is meant to change, and say so in the commit):
``python -m tests.golden.record``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

import primerge
from primerge.io.manifest import tensor_record

HIDDEN, INNER, KV, VOCAB, LAYERS = 16, 24, 8, 40, 2
FP32, BF16 = torch.float32, torch.bfloat16


def _shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV, HIDDEN),
            p + "self_attn.v_proj.weight": (KV, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.o_proj.bias": (HIDDEN,), p + "attn.qkv.weight": (3 * KV, KV),
            p + "mlp.gate_proj.weight": (INNER, HIDDEN), p + "mlp.up_proj.weight": (INNER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INNER), p + "input_layernorm.weight": (HIDDEN,),
        })
    shapes.update({"model.norm.weight": (HIDDEN,), "lm_head.weight": (VOCAB, HIDDEN)})
    return shapes


def _save(folder: Path, state: dict[str, torch.Tensor], dtype: torch.dtype, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.dtype.is_floating_point else v).contiguous() for k, v in state.items()}
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 16}\n')
    if shards == 1:
        save_file(state, str(folder / "model.safetensors"), {"format": "pt"})
        return folder
    names = list(state)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k] for k in part}, str(folder / file), {"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _adapter(folder: Path, base: dict[str, torch.Tensor], gen: torch.Generator, rank: int) -> Path:
    """A PEFT LoRA adapter folder (the format peft saves) on q/v projections and the MLP."""
    folder.mkdir(parents=True)
    targets = ["q_proj", "v_proj", "down_proj"]
    tensors = {}
    for name, w in base.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
            m, n = w.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = 0.3 * torch.randn(rank, n, generator=gen)
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.3 * torch.randn(m, rank, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"), {"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
              "bias": "none", "use_rslora": False, "fan_in_fan_out": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def build_zoo(root: Path) -> dict[str, Path]:
    """base (fp32), t0..t2 (fp32, with a per-task ``score`` head), s0..s2 (sharded), b0..b2 (bf16
    fine-tunes of a bf16 base ``base16``), lora0, lora1 (adapters of the base)."""
    gen = torch.Generator().manual_seed(2024)
    base = {n: torch.randn(s, generator=gen) * 0.5 for n, s in _shapes().items()}
    base["model.position_ids"] = torch.arange(VOCAB, dtype=torch.int64)
    paths = {"base": _save(root / "base", base, FP32), "base16": _save(root / "base16", base, BF16)}
    for t in range(3):
        state = {}
        for name, w in base.items():
            if not w.dtype.is_floating_point:
                state[name] = w.clone()
            elif w.dim() == 2:
                m, n = w.shape
                low = torch.randn(m, 2, generator=gen) @ torch.randn(2, n, generator=gen)
                state[name] = w + 0.05 * low + 0.01 * torch.randn(m, n, generator=gen)
            else:
                state[name] = w + 0.02 * torch.randn(w.shape, generator=gen)
        paths[f"s{t}"] = _save(root / f"s{t}", state, FP32, shards=2)
        paths[f"b{t}"] = _save(root / f"b{t}", state, BF16)
        state["score.weight"] = torch.randn(t + 2, HIDDEN, generator=gen)
        paths[f"t{t}"] = _save(root / f"t{t}", state, FP32)
    for k in range(2):
        paths[f"lora{k}"] = _adapter(root / f"lora{k}", base, gen, rank=2 + k)
    return paths


def _digest(path: Path, root: Path) -> str:
    data = path.read_bytes()
    if path.suffix in (".json", ".yaml", ".md"):
        data = data.replace(str(root).encode(), b"<ROOT>")
    return hashlib.sha256(data).hexdigest()


def folder_hashes(folder: Path, root: Path) -> dict[str, str]:
    """SHA-256 of every output file but the card and the manifest."""
    return {str(p.relative_to(folder)): _digest(p, root) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("README.md", "primerge-manifest.json")}


def memory_hashes(result) -> dict[str, str]:
    """SHA-256 of every tensor an in-memory merge returns (merged, task heads, per-task states)."""
    out = {f"state/{k}": tensor_record(v)["sha256"] for k, v in result.state_dict.items()}
    for label, tensors in (result.task_tensors or {}).items():
        out.update({f"heads/{label}/{k}": tensor_record(v)["sha256"] for k, v in tensors.items()})
    for label, tensors in (result.task_states or {}).items():
        out.update({f"tasks/{label}/{k}": tensor_record(v)["sha256"] for k, v in tensors.items()})
    return out


METHODS = ["task_arithmetic", "ties", "tsv", "prime", "dare", "della", "breadcrumbs", "consensus", "iso_c",
           "iso_cts", "subspace_boosting", "drm", "emr", "ho_subspace_boosting"]
FULL = ["t0", "t1", "t2"]
HEAD = r"^score\."


def _case(models: list[str | tuple[str, float]], method: str, base: str = "base", memory: bool = False, shard_size: int | None = None,
          lora_rank: int | None = None, **kw) -> Callable[[dict[str, Path], Path], dict[str, str]]:
    def run(zoo: dict[str, Path], out: Path) -> dict[str, str]:
        args = dict(kw)
        entries = [{"path": zoo[m[0]], "weight": m[1]} if isinstance(m, tuple) else zoo[m] for m in models]
        if any((m[0] if isinstance(m, tuple) else m).startswith("t") for m in models):
            args.setdefault("task_specific", HEAD)
        if memory:
            return memory_hashes(primerge.merge(zoo[base], entries, method, **args))
        if shard_size is not None:
            args["shard_size"] = shard_size
        if lora_rank is not None:
            args["lora_rank"] = lora_rank
        primerge.merge(zoo[base], entries, method, out=out, **args)
        return folder_hashes(out, zoo["base"].parent)
    return run


CASES: dict[str, Callable[[dict[str, Path], Path], dict[str, str]]] = {
    **{f"full/{m}": _case(FULL, m) for m in METHODS},
    **{f"memory/{m}": _case(FULL, m, memory=True) for m in METHODS},
    "full/prime-auto": _case(FULL, "prime", rank="auto"),
    "full/prime-ties-residual": _case(FULL, "prime", residual="ties"),
    "full/prime-s_sb": _case(FULL, "prime", residual="s_sb"),
    "full/ties-model-trim": _case(FULL, "ties", trim_scope="model"),
    "full/dare-ties": _case(FULL, "dare", combine="ties"),
    "full/sb-ties-base": _case(FULL, "subspace_boosting", base_merge="ties"),
    "full/tsv-exact": _case(FULL, "tsv", svd="exact"),
    "full/lines-prime": _case(FULL, "prime", lines={"alpha": 0.5, "beta": 0.5}),
    "full/lines-ties": _case(FULL, "ties", lines={"alpha": 0.4, "beta": 0.8}),
    "full/purify-prime": _case(FULL, "prime", purify={"method": "svd", "rank_ratio": 0.75}),
    "full/purify-ta": _case(FULL, "task_arithmetic", purify={"method": "svd", "rank_ratio": 0.5,
                                                             "allocation": "uniform"}),
    "full/weights": _case([("t0", 0.7), ("t1", 1.3)], "ties"),
    "full/weights-prime": _case([("t0", 0.7), ("t1", 1.3), "t2"], "prime"),
    "sharded-out/prime": _case(FULL, "prime", shard_size=4000),
    "sharded-out/emr": _case(FULL, "emr", shard_size=4000),
    "sharded-in/tsv": _case(["s0", "s1", "s2"], "tsv"),
    "sharded-in/ta": _case(["s0", "s1", "s2"], "task_arithmetic"),
    "bf16/prime": _case(["b0", "b1", "b2"], "prime", base="base16"),
    "bf16/ties": _case(["b0", "b1", "b2"], "ties", base="base16"),
    "bf16/iso_cts": _case(["b0", "b1", "b2"], "iso_cts", base="base16"),
    "lora-out/prime": _case(FULL, "prime", lora_rank=3),
    "lora-out/ta-lora-in": _case(["lora0", "lora1"], "task_arithmetic", lora_rank=4),
    **{f"lora-in/{m}": _case(["lora0", "lora1"], m) for m in ("task_arithmetic", "tsv", "prime", "iso_c",
                                                              "subspace_boosting", "ties", "drm", "emr")},
    "lora-in/memory-prime": _case(["lora0", "lora1"], "prime", memory=True),
    **{f"mixed/{m}": _case(["lora0", "s1", "t2"], m) for m in ("task_arithmetic", "tsv", "prime", "iso_c", "ties")},
}
