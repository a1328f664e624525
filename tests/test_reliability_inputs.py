"""Reliability, round three, the inputs (issue 28): every input read within bounds, and everything an
input claims checked against what it holds.

One class of defect per section, each with the test that would have caught it; hypothesis draws
the inputs where their space is large. Every refusal is one primerge error naming the file (exit 2
and one line on the command line), never a traceback, a hang or an unbounded allocation.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import fails_after
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import primerge
from primerge.cli.main import main as cli
from primerge.core.recipe import load_recipe
from primerge.data.tasks import load_table
from primerge.io import files
from primerge.io.quantized import Fp8Blocks, gguf_tensors, open_weights
from primerge.io.tokenizer import read_vocabulary
from primerge.util.errors import QUOTE_LIMIT, InputError, PrimergeError, RecipeError
from refusals import TASK_SPECIFIC, model_copy, recipe_file, refused, zoo_recipe

PROPERTY = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
#: The most characters of a refused input an error message may quote (a few hundred), plus its paths.
MESSAGE_BOUND = 1500


@pytest.fixture(autouse=True)
def no_hang():
    """Fail instead of blocking the suite if a case waits on a FIFO or expands without bound."""
    with fails_after(300):
        yield


# ------------------------------------------------------------------ 1. bounded reads: YAML aliases

FIELDS = ["parameters", "purify", "models", "matrices", "lines", "output", "execution", "calibration"]


def alias_bomb(field: str, fanout: int, depth: int) -> str:
    """A recipe whose ``field`` is a list of lists ``depth`` deep, each level ``fanout`` aliases of the
    one below: ``fanout ** depth`` values from a few hundred bytes."""
    lines = [f"l0: &l0 [{', '.join(['xxxxxxxx'] * fanout)}]"]
    lines += [f"l{d}: &l{d} [{', '.join([f'*l{d - 1}'] * fanout)}]" for d in range(1, depth)]
    return "\n".join(lines + ["base: /b", "models: [/m]", f"{field}: *l{depth - 1}", ""])


@PROPERTY
@given(field=st.sampled_from(FIELDS), fanout=st.integers(2, 12), depth=st.integers(2, 9))
def test_yaml_aliases_expand_within_a_bound_or_are_refused(tmp_path_factory, field, fanout, depth):
    """Whatever the alias structure: a RecipeError naming the field or the expansion, in bounded time
    (the alarm) and quoting a bounded part of the input; a document that expands beyond
    MAX_YAML_NODES values is refused before it is constructed."""
    path = tmp_path_factory.mktemp("bomb") / "recipe.yaml"
    path.write_text(alias_bomb(field, fanout, depth))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert len(message) < MESSAGE_BOUND, message[:300]
    if fanout ** depth > files.MAX_YAML_NODES:
        assert "expands to more than" in message, message


def test_a_recursive_alias_is_refused(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("base: /b\nmodels: &m [*m]\n")
    with pytest.raises(RecipeError, match="alias.*inside the value it names"):
        load_recipe(path)


@settings(PROPERTY, max_examples=20)
@given(field=st.sampled_from(["method", "tokenizer", "task_specific", "seed", "base", "unknown_field"]),
       size=st.integers(1_000, 20_000), char=st.sampled_from("x`|\n<é"))
def test_messages_quote_at_most_a_few_hundred_characters(tmp_path_factory, field, size, char):
    """A value of thousands of characters is quoted by at most QUOTE_LIMIT·2 of them (raw or escaped)."""
    path = tmp_path_factory.mktemp("long") / "recipe.yaml"
    path.write_text(yaml.safe_dump({"base": "/b", "models": ["/m"], field: char * size}))
    try:
        load_recipe(path)  # e.g. task_specific: a long but valid pattern
    except PrimergeError as exc:
        for form in {char, repr(char)[1:-1]}:
            runs = re.findall(f"(?:{re.escape(form)})+", str(exc))
            assert max(map(len, runs), default=0) <= 2 * QUOTE_LIMIT * len(form), (field, str(exc)[:300])


# ------------------------------------------------------------------ 1. bounded reads: special and huge files


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


SPECIAL = {"a FIFO": _fifo, "a character device": lambda path: (path.symlink_to("/dev/zero"), path)[1]}


@pytest.mark.parametrize("what", sorted(SPECIAL))
def test_a_special_recipe_is_refused(tmp_path, capsys, what):
    recipe = SPECIAL[what](tmp_path / "recipe.yaml")
    with pytest.raises(RecipeError, match=what):
        load_recipe(recipe)
    assert cli(["merge", str(recipe), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert what in capsys.readouterr().err


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("what", sorted(SPECIAL))
def test_special_files_in_a_model_folder_are_refused(zoo, tmp_path, capsys, name, what):
    folder = model_copy(tmp_path / "model", zoo["models"][0])
    if name.endswith(".index.json"):
        (folder / "model.safetensors").unlink()
    SPECIAL[what](folder / name)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[folder]))
    needle = what if what == "a FIFO" else "refusing to read it"  # /dev/zero: a link out of the folder
    refused(recipe, tmp_path / "out" / "merged", InputError, [folder / name, needle], capsys)


def test_a_fifo_swapped_in_after_the_check_is_refused_not_waited_on(tmp_path, monkeypatch):
    """The reader opens without blocking and checks the opened descriptor, not only the path."""
    target = _fifo(tmp_path / "config.json")
    monkeypatch.setattr(files, "regular_file", lambda path, what="file", error=InputError: path)
    with pytest.raises(InputError, match="not a regular file"):
        files.read_bounded(target, "config")


@pytest.mark.parametrize("limit, writer", [
    ("json", lambda folder: (folder / "config.json").write_text('{"pad": "' + "x" * 5000 + '"}')),
    ("tokenizer", lambda folder: (folder / "tokenizer.json").write_text('{"pad": "' + "x" * 5000 + '"}')),
    ("recipe", None),
])
def test_files_larger_than_their_kind_allows_are_refused(zoo, tmp_path, monkeypatch, limit, writer):
    """The rule, with the limit lowered to 4 KB: a larger file is refused before it is parsed."""
    monkeypatch.setitem(files.LIMITS, limit, 4096)
    if writer is None:
        path = recipe_file(tmp_path, {**zoo_recipe(zoo), "note": "x" * 5000})
        with pytest.raises(RecipeError, match="larger than 4096 bytes"):
            load_recipe(path)
        return
    folder = model_copy(tmp_path / "model", zoo["models"][0])
    writer(folder)
    with pytest.raises(InputError, match="larger than 4096 bytes"):
        primerge.merge(zoo["paths"]["base"], [folder], "task_arithmetic", task_specific=TASK_SPECIFIC)


def test_deeply_nested_task_rows_are_an_input_error(tmp_path):
    path = tmp_path / "task.jsonl"
    path.write_text('{"text": "a", "label": 0}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(InputError, match=r"row 2: the row is nested too deeply"):
        load_table(path)


@pytest.mark.parametrize("lie", ["tensor count", "string length", "array length", "dimension count"])
def test_gguf_headers_that_claim_more_than_the_file_holds_are_refused(tmp_path, lie):
    """Every count and length of a GGUF header is checked against the bytes left in the file."""
    import struct

    huge = 2 ** 60
    head = b"GGUF" + struct.pack("<I", 3)
    if lie == "tensor count":
        body = struct.pack("<QQ", huge, 0)
    elif lie == "string length":
        body = struct.pack("<QQ", 0, 1) + struct.pack("<Q", huge)
    elif lie == "array length":
        body = struct.pack("<QQ", 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, huge)
    else:
        body = struct.pack("<QQ", 1, 0) + struct.pack("<Q", 1) + b"w" + struct.pack("<I", 2 ** 31)
    path = tmp_path / "model.gguf"
    path.write_bytes(head + body)
    with pytest.raises((ValueError, EOFError)):
        gguf_tensors(path)
    with pytest.raises(InputError, match="GGUF"):
        open_weights(path)


# ------------------------------------------------------------------ 2. FP8: claims checked against the tensors


def quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An independent block quantizer (per block s = max|W| / 448), as DeepSeek's and transformers' do."""
    m, n = w.shape
    scales = torch.empty(math.ceil(m / block), math.ceil(n / block))
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            part = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scales[i, j] = part.abs().max() / 448
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (part / scales[i, j]).to(q.dtype)
    return q, scales


