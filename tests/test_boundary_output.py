"""The output boundary: names that become paths, what --force may replace, every command that writes,
the files copied from the base, non-finite outputs after the cast, the card's Markdown, parents a
failed write created, and temporary folders of live and dead writers.

Everything runs on real files (the tiny BERT zoo of conftest.py or hand-made safetensors) through
the API and the CLI; a refusal must be one ``primerge: error:`` line with nothing written or changed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt
from safetensors.torch import load_file, save_file

import primerge
from primerge.cli import main as cli
from primerge.util.errors import InputError, OutputError, RecipeError
from primerge.output.base import MergeResult
from primerge.output.card import write_card
from primerge.io.destination import destination
from primerge.io.manifest import MANIFEST, Ledger, tensor_record, verify_folder
from primerge.io.user_paths import MAX_COMPONENT, SAFE, component
from primerge.io.readers import SUPPORT_FILES
from primerge.io.writer import LOCK_SUFFIX, TEMP_MARK, save_tensors
from primerge.output.per_task import load_task_state
from primerge.core.recipe import build_recipe
from refusals import TASK_SPECIFIC, leftovers, model_copy, recipe_file, refused, snapshot, zoo_recipe

PROPERTY = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
GUARANTEES = Path(__file__).resolve().parents[1] / "docs" / "guarantees.md"


def cli_refuses(argv: list[str], needles, capsys) -> str:
    """The CLI exits 2 with one ``primerge: error:`` line holding every needle."""
    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("primerge: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in err, (needle, err)
    return err


# --------------------------------------------------------------------------- names that become paths


@PROPERTY
@given(text=st.text(min_size=1, max_size=400))
def test_a_component_is_one_plain_name_inside_its_folder(text):
    name = component(text)
    assert name not in (".", "..") and not name.startswith(".") and "/" not in name and "\0" not in name
    assert set(name) <= SAFE | {"%", "~"} and len(name.encode()) <= MAX_COMPONENT
    assert (Path("/out/task_heads") / f"{name}.safetensors").parent == Path("/out/task_heads")


@PROPERTY
@given(prefix=st.text(max_size=300), a=st.text(max_size=5), b=st.text(max_size=5))
def test_components_of_different_names_differ(prefix, a, b):
    assume(a != b and prefix + a)
    assume(prefix + b)
    assert component(prefix + a) != component(prefix + b)


HOSTILE_NAMES = ["org/model", "../../escape", "/abs/path", "x\0y", ".hidden", "..", "a" * 300, "tab\there"]


def test_model_names_that_look_like_paths_stay_inside_the_output(zoo, tmp_path):
    """EMR writes per_task/<name>/ and task_heads/<name>.safetensors: every name, however hostile,
    lands inside the output under its encoded name, can be loaded back by its own name, and
    nothing else in the tree changes."""
    root = tmp_path / "work"
    inputs = root / "inputs"
    shutil.copytree(zoo["paths"]["base"], inputs / "base")
    models = []
    for i, name in enumerate(HOSTILE_NAMES):
        folder = model_copy(inputs / f"m{i}", zoo["models"][i % 3])
        models.append({"path": folder, "name": name})
    before = snapshot(root)
    out = root / "out" / "merged"
    result = primerge.merge(inputs / "base", models, "emr", task_specific=TASK_SPECIFIC, out=out)
    after = snapshot(root)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before  # inputs untouched
    assert all(k.startswith("out/merged/") for k in after if k not in before)
    assert verify_folder(out).ok
    memory = primerge.merge(inputs / "base", models, "emr", task_specific=TASK_SPECIFIC)
    for i, name in enumerate(HOSTILE_NAMES):
        head = load_file(str(out / "task_heads" / f"{component(name)}.safetensors"))
        assert torch.equal(head["classifier.weight"], zoo["models"][i % 3]["classifier.weight"])
        rebuilt = load_task_state(result.out, name)
        assert all(torch.equal(rebuilt[k], v) for k, v in memory.task_states[name].items()), name


def test_names_differing_only_in_case_are_refused(zoo, tmp_path, capsys):
    models = [{"path": p, "name": n} for p, n in zip(zoo["paths"]["models"], ["Task", "task"])]
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=models))
    refused(recipe, tmp_path / "out" / "merged", RecipeError, ["'Task'", "'task'", "case"], capsys)


# --------------------------------------------------------------------------- what --force may replace


def _earlier(kind: str, folder: Path, zoo) -> Path:
    """An earlier primerge output of ``kind`` at ``folder``: a real merge, or a sealed report."""
    if kind == "merge":
        return primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"], "task_arithmetic",
                              task_specific=TASK_SPECIFIC, out=folder).out
    folder.mkdir(parents=True)
    (folder / "index.md").write_text("# an earlier report\n")
    Ledger(folder, kind=kind).seal()
    return folder


def _occupy(case: str, out: Path, zoo) -> None:
    """Put ``case`` at ``out``; each must survive ``merge --force`` untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if case == "a file (a recipe)":
        out.write_text(yaml.safe_dump({"base": "b", "models": ["m"]}))
    elif case == "a folder of other data":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif case == "a link to an earlier merge":
        out.symlink_to(_earlier("merge", out.parent / "real", zoo))
    elif case == "an earlier merge holding another file":
        _earlier("merge", out, zoo)
        (out / "notes.txt").write_text("mine")
    elif case == "an earlier merge holding a link":
        _earlier("merge", out, zoo)
        (out / "link").symlink_to(out.parent)
    elif case == "an earlier merge with an unreadable manifest":
        _earlier("merge", out, zoo)
        (out / MANIFEST).write_text("[" * 100_000)
    elif case == "an analysis report":
        _earlier("analysis", out, zoo)
    elif case == "a folder whose manifest is a FIFO":
        out.mkdir()
        os.mkfifo(out / MANIFEST)


