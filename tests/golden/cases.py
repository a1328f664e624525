"""Golden merges: a seeded zoo whose bits do not depend on the CPU, and the merges whose outputs
``hashes.json`` (byte identity) and ``reference.safetensors`` (values) record.

The zoo is built from ``torch.randint`` draws (integer arithmetic of the Mersenne twister: the same on
every CPU, unlike ``torch.randn``, whose vectorised Box-Muller differs between ATen's ``default`` and
AVX2 kernels) combined by element-wise products and sums only: each is one correctly rounded IEEE
operation, so every input byte is the same on every x86-64 CPU. No matrix products: their bits depend
on the BLAS kernels.

Every case runs one merge (every method; full, sharded, bf16, LoRA and mixed inputs; full,
sharded, per-task, LoRA and in-memory outputs; LiNeS, PAVE purification, PRIME rank: auto) and
returns its :class:`Output`: the bytes of every file and every tensor. Text files have the zoo's root
path replaced by ``<ROOT>`` so they do not depend on where the zoo was built. The model card and the
manifest are left out: they record versions and paths, and the manifest re-lists the other files'
hashes. Each case declares how its values may move on another CPU (:class:`Tolerance`).

Record new references (only when an output is meant to change, and say so in the commit):
``python -m tests.golden.record``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

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
            tensors[f"base_model.model.{module}.lora_A.weight"] = 0.3 * noise((rank, n), gen)
            tensors[f"base_model.model.{module}.lora_B.weight"] = 0.3 * noise((m, rank), gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"), {"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets,
              "bias": "none", "use_rslora": False, "fan_in_fan_out": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def noise(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Zero-mean noise of unit variance-order: the sum of four uniform draws on the grid k/4096,
    |k| <= 4096 (an Irwin-Hall approximation of a Gaussian). Every value and partial sum is a multiple of
    2^-12 below 4 in magnitude, so exact in float32: the result is the same on every CPU."""
    draws = [torch.randint(-4096, 4097, shape, generator=gen, dtype=torch.int32) for _ in range(4)]
    return (draws[0] + draws[1] + draws[2] + draws[3]).float() / 4096