def fp8_folder(folder: Path, block: int, claimed, shapes=((32, 64), (64, 32)), scale=None, config=None) -> Path:
    """A checkpoint of FP8 weights quantized with ``block`` whose config claims ``claimed``."""
    gen = torch.Generator().manual_seed(block)
    tensors = {"norm.weight": torch.ones(32)}
    for i, shape in enumerate(shapes):
        q, s = quantize(torch.randn(shape, generator=gen), block)
        tensors[f"layers.{i}.proj.weight"], tensors[f"layers.{i}.proj.weight_scale_inv"] = q, s
    if scale is not None:
        tensors["layers.0.proj.weight_scale_inv"] = torch.full_like(tensors["layers.0.proj.weight_scale_inv"], scale)
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": claimed}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "toy", "quantization_config": quant}))
    return folder


@st.composite
def block_claims(draw):
    """A true block b, lengths that are multiples of it (some of two blocks or more), and a claimed
    block whose scale shapes are the true ones: b itself, or a lie b' with ⌈m/b'⌉ = m/b for every m."""
    block = draw(st.sampled_from([4, 8, 16]))
    multiples = draw(st.lists(st.integers(1, 5), min_size=2, max_size=3))
    multiples[0] = max(multiples[0], 2)
    lengths = [block * k for k in multiples]
    consistent = [c for c in range(1, 4 * block) if all(math.ceil(m / c) == m // block for m in lengths)]
    return block, lengths, draw(st.sampled_from(consistent))


@PROPERTY
@given(case=block_claims())
def test_a_block_size_is_accepted_only_when_it_is_the_one_the_scales_were_made_with(tmp_path_factory, case):
    """Among the claims whose scale shapes all fit, only the true block size is accepted (the rule in
    primerge.io.quantized: b' ≠ b divides no length m = k·b with k ≥ 2). An accepted claim reads
    back the quantizer's values: q·s of the true blocks."""
    block, lengths, claimed = case
    shapes = [(lengths[0], lengths[-1]), (lengths[-1], lengths[0])]
    folder = fp8_folder(tmp_path_factory.mktemp("fp8") / "m", block, [claimed, claimed], shapes)
    if claimed != block:
        with pytest.raises(InputError, match="weight_block_size"):
            open_weights(folder)
        return
    stored = load_file(str(folder / "model.safetensors"))
    weights = open_weights(folder)
    for name in ("layers.0.proj.weight", "layers.1.proj.weight"):
        q, s = stored[name].double(), stored[name + "_scale_inv"].double()
        expected = q * s.repeat_interleave(block, 0).repeat_interleave(block, 1)
        assert torch.equal(weights.load(name).double(), expected.float().double())


@pytest.mark.parametrize("claimed", [[2 ** 24, 2 ** 24], [2 ** 40, 2 ** 40], [64, 2 ** 40]])
def test_a_huge_block_size_allocates_nothing_larger_than_the_weight(tmp_path, claimed):
    """Weights of one block each: any block at least their size reads the same values, and neither
    dequantizing nor quantizing again makes anything larger than the weight (else: a 4 TB
    allocation)."""
    folder = fp8_folder(tmp_path / "m", 64, claimed, shapes=((64, 64), (64, 64)))
    weights = open_weights(folder)
    stored = load_file(str(folder / "model.safetensors"))
    w = weights.load("layers.0.proj.weight")
    assert torch.equal(w, stored["layers.0.proj.weight"].float() * stored["layers.0.proj.weight_scale_inv"])
    q, s = Fp8Blocks(tuple(claimed)).quantize(w)
    assert q.shape == w.shape and s.shape == (1, 1)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf")])
def test_scales_that_are_not_finite_and_positive_are_refused(tmp_path, capsys, scale):
    base = fp8_folder(tmp_path / "base", 16, [16, 16])
    model = fp8_folder(tmp_path / "model", 16, [16, 16], scale=scale)
    recipe = recipe_file(tmp_path, {"base": base, "models": [model], "method": "task_arithmetic"})
    refused(recipe, tmp_path / "out" / "merged", InputError, ["layers.0.proj.weight_scale_inv", "zero, negative or not finite"],
            capsys)


def test_a_quantization_config_over_float_weights_is_refused(zoo, tmp_path, capsys):
    base = model_copy(tmp_path / "base", zoo["base"], zoo["paths"]["base"])
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (base / "config.json").write_text(json.dumps(config))
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, base=base))
    refused(recipe, tmp_path / "out" / "merged", InputError, [base / "config.json", "no tensor", "Remove quantization_config"],
            capsys)


