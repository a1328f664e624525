"""The input boundary: special files, hostile JSON and adapter configs, regular expressions that
would never finish, paths, seeds, sizes and devices no file system or machine can take, odd API
arguments, the reader's single header parse, and a verify that does not trust its manifest.

Each case must end in one clear error (``primerge: error:`` and exit 2 on the command line; exit 1
with one line per problem for ``verify``), never a traceback or a hang.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
from helpers import fails_after
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import primerge
from primerge.cli import main as cli
from primerge.util.errors import InputError, PrimergeError, RecipeError
from primerge.io import readers
from primerge.io.manifest import MANIFEST, verify_folder
from primerge.io.readers import open_checkpoint
from primerge.util.patterns import Pattern
from refusals import TASK_SPECIFIC, model_copy, recipe_file, refused, zoo_recipe

PROPERTY = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
QUERY = "encoder.layer.0.attention.self.query"
NESTED = "[" * 100_000 + "]" * 100_000


@pytest.fixture(autouse=True)
def no_hang():
    """Fail (instead of blocking the suite) if a case blocks on a FIFO or loops for a minute."""
    with fails_after(60):
        yield


def make_adapter(folder: Path, config: dict | None = None, raw: str | None = None, rank: int = 2,
                 module: str = QUERY, width: int = 32) -> Path:
    """A LoRA adapter of ``module`` written by hand (peft's file layout and key names)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = raw if raw is not None else json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 4, **(config or {})})
    (folder / "adapter_config.json").write_text(text)
    gen = torch.Generator().manual_seed(0)
    save_file({f"base_model.model.{module}.lora_A.weight": torch.randn(rank, width, generator=gen),
               f"base_model.model.{module}.lora_B.weight": torch.randn(width, rank, generator=gen)},
              str(folder / "adapter_model.safetensors"))
    return folder


# --------------------------------------------------------------------------- special files


def _special(path: Path, what: str) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    os.mkfifo(path) if what == "fifo" else path.mkdir()


def _sharded(folder: Path, state: dict) -> Path:
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict.fromkeys(state, "model-00001-of-00001.safetensors")}))
    return folder


def _setup(where: str, zoo, tmp: Path) -> tuple[dict, Path]:
    """Recipe overrides with one file replaced by a special file, and that file's path."""
    if where in ("weights", "config"):
        folder = model_copy(tmp / "m", zoo["models"][0], zoo["paths"]["models"][0])
        target = folder / ("model.safetensors" if where == "weights" else "config.json")
        return {"models": [folder]} if where == "weights" else {"base": folder, "models": zoo["paths"]["models"]}, target
    if where == "single weight file":
        return {"models": [tmp / "x.safetensors"]}, tmp / "x.safetensors"
    if where in ("index", "shard"):
        folder = _sharded(tmp / "sharded", dict(zoo["models"][0]))
        name = "model.safetensors.index.json" if where == "index" else "model-00001-of-00001.safetensors"
        return {"models": [folder]}, folder / name
    folder = make_adapter(tmp / "adapter")
    name = "adapter_config.json" if where == "adapter config" else "adapter_model.safetensors"
    return {"models": [folder, zoo["paths"]["models"][0]]}, folder / name


WHERE = ["weights", "single weight file", "config", "index", "shard", "adapter config", "adapter weights"]


@pytest.mark.parametrize("where,what", [(w, x) for w in WHERE for x in ("fifo", "folder")
                                        if (w, x) != ("single weight file", "folder")])  # that is a model folder
def test_special_files_are_refused_before_they_are_opened(zoo, tmp_path, capsys, where, what):
    overrides, target = _setup(where, zoo, tmp_path)
    _special(target, what)
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo, **overrides))
    found = "a FIFO (named pipe) where" if what == "fifo" else "a folder where"
    refused(recipe, tmp_path / "out" / "merged", InputError, [target, found], capsys)


def test_a_socket_where_the_weights_should_be_is_refused(zoo, tmp_path, capsys):
    import socket
    import tempfile

    with tempfile.TemporaryDirectory(dir="/tmp") as short:  # a socket path must fit in 108 bytes
        folder = Path(short) / "m"
        folder.mkdir()
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(folder / "model.safetensors"))
            recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo, models=[folder]))
            refused(recipe, tmp_path / "out", InputError, [folder / "model.safetensors", "a socket where"], capsys)


