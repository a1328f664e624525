"""Reliability and security: hostile files, mismatches, odd shapes, disk trouble, integrity.

Interruptions, thread-count determinism and the file-size limit run real merges in
subprocesses (tests/test_reliability_process.py); this module stays in-process.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import primerge
from primerge.cli import main as cli
from primerge.util.errors import InputError, OutputError, PrimergeError, RecipeError
from primerge.io import writer as writer_module
from primerge.io.manifest import MANIFEST, verify_folder
from primerge.io.readers import open_checkpoint
from primerge.methods import get_method
from primerge.methods.base import TensorContext
from primerge.core.recipe import load_recipe
from refusals import TASK_SPECIFIC, assert_nothing_left, model_copy, recipe_file, refused, snapshot, zoo_recipe

#: every method that merges checkpoints alone (a data-aware one needs task data: tests/test_regmean.py)
METHODS = [s.name for s in primerge.list_methods() if s.reads_grams is None]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def raw_safetensors(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file from a header (JSON-encoded unless bytes) and a data section."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return path


# --------------------------------------------------------------------------- hostile files

F32_2x2 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
HOSTILE_HEADERS = {
    "offsets beyond the data": ({"w": F32_2x2}, b"\0" * 8, None, "not fully covered"),
    "shape larger than its bytes": ({"w": {**F32_2x2, "shape": [3, 2]}}, b"\0" * 16, None, "invalid shape"),
    "overlapping tensors": ({"w": F32_2x2, "v": F32_2x2}, b"\0" * 16, None, "invalid offset"),
    "shape overflowing 64 bits": ({"w": {**F32_2x2, "shape": [2**62, 2**62]}}, b"\0" * 16, None, "overflow"),
    "negative dimension": ({"w": {**F32_2x2, "shape": [-1, 4]}}, b"\0" * 16, None, "invalid"),
    "header length of 2^62": ({"w": F32_2x2}, b"", 2**62, "header too large"),
    "header not JSON": (b"{not json", b"", None, "invalid JSON"),
    "header a JSON list": ([1, 2], b"", None, "invalid type"),
    "header not UTF-8": (b"\xff\xfe{}", b"", None, "UTF-8"),
    "unknown dtype code": ({"w": {**F32_2x2, "dtype": "Q9"}}, b"\0" * 16, None, "Q9"),
    "complex dtype": ({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "C64"),
    "no tensors at all": ({"__metadata__": {"format": "pt"}}, b"", None, "holds no tensors"),
}


@pytest.mark.parametrize("case", list(HOSTILE_HEADERS))
def test_hostile_safetensors_headers_are_refused_before_writing(zoo, tmp_path, capsys, case):
    header, data, length, needle = HOSTILE_HEADERS[case]
    folder = tmp_path / "hostile"
    folder.mkdir()
    raw_safetensors(folder / "model.safetensors", header, data, length)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[zoo["paths"]["models"][0], folder]))
    refused(recipe, tmp_path / "out" / "merged", InputError, [folder / "model.safetensors", needle], capsys)


@pytest.mark.parametrize("shard", ["/etc/passwd", "../x.safetensors", "sub/x.safetensors", ".", ""])
def test_index_shard_names_must_stay_in_the_folder(zoo, tmp_path, capsys, shard):
    folder = tmp_path / "models" / "escaping"
    folder.mkdir(parents=True)
    save_file(dict(zoo["models"][0]), str(tmp_path / "models" / "x.safetensors"))  # a real target
    (folder / "sub").mkdir()
    save_file(dict(zoo["models"][0]), str(folder / "sub" / "x.safetensors"))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": dict.fromkeys(zoo["models"][0], shard)}))
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[folder]))
    refused(recipe, tmp_path / "out" / "merged", InputError, [index, "outside the model folder"], capsys)


@pytest.mark.parametrize("weight_map", [[1, 2], {"a": 3}, {"a": None}, {"a": ["x"]}, "x"])
def test_index_with_a_malformed_weight_map(zoo, tmp_path, capsys, weight_map):
    folder = tmp_path / "bad_index"
    folder.mkdir()
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[folder]))
    refused(recipe, tmp_path / "out" / "merged", InputError, [index, "not a valid shard index"], capsys)


def test_symlinks_out_of_the_folder_are_refused(zoo, tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file(dict(zoo["models"][0]), str(outside / "weights.safetensors"))
    (outside / "secret.json").write_text('{"token": "do not copy me"}')

    linked_weights = tmp_path / "linked_weights"
    linked_weights.mkdir()
    (linked_weights / "model.safetensors").symlink_to(outside / "weights.safetensors")
    recipe = recipe_file(tmp_path / "a", zoo_recipe(zoo, models=[linked_weights]))
    refused(recipe, tmp_path / "out" / "merged", InputError,
            [linked_weights / "model.safetensors", "outside the model folder"], capsys)

    # a base whose config is a link out of its folder: it would be copied into the output
    base = tmp_path / "linked_config_base"
    base.mkdir()
    save_file(dict(zoo["base"]), str(base / "model.safetensors"))
    (base / "config.json").symlink_to(outside / "secret.json")
    recipe = recipe_file(tmp_path / "b", zoo_recipe(zoo, base=base))
    refused(recipe, tmp_path / "out" / "merged", InputError, [base / "config.json", "outside"], capsys)


def test_hugging_face_cache_snapshot_links_are_followed(zoo, tmp_path):
    """``snapshots/<rev>/`` files link to ``../../blobs/<hash>`` in a hub cache: that is allowed."""
    repo = tmp_path / "hub" / "models--org--ft"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir = repo / "snapshots" / "abc123"
    snapshot_dir.mkdir(parents=True)
    save_file(dict(zoo["models"][0]), str(repo / "blobs" / "f00d"))
    (snapshot_dir / "model.safetensors").symlink_to("../../blobs/f00d")
    got = primerge.merge(zoo["paths"]["base"], [snapshot_dir], "task_arithmetic", task_specific=TASK_SPECIFIC)
    direct = primerge.merge(zoo["paths"]["base"], [zoo["paths"]["models"][0]], "task_arithmetic",
                            task_specific=TASK_SPECIFIC)
    assert all(torch.equal(got.state_dict[k], direct.state_dict[k]) for k in direct.state_dict)


def test_pickles_are_refused_without_opt_in(zoo, tmp_path, capsys):
    folder = tmp_path / "bin_model"
    folder.mkdir()
    torch.save(dict(zoo["models"][0]), folder / "pytorch_model.bin")
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[folder]))
    refused(recipe, tmp_path / "out" / "merged", InputError,
            [folder / "pytorch_model.bin", "allow_pickle: true", "--allow-pickle"], capsys)
    # opting in on the command line reads it (weights only)
    out = tmp_path / "out" / "ok"
    assert cli.main(["merge", str(recipe), "--out", str(out), "--quiet", "--allow-pickle"]) == 0
    assert verify_folder(out).ok


@pytest.mark.parametrize("text", ["{not json", "", "\xff"])
def test_config_that_is_not_json_is_refused(zoo, tmp_path, capsys, text):
    for role in ("base", "model"):
        folder = model_copy(tmp_path / role, zoo["base"] if role == "base" else zoo["models"][0])
        (folder / "config.json").write_bytes(text.encode("latin-1"))
        data = zoo_recipe(zoo, base=folder) if role == "base" else zoo_recipe(zoo, models=[folder])
        recipe = recipe_file(tmp_path / f"r_{role}", data)
        refused(recipe, tmp_path / "out" / "merged", InputError, [folder / "config.json", "not valid JSON"],
                capsys)


# --------------------------------------------------------------------------- fuzzing

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I8", "BOOL", "U8", "Q9", "C64"]
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I8": 1, "BOOL": 1, "U8": 1}


@st.composite
def headers(draw):
    """Safetensors headers: about half consistent (they must merge), the rest with one lie or more
    (bad dtype, negative or huge dimension, wrong or reversed offsets, bad metadata, short data)."""
    honest = draw(st.booleans())

    def lie(honest_value, *lies):
        return honest_value if honest else draw(st.sampled_from([honest_value, *lies]))

    entries, offset = {}, 0
    for i in range(draw(st.integers(1 if honest else 0, 3))):
        dtype = lie(draw(st.sampled_from(DTYPES[:-2])), *DTYPES[-2:])
        shape = [lie(d, -1, 2**40) for d in draw(st.lists(st.integers(0, 5), max_size=3))]
        size = SIZES.get(dtype, 4)
        for d in shape:
            size *= max(d, 0)
        end = offset + lie(size, size + 1, max(size - 1, 0))
        entries[f"t{i}.weight"] = {"dtype": dtype, "shape": shape,
                                   "data_offsets": lie([offset, end], [end, offset], [0, end])}
        offset = end
    if draw(st.booleans()):
        entries["__metadata__"] = lie({"format": "pt"}, {"x": 1}, [])
    data = bytes(min(offset, 4096)) + lie(b"", b"\0", b"junk")
    return entries, lie(data, data[: len(data) // 2])


@FUZZ
@given(case=headers(), method=st.sampled_from(METHODS))
def test_fuzzed_safetensors_either_merge_or_fail_cleanly(tmp_path_factory, case, method):
    """Whatever the header says, reading and merging ends in success or a PrimergeError.

    The file is merged with a perturbed copy of itself when readable, so methods see real
    task vectors of every odd shape the header can describe."""
    header, data = case
    folder = tmp_path_factory.mktemp("fuzz")
    path = raw_safetensors(folder / "w.safetensors", header, data)
    try:
        state = load_file(str(path))
    except Exception:  # unreadable for safetensors itself: primerge must refuse it
        with pytest.raises(PrimergeError):
            primerge.merge(path, [path], method)
        return
    other = folder / "ft.safetensors"
    save_file({k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}, str(other))
    supported = state and all(e["dtype"] in SIZES for k, e in header.items() if k != "__metadata__")
    try:
        result = primerge.merge(path, [other, path], method)
    except PrimergeError:
        assert not supported, "a readable file with supported dtypes must merge"
        return
    for name, tensor in result.state_dict.items():
        assert tensor.shape == open_checkpoint(path).info(name).shape
        if tensor.dtype.is_floating_point:
            assert torch.isfinite(tensor).all()


@FUZZ
@given(raw=st.binary(max_size=300))
def test_fuzzed_bytes_are_never_a_raw_traceback(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("bytes") / "w.safetensors"
    path.write_bytes(raw)
    with pytest.raises(PrimergeError):
        open_checkpoint(path)


JUNK = st.none() | st.booleans() | st.integers(-3, 10**20) | st.floats(allow_nan=True) | st.text(max_size=8)
PARAMETER_VALUES = st.sampled_from(["auto", "exact", "randomized", "H", "V", "mean", "ties", "model", 0.01, 0.5, 2,
                                    1.0, 0, -1])


@st.composite
def recipes(draw, p):
    """A working recipe on the tiny zoo (paths ``p``) with up to three fields replaced by junk."""
    method = draw(st.sampled_from(METHODS))
    names = list(get_method(method).params_model.model_fields)
    data = {"base": str(p["base"]), "method": method, "task_specific": TASK_SPECIFIC,
            "models": [str(m) for m in draw(st.lists(st.sampled_from(p["models"]), min_size=1, max_size=3))],
            "parameters": draw(st.dictionaries(st.sampled_from(names), PARAMETER_VALUES, max_size=2))
            if names else {}}
    odd = {"base": JUNK | st.just("/no/such/model"), "models": JUNK | st.just([{"path": str(p["base"]),
                                                                                 "weight": float("nan")}]),
           "method": st.text(max_size=6), "parameters": JUNK | st.just({"bogus": 1}),
           "seed": JUNK, "task_specific": st.sampled_from(["(", "x", None]) | JUNK,
           "matrices": st.sampled_from(["weight", "[", "^$", None]), "lines": JUNK | st.just({"alpha": 2}),
           "allow_pickle": JUNK, "unknown_field": JUNK}
    for key in draw(st.lists(st.sampled_from(sorted(odd)), max_size=3, unique=True)):
        data[key] = draw(odd[key])
    return data


def test_fuzzed_recipes_either_merge_or_fail_cleanly(zoo, tmp_path):
    """Through the YAML file and the CLI: exit 0 with a verified folder, or exit 2 with one line."""
    import yaml

    outcomes = []

    @FUZZ
    @given(data=recipes({k: zoo["paths"][k] for k in ("base", "models")}))
    def check(data):
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(data))
        out = tmp_path / "out"
        code = cli.main(["merge", str(path), "--out", str(out), "--quiet", "--force"])
        outcomes.append(code)
        assert code in (0, 2)
        if code == 0:
            assert verify_folder(out).ok

    check()
    assert outcomes.count(0) >= 10 and outcomes.count(2) >= 10, outcomes  # both sides were exercised


#: Fragments of pydantic's own error wording that must never reach a user.
JARGON = ("Input should", "literal[", "Value error", "constrained-", "function-after", "Field required", "type=")


@FUZZ
@given(data=recipes({"base": "/b", "models": ["/m0", "/m1"]}),
       values=st.dictionaries(st.sampled_from(["rank", "density", "scale", "alpha", "svd", "residual", "k", "lam",
                                               "beta", "drop_rate", "base_merge", "trim_scope"]), JUNK, max_size=2))
def test_recipe_errors_name_the_field_and_value_in_plain_words(data, values):
    """A recipe (or its method's parameters) with junk values is refused with one sentence per field,
    naming the field and the value, never pydantic's internal wording."""
    from primerge.core.recipe import build_recipe

    if isinstance(data.get("parameters"), dict):
        data["parameters"] = {**data["parameters"], **values}
    try:
        build_recipe(data)
    except RecipeError as exc:
        assert not any(fragment in str(exc) for fragment in JARGON), str(exc)


@FUZZ
@given(text=st.text(max_size=200))
def test_fuzzed_recipe_text_is_a_recipe_or_a_recipe_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(text)
    try:
        load_recipe(path)
    except RecipeError:
        pass


# --------------------------------------------------------------------------- mismatches and odd shapes


def test_resized_vocabulary_is_named(zoo, tmp_path, capsys):
    state = dict(zoo["models"][0])
    name = "embeddings.word_embeddings.weight"
    state[name] = torch.cat([state[name], state[name][:3]])
    model = model_copy(tmp_path / "bigger_vocab", state)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[model]))
    refused(recipe, tmp_path / "out" / "merged", InputError, [f"'{name}'", "[67, 32]", "[64, 32]", "vocabulary"],
            capsys)


