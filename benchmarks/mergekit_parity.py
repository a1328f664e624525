"""Parity with mergekit: the same merges by mergekit 0.1.5 and by primerge, compared tensor by tensor.

    python benchmarks/mergekit_parity.py /tmp/mk-venv/bin/mergekit-yaml [--work DIR] [--only NAME ...]

mergekit is never imported: it runs as its own ``mergekit-yaml`` executable (a separate
virtualenv, e.g. ``python -m venv /tmp/mk-venv && /tmp/mk-venv/bin/pip install torch==2.13.0 &&
/tmp/mk-venv/bin/pip install mergekit==0.1.5``), so it is no dependency of primerge or its tests.

The zoo is built here: a tiny Llama (transformers ``LlamaConfig``, random weights, float32) as the
base and three fine-tunes θ_t = θ₀ + τ_t, where τ_t mixes a direction shared by all three with one
of its own (so the models agree and conflict in sign, and their angles are neither 0 nor 90°).
Every deterministic method primerge shares with mergekit is run from a mergekit YAML written here
and from the same merge expressed as a primerge call; mergekit's composite parameters are mapped
with :func:`primerge.methods.mergekit_names.translate`. Both compute in float32 and store float32.

For each merge the printed number is max over tensors of max|θ_primerge − θ_mergekit| / max|θ_mergekit|
(each tensor's error relative to its own scale); the target is ≤ 1e-5. DARE and DELLA draw random
masks (mergekit from torch's global generator, primerge from a seed per tensor), so they appear
only at density 1, where nothing is dropped.
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
import yaml
from safetensors.torch import load_file

import primerge
from primerge.methods.mergekit_names import MERGEKIT_METHODS, translate

TARGET = 1e-5
FINE_TUNES = ("ft1", "ft2", "ft3")


def build_zoo(root: Path, seed: int = 0) -> None:
    """base/ and ft1..ft3/ under ``root``: a tiny Llama and three fine-tunes of it (float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    for p in model.parameters():  # norms start at 1: give them spread, like trained norms
        if p.dim() == 1:
            p.data.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(root / "base")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    shared = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    for name in FINE_TUNES:
        state = {}
        for key, theta in base.items():
            scale = 0.02 * theta.abs().mean()
            state[key] = theta + scale * (0.7 * shared[key] + torch.randn(theta.shape, generator=g))
        model.load_state_dict(state)
        model.save_pretrained(root / name)


#: (label, mergekit config without paths, primerge method, primerge parameters or None to translate)
Case = tuple[str, dict[str, Any], str, dict[str, Any] | None]


def models(weights: dict[str, float] | None = None, names: tuple[str, ...] = FINE_TUNES,
           **per_model: list[float]) -> list[dict[str, Any]]:
    """mergekit's ``models`` list: the fine-tunes named in ``weights`` with those weights, else
    ``names`` without weights; other per-model parameters as lists in that order."""
    names = tuple(weights) if weights else names
    out = []
    for i, name in enumerate(names):
        parameters = {k: v[i] for k, v in per_model.items()}
        if weights:
            parameters["weight"] = weights[name]
        out.append({"model": name, **({"parameters": parameters} if parameters else {})})
    return out


def cases() -> list[Case]:
    """Every compared merge."""
    three = {"ft1": 0.5, "ft2": 0.3, "ft3": 0.7}
    return [
        ("linear", {"merge_method": "linear", "models": models(three)}, "linear", {}),
        ("linear normalize: false", {"merge_method": "linear", "models": models(three),
                                     "parameters": {"normalize": False}}, "linear", {"normalize": False}),
        ("slerp t=0.3", {"merge_method": "slerp", "base_model": "base", "models": models(names=("ft1",)),
                         "parameters": {"t": 0.3}}, "slerp", {"t": 0.3}),
        ("nuslerp", {"merge_method": "nuslerp", "base_model": "base", "models": models({"ft1": 0.4, "ft2": 0.6})},
         "nuslerp", {}),
        ("nuslerp row-wise", {"merge_method": "nuslerp", "base_model": "base",
                              "models": models({"ft1": 0.4, "ft2": 0.6}),
                              "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
         "nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        ("nuslerp no base (rows)", {"merge_method": "nuslerp", "models": models({"ft1": 0.4, "ft2": 0.6}),
                                    "parameters": {"nuslerp_flatten": False}},
         "nuslerp", {"flatten": False, "space": "weights"}),
        ("multislerp", {"merge_method": "multislerp", "base_model": "base", "models": models(three)},
         "multislerp", {}),
        ("multislerp no base", {"merge_method": "multislerp", "models": models(three)},
         "multislerp", {"space": "weights"}),
        ("karcher", {"merge_method": "karcher", "models": models()}, "karcher", {}),
        ("karcher max_iter=30 tol=1e-7", {"merge_method": "karcher", "models": models(),
                                          "parameters": {"max_iter": 30, "tol": 1e-7}},
         "karcher", {"max_iter": 30, "tol": 1e-7}),
        ("model_stock", {"merge_method": "model_stock", "base_model": "base", "models": models()}, "model_stock", {}),
        ("model_stock filter_wise", {"merge_method": "model_stock", "base_model": "base", "models": models(),
                                     "parameters": {"filter_wise": True}}, "model_stock", {"filter_wise": True}),
        ("nearswap t=2e-4", {"merge_method": "nearswap", "base_model": "base", "models": models(names=("ft1",)),
                             "parameters": {"t": 2e-4}}, "nearswap", {"t": 2e-4}),
        ("arcee_fusion", {"merge_method": "arcee_fusion", "base_model": "base", "models": models(names=("ft1",))},
         "arcee_fusion", {}),
        ("sce select_topk=0.4", {"merge_method": "sce", "base_model": "base", "models": models(),
                                 "parameters": {"select_topk": 0.4}},
         "sce", {"select_topk": 0.4, "weight_floor": 1e-6}),
        ("sce", {"merge_method": "sce", "base_model": "base", "models": models()}, "sce", {"weight_floor": 1e-6}),
        ("task_arithmetic lambda=0.8", {"merge_method": "task_arithmetic", "base_model": "base",
                                        "models": models(three), "parameters": {"lambda": 0.8}},
         "task_arithmetic", None),
        ("task_arithmetic normalize", {"merge_method": "task_arithmetic", "base_model": "base",
                                       "models": models(three), "parameters": {"normalize": True}},
         "task_arithmetic", None),
        ("ties", {"merge_method": "ties", "base_model": "base", "models": models(three, density=[0.3, 0.5, 0.7])},
         "ties", None),
        ("ties normalize: false, rescale", {"merge_method": "ties", "base_model": "base",
                                            "models": models(three, density=[0.3, 0.5, 0.7]),
                                            "parameters": {"normalize": False, "rescale": True, "lambda": 0.6}},
         "ties", None),
        ("breadcrumbs", {"merge_method": "breadcrumbs", "base_model": "base",
                         "models": models(three, density=[0.6, 0.8, 0.9], gamma=[0.05, 0.01, 0.02])},
         "breadcrumbs", None),
        ("breadcrumbs_ties", {"merge_method": "breadcrumbs_ties", "base_model": "base",
                              "models": models(three, density=[0.6, 0.8, 0.9], gamma=[0.05, 0.01, 0.02]),
                              "parameters": {"normalize": True}}, "breadcrumbs_ties", None),
        ("dare_ties density=1", {"merge_method": "dare_ties", "base_model": "base", "models": models(three)},
         "dare_ties", None),
        ("della density=1", {"merge_method": "della", "base_model": "base", "models": models(three)}, "della", None),
    ]


def mergekit_config(config: dict[str, Any], zoo: Path) -> dict[str, Any]:
    """``config`` with model names made paths and float32 compute and output."""
    out = dict(config, dtype="float32", out_dtype="float32")
    out["models"] = [dict(m, model=str(zoo / m["model"])) for m in config["models"]]
    if "base_model" in config:
        out["base_model"] = str(zoo / config["base_model"])
    return out


def primerge_call(config: dict[str, Any], method: str, parameters: dict[str, Any] | None
                  ) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """(method, models, parameters) of the same merge in primerge: per-model weights as model
    weights; with ``parameters`` None, mergekit's method and per-model parameters translated
    (:func:`translate`), a per-model value given to its model (a list at the recipe level would be
    a gradient over depth)."""
    entries = [{"path": m["model"], "weight": m.get("parameters", {}).get("weight", 1.0)} for m in config["models"]]
    if parameters is not None:
        return method, entries, parameters
    given = dict(config.get("parameters", {}))
    for key in ("density", "gamma", "epsilon"):
        values = [m.get("parameters", {}).get(key) for m in config["models"]]
        if any(v is not None for v in values):
            given[key] = values
    target, translated = (method, given) if method not in MERGEKIT_METHODS or method in (
        "dare_ties", "dare_linear", "della_linear", "breadcrumbs_ties") else translate(method, given)
    shared = {k: v for k, v in translated.items() if not isinstance(v, list)}
    for i, entry in enumerate(entries):
        entry["parameters"] = {k: v[i] for k, v in translated.items() if isinstance(v, list)}
    return target, entries, shared


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def relative_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, str]:
    """max over tensors of max|a − b| / max|b|, and the tensor where it is reached."""
    if set(ours) != set(theirs):
        raise SystemExit(f"tensor names differ: only primerge {sorted(set(ours) - set(theirs))[:5]}, "
                         f"only mergekit {sorted(set(theirs) - set(ours))[:5]}")
    worst, where = 0.0, ""
    for name, b in theirs.items():
        a, b = ours[name].double(), b.double()
        error = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        if error > worst:
            worst, where = error, name
    return worst, where


