"""Every error path: a primerge error naming the file/tensor, exit code 2, nothing left behind.

Each case is run twice: through the API (the exception class and its message) and
through ``primerge.cli.main`` (exit code 2, the message on stderr). After each, the
output path must not exist and no hidden ``.<name>.primerge-*`` folder may remain
beside it. Inputs that a test modifies are copies in ``tmp_path``; the session
``bert_zoo`` is never written to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import primerge
from primerge.cli import main as cli
from primerge.util.errors import InputError, OutputError, RecipeError
from primerge.io import writer as writer_module
from primerge.output import folder as folder_module
from primerge.io.readers import open_checkpoint
from primerge.io.destination import Destination
from primerge.io.writer import TEMP_MARK, atomic_folder
from refusals import (TASK_SPECIFIC, assert_nothing_left, leftovers, model_copy, recipe_file, refused,
                      snapshot, zoo_recipe)

UNPICKLED: list[str] = []


class Payload:
    """A custom object pickled into a .bin; unpickling it would record itself."""

    def __init__(self) -> None:
        self.value = 1

    def __setstate__(self, state) -> None:
        UNPICKLED.append("Payload.__setstate__ ran")
        self.__dict__.update(state)


# --------------------------------------------------------------------------- recipe errors


def test_missing_base_path(zoo, tmp_path, capsys):
    missing = tmp_path / "no_such_base"
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, base=missing))
    refused(recipe, tmp_path / "out" / "merged", InputError, [missing, "no such file"], capsys)


def test_missing_model_path(zoo, tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[zoo["paths"]["models"][0], missing]))
    refused(recipe, tmp_path / "out" / "merged", InputError, [missing], capsys)


def test_unknown_method_suggests_closest(zoo, tmp_path, capsys):
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, method="prme"))
    refused(recipe, tmp_path / "out" / "merged", RecipeError,
            ["'prme'", "Did you mean 'prime'?", recipe], capsys)
    with pytest.raises(RecipeError, match="Did you mean 'tsv'"):
        primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"], "tsb")


def test_unknown_parameter_suggests_closest(zoo, tmp_path, capsys):
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, method="prime", parameters={"rnk": 0.02}))
    refused(recipe, tmp_path / "out" / "merged", RecipeError,
            ["'rnk'", "Did you mean 'rank'?", "prime"], capsys)


@pytest.mark.parametrize("method,params,needle", [
    ("ties", {"density": 1.5}, "density"),
    ("prime", {"rank": 2.5}, "rank"),
])
def test_bad_parameter_value(zoo, tmp_path, capsys, method, params, needle):
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, method=method, parameters=params))
    message = refused(recipe, tmp_path / "out" / "merged", RecipeError, [needle, method, recipe], capsys)
    assert "Traceback" not in message
    with pytest.raises(RecipeError, match=needle):
        primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"], method, **params)


def test_unknown_recipe_field(zoo, tmp_path, capsys):
    data = zoo_recipe(zoo)
    data["methd"] = data.pop("method")
    recipe = recipe_file(tmp_path, data)
    refused(recipe, tmp_path / "out" / "merged", RecipeError,
            ["'methd'", "Did you mean 'method'?", recipe], capsys)


def test_invalid_yaml(tmp_path, capsys):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("base: [unclosed\nmodels:\n  - a\n")
    refused(recipe, tmp_path / "out" / "merged", RecipeError, [recipe, "YAML"], capsys)


def test_recipe_that_is_not_a_mapping(tmp_path, capsys):
    recipe = tmp_path / "list.yaml"
    recipe.write_text("- base\n- models\n")
    refused(recipe, tmp_path / "out" / "merged", RecipeError, [recipe, "mapping"], capsys)


def test_recipe_with_no_models(zoo, tmp_path, capsys):
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[]))
    refused(recipe, tmp_path / "out" / "merged", RecipeError, ["models", recipe], capsys)


def test_invalid_regex(zoo, tmp_path, capsys):
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, task_specific="classifier.("))
    refused(recipe, tmp_path / "out" / "merged", RecipeError,
            ["task_specific", "regular expression", recipe], capsys)


# --------------------------------------------------------------------------- inconsistent checkpoints


def test_model_missing_a_tensor(zoo, tmp_path, capsys):
    state = dict(zoo["models"][0])
    del state["pooler.dense.bias"]
    model = model_copy(tmp_path / "short", state)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[model, zoo["paths"]["models"][1]]))
    refused(recipe, tmp_path / "out" / "merged", InputError,
            [model / "model.safetensors", "'pooler.dense.bias'", "missing"], capsys)


def test_prefixed_model_missing_a_tensor_is_blamed_for_that_tensor_only(zoo, tmp_path, capsys):
    """A ``bert.``-prefixed fine-tune lacking one tensor: the message names that tensor (under its
    prefixed name), not every base tensor the unprefixed comparison would miss."""
    state = {f"bert.{k}" if not k.startswith("classifier.") else k: v for k, v in zoo["models"][0].items()}
    del state["bert.encoder.layer.0.output.dense.bias"]
    model = model_copy(tmp_path / "prefixed", state)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[model, zoo["paths"]["models"][1]]))
    err = refused(recipe, tmp_path / "out" / "merged", InputError,
                  ["1 tensors", "'bert.encoder.layer.0.output.dense.bias'"], capsys)
    assert "pooler" not in err


def test_integer_buffers_missing_from_a_fine_tune_are_copied_from_the_base(tmp_path):
    """Older BERT checkpoints keep ``embeddings.position_ids`` (int64) in the base only: the
    fine-tunes merge, prefixed or not, and the output carries the base's buffer."""
    gen = torch.Generator().manual_seed(0)
    base = {"embeddings.position_ids": torch.arange(8)[None], "encoder.dense.weight": torch.randn(4, 4, generator=gen),
            "encoder.norm.weight": torch.ones(4)}
    tuned = [{k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items() if v.is_floating_point()}
             for _ in range(2)]
    tuned[1] = {f"bert.{k}": v for k, v in tuned[1].items()}
    paths = [model_copy(tmp_path / f"m{i}", state) for i, state in enumerate(tuned)]
    result = primerge.merge(model_copy(tmp_path / "base", base), paths, "task_arithmetic")
    assert torch.equal(result.state_dict["embeddings.position_ids"], base["embeddings.position_ids"])
    expected = base["encoder.dense.weight"] + ((tuned[0]["encoder.dense.weight"] - base["encoder.dense.weight"])
                                               + (tuned[1]["bert.encoder.dense.weight"] - base["encoder.dense.weight"])) / 2
    torch.testing.assert_close(result.state_dict["encoder.dense.weight"], expected)