def test_integer_tensor_where_the_base_has_floats_is_refused(zoo, tmp_path, capsys):
    state = dict(zoo["models"][0])
    name = "encoder.layer.0.output.dense.bias"
    state[name] = state[name].to(torch.int32)
    model = model_copy(tmp_path / "int_model", state)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[model]))
    refused(recipe, tmp_path / "out" / "merged", InputError, [f"'{name}'", "torch.int32"], capsys)


def test_models_in_another_float_dtype_are_merged_in_float32(zoo, tmp_path):
    half = model_copy(tmp_path / "half", {k: v.half() if v.is_floating_point() else v
                                          for k, v in zoo["models"][0].items()})
    got = primerge.merge(zoo["paths"]["base"], [half], "task_arithmetic", task_specific=TASK_SPECIFIC)
    for name, base in zoo["base"].items():
        if base.is_floating_point():
            expected = base + (zoo["models"][0][name].half().float() - base)
            assert got.state_dict[name].dtype == base.dtype
            torch.testing.assert_close(got.state_dict[name], expected, rtol=0, atol=1e-6)


def test_model_equal_to_the_base_and_duplicates(zoo):
    """Models equal to their base give the base bit for bit, and a model given twice is merged with
    a label per entry. Every method's own part (an update of exact zeros for zero task vectors, a
    finite one for duplicated tasks) is the method contract's ('zero', 'shapes'):
    tests/test_method_contract.py."""
    p = zoo["paths"]
    zero = primerge.merge(p["base"], [p["base"], p["base"]], "prime")
    for name, tensor in zero.state_dict.items():
        torch.testing.assert_close(tensor, zoo["base"][name], rtol=0, atol=0, msg=name)
    twice = primerge.merge(p["base"], [p["models"][0], p["models"][0]], "prime", task_specific=TASK_SPECIFIC)
    assert list(twice.task_tensors) == ["task0", "task0-2"]
    assert all(torch.isfinite(t).all() for t in twice.state_dict.values() if t.is_floating_point())