def test_a_one_dimensional_fp8_tensor_with_a_scale_is_refused_cleanly(tmp_path, capsys):
    folder = fp8_folder(tmp_path / "base", 16, [16, 16])
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["bias"] = torch.ones(16).to(torch.float8_e4m3fn)
    tensors["bias_scale_inv"] = torch.ones(1)
    save_file(tensors, str(folder / "model.safetensors"))
    recipe = recipe_file(tmp_path, {"base": folder, "models": [folder], "method": "task_arithmetic"})
    refused(recipe, tmp_path / "out" / "merged", InputError, ["'bias'", "block scales need a matrix"], capsys)


# ------------------------------------------------------------------ 2. tokenizers: ids, duplicates, rows


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    from realmodels import build_base, fine_tune

    root = tmp_path_factory.mktemp("vocab")
    build_base(root / "base", "llama")
    fine_tune(root / "base", root / "ft", "llama", 1)
    return root


def _with_tokenizer(root: Path, target: Path, change) -> Path:
    shutil.copytree(root / "ft", target)
    data = json.loads((target / "tokenizer.json").read_text())
    text = change(data)
    (target / "tokenizer.json").write_text(text if isinstance(text, str) else json.dumps(data))
    return target


def _grow(data):
    data["model"]["vocab"]["far"] = 200_000