# --------------------------------------------------------------------------- tracebacks that became errors


def _base_file(zoo, tmp: Path, name: str, text: str) -> dict:
    base = tmp / "base"
    shutil.copytree(zoo["paths"]["base"], base)
    (base / name).write_text(text)
    return {"base": base}


def _adapter_case(config: dict | None = None, raw: str | None = None, rank: int = 2):
    return lambda zoo, tmp: {"models": [make_adapter(tmp / "adapter", config, raw, rank), zoo["paths"]["models"][0]]}


def _index_case(zoo, tmp: Path) -> dict:
    folder = tmp / "idx"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(NESTED)
    return {"models": [folder]}


CASES = {  # name: (recipe overrides from (zoo, tmp_path), error, needles)
    "nested config.json": (lambda z, t: _base_file(z, t, "config.json", NESTED), InputError,
                           ["config.json", "nested too deeply"]),
    "nested tokenizer.json": (lambda z, t: _base_file(z, t, "tokenizer.json", NESTED), InputError,
                              ["tokenizer.json", "nested too deeply"]),
    "nested shard index": (_index_case, InputError, ["model.safetensors.index.json", "nested too deeply"]),
    "nested adapter config": (_adapter_case(raw=NESTED), InputError, ["adapter_config.json", "nested too deeply"]),
    "adapter r: 0": (_adapter_case({"r": 0}), InputError, ["r is 0", "positive integer"]),
    "adapter r: '8'": (_adapter_case({"r": "8"}), InputError, ["r is '8'"]),
    "adapter r: 2.5": (_adapter_case({"r": 2.5}), InputError, ["r is 2.5"]),
    "adapter r: true": (_adapter_case({"r": True}), InputError, ["r is True"]),
    "adapter r: 10^400": (_adapter_case({"r": 10**400}), InputError, ["positive integer"]),
    "adapter lora_alpha: 'x'": (_adapter_case({"lora_alpha": "x"}), InputError, ["lora_alpha is 'x'", "finite"]),
    "adapter lora_alpha: NaN": (_adapter_case({"lora_alpha": math.nan}), InputError, ["lora_alpha is nan"]),
    "adapter lora_alpha: 10^400": (_adapter_case({"lora_alpha": 10**400}), InputError, ["finite number"]),
    "adapter rank_pattern a list": (_adapter_case({"rank_pattern": [1]}), InputError,
                                    ["rank_pattern must map", "list"]),
    "adapter rank_pattern bad regex": (_adapter_case({"rank_pattern": {"(": 2}}), InputError,
                                       ["rank_pattern key '('", "not a valid regular expression"]),
    "adapter rank_pattern value 0": (_adapter_case({"rank_pattern": {"query": 0}}), InputError,
                                     ["rank_pattern['query'] is 0"]),
    "adapter alpha_pattern value 'x'": (_adapter_case({"alpha_pattern": {"query": "x"}}), InputError,
                                        ["alpha_pattern['query'] is 'x'"]),
    "adapter use_rslora: 'yes'": (_adapter_case({"use_rslora": "yes"}), InputError, ["use_rslora is 'yes'"]),
    "adapter pattern too long": (_adapter_case({"rank_pattern": {"q" * 3000: 2}}), InputError,
                                 ["characters long"]),
    "adapter pattern unrolling": (_adapter_case({"rank_pattern": {"((a{100}){100}){100}": 2}}), InputError,
                                  ["nests counted repetitions"]),
    "adapter factors of rank 0": (_adapter_case({"r": None}, rank=0), InputError, ["rank 0"]),
    "LiNeS group not a number": (lambda z, t: {"lines": {"alpha": 1, "beta": 0, "block_pattern": r"(layer)\."}},
                                 RecipeError, ["lines.block_pattern", "'layer'", "not a block number"]),
    "base with a NUL byte": (lambda z, t: {"base": "models/a\0b"}, RecipeError, ["base", "NUL byte"]),
    "model with a NUL byte": (lambda z, t: {"models": ["a\0b"]}, RecipeError, ["models: path", "NUL byte"]),
    "over-long path component": (lambda z, t: {"base": "x" * 300}, RecipeError, ["300 bytes", "255"]),
    "path longer than PATH_MAX": (lambda z, t: {"base": "/".join(["x" * 200] * 25)}, RecipeError, ["4096"]),
    "seed of 5000 digits": (lambda z, t: {}, RecipeError, ["not valid YAML", "5000 digits"]),
    "seed of 2^70": (lambda z, t: {"seed": 2**70}, RecipeError, ["seed"]),
    "negative seed": (lambda z, t: {"seed": -1}, RecipeError, ["seed"]),
    "matrices regex unrolling": (lambda z, t: {"matrices": "(((x{50}){50}){50})"}, RecipeError,
                                 ["matrices", "nests counted repetitions"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inputs_that_raised_tracebacks_are_one_clear_error(zoo, tmp_path, capsys, case):
    overrides, error, needles = CASES[case]
    path = recipe_file(tmp_path / "r", zoo_recipe(zoo, **overrides(zoo, tmp_path)))
    if case == "seed of 5000 digits":  # written as text: PyYAML builds no such int (Python's digit limit)
        path.write_text(path.read_text() + "seed: " + "9" * 5000 + "\n")
    refused(path, tmp_path / "out" / "merged", error, needles, capsys)


@pytest.mark.parametrize("size", ["infGB", "nanMB", "0", "-5", "1e400", "", "GB", "0.1B"])
def test_shard_sizes_that_are_not_a_positive_size(zoo, tmp_path, capsys, size):
    recipe = recipe_file(tmp_path, zoo_recipe(zoo))
    refused(recipe, tmp_path / "out", RecipeError, ["size"], capsys, shard_size=size or " ")


@pytest.mark.parametrize("device", ["meta", "mps", "xla", "cuda:99", "cpu:0", "CUDA", "cuda:-1"])
def test_unsupported_devices(zoo, tmp_path, capsys, device):
    recipe = recipe_file(tmp_path, zoo_recipe(zoo))
    needle = "CUDA" if device == "cuda:99" else f"unsupported device '{device}'"
    refused(recipe, tmp_path / "out", RecipeError, [needle], capsys, device=device)


JUNK = (st.none() | st.booleans() | st.integers(-2, 2**70) | st.floats(allow_nan=True) | st.binary(max_size=4)
        | st.text(max_size=4) | st.just("a\0b") | st.lists(st.integers(0, 2), max_size=2)
        | st.dictionaries(st.text(max_size=3), st.integers(0, 2), max_size=2))
ARGUMENTS = ["out", "shard_size", "device", "force", "quiet", "allow_pickle", "seed", "lora_rank", "task_specific",
             "matrices", "lines", "parameters", "method"]


def test_odd_python_api_arguments_are_primerge_errors(zoo, tmp_path, monkeypatch):
    """Any value of any keyword argument of primerge.merge: a merge or a PrimergeError, never
    another exception (shard_size=1.5, out=b"...", device=3, force="no", seed=2**70, ...)."""
    monkeypatch.chdir(tmp_path)  # relative outputs land here
    outcomes = []

    @PROPERTY
    @given(changes=st.dictionaries(st.sampled_from(ARGUMENTS), JUNK, min_size=1, max_size=2))
    def check(changes):
        kwargs = {"task_specific": TASK_SPECIFIC, **changes}
        if isinstance(kwargs.get("out"), str):
            kwargs["out"] = tmp_path / "outs" / kwargs["out"].replace("/", "_")
        try:
            primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"][:2], **{"method": "task_arithmetic",
                                                                                  **kwargs})
            outcomes.append("merged")
        except PrimergeError:
            outcomes.append("refused")

    check()
    assert outcomes.count("refused") > 20 and "merged" in outcomes
    for bad in ({"shard_size": 1.5}, {"out": b"out"}, {"device": 3}, {"force": "no", "out": tmp_path / "o"},
                {"allow_pickle": "no"}, {"seed": 2**70}):
        with pytest.raises(PrimergeError):
            primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"][:2], "task_arithmetic", **bad)
    with pytest.raises(RecipeError, match="recipe must be a path"):
        primerge.merge_recipe(b"recipe.yaml")


# --------------------------------------------------------------------------- regular expressions in bounded time

REGEX_TEXT = st.text(alphabet="()[]{}|*+?.\\^$a1,:!=<>-wd", max_size=40)


@PROPERTY
@given(text=REGEX_TEXT)
def test_any_pattern_compiles_or_is_refused_and_matches_in_bounded_time(text):
    try:
        pattern = Pattern(text, "task_specific")
    except RecipeError:
        return
    for name in ("encoder.layer.0.attention.self.query.weight", "a" * 40, ""):
        try:
            pattern.search(name)
        except RecipeError as exc:
            assert "took more than" in str(exc)


def _aaa_base(tmp: Path) -> tuple[Path, Path, str]:
    """A base and a fine-tune whose first module is named by 60 a's (prey for backtracking)."""
    module = "a" * 60
    state = {f"{module}.weight": torch.randn(8, 8), "norm.weight": torch.ones(8)}
    base = model_copy(tmp / "base", state)
    model = model_copy(tmp / "ft", {k: v + 0.1 for k, v in state.items()})
    return base, model, module


def test_a_catastrophic_adapter_pattern_times_out_with_an_error(tmp_path, capsys):
    base, model, module = _aaa_base(tmp_path)
    adapter = make_adapter(tmp_path / "adapter", {"rank_pattern": {r"(a|aa)+\3b": 2}}, module=module, width=8)
    recipe = recipe_file(tmp_path / "r", {"base": base, "models": [adapter, model], "method": "task_arithmetic"})
    refused(recipe, tmp_path / "out", InputError, ["adapter_config.json", "rank_pattern", "took more than"], capsys)


def test_a_catastrophic_recipe_pattern_times_out_with_an_error(tmp_path, capsys):
    base, model, _ = _aaa_base(tmp_path)
    recipe = recipe_file(tmp_path / "r", {"base": base, "models": [model, model], "method": "task_arithmetic",
                                          "task_specific": r"(a|aa)+\1b"})
    refused(recipe, tmp_path / "out", RecipeError, ["task_specific", "took more than"], capsys)


# --------------------------------------------------------------------------- the reader

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int8,
          torch.uint8, torch.bool]