ODD_SHAPES = {"row.weight": (1, 7), "col.weight": (7, 1), "one.weight": (1, 1), "bias": (5,), "scalar": (),
              "empty.weight": (0, 4), "big.weight": (6, 9)}


@pytest.mark.parametrize("tasks", [1, 3])
def test_dimension_of_one_single_task_and_empty_tensors(tmp_path, tasks):
    """Odd shapes through the engine: written with their shapes, empty tensors copied from the
    base. Every method's updates on such shapes, with one and three tasks, are the method
    contract's ('shapes'): tests/test_method_contract.py."""
    gen = torch.Generator().manual_seed(tasks)
    base = {k: torch.randn(s, generator=gen) for k, s in ODD_SHAPES.items()}
    folders = [model_copy(tmp_path / "base", base)]
    for t in range(tasks):
        folders.append(model_copy(tmp_path / f"m{t}", {k: v + 0.1 * torch.randn(v.shape, generator=gen)
                                                       for k, v in base.items()}))
    out = primerge.merge(folders[0], folders[1:], "prime", out=tmp_path / "out").out
    merged = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in merged.items()} == ODD_SHAPES
    assert all(torch.isfinite(v).all() for v in merged.values())
    assert torch.equal(merged["empty.weight"], base["empty.weight"])