def run_case(case: Case, zoo: Path, work: Path, mergekit: str) -> tuple[float, str, float, float]:
    label, config, method, parameters = case
    slug = label.replace(" ", "_").replace(":", "").replace("=", "")
    config_file = work / f"{slug}.yml"
    config_file.write_text(yaml.safe_dump(mergekit_config(config, zoo), sort_keys=False))
    shutil.rmtree(work / f"{slug}-mergekit", ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run([mergekit, str(config_file), str(work / f"{slug}-mergekit"), "--quiet",
                             "--random-seed", "0"], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"mergekit failed on {label}:\n{result.stderr[-3000:]}")
    mergekit_s = time.perf_counter() - start
    name, entries, params = primerge_call(config, method, parameters)
    start = time.perf_counter()
    primerge.merge(base=zoo / "base", models=[dict(e, path=str(zoo / e["path"])) for e in entries], method=name,
                   parameters=params, out=work / f"{slug}-primerge", force=True)
    primerge_s = time.perf_counter() - start
    error, where = relative_difference(tensors(work / f"{slug}-primerge"), tensors(work / f"{slug}-mergekit"))
    return error, where, mergekit_s, primerge_s


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mergekit", help="path of mergekit's mergekit-yaml executable")
    parser.add_argument("--work", help="folder for the zoo and the outputs (default: a temporary one)")
    parser.add_argument("--only", nargs="*", help="run only the cases whose label starts with these")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        zoo = work / "zoo"
        if not (zoo / "ft3").exists():
            build_zoo(zoo)
        selected = [c for c in cases() if not args.only or any(c[0].startswith(o) for o in args.only)]
        print(f"{'merge':<34} {'max rel. diff':>13}  {'worst tensor':<40} {'mergekit s':>10} {'primerge s':>10}")
        failures = 0
        for case in selected:
            error, where, mk_s, pm_s = run_case(case, zoo, work, args.mergekit)
            failures += error > TARGET
            flag = "" if error <= TARGET else "  > 1e-5"
            print(f"{case[0]:<34} {error:>13.2e}  {where:<40} {mk_s:>10.1f} {pm_s:>10.1f}{flag}", flush=True)
        print(f"{len(selected) - failures}/{len(selected)} merges within {TARGET:g} of mergekit 0.1.5")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