def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a bᵀ by broadcasting: one correctly rounded product per entry, no BLAS."""
    return a[:, None] * b[None, :]


def build_zoo(root: Path) -> dict[str, Path]:
    """base (fp32), t0..t2 (fp32, with a per-task ``score`` head), s0..s2 (sharded), b0..b2 (bf16
    fine-tunes of a bf16 base ``base16``), lora0, lora1 (adapters of the base). A fine-tune's 2-D task
    vectors are two strong rank-one directions over a weaker dense floor, as real fine-tunes are."""
    gen = torch.Generator().manual_seed(2024)
    base = {n: noise(s, gen) * 0.5 for n, s in _shapes().items()}
    base["model.position_ids"] = torch.arange(VOCAB, dtype=torch.int64)
    paths = {"base": _save(root / "base", base, FP32), "base16": _save(root / "base16", base, BF16)}
    for t in range(3):
        state = {}
        for name, w in base.items():
            if not w.dtype.is_floating_point:
                state[name] = w.clone()
            elif w.dim() == 2:
                m, n = w.shape
                low = outer(noise((m,), gen), noise((n,), gen)) + outer(noise((m,), gen), noise((n,), gen))
                state[name] = w + 0.05 * low + 0.01 * noise((m, n), gen)
            else:
                state[name] = w + 0.02 * noise(tuple(w.shape), gen)
        paths[f"s{t}"] = _save(root / f"s{t}", state, FP32, shards=2)
        paths[f"b{t}"] = _save(root / f"b{t}", state, BF16)
        state["score.weight"] = noise((t + 2, HIDDEN), gen)
        paths[f"t{t}"] = _save(root / f"t{t}", state, FP32)
    for k in range(2):
        paths[f"lora{k}"] = _adapter(root / f"lora{k}", base, gen, rank=2 + k)
    return paths


# --------------------------------------------------------------------------- outputs

#: An output: ``{relative file: bytes}`` for every file, and ``{file:tensor key | state/... : tensor}``
#: for every tensor (files that hold tensors are also listed whole, as bytes).
Output = dict[str, "bytes | torch.Tensor"]


def _file_bytes(path: Path, root: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix in (".json", ".yaml", ".md"):
        data = data.replace(str(root).encode(), b"<ROOT>")
    return data


def folder_output(folder: Path, root: Path) -> Output:
    """Every output file but the card and the manifest, and every tensor of its safetensors files."""
    out: Output = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name in ("README.md", "primerge-manifest.json"):
            continue
        rel = str(path.relative_to(folder))
        out[rel] = _file_bytes(path, root)
        if path.suffix == ".safetensors":
            out.update({f"{rel}:{k}": v for k, v in load_file(str(path)).items()})
    return out


def memory_output(result) -> Output:
    """Every tensor an in-memory merge returns (merged, task heads, per-task states)."""
    out: Output = {f"state/{k}": v for k, v in result.state_dict.items()}
    for label, tensors in (result.task_tensors or {}).items():
        out.update({f"heads/{label}/{k}": v for k, v in tensors.items()})
    for label, tensors in (result.task_states or {}).items():
        out.update({f"tasks/{label}/{k}": v for k, v in tensors.items()})
    return out


def digest(value: "bytes | torch.Tensor") -> str:
    return tensor_record(value)["sha256"] if isinstance(value, torch.Tensor) else hashlib.sha256(value).hexdigest()


def folder_hashes(folder: Path, root: Path) -> dict[str, str]:
    """SHA-256 of every file and tensor of an output folder (:func:`folder_output`)."""
    return {key: digest(value) for key, value in folder_output(folder, root).items()}


def tensor_name(key: str) -> str:
    """The model tensor a key holds: ``model.safetensors:x.weight`` and ``state/x.weight`` -> ``x.weight``."""
    return key.split(":", 1)[1] if ":" in key else key.split("/", 1)[1]


# --------------------------------------------------------------------------- tolerances

#: float32 unit round-off.
U32 = 2.0 ** -24
#: Bound on the relative change of a merged update from float32 round-off taken in another order (other
#: BLAS / LAPACK kernels, other vector widths). A backward-stable float32 SVD or reduction of an m×n
#: matrix (m, n <= 48 here) has backward error below c·n·u·||A|| with c of order 1, about 3e-6·c
#: relative; a truncation at rank k moves the kept part by that divided by the relative gap
#: (σ_k − σ_{k+1})/σ_1 (Wedin's sin Θ theorem). The zoo's task vectors are two strong directions over a
#: floor five times weaker, and the merges chain a handful of such steps, so 1e-3 leaves more than a
#: factor 10 for a relative gap down to 3e-2 and c up to 10; a change of the code moves updates by
#: percents, 20 times more.
ROUNDOFF_BOUND = 1e-3
#: Methods that select entries by comparing values (TIES trim and election, DRM prune, top-k): an entry
#: at the threshold may flip when the values compared move by round-off. On random inputs such ties are
#: rare events; a real change of the selection rule changes most entries, not 2 %.
SELECTION_FRACTION = 0.02


def _storage_ulp(ref: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of the stored dtype at each reference value: two correct roundings
    of reals that differ by round-off may land one ulp apart."""
    return torch.finfo(ref.dtype).eps * ref.double().abs() + torch.finfo(ref.dtype).tiny


@dataclass(frozen=True)
class Tolerance:
    """How a case's tensors may differ from the reference values on a CPU other than the recording one.

    ``exact``: element-wise arithmetic on inputs that are the same everywhere (each IEEE operation is
    correctly rounded, sums over tasks run in one fixed order): no difference at all.
    ``roundoff``: a float32 path with reductions or SVDs: ||Δ||_F <= ROUNDOFF_BOUND·||ref − base||_F
    (relative to the update, where a base tensor of the same shape exists) plus one storage ulp per entry.
    ``selection``: as ``roundoff``, but at most SELECTION_FRACTION of the entries may break that bound
    (entries that flipped at a selection threshold).
    """

    kind: Literal["exact", "roundoff", "selection"]

    def problem(self, key: str, got: torch.Tensor, ref: torch.Tensor, base: torch.Tensor | None) -> str | None:
        """None when ``got`` is within the tolerance of ``ref``, else a line saying by how much it is not."""
        if got.shape != ref.shape or got.dtype != ref.dtype:
            return f"{key}: {got.dtype}{tuple(got.shape)} where the reference is {ref.dtype}{tuple(ref.shape)}"
        if torch.equal(got, ref):
            return None
        if self.kind == "exact" or not got.is_floating_point():
            changed = (got != ref).double().mean().item()
            return f"{key}: {changed:.1%} of entries differ from the reference (tolerance: exact)"
        delta = (got.double() - ref.double())
        update = ref.double() - (base.double() if base is not None and base.shape == ref.shape else 0)
        scale = ROUNDOFF_BOUND * update.norm() / max(update.numel(), 1) ** 0.5
        outside = delta.abs() > _storage_ulp(ref) + scale
        if self.kind == "roundoff":
            allowed = ROUNDOFF_BOUND * update.norm() + _storage_ulp(ref).norm()
            if delta.norm() <= allowed:
                return None
            return (f"{key}: off by {delta.norm() / update.norm().clamp_min(1e-30):.2e} of the update "
                    f"(Frobenius; tolerance {ROUNDOFF_BOUND:g} plus one ulp per entry)")
        fraction = outside.double().mean().item()
        if fraction <= SELECTION_FRACTION:
            return None
        return (f"{key}: {fraction:.2%} of entries off by more than round-off (tolerance: "
                f"{SELECTION_FRACTION:.0%} flipped at selection thresholds)")