# --------------------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["task_arithmetic", "prime", "tsv"])
def test_half_precision_is_computed_in_float32_and_written_in_the_base_dtype(zoo, tmp_path, dtype, method):
    """Against the same merge (``svd: exact``, the same path) in float64, the written tensor is off by
    at most one rounding to the storage dtype plus the float32 round-off of the path.

    The storage rounding is at most one ulp (eps·|x|; half an ulp from the rounding itself, and the
    float32 value may sit on the other side of a rounding boundary). The path's round-off is bounded by
    its conditioning: the float64 merge is re-run on task vectors perturbed by a few float32 units of
    round-off (relative 2^-22, random signs), and the change it makes, times 64 (the number of float32
    operations an entry's error accumulates over is far below that squared), bounds what float32
    arithmetic in any order (any CPU, BLAS, thread count) can do. An SVD truncated inside a gap-free
    part of the spectrum is ill-conditioned and gets a larger allowance from the same measurement, as it
    should. In bf16 at least 95 % of entries must moreover be exactly the rounded float64 value."""
    def cast(state):
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}

    base = model_copy(tmp_path / "base", cast(zoo["base"]))
    models = [model_copy(tmp_path / f"m{t}", cast(m)) for t, m in enumerate(zoo["models"])]
    options = {} if method == "task_arithmetic" else {"svd": "exact"}
    got = primerge.merge(base, models, method, task_specific=TASK_SPECIFIC, **options).state_dict

    from primerge.core.recipe import DEFAULT_NON_MATRIX
    from primerge.methods.base import TensorContext
    import re

    spec = get_method(method)
    params = spec.parameters(options)
    ulp = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(0)
    for name, b in load_file(str(base / "model.safetensors")).items():
        if not b.is_floating_point():
            continue
        b64 = b.double()
        taus = torch.stack([load_file(str(m / "model.safetensors"))[name].double() - b64 for m in models])
        ctx = TensorContext(name, "matrix" if b.dim() == 2 and not re.search(DEFAULT_NON_MATRIX, name) else "fallback")
        reference = b64 + spec.apply(taus, ctx, params)
        signs = torch.randint(0, 2, taus.shape, generator=gen).double() * 2 - 1
        perturbed = b64 + spec.apply(taus * (1 + 2.0 ** -22 * signs), ctx, params)
        path_error = 64 * (perturbed - reference).abs().max() + 2.0 ** -20 * reference.abs().max()
        assert got[name].dtype == dtype
        error = (got[name].double() - reference).abs()
        assert (error <= ulp * reference.abs() + path_error).all(), (name, error.max(), path_error)
        if dtype == torch.bfloat16:
            exact = (got[name] == reference.to(dtype)).double().mean()
            assert exact >= 0.95, (name, exact)