@pytest.mark.parametrize("name,shape,needles", [
    ("embeddings.LayerNorm.weight", (40,), ["dimension 0 is 40 in the model, 32 in the base", "not a fine-tune"]),
    ("embeddings.word_embeddings.weight", (70, 32), ["shape [70, 32]", "[64, 32] in the base",
                                                     "resized vocabulary", "tokenizer.json"]),
    ("encoder.layer.0.attention.self.query.weight", (32, 32, 1), ["3 dimensions in the model and 2"]),
])
def test_shape_mismatch_says_which_dimension_and_what_it_means(zoo, tmp_path, capsys, name, shape, needles):
    state = {**zoo["models"][1], name: torch.zeros(shape)}
    model = model_copy(tmp_path / "odd", state)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[zoo["paths"]["models"][0], model]))
    err = refused(recipe, tmp_path / "out" / "merged", InputError, [f"'{name}'", *needles], capsys)
    assert ("resized vocabulary" in err) == ("embeddings" in name and "word" in name)


def test_model_with_extra_tensor_suggests_task_specific(zoo, tmp_path, capsys):
    # the zoo's classifier heads without a task_specific rule
    data = zoo_recipe(zoo)
    del data["task_specific"]
    recipe = recipe_file(tmp_path, data)
    refused(recipe, tmp_path / "out" / "merged", InputError,
            ["'classifier.", "task_specific", zoo["paths"]["models"][0] / "model.safetensors"], capsys)
    # an extra tensor that the task_specific rule does not cover
    state = {**zoo["models"][1], "adapter.extra.weight": torch.ones(2, 2)}
    model = model_copy(tmp_path / "extra", state)
    recipe = recipe_file(tmp_path / "r2", zoo_recipe(zoo, models=[model]))
    refused(recipe, tmp_path / "out" / "merged", InputError,
            ["'adapter.extra.weight'", "task_specific", model / "model.safetensors"], capsys)