@PROPERTY
@given(specs=st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)),
                      min_size=1, max_size=6))
def test_the_reader_returns_exactly_what_safetensors_stores(tmp_path_factory, specs):
    gen = torch.Generator().manual_seed(len(specs))
    state = {f"t{i}": (torch.randn(shape, generator=gen) * 50).to(dtype) for i, (dtype, shape) in enumerate(specs)}
    path = tmp_path_factory.mktemp("r") / "w.safetensors"
    save_file(state, str(path))
    checkpoint = open_checkpoint(path)
    stored = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        assert checkpoint.names == list(handle.keys())  # the library's order (the header's is by data)
    for name, tensor in stored.items():
        got = checkpoint.load(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), name


def test_each_header_is_parsed_once_however_many_tensors_are_read(tmp_path, monkeypatch):
    """Reading N tensors costs N opens and reads, not N header parses (which made 4,000 tensors
    take minutes); the library validates each file once."""
    state = {f"layers.{i}.weight": torch.full((3,), float(i)) for i in range(500)}
    _sharded(tmp_path / "m", state)
    parses, validations = [], []
    real_parse, real_open = readers._read_header, readers.safe_open
    monkeypatch.setattr(readers, "_read_header", lambda p: parses.append(p) or real_parse(p))
    monkeypatch.setattr(readers, "safe_open", lambda *a, **k: validations.append(a) or real_open(*a, **k))
    checkpoint = open_checkpoint(tmp_path / "m")
    for i in range(500):
        assert checkpoint.load(f"layers.{i}.weight")[0] == i
    assert len(parses) == 1 and len(validations) == 1


