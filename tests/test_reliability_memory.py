"""Pre-flight keeps its word (issue 28, class 3): the peak memory of a merge never exceeds the estimate
the plan gives and the merge is refused by, for every method, treatment and input kind.

Each treatment runs in a subprocess (tests/test_reliability_memory.py's ``CHILD``), which merges
each case after a warm-up merge of a tiny model with the same method (so one-time buffers, BLAS and
LAPACK workspaces and lazily imported modules, are part of the baseline, as in the estimate's
baseline: this process's resident memory before the merge), with glibc returning every block
above 64 KiB to the system when it is freed (``MALLOC_MMAP_THRESHOLD_``), so resident memory is
live memory and its high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``) is the
merge's peak. The check, measured peak − resident before ≤ estimate − its baseline, holds on any
x86-64 CPU by the estimate's construction (primerge.engine.memory_model): allocation sizes do not
depend on the vector width, and the table's 25 % and two copies cover LAPACK's and the thread
count's workspaces. The tensors are large (1 MiB a matrix) next to the allocator's and Python's
noise, so a working set underestimated by even one tensor copy fails here.

Not here: ``regmean`` / ``regmean_pp``, which need each task's calibration data (their (a, b) are
their family's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import primerge

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's VmHWM reset")]

WIDTH = 512
T = 4

CHILD = r"""
import json, sys
from pathlib import Path
import torch
import primerge
from primerge.core.plan import build_plan
from primerge.core.recipe import build_recipe
from primerge.engine.preflight import baseline_memory, peak_memory

def vm(field):
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))

results = []
for case in json.loads(sys.argv[1]):
    primerge.merge_recipe(build_recipe(case["warm"]), out=case["warm_out"])
    recipe = build_recipe(case["recipe"])
    plan = build_plan(recipe)
    estimate = peak_memory(plan, in_memory=False)[0] - baseline_memory()
    plan.close()
    Path("/proc/self/clear_refs").write_text("5")
    before = vm("VmRSS")
    primerge.merge_recipe(recipe, out=case["out"])
    results.append({"case": case["name"], "measured": vm("VmHWM") - before, "estimate": estimate})
print(json.dumps(results))
"""


def _save(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))
    return folder


def dense_state(gen: torch.Generator, width: int) -> dict[str, torch.Tensor]:
    """Square matrices (the widest SVD factors per element), a fallback 2-D tensor, vectors."""
    state = {f"layers.{i}.proj.weight": torch.randn(width, width, generator=gen) for i in range(3)}
    state.update({"wpe.weight": torch.randn(2 * width, 64, generator=gen), "norm.weight": torch.randn(width, generator=gen),
                  "layers.0.proj.bias": torch.randn(width, generator=gen)})
    return state


def family(root: Path, base: dict, perturb, store=lambda state: state, config=None) -> dict:
    """A base and T fine-tunes of it, stored by ``store``; paths for a recipe."""
    gen = torch.Generator().manual_seed(1)
    _save(root / "base", store(base), config)
    models = [_save(root / f"m{t}", store(perturb(base, gen)), config) for t in range(T)]
    return {"base": str(root / "base"), "models": [str(m) for m in models]}


def noisy(base, gen):
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}


def clustered(base, gen):
    """Every |τ| within 10^-4 of 1: one histogram bin of TIES's model-wide pre-pass holds the model."""
    return {k: v + (1 + 1e-4 * torch.rand(v.shape, generator=gen)) * torch.randn(v.shape, generator=gen).sign()
            for k, v in base.items()}