OCCUPIED = {"a file (a recipe)": "is a file", "a folder of other data": f"no {MANIFEST}",
            "a link to an earlier merge": "is a symbolic link",
            "an earlier merge holding another file": "did not write (first: 'notes.txt')",
            "an earlier merge holding a link": "link or special file ('link')",
            "an earlier merge with an unreadable manifest": "cannot be read",
            "an analysis report": "analysis report, not a merge",
            "a folder whose manifest is a FIFO": "special file"}


@pytest.mark.parametrize("case", list(OCCUPIED))
def test_force_never_replaces_what_primerge_did_not_write(zoo, tmp_path, capsys, case):
    out = tmp_path / "out" / "merged"
    _occupy(case, out, zoo)
    before = snapshot(out.parent) if "FIFO" not in case else sorted(os.listdir(out))
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo))
    needle = OCCUPIED[case]
    refused(recipe, out, OutputError, [out, needle], capsys, force=True, existed=True)
    assert (snapshot(out.parent) if "FIFO" not in case else sorted(os.listdir(out))) == before


def test_force_replaces_an_earlier_merge_and_an_empty_folder(zoo, tmp_path):
    out = _earlier("merge", tmp_path / "merged", zoo)
    result = primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"][:2], "ties", task_specific=TASK_SPECIFIC,
                            out=out, force=True)
    assert result.out == out and verify_folder(out).ok and leftovers(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"], "ties", task_specific=TASK_SPECIFIC,
                          out=empty).out == empty


@pytest.fixture
def hub_snapshot(zoo, tmp_path) -> dict:
    """A Hugging Face cache layout: snapshots/<rev>/ files are links into blobs/."""
    repo = tmp_path / "hub" / "models--org--ft"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for name, blob in (("model.safetensors", "b1"), ("config.json", "b2")):
        src = zoo["paths"]["models"][0] / name
        shutil.copyfile(src, repo / "blobs" / blob)
        (snap / name).symlink_to(f"../../blobs/{blob}")
    return {"repo": repo, "snapshot": snap}