EXACT, ROUNDOFF, SELECTION = Tolerance("exact"), Tolerance("roundoff"), Tolerance("selection")


@dataclass(frozen=True)
class Case:
    """One golden merge: ``run(zoo, out)`` gives its :data:`Output`; ``tolerance`` says how its tensors
    may move on another CPU; ``base`` names the zoo model whose tensors updates are measured from."""

    run: Callable[[dict[str, Path], Path], Output]
    tolerance: Tolerance
    base: str = "base"


# Tolerance of each method on dense inputs (Tolerance's docstring says why each class).
TOLERANCE = {"task_arithmetic": EXACT, "ties": EXACT, "dare": EXACT, "della": EXACT, "breadcrumbs": EXACT,
             "consensus": EXACT, "tsv": ROUNDOFF, "prime": ROUNDOFF, "iso_c": ROUNDOFF, "iso_cts": ROUNDOFF,
             "subspace_boosting": ROUNDOFF, "ho_subspace_boosting": ROUNDOFF, "emr": ROUNDOFF, "drm": SELECTION}
#: Methods whose result selects entries by comparing values.
SELECTING = {"ties", "dare", "della", "breadcrumbs", "consensus", "drm"}
#: On LoRA inputs τ = B·A is a matrix product: round-off enters every method, and selections may flip.
LORA_TOLERANCE = {m: SELECTION if m in SELECTING else ROUNDOFF for m in TOLERANCE}


METHODS = ["task_arithmetic", "ties", "tsv", "prime", "dare", "della", "breadcrumbs", "consensus", "iso_c",
           "iso_cts", "subspace_boosting", "drm", "emr", "ho_subspace_boosting"]
FULL = ["t0", "t1", "t2"]
HEAD = r"^score\."


def _case(models: list[str | tuple[str, float]], method: str, tolerance: Tolerance | None = None, base: str = "base",
          memory: bool = False, shard_size: int | None = None, lora_rank: int | None = None, **kw) -> Case:
    def run(zoo: dict[str, Path], out: Path) -> Output:
        args = dict(kw)
        entries = [{"path": zoo[m[0]], "weight": m[1]} if isinstance(m, tuple) else zoo[m] for m in models]
        if any((m[0] if isinstance(m, tuple) else m).startswith("t") for m in models):
            args.setdefault("task_specific", HEAD)
        if memory:
            return memory_output(primerge.merge(zoo[base], entries, method, **args))
        if shard_size is not None:
            args["shard_size"] = shard_size
        if lora_rank is not None:
            args["lora_rank"] = lora_rank
        primerge.merge(zoo[base], entries, method, out=out, **args)
        return folder_output(out, zoo["base"].parent)
    lora_in = any(str(m).startswith("lora") for m in models)
    default = (LORA_TOLERANCE if lora_in else TOLERANCE)[method]
    # a LoRA output is a truncated SVD of the merged update; a LoRA input's B·A is a product
    return Case(run, tolerance or (ROUNDOFF if lora_rank is not None and default is EXACT else default), base)


CASES: dict[str, Case] = {
    **{f"full/{m}": _case(FULL, m) for m in METHODS},
    **{f"memory/{m}": _case(FULL, m, memory=True) for m in METHODS},
    "full/prime-auto": _case(FULL, "prime", rank="auto"),
    "full/prime-ties-residual": _case(FULL, "prime", SELECTION, residual="ties"),
    "full/prime-s_sb": _case(FULL, "prime", residual="s_sb"),
    "full/ties-model-trim": _case(FULL, "ties", trim_scope="model"),
    "full/dare-ties": _case(FULL, "dare", combine="ties"),
    "full/sb-ties-base": _case(FULL, "subspace_boosting", SELECTION, base_merge="ties"),
    "full/tsv-exact": _case(FULL, "tsv", svd="exact"),
    "full/lines-prime": _case(FULL, "prime", lines={"alpha": 0.5, "beta": 0.5}),
    "full/lines-ties": _case(FULL, "ties", lines={"alpha": 0.4, "beta": 0.8}),
    "full/purify-prime": _case(FULL, "prime", purify={"method": "svd", "rank_ratio": 0.75}),
    "full/purify-ta": _case(FULL, "task_arithmetic", ROUNDOFF, purify={"method": "svd", "rank_ratio": 0.5,
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