@pytest.mark.parametrize("change", ["appended", "truncated"])
def test_a_file_changed_during_the_merge_is_an_error(tmp_path, change):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(64), "b": torch.zeros(64)}, str(path))
    checkpoint = open_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data + b"\0" * 8 if change == "appended" else data[:-100])
    with pytest.raises(InputError, match="changed while it was being merged"):
        checkpoint.load("b")


# --------------------------------------------------------------------------- verify does not trust its manifest


@pytest.fixture
def output(zoo, tmp_path) -> Path:
    return primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"], "task_arithmetic", task_specific=TASK_SPECIFIC,
                          out=tmp_path / "merged").out


def _rewrite(folder: Path, edit) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest["files"])
    (folder / MANIFEST).write_text(json.dumps(manifest))


ESCAPES = ["../outside.txt", "/etc/hostname", "task_heads/../../outside.txt", "./config.json", "", "a\\b",
           "config.json/"]


@pytest.mark.parametrize("rel", ESCAPES)
def test_verify_never_opens_a_path_outside_the_folder(output, tmp_path, capsys, rel):
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the output")
    from primerge.util.hashing import file_sha256

    _rewrite(output, lambda files: files.update({rel: {"size": outside.stat().st_size,
                                                       "sha256": file_sha256(outside)}}))
    assert cli.main(["verify", str(output)]) == 1
    out = capsys.readouterr().out
    assert "other than a plain relative path inside the folder; not opened" in out and "FAILED (1 problems)" in out, out