@pytest.mark.parametrize("where", ["blobs", "repo", "snapshots"])
def test_output_holding_a_hub_cache_input_is_refused_even_when_it_looks_like_an_output(
        zoo, tmp_path, capsys, hub_snapshot, where):
    """An output that contains the blobs a snapshot's links resolve to would delete the input's
    weights: refused, even with --force and a manifest that lists every blob."""
    repo = hub_snapshot["repo"]
    Ledger(repo / "blobs").seal()  # the blobs folder now looks like an earlier primerge output
    out = {"blobs": repo / "blobs", "repo": repo, "snapshots": repo / "snapshots"}[where]
    before = snapshot(repo)
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo, models=[hub_snapshot["snapshot"]]))
    refused(recipe, out, OutputError, [out, "contains the input"], capsys, force=True, existed=True)
    assert snapshot(repo) == before


def test_force_must_be_a_boolean(zoo, tmp_path):
    with pytest.raises(RecipeError, match="force must be true or false"):
        primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"], "task_arithmetic",
                       task_specific=TASK_SPECIFIC, out=tmp_path / "o", force="no")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- every command that writes


def _demo(out: Path, tmp_path) -> list[str]:
    return ["demo", "--tasks", "rt_sentiment", "--base", str(tmp_path / "inputs" / "base"), "--cache",
            str(tmp_path / "cache"), "--report", str(out), "--methods", "tsv", "--quiet"]


COMMANDS = {
    "analyze": lambda out, recipe, zoo, tmp: ["analyze", str(recipe), "--out", str(out), "--force", "--quiet"],
    "merge --as-lora": lambda out, recipe, zoo, tmp: ["merge", str(recipe), "--out", str(out), "--as-lora", "4",
                                                      "--force", "--quiet"],
    "demo --report": lambda out, recipe, zoo, tmp: _demo(out, tmp),
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("case", ["an input", "inside an input", "a folder of other data", "another kind"])
def test_every_writing_command_follows_the_output_rules(zoo, tmp_path, capsys, command, case):
    """analyze, LoRA export and the demo report refuse what merge refuses, before any work; their
    --force (the demo's rerun) replaces only their own kind of output."""
    base = tmp_path / "inputs" / "base"
    shutil.copytree(zoo["paths"]["base"], base)
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo, base=base))
    out = {"an input": base, "inside an input": base / "report"}.get(case, tmp_path / "out")
    if case == "a folder of other data":
        _occupy(case, out, zoo)
    elif case == "another kind":  # a LoRA adapter is a merge output: an analysis report is not
        _earlier("analysis" if command == "merge --as-lora" else "merge", out, zoo)
    before = snapshot(tmp_path)
    needle = {"a folder of other data": "not a primerge output", "another kind": "not a"}.get(
        case, "is, or is inside, the input")
    cli_refuses(COMMANDS[command](out, recipe, zoo, tmp_path), [out, needle], capsys)
    assert snapshot(tmp_path) == before and not (base / "report").exists()


def test_zoo_models_and_bench_work_folders_follow_the_output_rules(zoo, tmp_path, capsys):
    from primerge.evaluation.model import save_folder

    base = zoo["paths"]["base"]
    with pytest.raises(OutputError, match="is, or is inside, the input"):
        save_folder(base / "zoo", None, None, inputs=[base])  # refused before anything is saved
    other = tmp_path / "data"
    _occupy("a folder of other data", other, zoo)
    with pytest.raises(OutputError, match=f"no {MANIFEST}"):
        save_folder(other, None, None)
    assert sorted(os.listdir(other)) == ["thesis.tex"]

    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo))
    bench = ["bench", "--recipe", str(recipe), "--methods", "task_arithmetic", "--repeats", "1", "--no-scaling",
             "--no-accuracy", "--workdir"]
    cli_refuses([*bench, str(base / "work")], ["is, or is inside, the input"], capsys)
    assert not (base / "work").exists()
    (tmp_path / "a_file").write_text("x")
    cli_refuses([*bench, str(tmp_path / "a_file")], ["cannot create the work folder"], capsys)


def test_the_demo_replaces_its_own_earlier_report_only():
    """Without a --force option the demo replaces an earlier demo report (with a manifest, or
    the four files it wrote before manifests) and nothing else."""
    from primerge.evaluation.demo import REPORT_FILES

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        legacy = Path(tmp) / "demo-report"
        legacy.mkdir()
        for name in REPORT_FILES:
            (legacy / name).write_text("old")
        target = destination(legacy, force=True, kind="demo-report", legacy=REPORT_FILES)
        assert target.existing() == "previous"
        (legacy / "mine.txt").write_text("x")
        with pytest.raises(OutputError, match="not a primerge output"):
            destination(legacy, force=True, kind="demo-report", legacy=REPORT_FILES)