def _duplicate(data):
    text = json.dumps(data)
    return text.replace('"w1": 1,', '"w1": 1, "w2": 1,', 1).replace('"w2": 2', '"w2": 7', 1)


def _shared_id(data):
    data["model"]["vocab"]["w2"] = 1


def _empty(data):
    data["model"]["vocab"][""] = 61


TOKENIZER_CASES = {
    "an id beyond the embedding rows": (_grow, "has id 200000, but the model's input embedding has 64 rows"),
    "a key given twice": (_duplicate, "appears twice"),
    "two tokens with one id": (_shared_id, "both have id 1"),
    "an empty token the union cannot add": (_empty, "cannot be added to the base's tokenizer"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_tokenizers_that_contradict_their_weights_or_themselves_are_refused(llama_pair, tmp_path, capsys, case):
    change, needle = TOKENIZER_CASES[case]
    model = _with_tokenizer(llama_pair, tmp_path / "model", change)
    recipe = recipe_file(tmp_path, {"base": llama_pair / "base", "models": [model], "method": "task_arithmetic",
                                    "tokenizer": "union"})
    refused(recipe, tmp_path / "out" / "merged", InputError, [needle], capsys)


@PROPERTY
@given(ids=st.lists(st.integers(0, 70), min_size=3, max_size=12),
       words=st.lists(st.sampled_from(["a", "b", "c", "d", "", "é", "a "]), min_size=3, max_size=12))
def test_a_vocabulary_read_is_the_one_its_file_states_or_refused(tmp_path_factory, ids, words):
    """A WordLevel tokenizer.json with drawn (token, id) pairs, duplicates and all: read_vocabulary
    either gives exactly the pairs the file states, each id once, or refuses it."""
    folder = tmp_path_factory.mktemp("tok")
    pairs = list(zip(words, ids))
    body = ", ".join(f"{json.dumps(t)}: {i}" for t, i in pairs)
    (folder / "tokenizer.json").write_text(
        '{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null, '
        '"pre_tokenizer": null, "post_processor": null, "decoder": null, '
        '"model": {"type": "WordLevel", "vocab": {' + body + '}, "unk_token": "a"}}')
    try:
        vocab = read_vocabulary(folder)
    except InputError:
        return
    assert vocab.tokens == dict(pairs) and len(set(vocab.tokens.values())) == len(vocab.tokens)


# ------------------------------------------------------------------ 2. architectures


def test_a_model_of_another_architecture_is_refused_unless_allowed(llama_pair, tmp_path, capsys):
    other = tmp_path / "mistral"
    shutil.copytree(llama_pair / "ft", other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(config))
    data = {"base": llama_pair / "base", "models": [other], "method": "task_arithmetic"}
    refused(recipe_file(tmp_path, data), tmp_path / "out" / "merged", InputError,
            ["model_type 'mistral'", "model_type 'llama'", "allow_other_architectures: true"], capsys)
    merged = primerge.merge_recipe(recipe_file(tmp_path / "allowed", {**data, "allow_other_architectures": True}))
    assert merged.state_dict


# ------------------------------------------------------------------ 2. label words


@PROPERTY
@given(label=st.text(min_size=1, max_size=12))
def test_a_label_is_one_line_of_printable_text(tmp_path_factory, label):
    """A label ends a prompt as its answer word: one with a line break or control character (the
    attack: ``"yes\\nAnswer: no"``) is refused, every other label is kept as it is (stripped)."""
    from primerge.data.tasks import single_line

    path = tmp_path_factory.mktemp("task") / "t.jsonl"
    rows = [{"text": "a", "label": label}, {"text": "b", "label": "other"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if not label.strip() or label.strip() == "other":
        return
    try:
        task = load_table(path)
    except InputError as exc:
        assert not single_line(label.strip()), exc
        return
    assert single_line(label.strip()) and label.strip() in task.classes
    assert all("\n" not in c and "\r" not in c for c in task.classes)


# ------------------------------------------------------------------ tracebacks and small defects


def test_a_model_name_with_a_lone_surrogate_writes_a_card(zoo, tmp_path):
    out = tmp_path / "merged"
    primerge.merge(zoo["paths"]["base"], [{"path": zoo["paths"]["models"][0], "name": "odd\udc80name"}],
                   "task_arithmetic", task_specific=TASK_SPECIFIC, out=out)
    assert "odd\\udc80name" in (out / "README.md").read_text(encoding="utf-8")


def test_workers_without_the_ray_backend_says_what_to_add(zoo, tmp_path, capsys):
    recipe = recipe_file(tmp_path, zoo_recipe(zoo))
    assert cli(["merge", str(recipe), "--out", str(tmp_path / "out"), "--workers", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--workers" in err and "add --backend ray" in err and "invalid recipe" not in err


def test_the_plans_treatment_counts_add_up_to_the_tensor_count(zoo, capsys):
    """The rows of the treatments partition the output's tensors (their total is that count); the
    vocabulary-aligned and task-specific counts are apart from it."""
    from primerge.core.plan import build_plan
    from primerge.core.recipe import build_recipe
    from primerge.core.sources import TREATMENTS
    from primerge.engine.preflight import ROW_LABELS, preflight

    plan = build_plan(build_recipe(zoo_recipe(zoo)))
    text = preflight(plan, None, torch.device("cpu"), calibrate_time=False).to_text()
    rows = {key: int(line.split()[-1]) for key in (*TREATMENTS, "total") for line in text.splitlines()
            if line.strip().startswith(ROW_LABELS[key])}
    assert rows["total"] == len(plan.entries) == sum(rows[k] for k in TREATMENTS) == len(load_file(
        str(zoo["paths"]["base"] / "model.safetensors")))
    assert f"{ROW_LABELS['task_specific']:<42} {3 * 2:>6}" in text  # 2 head tensors per model, counted apart


def test_a_listing_into_a_closed_pipe_ends_quietly():
    done = subprocess.run(f"{sys.executable} -m primerge methods | head -n 1", shell=True, capture_output=True,
                          text=True, executable="/bin/bash")
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr


# ------------------------------------------------------------------ 6. task folders run code only when allowed


def test_an_include_path_needs_an_explicit_allowance_and_says_why(tmp_path, capsys):
    """lm-eval task YAML can run code (``!function``): --include-path alone is refused before anything
    runs, with the reason and the flag; with --allow-task-code the note comes first on stderr."""
    from primerge.cli.llm import check_task_code

    (tmp_path / "task.yaml").write_text("task: mine\nprocess_docs: !function utils.process\n")
    assert cli(["eval", str(tmp_path), "--harness", "lm-eval", "--tasks", "mine", "--include-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "!function" in err and "--allow-task-code" in err and str(tmp_path) in err and "Traceback" not in err
    check_task_code([tmp_path], allowed=True)
    assert "running the task YAMLs" in capsys.readouterr().err