MALFORMED = {"not an object": 5, "size as text": {"size": "12", "sha256": "0" * 64}, "no hash": {"size": 1},
             "tensors a list": {"size": 1, "tensors": [1]}, "hash not hex": {"size": 1, "sha256": "xyz"},
             "negative size": {"size": -1, "sha256": "0" * 64}, "tensor record junk": {"size": 1, "tensors": {"w": 3}}}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_verify_reports_malformed_entries(output, capsys, case):
    _rewrite(output, lambda files: files.update({"config.json": MALFORMED[case]}))
    assert cli.main(["verify", str(output)]) == 1
    assert "config.json: the manifest entry is malformed" in capsys.readouterr().out


@pytest.mark.parametrize("manifest", [NESTED, "[]", '{"format": 2, "files": {}}', '{"format": 1, "files": []}',
                                      '{"format": 1, "kind": 3, "files": {}}', "\xff"])
def test_verify_with_an_unreadable_manifest_is_an_error(output, capsys, manifest):
    (output / MANIFEST).write_bytes(manifest.encode("latin-1"))
    assert cli.main(["verify", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("primerge: error: ") and MANIFEST in err and "Traceback" not in err


@pytest.mark.parametrize("odd", ["link", "fifo", "listed fifo", "empty list", "manifest fifo", "no folder"])
def test_verify_reports_links_special_files_and_an_empty_list(output, tmp_path, capsys, odd):
    if odd == "link":
        (output / "extra").symlink_to(tmp_path)
    elif odd == "fifo":
        os.mkfifo(output / "pipe")
    elif odd == "listed fifo":
        (output / "config.json").unlink()
        os.mkfifo(output / "config.json")
    elif odd == "empty list":
        _rewrite(output, lambda files: files.clear())
    elif odd == "manifest fifo":
        (output / MANIFEST).unlink()
        os.mkfifo(output / MANIFEST)
    code = cli.main(["verify", str(output if odd != "no folder" else tmp_path / "missing")])
    captured = capsys.readouterr()
    expected = {"link": "extra: a symbolic link", "fifo": "pipe: a FIFO (named pipe) (primerge writes none",
                "listed fifo": "config.json: a FIFO (named pipe), not a file",
                "empty list": "lists no files", "manifest fifo": "a FIFO (named pipe) where a manifest",
                "no folder": "no such folder"}[odd]
    assert code == (2 if odd in ("manifest fifo", "no folder") else 1)
    assert expected in captured.out + captured.err, captured


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=12)
PATHS = st.sampled_from(["model.safetensors", "config.json", "../x", "/etc/hostname", "task_heads", "", "a/../b"])


@PROPERTY
@given(files=st.dictionaries(PATHS, JSON | st.fixed_dictionaries({"size": JSON, "sha256": JSON}), max_size=4),
       extra=st.dictionaries(st.sampled_from(["format", "kind", "files"]), JSON, max_size=2))
def test_fuzzed_manifests_give_a_report_or_an_error(output, files, extra):
    (output / MANIFEST).write_text(json.dumps({"format": 1, "files": files, **extra}))
    try:
        report = verify_folder(output)
    except InputError:
        return
    assert all(isinstance(p, str) for p in report.problems)