def test_mismatched_shapes(zoo, tmp_path, capsys):
    name = "encoder.layer.1.intermediate.dense.weight"
    state = dict(zoo["models"][2])
    state[name] = torch.zeros(48, 33)
    model = model_copy(tmp_path / "wide", state)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[zoo["paths"]["models"][0], model]))
    refused(recipe, tmp_path / "out" / "merged", InputError,
            [f"'{name}'", model / "model.safetensors", zoo["paths"]["base"] / "model.safetensors",
             "[48, 33]", "[48, 32]"], capsys)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_values_abort_a_started_merge(zoo, tmp_path, capsys, monkeypatch, bad):
    names = open_checkpoint(zoo["paths"]["base"]).names
    name = names[-1] if bad == "nan" else names[-3]  # late in the plan: shards were already written
    state = dict(zoo["models"][1])
    poisoned = state[name].clone()
    poisoned.view(-1)[3] = float(bad)
    state[name] = poisoned
    model = model_copy(tmp_path / f"{bad}_model", state)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[zoo["paths"]["models"][0], model]))
    out = tmp_path / "out" / "merged"

    written: list[Path] = []
    real_save = writer_module.save_tensors

    def spy(path, tensors, metadata=None, ledger=None):
        real_save(path, tensors, metadata, ledger)
        assert Path(path).is_file()
        written.append(Path(path))

    monkeypatch.setattr(folder_module, "save_tensors", spy)  # the model folder's shard writer
    refused(recipe, out, InputError, [f"'{name}'", model / "model.safetensors", "NaN or Inf"], capsys,
            shard_size=10_000)
    # merging had started streaming: shards were written into the temporary folder, then removed
    assert written, "no shard was written before the bad tensor was reached"
    assert all(p.parent.name.startswith(f".{out.name}{TEMP_MARK}") for p in written), written
    assert not any(p.exists() or p.parent.exists() for p in written)


# --------------------------------------------------------------------------- unsafe outputs


@pytest.fixture
def own_inputs(zoo, tmp_path):
    """Copies of the zoo under tmp_path/inputs (safe to point a buggy output at)."""
    root = tmp_path / "inputs"
    base = root / "base"
    shutil.copytree(zoo["paths"]["base"], base)
    models = []
    for m in zoo["paths"]["models"]:
        shutil.copytree(m, root / m.name)
        models.append(root / m.name)
    return {"root": root, "base": base, "models": models}


@pytest.mark.parametrize("where", ["equal", "inside", "contains"])
@pytest.mark.parametrize("force", [False, True])
def test_output_overlapping_an_input(zoo, own_inputs, tmp_path, capsys, where, force):
    recipe = recipe_file(tmp_path / "recipes", zoo_recipe(zoo, base=own_inputs["base"],
                                                          models=own_inputs["models"]))
    before = snapshot(own_inputs["root"])
    model = own_inputs["models"][1]
    out = {"equal": model, "inside": model / "merged", "contains": own_inputs["root"]}[where]
    needle = "contains the input" if where == "contains" else "is, or is inside, the input"
    refused(recipe, out, OutputError, [out, needle], capsys, force=force, existed=where != "inside")
    assert snapshot(own_inputs["root"]) == before  # every input untouched