# --------------------------------------------------------------------------- files copied from the base


def test_only_vetted_support_files_are_copied(zoo, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(zoo["paths"]["base"], base)
    config = json.loads((base / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel", "AutoConfig": "other--configuration_x.X"}
    (base / "config.json").write_text(json.dumps(config))
    wanted = {"generation_config.json": "{}", "vocab.txt": "[PAD]\n", "LICENSE": "Apache-2.0",
              "chat_template.jinja": "{{ messages }}", "modeling_custom.py": "class CustomModel: pass\n"}
    stray = {".env": "TOKEN=secret", "id_rsa": "-----BEGIN", "optimizer.pt": "x", "trainer_state.json": "{}",
             "training_args.bin": "x", "notes.txt": "x", "evil.py": "import os", "README.md": "# base card"}
    for name, text in {**wanted, **stray}.items():
        (base / name).write_text(text)
    (base / "checkpoint-500").mkdir()
    (base / "checkpoint-500" / "optimizer.pt").write_text("x")
    out = primerge.merge(base, zoo["paths"]["models"], "task_arithmetic", task_specific=TASK_SPECIFIC,
                         out=tmp_path / "out").out
    copied = {p.name for p in out.iterdir() if p.is_file()} - {"model.safetensors", "README.md", MANIFEST}
    assert copied == {"config.json", "tokenizer_config.json", *wanted}
    for name in copied:
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert (out / "README.md").read_text() != "# base card"


def test_the_guarantees_list_exactly_the_copied_files():
    text = " ".join(GUARANTEES.read_text().split())
    listed = text.split("An output copies these files of the base folder when they are there:", 1)[1]
    listed = listed.split("and the custom-code modules", 1)[0]
    assert re.findall(r"`([^`]+)`", listed) == list(SUPPORT_FILES)


def test_every_tensor_of_an_output_is_written_by_the_checking_writer():
    """The finite check lives in io.writer.save_tensors: no other module of the merge path calls
    safetensors' writer (only the zoo builders, PAVE's covariance and decomposition caches, RegMean++'s
    per-stage Gram matrices and the method contract's input files, which write no merge)."""
    src = Path(primerge.__file__).parent
    writers = {p.relative_to(src).as_posix() for p in src.rglob("*.py")
               if re.search(r"\bsave_file\(|safetensors\.torch\.save\(|torch\.save\(", p.read_text())}
    assert writers == {"io/writer.py", "evaluation/model.py", "purify/covariance.py", "purify/store.py",
                       "calibration/merged.py", "testing/checks.py"}, writers


@pytest.mark.parametrize("what", ["folder", "fifo"])
def test_a_support_file_that_is_not_a_file_is_an_error(zoo, tmp_path, capsys, what):
    base = tmp_path / "base"
    shutil.copytree(zoo["paths"]["base"], base)
    (base / "tokenizer_config.json").unlink()
    os.mkdir(base / "tokenizer_config.json") if what == "folder" else os.mkfifo(base / "tokenizer_config.json")
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo, base=base))
    needle = "a folder where a support file" if what == "folder" else "a FIFO (named pipe) where a support file"
    refused(recipe, tmp_path / "out", InputError, [base / "tokenizer_config.json", needle], capsys)


# --------------------------------------------------------------------------- non-finite outputs


def _state(dtype: torch.dtype, value: float, extra: float = 0.0) -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.full((4, 3), value + extra).to(dtype), "norm.weight": torch.ones(4).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_an_overflow_in_the_stored_dtype_is_refused(tmp_path, capsys, dtype):
    """θ₀ + Σ τ fits in float32 but not in the base's dtype: an error naming the tensor and the
    dtype (written, in memory), never an Inf in the output."""
    big = torch.finfo(dtype).max * 0.9
    base = model_copy(tmp_path / "base", _state(dtype, big))
    models = [model_copy(tmp_path / f"m{t}", _state(dtype, big, big * 0.1)) for t in range(2)]
    recipe = recipe_file(tmp_path / "r", {"base": base, "models": models, "method": "task_arithmetic",
                                          "parameters": {"scale": 1.0}})
    name = str(dtype).removeprefix("torch.")
    refused(recipe, tmp_path / "out", OutputError, ["'layer.weight'", f"NaN or Inf values as {name}"], capsys)
    with pytest.raises(OutputError, match="merge result: tensor 'layer.weight'"):
        primerge.merge(base, models, "task_arithmetic", scale=1.0)


@pytest.mark.parametrize("where", ["copied from the base", "a task head"])
def test_non_finite_copied_tensors_and_heads_are_refused(zoo, tmp_path, capsys, where):
    base_state, model_state = dict(zoo["base"]), dict(zoo["models"][0])
    if where == "copied from the base":
        base_state["classifier.weight"] = torch.full((2, 32), float("inf"))  # task-specific: copied
        model_state["classifier.weight"] = torch.zeros(2, 32)
    else:
        model_state["classifier.bias"] = torch.tensor([0.0, float("nan")])
    base = model_copy(tmp_path / "base", base_state)
    model = model_copy(tmp_path / "m", model_state)
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo, base=base, models=[model, zoo["paths"]["models"][1]]))
    tensor = "classifier.weight" if where == "copied from the base" else "classifier.bias"
    refused(recipe, tmp_path / "out", OutputError, [f"'{tensor}'", "NaN or Inf"], capsys)


FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@PROPERTY
@given(dtype=st.sampled_from(FLOATS), shape=st.lists(st.integers(0, 4), max_size=3),
       bad=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]), at=st.integers(0, 100))
def test_the_writer_refuses_exactly_the_non_finite_tensors(tmp_path_factory, dtype, shape, bad, at):
    """save_tensors is the one way primerge writes tensors: it writes finite ones and refuses any
    NaN/Inf, of every float dtype, before anything reaches the disk."""
    tensor = torch.randn(shape).to(dtype)
    if bad is not None and tensor.numel():
        tensor.view(-1)[at % tensor.numel()] = bad
    path = tmp_path_factory.mktemp("w") / "t.safetensors"
    if bad is not None and tensor.numel():
        with pytest.raises(OutputError, match="'t' holds NaN or Inf"):
            save_tensors(path, {"t": tensor, "ints": torch.arange(3)})
        assert not path.exists()
    else:
        save_tensors(path, {"t": tensor, "ints": torch.arange(3)})
        assert torch.equal(load_file(str(path))["t"], tensor)


def test_verify_reports_a_non_finite_tensor(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    tensors = {"w": torch.tensor([1.0, float("inf")]), "b": torch.zeros(2)}
    save_file(tensors, str(folder / "model.safetensors"))
    manifest = {"format": 1, "kind": "merge", "files": {"model.safetensors": {
        "size": (folder / "model.safetensors").stat().st_size,
        "tensors": {k: tensor_record(v) for k, v in tensors.items()}}}}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    assert cli.main(["verify", str(folder)]) == 1
    out = capsys.readouterr().out
    assert "model.safetensors: tensor 'w' holds NaN or Inf" in out and "'b'" not in out


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_without_block_scales_is_refused_with_the_reason(tmp_path, capsys, dtype):
    """Raw float8 values are not the weights without their scales (FP8 with weight_scale_inv is
    dequantized: tests/test_checkpoints_tensors.py)."""
    state = {"w": torch.randn(4, 4).to(dtype), "n": torch.ones(4)}
    base = model_copy(tmp_path / "base", state)
    model = model_copy(tmp_path / "m", {k: (v.float() + 0.1).to(v.dtype) for k, v in state.items()})
    recipe = recipe_file(tmp_path / "r", {"base": base, "models": [model, model], "method": "prime"})
    refused(recipe, tmp_path / "out", InputError, [base / "model.safetensors", "'w'", "FP8 without block scales", "Fix:"],
            capsys)


# --------------------------------------------------------------------------- the model card's Markdown

MD = MarkdownIt("commonmark").enable("table")
NAMES = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())