def quantize_fp8(state: dict, block: int = 128) -> dict:
    out = {}
    for name, w in state.items():
        if w.dim() != 2 or not name.startswith("layers."):
            out[name] = w.to(torch.bfloat16)
            continue
        m, n = w.shape
        blocks = w.reshape(m // block, block, n // block, block)
        scale = blocks.abs().amax(dim=(1, 3)) / 448
        q = (blocks / scale[:, None, :, None]).reshape(m, n).to(torch.float8_e4m3fn)
        out[name], out[name + "_scale_inv"] = q, scale
    return out


def vocabulary_family(root: Path) -> dict:
    """A base of 2000 tokens and fine-tunes adding 100 tokens each (rows 2100): tokenizer: union
    aligns every vocabulary tensor's rows by token string."""
    from tokenizers import Tokenizer, models

    gen = torch.Generator().manual_seed(2)
    base = {"model.embed_tokens.weight": torch.randn(2000, 256, generator=gen),
            "lm_head.weight": torch.randn(2000, 256, generator=gen),
            "layers.0.proj.weight": torch.randn(256, 256, generator=gen)}
    _save(root / "base", base)
    Tokenizer(models.WordLevel({f"t{i}": i for i in range(2000)}, unk_token="t0")).save(str(root / "base" / "tokenizer.json"))
    paths = []
    for t in range(T):
        state = noisy(base, gen)
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            state[name] = torch.cat([state[name], torch.randn(100, 256, generator=gen)])
        folder = _save(root / f"m{t}", state)
        vocab = {f"t{i}": i for i in range(2000)} | {f"new{t}_{i}": 2000 + i for i in range(100)}
        Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
        paths.append(str(folder))
    return {"base": str(root / "base"), "models": paths, "tokenizer": "union"}


def lora_family(root: Path) -> dict:
    gen = torch.Generator().manual_seed(3)
    base = dense_state(gen, WIDTH)
    _save(root / "base", base)
    paths = []
    for t in range(T):
        folder = root / f"lora{t}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
        save_file({f"base_model.model.layers.{i}.proj.{part}.weight": torch.randn(shape, generator=gen) * 0.1
                   for i in range(3) for part, shape in (("lora_A", (8, WIDTH)), ("lora_B", (WIDTH, 8)))},
                  str(folder / "adapter_model.safetensors"))
        paths.append(str(folder))
    return {"base": str(root / "base"), "models": paths}


ALL = [s.name for s in primerge.list_methods() if s.name not in ("regmean", "regmean_pp")]
SOME = ["task_arithmetic", "ties", "prime", "tsv"]


def treatments(root: Path) -> dict[str, tuple[dict, list[tuple[str, dict]]]]:
    """Treatment -> (recipe fields of its inputs, [(method, parameters)])."""
    gen = torch.Generator().manual_seed(0)
    dense = dense_state(gen, WIDTH)
    experts = {"mlp.experts.weight": torch.randn(4, 256, 256, generator=gen), "norm.weight": torch.randn(256, generator=gen)}
    conv = {"conv.weight": torch.randn(256, 128, 3, 3, generator=gen), "conv.bias": torch.randn(256, generator=gen)}
    fp8_config = {"model_type": "toy", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    return {
        "matrix and fallback, every method": (family(root / "dense", dense, noisy), [(m, {}) for m in ALL]),
        "experts": (family(root / "experts", experts, noisy), [(m, {}) for m in SOME]),
        "reshaped": ({**family(root / "conv", conv, noisy), "matrices": {"conv": "flatten"}}, [(m, {}) for m in SOME]),
        "bfloat16 inputs": (family(root / "bf16", dense, noisy, lambda s: {k: v.to(torch.bfloat16) for k, v in s.items()}),
                            [(m, {}) for m in SOME]),
        "FP8 inputs": ({**family(root / "fp8", dense, noisy, quantize_fp8, fp8_config), "output": {"dtype": "bfloat16"}},
                       [(m, {}) for m in SOME]),
        "vocabulary-aligned": (vocabulary_family(root / "vocab"), [(m, {}) for m in SOME]),
        "LoRA adapters": (lora_family(root / "lora"), [(m, {}) for m in SOME]),
        "TIES model-wide trim, clustered magnitudes": (family(root / "clustered", dense, clustered),
                                                       [("ties", {"trim_scope": "model"})]),
    }


def _cases(fields: dict, methods: list[tuple[str, dict]], warm: dict, out: Path) -> list[dict]:
    cases = []
    for method, params in methods:
        models = fields["models"][:{"slerp": 1, "nearswap": 1, "arcee_fusion": 1, "nuslerp": 2}.get(method, T)]
        params = {**params, **({"steps": 5} if method == "wudi" else {})}
        recipe = {**fields, "models": models, "method": method, "parameters": params}
        tiny = {**recipe, "base": warm["base"], "models": warm["models"][:len(models)]}
        tiny = {k: v for k, v in tiny.items() if k not in ("tokenizer", "matrices", "output")}
        cases.append({"name": method, "recipe": recipe, "warm": tiny, "out": str(out / method),
                      "warm_out": str(out / f"warm-{method}")})
    return cases


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    warm = family(root / "tiny", dense_state(torch.Generator().manual_seed(9), 16), noisy)
    return root, warm, treatments(root)


TREATMENTS = ["matrix and fallback, every method", "experts", "reshaped", "bfloat16 inputs", "FP8 inputs",
              "vocabulary-aligned", "LoRA adapters", "TIES model-wide trim, clustered magnitudes"]


@pytest.mark.parametrize("treatment", TREATMENTS)
def test_the_measured_peak_is_within_the_estimate(inputs, tmp_path, treatment):
    root, warm, table = inputs
    fields, methods = table[treatment]
    cases = _cases(fields, methods, warm, tmp_path)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cases)], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    over = []
    for result in json.loads(done.stdout.strip().splitlines()[-1]):
        if result["measured"] > result["estimate"]:
            over.append(f"{result['case']}: measured {result['measured'] / 2**20:.1f} MiB > estimate "
                        f"{result['estimate'] / 2**20:.1f} MiB")
    assert not over, f"{treatment}: " + "; ".join(over)