# --------------------------------------------------------------------------- determinism


def _subset_copy(folder: Path, target: Path, keep) -> Path:
    state = load_file(str(folder / "model.safetensors"))
    return model_copy(target, {k: v for k, v in state.items() if keep(k)})


def test_randomised_methods_do_not_depend_on_which_tensors_come_before(zoo, tmp_path):
    """Seeds come from the recipe seed and the tensor name: merging only every other tensor (so
    each is visited at another position) gives those tensors exactly the same values. That a
    method's draws come from ``ctx.seed`` alone, and change with it, is the method contract's
    ('seed'): tests/test_method_contract.py."""
    p = zoo["paths"]
    first = primerge.merge(p["base"], p["models"], "dare", task_specific=TASK_SPECIFIC, seed=7)
    kept = set(list(first.state_dict)[1::2])
    base = _subset_copy(p["base"], tmp_path / "base", kept.__contains__)
    models = [_subset_copy(m, tmp_path / m.name, lambda k: k in kept or k.startswith("classifier"))
              for m in p["models"]]
    second = primerge.merge(base, models, "dare", task_specific=TASK_SPECIFIC, seed=7)
    assert set(second.state_dict) == kept
    for name in kept:
        assert torch.equal(first.state_dict[name], second.state_dict[name]), name
    other_seed = primerge.merge(p["base"], p["models"], "dare", task_specific=TASK_SPECIFIC, seed=8)
    assert any(not torch.equal(t, other_seed.state_dict[n]) for n, t in first.state_dict.items())


