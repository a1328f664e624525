"""End-to-end behaviour of the merge engine on real checkpoint files (the ``bert_zoo``).

Every expected value is recomputed here independently from the files on disk:
θ₀ + spec.apply(τ-stack, ctx, params) with τ_t = θ_t − θ₀ read by
``safetensors.torch.load_file``, the tensor class decided by the docs/algorithms.md
"Conventions" regex, and the seed from :func:`derive_seed`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import primerge
from primerge.io.manifest import verify_folder
from primerge.cli import main as cli
from primerge.methods.base import TensorContext, PerTaskUpdate
from primerge.util.seeding import derive_seed
from helpers import run_passes

TASK_SPECIFIC = r"^classifier\."
NON_MATRIX = r"embed|wte|wpe|position|lm_head|shared"  # docs/algorithms.md, "Conventions"
SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


# --------------------------------------------------------------------------- helpers


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a written model folder (single file or sharded)."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out.update(load_file(str(folder / shard)))
        return out
    return load_file(str(folder / "model.safetensors"))


def _state(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    return load_file(str(path / "model.safetensors" if path.is_dir() else path))


def _kind(name: str, tensor: torch.Tensor) -> str:
    return "matrix" if tensor.dim() == 2 and re.search(NON_MATRIX, name) is None else "fallback"


def expected_merge(base: dict, models: list[dict], method: str, params: dict | None = None, *,
                   weights: list[float] | None = None, seed: int = 42,
                   task_specific: str | None = TASK_SPECIFIC, prepass=None) -> dict[str, torch.Tensor]:
    """θ₀ + spec.apply(τ, ctx, params) per base tensor, computed from loaded state dicts."""
    spec = primerge.get_method(method)
    p = spec.parameters(params or {})
    weights = weights or [1.0] * len(models)
    merged = [n for n, b in base.items()
              if b.dtype.is_floating_point and not (task_specific and re.search(task_specific, n))]

    def stack(name):
        return torch.stack([(m[name].float() - base[name].float()) * w for m, w in zip(models, weights)])

    def ctx(name, result=None):
        return TensorContext(name, _kind(name, base[name]), derive_seed(seed, name), result, base[name].float())

    whole_model = spec.make_prepass(p)
    if prepass is None and whole_model is not None:  # stream our own τ through the declared pass
        prepass = run_passes(whole_model, [(stack(name), ctx(name)) for name in merged])
    out = {name: b.clone() for name, b in base.items() if name not in merged}
    for name in merged:
        update = spec.apply(stack(name), ctx(name, prepass), p)
        if isinstance(update, PerTaskUpdate):  # per-task methods: the unified update goes in the body
            update = update.update
        out[name] = (base[name].float() + update).to(base[name].dtype)
    return {name: out[name] for name in base}


def assert_same_tensors(actual: dict, expected: dict, *, atol: float = 1e-6, rtol: float = 1e-5):
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def zoo_states(bert_zoo):
    base = _state(bert_zoo["base"])
    models = [_state(m) for m in bert_zoo["models"]]
    return base, models


@pytest.fixture(scope="module")
def ta_reference(bert_zoo, tmp_path_factory):
    """One task_arithmetic merge of the zoo, written to disk (shared by several input tests)."""
    out = tmp_path_factory.mktemp("ta_ref") / "merged"
    primerge.merge(bert_zoo["base"], bert_zoo["models"], "task_arithmetic",
                   task_specific=TASK_SPECIFIC, out=out)
    return _weights(out)


# --------------------------------------------------------------------------- every method, end to end


@pytest.mark.parametrize("method", [s.name for s in primerge.list_methods()
                                    if s.models[0] <= 3 and (s.models[1] or 3) >= 3  # the zoo has 3 models
                                    and s.reads_grams is None])  # data-aware methods: tests/test_regmean.py
def test_every_method_end_to_end(method, bert_zoo, zoo_states, tmp_path):
    from transformers import AutoModel, BertModel

    base, models = zoo_states
    out = tmp_path / "merged"
    result = primerge.merge(bert_zoo["base"], bert_zoo["models"], method,
                            task_specific=TASK_SPECIFIC, out=out)
    assert result.out == out and result.method == method
    per_task = ["per_task"] if primerge.get_method(method).per_task else []
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "README.md", "config.json", "model.safetensors", "primerge-manifest.json", "task_heads",
        "tokenizer_config.json", *per_task])
    check = verify_folder(out)
    assert check.ok and check.files == len([p for p in out.rglob("*") if p.is_file()]) - 1, check

    # the body, reloaded by transformers, equals θ₀ + merge(τ)
    expected = expected_merge(base, models, method)
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert isinstance(model, BertModel)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded = {k: v for k, v in model.state_dict().items() if k in expected}
    assert_same_tensors(loaded, expected)
    # the merge really moved the body away from the base (and not to any single fine-tune)
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(loaded[name], base[name])
    assert all(not torch.allclose(loaded[name], m[name]) for m in models)

    # task heads: each model keeps its own, under its own names
    heads = sorted(p.name for p in (out / "task_heads").iterdir())
    assert heads == [f"task{t}.{ext}" for t in range(3) for ext in ("json", "safetensors")]
    for t, m in enumerate(models):
        head = load_file(str(out / "task_heads" / f"task{t}.safetensors"))
        assert set(head) == {"classifier.weight", "classifier.bias"}
        for k, v in head.items():
            assert torch.equal(v, m[k]), (t, k)
    assert [load_file(str(out / "task_heads" / f"task{t}.safetensors"))["classifier.weight"].shape[0]
            for t in range(3)] == [2, 3, 5]

    # support files are copies of the base's
    for f in ("config.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (bert_zoo["base"] / f).read_bytes()

    # the model card names the method, every parameter and the primerge version
    card = (out / "README.md").read_text()
    assert f"primerge {primerge.__version__}" in card
    assert f"`{method}`" in card
    params = primerge.get_method(method).parameters().model_dump(mode="json")
    for k, v in params.items():
        assert f"| {k} | {v} |" in card, k
    front = yaml.safe_load(card.split("---\n")[1])
    inputs = front["primerge"].pop("inputs")
    assert front["primerge"] == {"version": primerge.__version__, "method": method,
                                 "parameters": params, "seed": 42}
    assert str(bert_zoo["root"]) not in card.split("---\n")[1]  # no local path in the front matter
    folders = [bert_zoo["base"], *bert_zoo["models"]]
    assert [i["name"] for i in inputs] == ["base", "task0", "task1", "task2"]
    for record, folder in zip(inputs, folders):  # every file read, by name, with its SHA-256
        assert record["files"]["model.safetensors"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    for t in range(3):
        assert f"task_heads/task{t}.safetensors" in card

    # a forward pass of the reloaded model equals one of a BertModel holding the expected weights
    reference = BertModel(bert_zoo["config"])
    reference.load_state_dict(expected, strict=False)
    ids = torch.tensor([[1, 5, 9, 3, 17, 2]])
    model.eval()
    reference.eval()
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state
        ref_hidden = reference(input_ids=ids).last_hidden_state
    assert hidden.shape == (1, 6, 32)
    assert torch.isfinite(hidden).all()
    torch.testing.assert_close(hidden, ref_hidden, atol=1e-5, rtol=1e-5)


def test_in_memory_api_equals_written_files(bert_zoo, tmp_path):
    out = tmp_path / "merged"
    on_disk = primerge.merge(bert_zoo["base"], bert_zoo["models"], "prime", rank=2,
                             task_specific=TASK_SPECIFIC, out=out)
    in_memory = primerge.merge(bert_zoo["base"], bert_zoo["models"], "prime", rank=2,
                               task_specific=TASK_SPECIFIC)
    assert in_memory.out is None and on_disk.state_dict is None
    written = _weights(out)
    assert set(in_memory.state_dict) == set(written)
    for k, v in written.items():
        assert torch.equal(in_memory.state_dict[k], v), k
    assert set(in_memory.task_tensors) == {"task0", "task1", "task2"}
    for label, tensors in in_memory.task_tensors.items():
        head = load_file(str(out / "task_heads" / f"{label}.safetensors"))
        assert set(tensors) == set(head)
        for k in head:
            assert torch.equal(tensors[k], head[k]), (label, k)
    assert in_memory.counts == on_disk.counts
    # 2 layers x 6 linear weights + pooler = 13 matrices; the 3 embeddings are not matrices
    assert in_memory.counts == {"matrix": 13, "experts": 0, "reshaped": 0, "fallback": 26, "copy": 0,
                                "task_specific": 6, "expert_matrices": 0, "vocab_aligned": 0}
    assert in_memory.parameters["rank"] == 2


def test_sharded_output(bert_zoo, tmp_path):
    from transformers import AutoModel

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    primerge.merge(bert_zoo["base"], bert_zoo["models"], "tsv", task_specific=TASK_SPECIFIC, out=single)
    primerge.merge(bert_zoo["base"], bert_zoo["models"], "tsv", task_specific=TASK_SPECIFIC,
                   out=sharded, shard_size=20_000)
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) >= 3, files
    assert not (sharded / "model.safetensors").exists()
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    reference = _weights(single)
    assert set(index["weight_map"]) == set(reference)
    assert set(index["weight_map"].values()) == set(files)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in reference.values())
    for f in files:
        shard = load_file(str(sharded / f))
        assert {k for k, v in index["weight_map"].items() if v == f} == set(shard)
        size = sum(v.numel() * v.element_size() for v in shard.values())
        assert size <= 20_000 or len(shard) == 1, (f, size)
    # transformers reads the sharded folder; the values equal the unsharded merge
    model, info = AutoModel.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"], info
    loaded = model.state_dict()
    for k, v in reference.items():
        assert torch.equal(loaded[k], v), k
    assert "model.safetensors.index.json" in (sharded / "README.md").read_text()


# --------------------------------------------------------------------------- input formats


def test_sharded_input_model(bert_zoo, zoo_states, ta_reference, tmp_path):
    _, models = zoo_states
    folder = tmp_path / "sharded_task0"
    folder.mkdir()
    names = list(models[0])
    parts = [names[0::3], names[1::3], names[2::3]]
    weight_map = {}
    for i, part in enumerate(parts):
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: models[0][k].contiguous() for k in part}, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    res = primerge.merge(bert_zoo["base"], [folder, *bert_zoo["models"][1:]], "task_arithmetic",
                         task_specific=TASK_SPECIFIC)
    assert_same_tensors(res.state_dict, ta_reference, atol=0, rtol=0)
    assert torch.equal(res.task_tensors["sharded_task0"]["classifier.weight"], models[0]["classifier.weight"])


def test_single_safetensors_files_as_base_and_models(bert_zoo, zoo_states, ta_reference):
    _, models = zoo_states
    res = primerge.merge(bert_zoo["base"] / "model.safetensors",
                         [m / "model.safetensors" for m in bert_zoo["models"]], "task_arithmetic",
                         task_specific=TASK_SPECIFIC)
    assert_same_tensors(res.state_dict, ta_reference, atol=0, rtol=0)
    # labels from file stems, de-duplicated
    assert list(res.task_tensors) == ["model", "model-2", "model-3"]
    assert torch.equal(res.task_tensors["model-3"]["classifier.weight"], models[2]["classifier.weight"])


def test_pytorch_bin_folder(bert_zoo, zoo_states, ta_reference, tmp_path):
    _, models = zoo_states
    folder = tmp_path / "bin_task1"
    folder.mkdir()
    torch.save(dict(models[1]), folder / "pytorch_model.bin")
    (folder / "config.json").write_text((bert_zoo["models"][1] / "config.json").read_text())
    res = primerge.merge(bert_zoo["base"], [bert_zoo["models"][0], folder, bert_zoo["models"][2]],
                         "task_arithmetic", task_specific=TASK_SPECIFIC, allow_pickle=True)
    assert_same_tensors(res.state_dict, ta_reference, atol=0, rtol=0)
    assert torch.equal(res.task_tensors["bin_task1"]["classifier.weight"], models[1]["classifier.weight"])


def test_legacy_format_pytorch_bin_is_readable(bert_zoo, zoo_states, ta_reference, tmp_path):
    """A pre-1.6 (non-zip) ``torch.save`` of a plain state dict, as older Hub checkpoints are."""
    _, models = zoo_states
    folder = tmp_path / "legacy_task1"
    folder.mkdir()
    torch.save(dict(models[1]), folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    res = primerge.merge(bert_zoo["base"], [bert_zoo["models"][0], folder, bert_zoo["models"][2]],
                         "task_arithmetic", task_specific=TASK_SPECIFIC, allow_pickle=True)
    assert_same_tensors(res.state_dict, ta_reference, atol=0, rtol=0)


def test_pytorch_bin_is_read_weights_only(bert_zoo, zoo_states, tmp_path, monkeypatch):
    _, models = zoo_states
    folder = tmp_path / "bin_model"
    folder.mkdir()
    torch.save(dict(models[0]), folder / "pytorch_model.bin")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    primerge.merge(bert_zoo["base"], [folder], "task_arithmetic", task_specific=TASK_SPECIFIC,
                   allow_pickle=True)
    assert calls and all(w is True for w in calls), calls


def test_prefixed_model_aligns_to_base(bert_zoo, zoo_states, ta_reference, tmp_path):
    """A BertForSequenceClassification-style checkpoint: every body key under ``bert.``."""
    _, models = zoo_states
    state = {(k if k.startswith("classifier.") else f"bert.{k}"): v for k, v in models[2].items()}
    folder = tmp_path / "seqcls_task2"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    res = primerge.merge(bert_zoo["base"], [*bert_zoo["models"][:2], folder], "task_arithmetic",
                         task_specific=TASK_SPECIFIC)
    assert not any(k.startswith("bert.") for k in res.state_dict)
    assert_same_tensors(res.state_dict, ta_reference, atol=0, rtol=0)
    assert set(res.task_tensors["seqcls_task2"]) == {"classifier.weight", "classifier.bias"}


def test_bf16_inputs_give_bf16_output(bert_zoo, zoo_states, tmp_path):
    base, models = zoo_states
    b16 = {k: v.to(torch.bfloat16) for k, v in base.items()}
    m16 = [{k: v.to(torch.bfloat16) for k, v in m.items()} for m in models]
    save_file(b16, str(tmp_path / "base16.safetensors"))
    paths = []
    for t, m in enumerate(m16):
        save_file(m, str(tmp_path / f"ft16_{t}.safetensors"))
        paths.append(tmp_path / f"ft16_{t}.safetensors")
    out = tmp_path / "merged16"
    primerge.merge(tmp_path / "base16.safetensors", paths, "prime", task_specific=TASK_SPECIFIC, out=out)
    merged = _weights(out)
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    # float32 computation on the bf16 inputs, not rounded
    spec = primerge.get_method("prime")
    p = spec.parameters()
    rounded = 0
    for name, b in b16.items():
        taus = torch.stack([m[name].float() - b.float() for m in m16])
        ctx = TensorContext(name, _kind(name, b), derive_seed(42, name))
        exact = b.float() + spec.apply(taus, ctx, p)
        diff = (merged[name].float() - exact).abs()
        # round-to-nearest bf16: at most half an ulp (2^-8 relative) plus float32 noise
        assert bool((diff <= exact.abs() * 2.0**-8 + 1e-6).all()), (name, diff.max())
        rounded += int((diff > 0).sum())
    assert rounded > 0  # the float32 result really was rounded to bf16 on write


# --------------------------------------------------------------------------- weights, determinism, TIES scope


def test_model_weight_scales_the_task_vector(bert_zoo, zoo_states, tmp_path):
    base, models = zoo_states
    doubled = {k: (base[k] + 2.0 * (v - base[k])) if k in base else v for k, v in models[0].items()}
    save_file(doubled, str(tmp_path / "doubled.safetensors"))
    others = bert_zoo["models"][1:]
    weighted = primerge.merge(bert_zoo["base"], [{"path": bert_zoo["models"][0], "weight": 2.0}, *others],
                              "task_arithmetic", task_specific=TASK_SPECIFIC)
    explicit = primerge.merge(bert_zoo["base"], [tmp_path / "doubled.safetensors", *others],
                              "task_arithmetic", task_specific=TASK_SPECIFIC)
    plain = primerge.merge(bert_zoo["base"], bert_zoo["models"], "task_arithmetic",
                           task_specific=TASK_SPECIFIC)
    assert_same_tensors(weighted.state_dict, explicit.state_dict, atol=1e-6, rtol=1e-5)
    assert_same_tensors(weighted.state_dict,
                        expected_merge(base, models, "task_arithmetic", weights=[2.0, 1.0, 1.0]))
    # and it differs from the unweighted merge by exactly τ_0 / T
    name = "encoder.layer.1.output.dense.weight"
    torch.testing.assert_close(weighted.state_dict[name] - plain.state_dict[name],
                               (models[0][name] - base[name]) / 3, atol=1e-6, rtol=1e-4)


def test_same_seed_gives_identical_bytes(bert_zoo, tmp_path):
    kwargs = dict(task_specific=TASK_SPECIFIC, rank=1, svd="randomized", seed=7)
    primerge.merge(bert_zoo["base"], bert_zoo["models"], "prime", out=tmp_path / "a", **kwargs)
    primerge.merge(bert_zoo["base"], bert_zoo["models"], "prime", out=tmp_path / "b", **kwargs)
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    b = (tmp_path / "b" / "model.safetensors").read_bytes()
    header_len = int.from_bytes(a[:8], "little")
    # same header content and the same tensor bytes ...
    assert json.loads(a[8:8 + header_len]) == json.loads(b[8:8 + header_len])
    assert a[8 + header_len:] == b[8 + header_len:]
    # ... and the same file, byte for byte (header key order included)
    assert a == b


def test_repeated_merges_are_byte_stable(bert_zoo, tmp_path):
    """Eight merges of the same recipe give one file, byte for byte.

    (Two merges alone can match by chance when something in the file, e.g. the
    header's metadata order, is random.)
    """
    files = set()
    for i in range(8):
        out = tmp_path / f"m{i}"
        primerge.merge(bert_zoo["base"], bert_zoo["models"], "task_arithmetic",
                       task_specific=TASK_SPECIFIC, out=out, shard_size=40_000)
        shards = sorted(out.glob("model-*.safetensors"))
        assert len(shards) >= 2
        files.add(tuple(p.read_bytes() for p in shards) + ((out / "model.safetensors.index.json").read_bytes(),))
    assert len(files) == 1


def test_ties_model_scope_trims_over_the_whole_model(bert_zoo, zoo_states):
    from primerge.engine.stream import resolve_device, run_prepass
    from primerge.core.plan import build_plan
    from primerge.core.recipe import build_recipe

    base, models = zoo_states
    recipe = build_recipe({"base": bert_zoo["base"], "models": bert_zoo["models"], "method": "ties",
                           "parameters": {"trim_scope": "model"}, "task_specific": TASK_SPECIFIC})
    plan = build_plan(recipe)
    thresholds = run_prepass(plan, resolve_device("cpu"), quiet=True)

    names = [k for k, v in base.items() if v.dtype.is_floating_point and not re.search(TASK_SPECIFIC, k)]
    n = sum(base[k].numel() for k in names)
    assert n == 19520
    k = round(0.2 * n)
    assert thresholds.shape == (3,)
    for t, m in enumerate(models):
        flat = torch.cat([(m[name].float() - base[name].float()).abs().flatten() for name in names])
        direct = flat.kthvalue(n - k + 1).values
        assert float(thresholds[t]) == float(direct), t
        assert int((flat >= thresholds[t].float()).sum()) == k, t

    # the merge uses exactly these thresholds
    merged = primerge.merge(bert_zoo["base"], bert_zoo["models"], "ties", trim_scope="model",
                            task_specific=TASK_SPECIFIC)
    direct_thr = torch.stack([
        torch.cat([(m[x].float() - base[x].float()).abs().flatten() for x in names]).kthvalue(n - k + 1).values
        for m in models])
    expected = expected_merge(base, models, "ties", {"trim_scope": "model"}, prepass=direct_thr)
    assert_same_tensors(merged.state_dict, expected)
    per_tensor_merge = primerge.merge(bert_zoo["base"], bert_zoo["models"], "ties",
                                      task_specific=TASK_SPECIFIC)
    assert any(not torch.equal(merged.state_dict[x], per_tensor_merge.state_dict[x]) for x in names)


# --------------------------------------------------------------------------- CLI


def test_svd_auto_choices_are_said_once_per_distinct_shape_at_the_start(bert_zoo, tmp_path, capsys):
    """The merge states ``svd: auto``'s choice and its reason once per distinct (batch shape, rank),
    on stderr before merging and in the card; an explicit ``svd`` states nothing."""
    from primerge.engine.stream import svd_choices
    from primerge.linalg import choose_svd
    from primerge.core.plan import build_plan
    from primerge.core.recipe import build_recipe

    spec = {"base": bert_zoo["base"], "models": bert_zoo["models"], "method": "tsv", "task_specific": TASK_SPECIFIC}
    plan = build_plan(build_recipe(spec))
    shapes = {e.shape for e in plan.mergeable() if e.kind == "matrix"}
    requests = {((3, *shape), min(shape) // 3) for shape in shapes}
    lines = svd_choices(plan)
    assert len(lines) == len(requests) > 1
    for batch, rank in requests:
        choice = choose_svd(batch, rank)
        assert sum(f"{'×'.join(map(str, batch))} at rank {rank} " in line and choice.reason in line
                   and line.startswith(f"svd: auto: {choice.mode} SVD") for line in lines) == 1
    assert svd_choices(build_plan(build_recipe({**spec, "parameters": {"svd": "exact"}}))) == []
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({**spec, "base": str(spec["base"]),
                                                          "models": [str(m) for m in spec["models"]]}))
    assert cli.main(["merge", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert all(err.count(line) == 1 for line in lines) and err.index(lines[0]) < err.index("merge")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Decided from the shapes" in card and all(line in card for line in lines)


def test_prime_rank_auto_says_its_svd_choices_once_the_pre_pass_chose_the_rank(bert_zoo, tmp_path, capsys):
    """With ``rank: auto`` nothing is known at the start; after the F(r) pass the merge states
    ``svd: auto``'s choice at the chosen rank, once per distinct shape, as with a fixed rank."""
    from primerge.engine.stream import run_prepass, svd_choices
    from primerge.methods.prime import principal_rank
    from primerge.core.plan import build_plan
    from primerge.core.recipe import build_recipe

    spec = {"base": bert_zoo["base"], "models": bert_zoo["models"], "method": "prime", "task_specific": TASK_SPECIFIC,
            "parameters": {"rank": "auto"}}
    plan = build_plan(build_recipe(spec))
    assert svd_choices(plan) == []
    shapes_of = lambda p: {e.shape for e in p.mergeable() if e.kind == "matrix"}  # noqa: E731
    chosen = run_prepass(plan, torch.device("cpu")).rank
    result = primerge.merge_recipe(build_recipe(spec), out=tmp_path / "out", quiet=False)
    requests = {((3, *shape), principal_rank(chosen, min(shape), 3)) for shape in shapes_of(plan)}
    lines = [line for line in result.decisions if line.startswith("svd: auto")]
    assert len(lines) == len(requests) > 1
    for batch, rank in requests:
        assert sum(f"{'×'.join(map(str, batch))} at rank {rank} " in line for line in lines) == 1, lines
    err = capsys.readouterr().err
    assert all(err.count(line) == 1 for line in lines)


def test_yaml_recipe_through_cli(bert_zoo, zoo_states, tmp_path, capsys):
    base, models = zoo_states
    work = tmp_path / "project"
    work.mkdir()
    rel = lambda p: os.path.relpath(p, work)  # noqa: E731
    recipe = {
        "base": rel(bert_zoo["base"]),
        "models": [rel(bert_zoo["models"][0]), {"path": rel(bert_zoo["models"][1]), "name": "second"},
                   {"path": rel(bert_zoo["models"][2]), "weight": 0.5}],
        "method": "ties",
        "parameters": {"density": 0.3, "scale": 0.9},
        "task_specific": TASK_SPECIFIC,
        "seed": 3,
    }
    assert not Path(recipe["base"]).is_absolute()
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "cli_out"
    # run from elsewhere: relative paths resolve against the recipe's folder, not the cwd
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = cli.main(["merge", str(work / "recipe.yaml"), "--out", str(out), "--quiet"])
    finally:
        os.chdir(cwd)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "merged with ties" in captured.out and str(out) in captured.out
    expected = expected_merge(base, models, "ties", {"density": 0.3, "scale": 0.9},
                              weights=[1.0, 1.0, 0.5], seed=3)
    assert_same_tensors(_weights(out), expected)
    assert sorted(p.name for p in (out / "task_heads").glob("*.safetensors")) == [
        "second.safetensors", "task0.safetensors", "task2.safetensors"]
    card = (out / "README.md").read_text()
    assert "| density | 0.3 |" in card and "| seed | 3 |" in card


def test_methods_command_lists_every_method_with_parameters():
    proc = subprocess.run([sys.executable, "-m", "primerge", "methods"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    listed = [ln.split()[0] for ln in lines if ln and not ln.startswith(" ")]
    assert listed == [spec.name for spec in primerge.list_methods()]
    assert listed[:4] == ["task_arithmetic", "ties", "tsv", "prime"]
    blocks: dict[str, list[str]] = {}
    current = None
    for ln in lines:
        if ln and not ln.startswith(" "):
            current = ln.split()[0]
            blocks[current] = []
        elif ln.strip():
            blocks[current].append(ln.split()[0])
    for spec in primerge.list_methods():
        assert blocks[spec.name] == list(spec.params_model.model_fields), spec.name
    # the parameters docs/algorithms.md names are there (the lists may grow)
    assert blocks["task_arithmetic"][:1] == ["scale"]
    assert {"density", "scale", "trim_scope"} <= set(blocks["ties"])
    assert {"scale", "svd"} <= set(blocks["tsv"])
    assert {"scale", "rank", "residual", "s_sb_scale"} <= set(blocks["prime"])
    prime_rank = next(ln for ln in lines if ln.strip().startswith("rank"))
    assert "0.01" in prime_rank
    trim = next(ln for ln in lines if ln.strip().startswith("trim_scope"))
    assert "tensor|model" in trim


def test_a_prime_rank_a_matrix_cannot_take_is_said_with_what_it_became(bert_zoo, tmp_path, capsys):
    """rank: 200 on the zoo's 32-wide matrices is capped at 32, then lowered to ⌊32/3⌋ = 10 for
    T = 3; rank 0.01 (1 everywhere) changes nothing and says nothing."""
    from primerge.engine.stream import shape_notes
    from primerge.core.plan import build_plan
    from primerge.core.recipe import build_recipe

    spec = {"base": bert_zoo["base"], "models": bert_zoo["models"], "method": "prime", "task_specific": TASK_SPECIFIC}
    plan = build_plan(build_recipe({**spec, "parameters": {"rank": 200}}))
    shapes = {e.shape for e in plan.mergeable() if e.kind == "matrix"}
    notes = shape_notes(plan)
    assert len(notes) == len(shapes)
    for m, n in shapes:
        r_full = min(m, n)
        assert sum(f"prime: rank 200 on {m}×{n} matrices is 200, capped at min(m, n) = {r_full}, then lowered "
                   f"to ⌊{r_full}/T⌋ = {r_full // 3}" in note for note in notes) == 1, notes
    assert shape_notes(build_plan(build_recipe(spec))) == []
    result = primerge.merge_recipe(build_recipe({**spec, "parameters": {"rank": 200}}), out=tmp_path / "out", quiet=False)
    assert result.decisions[-len(notes):] == notes
    err = capsys.readouterr().err
    assert all(note in err for note in notes), err[:2000]