def test_existing_output_without_and_with_force(zoo, tmp_path, capsys):
    """--force replaces an earlier primerge output, only once the new one is complete."""
    out = tmp_path / "out" / "merged"
    recipe = recipe_file(tmp_path, zoo_recipe(zoo))
    assert cli.main(["merge", str(recipe), "--out", str(out), "--quiet"]) == 0
    before = snapshot(out)
    refused(recipe, out, OutputError, [out, "--force"], capsys, existed=True)
    assert snapshot(out) == before

    # with force but a failing merge: the old output stays, nothing new appears
    state = dict(zoo["models"][0])
    state["pooler.dense.weight"] = torch.full_like(state["pooler.dense.weight"], float("nan"))
    bad = model_copy(tmp_path / "nan_model", state)
    bad_recipe = recipe_file(tmp_path / "bad", zoo_recipe(zoo, models=[bad]))
    refused(bad_recipe, out, InputError, ["'pooler.dense.weight'"], capsys, force=True, existed=True)
    assert snapshot(out) == before

    # with force and a good merge: replaced, no aside folder left
    other = recipe_file(tmp_path / "other", zoo_recipe(zoo, models=zoo["paths"]["models"][:2]))
    assert cli.main(["merge", str(other), "--out", str(out), "--quiet", "--force"]) == 0
    assert snapshot(out) != before and leftovers(out) == []
    ref = primerge.merge(zoo["paths"]["base"], zoo["paths"]["models"][:2], "task_arithmetic",
                         task_specific=TASK_SPECIFIC)
    merged = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(merged[k], v) for k, v in ref.state_dict.items())


def test_existing_empty_output_folder_is_used_without_force(zoo, tmp_path, capsys):
    """check_output accepts an existing *empty* folder without --force; the merge must then succeed."""
    out = tmp_path / "empty_out"
    out.mkdir()
    recipe = recipe_file(tmp_path, zoo_recipe(zoo))
    code = cli.main(["merge", str(recipe), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    assert leftovers(out) == []


def test_output_that_is_a_file_is_never_replaced(zoo, tmp_path, capsys):
    out = tmp_path / "merged"
    out.write_text("a stray file")
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo))
    for force in (False, True):
        refused(recipe, out, OutputError, [out, "is a file", "never replaces"], capsys, existed=True, force=force)
        assert out.read_text() == "a stray file"


# --------------------------------------------------------------------------- unreadable inputs


def test_truncated_safetensors(zoo, tmp_path, capsys):
    folder = shutil.copytree(zoo["paths"]["models"][0], tmp_path / "truncated")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[folder]))
    refused(recipe, tmp_path / "out" / "merged", InputError, [weights, "not a readable safetensors"], capsys)


def test_garbage_safetensors_header(zoo, tmp_path, capsys):
    weights = tmp_path / "garbage.safetensors"
    weights.write_bytes((24).to_bytes(8, "little") + b"{this is not json, sorry" + bytes(64))
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, base=weights))
    refused(recipe, tmp_path / "out" / "merged", InputError, [weights, "not a readable safetensors"], capsys)
    # an absurd header length is refused the same way
    weights.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    refused(recipe, tmp_path / "out" / "merged", InputError, [weights], capsys)


def _sharded(folder: Path, state: dict, shard_names: list[str]) -> dict[str, str]:
    folder.mkdir(parents=True)
    names = list(state)
    weight_map = {n: shard_names[i % len(shard_names)] for i, n in enumerate(names)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weight_map


def test_shard_index_pointing_outside_the_folder(zoo, tmp_path, capsys):
    state = zoo["models"][0]
    folder = tmp_path / "models" / "escaping"
    _sharded(folder, state, ["../x.safetensors"])
    save_file(dict(state), str(tmp_path / "models" / "x.safetensors"))  # it exists: refused anyway
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[folder]))
    refused(recipe, tmp_path / "out" / "merged", InputError,
            [folder / "model.safetensors.index.json", "'../x.safetensors'", "outside"], capsys)


def test_shard_index_with_a_missing_shard(zoo, tmp_path, capsys):
    state = zoo["models"][0]
    folder = tmp_path / "holey"
    weight_map = _sharded(folder, state, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    save_file({k: v for k, v in state.items() if weight_map[k].startswith("model-00001")},
              str(folder / "model-00001-of-00002.safetensors"))
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[folder]))
    refused(recipe, tmp_path / "out" / "merged", InputError,
            ["'model-00002-of-00002.safetensors'", "missing", folder], capsys)