def _code_spans(tokens) -> list[str]:
    return [c.content for t in tokens if t.type == "inline" for c in t.children or [] if c.type == "code_inline"]


def _shown(text: str) -> str:
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 32 or ord(c) == 127 else c for c in text)


@PROPERTY
@given(labels=st.lists(NAMES, min_size=1, max_size=3, unique=True),
       tensors=st.lists(NAMES, min_size=1, max_size=3, unique=True))
def test_card_markdown_holds_any_model_and_tensor_names(tmp_path_factory, labels, tensors):
    """Whatever the names (backticks, pipes, newlines, HTML), the card's tables keep one row per
    model with the name as its first cell, each task head is one list item naming its tensors,
    and the recipe block is exactly the recipe."""
    assume(len({component(x).casefold() for x in labels}) == len(labels))
    folder = tmp_path_factory.mktemp("card")
    recipe = build_recipe({"base": "base|dir`", "models": [{"path": f"m{i}", "name": n} for i, n in enumerate(labels)],
                           "method": "task_arithmetic"})
    result = MergeResult("task_arithmetic", {"scale": None}, counts={})
    heads = {label: {n: torch.zeros(1) for n in tensors} for label in labels}
    tokens = MD.parse(write_card(folder, recipe, result, ["model.safetensors"], heads, [], []).read_text())
    models = next(i for i, t in enumerate(tokens) if t.type == "inline" and t.content == "name")
    table = tokens[models:next(i for i in range(models, len(tokens)) if tokens[i].type == "table_close")]
    assert _code_spans(table)[0::2] == [_shown(x) for x in labels]
    assert len([t for t in table if t.type == "tr_open"]) == len(labels)  # body rows (the header is before)
    start = next(i for i, t in enumerate(tokens) if t.type == "inline" and t.content == "Task-specific tensors")
    end = next(i for i in range(start + 1, len(tokens)) if tokens[i].type == "heading_open")
    items = [t for t in tokens[start:end] if t.type == "inline" and t.level == 3]  # inside list items
    assert len(items) == len(labels)
    for item, label in zip(items, labels):
        assert _code_spans([item]) == [_shown(label), f"task_heads/{component(label)}.safetensors",
                                       *(_shown(n) for n in tensors)]
    fence = next(t for t in tokens if t.type == "fence")
    assert fence.content == recipe.to_yaml()


# --------------------------------------------------------------------------- parents and temporary folders


def test_a_failed_merge_leaves_no_parent_folders_it_created(zoo, tmp_path, capsys):
    state = dict(zoo["models"][1])
    state["pooler.dense.weight"] = torch.full_like(state["pooler.dense.weight"], float("nan"))
    bad = model_copy(tmp_path / "bad", state)
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo, models=[zoo["paths"]["models"][0], bad]))
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "new" / "a" / "b" / "merged", tmp_path / "kept" / "a" / "merged"):
        refused(recipe, out, InputError, ["'pooler.dense.weight'"], capsys, shard_size=10_000)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "kept").is_dir() and not any((tmp_path / "kept").iterdir())


def test_a_live_writer_in_another_pid_namespace_keeps_its_temporary_folder(zoo, tmp_path):
    """Staleness is decided by the writer's lock, not its pid: a folder whose pid runs no process
    here (another container) but whose lock is held survives a merge to the same destination;
    once the lock is released, the next merge removes it."""
    out = tmp_path / "merged"
    live = tmp_path / f".merged{TEMP_MARK}999999999-0badf00d"
    live.mkdir()
    (live / "model.safetensors").write_bytes(b"being written")
    lock = live.with_name(live.name + LOCK_SUFFIX)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(120)"), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        args = (zoo["paths"]["base"], zoo["paths"]["models"], "task_arithmetic")
        primerge.merge(*args, task_specific=TASK_SPECIFIC, out=out)
        assert (live / "model.safetensors").read_bytes() == b"being written"
    finally:
        holder.kill()
        holder.wait()
    primerge.merge(*args, task_specific=TASK_SPECIFIC, out=out, force=True)
    assert not live.exists() and not lock.exists() and leftovers(out) == []