# --------------------------------------------------------------------------- disk trouble


def test_full_disk_while_writing_a_shard_leaves_nothing(zoo, tmp_path, capsys, monkeypatch):
    written = []
    real = writer_module.save_file

    def filling(tensors, path, metadata=None):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(writer_module, "save_file", filling)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo))
    refused(recipe, tmp_path / "out" / "merged", OutputError, ["No space left on device", "write failed"],
            capsys, shard_size=20_000)


def test_output_under_a_file_is_refused_cleanly(zoo, tmp_path, capsys):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder should be")
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo))
    refused(recipe, blocker / "merged", OutputError, [blocker / "merged", "cannot create the output folder"],
            capsys)
    assert blocker.read_text() == "a file where a folder should be"


def test_stale_temporary_folders_of_dead_processes_are_removed(zoo, tmp_path):
    out = tmp_path / "merged"
    dead = tmp_path / f".merged{writer_module.TEMP_MARK}999999999-deadbeef"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half a shard")
    alive = tmp_path / f".merged{writer_module.TEMP_MARK}{os.getpid()}-cafecafe"
    alive.mkdir()
    primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"], "task_arithmetic",
                   task_specific=TASK_SPECIFIC, out=out)
    assert not dead.exists() and alive.exists()
    assert verify_folder(out).ok


# --------------------------------------------------------------------------- output integrity


@pytest.fixture
def merged_folder(zoo, tmp_path) -> Path:
    return primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"], "emr", task_specific=TASK_SPECIFIC,
                          out=tmp_path / "merged", shard_size=30_000).out


def test_manifest_lists_every_file_and_tensor(merged_folder):
    manifest = json.loads((merged_folder / MANIFEST).read_text())
    on_disk = sorted(str(p.relative_to(merged_folder)) for p in merged_folder.rglob("*")
                     if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk
    shards = [f for f in on_disk if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) > 1 and any(f.startswith("per_task/") for f in on_disk)
    for rel in shards:
        stored = load_file(str(merged_folder / rel))
        assert set(manifest["files"][rel]["tensors"]) == set(stored)
    assert "primerge verify" in (merged_folder / "README.md").read_text()


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete", "add a file", "edit config"])
def test_verify_detects_damage(merged_folder, capsys, damage):
    assert cli.main(["verify", str(merged_folder)]) == 0
    assert capsys.readouterr().out.startswith("OK: ")
    shard = sorted(merged_folder.glob("model-*.safetensors"))[0]
    if damage == "flip a byte":
        data = bytearray(shard.read_bytes())
        data[-3] ^= 0x40
        shard.write_bytes(bytes(data))
        needle = "sha256"
    elif damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
        needle = "size"
    elif damage == "delete":
        shard.unlink()
        needle = "missing"
    elif damage == "add a file":
        (merged_folder / "extra.bin").write_bytes(b"x")
        needle = "extra.bin: not listed"
    else:
        (merged_folder / "config.json").write_text("{}")
        needle = "config.json: contents changed"
    assert cli.main(["verify", str(merged_folder)]) == 1
    out = capsys.readouterr().out
    assert needle in out and "FAILED" in out, out


def test_verify_without_a_manifest_is_an_error(zoo, tmp_path, capsys):
    assert cli.main(["verify", str(zoo["paths"]["base"])]) == 2
    assert "no primerge-manifest.json" in capsys.readouterr().err


def test_a_write_that_differs_from_the_computed_tensor_is_caught(zoo, tmp_path, capsys, monkeypatch):
    """Simulated silent corruption: the file on disk is not what was computed; nothing is published."""
    real = writer_module.save_file

    def corrupting(tensors, path, metadata=None):
        real({k: (v + 1 if k.endswith("query.weight") else v) for k, v in tensors.items()}, path,
             metadata=metadata)

    monkeypatch.setattr(writer_module, "save_file", corrupting)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo))
    refused(recipe, tmp_path / "out" / "merged", OutputError, ["does not match what was computed", "query.weight",
                                                               "sha256"], capsys)