def test_bin_with_a_pickled_object_is_refused(zoo, tmp_path, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    state = dict(zoo["models"][0])
    state["payload"] = Payload()
    torch.save(state, folder / "pytorch_model.bin")
    UNPICKLED.clear()
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[folder], allow_pickle=True))
    refused(recipe, tmp_path / "out" / "merged", InputError,
            [folder / "pytorch_model.bin", "weights-only"], capsys)
    assert UNPICKLED == []  # the object was never reconstructed
    # the same object through the default torch.load would be rebuilt: the refusal is real
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert UNPICKLED == ["Payload.__setstate__ ran"]


def test_bin_holding_a_non_dict_is_refused(zoo, tmp_path, capsys):
    weights = tmp_path / "list.bin"
    torch.save([torch.zeros(2)], weights)
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo, models=[weights], allow_pickle=True))
    refused(recipe, tmp_path / "out" / "merged", InputError, [weights, "state dict"], capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(zoo, tmp_path, capsys):
    recipe = recipe_file(tmp_path, zoo_recipe(zoo))
    refused(recipe, tmp_path / "out" / "merged", RecipeError, ["cuda", "no CUDA device"], capsys,
            device="cuda")


def test_unknown_device(zoo, tmp_path, capsys):
    recipe = recipe_file(tmp_path, zoo_recipe(zoo))
    refused(recipe, tmp_path / "out" / "merged", RecipeError, ["'tpu0'"], capsys, device="tpu0")


def test_input_folder_without_weights(zoo, tmp_path, capsys):
    folder = tmp_path / "config_only"
    folder.mkdir()
    shutil.copy(zoo["paths"]["base"] / "config.json", folder / "config.json")
    recipe = recipe_file(tmp_path, zoo_recipe(zoo, models=[zoo["paths"]["models"][0], folder]))
    refused(recipe, tmp_path / "out" / "merged", InputError, [folder, "no model weights"], capsys)


def test_unknown_checkpoint_file_type(zoo, tmp_path, capsys):
    weights = tmp_path / "weights.npz"
    weights.write_bytes(b"PK")
    recipe = recipe_file(tmp_path / "r", zoo_recipe(zoo, base=weights))
    refused(recipe, tmp_path / "out" / "merged", InputError, [weights, "unknown checkpoint type"], capsys)


# --------------------------------------------------------------------------- interrupts


def test_atomic_folder_removes_temp_on_keyboard_interrupt(tmp_path):
    dest = tmp_path / "dest"
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(Destination(dest)) as folder:
            seen.append(folder)
            (folder / "model.safetensors").write_bytes(b"partial")
            raise KeyboardInterrupt
    assert seen and seen[0].name.startswith(f".dest{TEMP_MARK}")
    assert not seen[0].exists()
    assert not dest.exists()
    assert list(tmp_path.iterdir()) == []

    # an existing destination (force) survives an interrupt untouched
    dest.mkdir()
    (dest / "old.txt").write_text("keep me")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(Destination(dest, force=True)) as folder:
            (folder / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]
    assert sorted(p.name for p in dest.iterdir()) == ["old.txt"]

    # and on success the folder is renamed into place
    with atomic_folder(Destination(tmp_path / "ok")) as folder:
        (folder / "a.txt").write_text("a")
    assert (tmp_path / "ok" / "a.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "ok"]


def test_cli_interrupt_mid_merge_exits_130_and_leaves_nothing(zoo, tmp_path, capsys, monkeypatch):
    import primerge.core.sources as taskvectors

    calls = []
    real = taskvectors.weighted_delta

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(taskvectors, "weighted_delta", interrupted)
    recipe = recipe_file(tmp_path, zoo_recipe(zoo))
    out = tmp_path / "out" / "merged"
    code = cli.main(["merge", str(recipe), "--out", str(out), "--quiet", "--shard-size", "10000"])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert len(calls) == 20
    assert_nothing_left(out)