def test_inputs_are_never_modified(zoo, tmp_path):
    before = snapshot(zoo["paths"]["root"])
    for method in ("prime", "ties", "emr"):
        primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"], method, task_specific=TASK_SPECIFIC,
                       out=tmp_path / method)
    assert snapshot(zoo["paths"]["root"]) == before
    assert_nothing_left(tmp_path / "never-written")


def test_products_with_few_rows_do_not_depend_on_the_thread_count():
    """The CPU BLAS splits a product's rows over its threads with a remainder kernel, so a left
    operand of a few rows (5–11 on this project's CPU torch; e.g. Ûᵀ M_r in PRIME with T·r = 6)
    gives other bits with 2 threads than with 1. Under ThreadIndependent it does not, and neither
    does a PRIME merge at a rank where that happens."""
    from primerge.methods.stack import TaskStack

    gen = torch.Generator().manual_seed(0)
    lefts = [torch.randn(rows, 24, generator=gen) for rows in range(1, 40)]
    right = torch.randn(24, 64, generator=gen)
    taus = TaskStack.of(torch.randn(3, 24, 16, generator=gen))
    spec = get_method("prime")
    results = under_one_and_two_threads(lambda: [a @ right for a in lefts] + [a.mT.mT @ right for a in lefts] + [
        torch.addmm(torch.zeros(a.shape[0], 64), a, right) for a in lefts] + [
        spec.apply(taus, TensorContext("w", "matrix"), spec.parameters({"rank": 0.12}))])
    assert all(torch.equal(one, two) for one, two in zip(results[1], results[2]))


def under_one_and_two_threads(compute) -> dict[int, list]:
    """``compute()`` under ThreadIndependent with 1 and with 2 torch threads (restored after each
    call, checked), keyed by the thread count."""
    from primerge.util.deterministic import ThreadIndependent

    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with ThreadIndependent():
                results[threads] = compute()
            assert torch.get_num_threads() == threads  # restored after every decomposition
    finally:
        torch.set_num_threads(before)
    return results


@pytest.mark.parametrize("split", [True, False])
def test_decompositions_under_thread_independent_do_not_depend_on_the_thread_count(monkeypatch, split):
    """Batched and single decompositions give the same bits with 1 and 2 threads, whether a
    batch is split over the threads or decomposed in one call; a split batch gives each matrix
    exactly what the matrix alone gives."""
    from primerge.util import deterministic

    monkeypatch.setattr(deterministic, "SPLIT_WORK", 0 if split else 2**62)

    gen = torch.Generator().manual_seed(0)
    batch = torch.randn(3, 384, 200, generator=gen)
    gram = batch[0].T @ batch[0] + torch.eye(200)
    results = under_one_and_two_threads(lambda: [
        *torch.linalg.svd(batch, full_matrices=False), *torch.linalg.qr(batch[0]), torch.linalg.svdvals(batch),
        *torch.linalg.eigh(gram), torch.linalg.cholesky(gram), torch.linalg.svd(batch[1], full_matrices=False).U])
    for one, two in zip(results[1], results[2]):
        assert torch.equal(one, two)
    if split:
        assert torch.equal(results[1][0][1], results[1][-1])  # batch element 1 == that matrix alone
    U, S, Vh = results[1][:3]
    torch.testing.assert_close(U @ torch.diag_embed(S) @ Vh, batch, rtol=0, atol=1e-4)
