"""The benchmark end to end on a miniature: a tiny random BERT with a tokenizer built here, two
user tasks (CSV and JSONL), one epoch: zoo build -> merge -> eval -> demo report."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import primerge  # noqa: E402
from primerge.cli.main import main  # noqa: E402
from primerge.util.errors import InputError  # noqa: E402
from primerge.evaluation.demo import run_demo  # noqa: E402
from primerge.evaluation.model import HEAD_REGEX, read_tensors  # noqa: E402
from primerge.data.tasks import load_splits  # noqa: E402
from primerge.evaluation.zoo import TrainingProtocol, build_zoo, evaluate_model, fine_tune  # noqa: E402

PROTOCOL = TrainingProtocol(epochs=1, small_task_epochs=1)
CLI_PROTOCOL = ["--epochs", "1", "--small-task-epochs", "1"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FILLER = "the a of to and is it on in at with this that very quite".split()
COLORS = ["red", "blue"]
ANIMALS = ["cat", "dog", "bird"]


def sentences(keywords: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` distinct texts of filler words around one keyword; the label is the keyword."""
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    while len(rows) < n:
        label = keywords[int(rng.integers(len(keywords)))]
        words = list(rng.choice(FILLER, size=int(rng.integers(3, 9))))
        words.insert(int(rng.integers(len(words) + 1)), label)
        text = " ".join(words)
        if text not in seen:
            seen.add(text)
            rows.append((text, label))
    return rows


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-base")
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + FILLER + COLORS + ANIMALS) + "\n")
    tokenizer = transformers.BertTokenizer(vocab=str(vocab))
    assert tokenizer("the red cat")["input_ids"][1:4] == [5, 5 + len(FILLER), 7 + len(FILLER)]
    config = transformers.BertConfig(vocab_size=len(SPECIAL + FILLER + COLORS + ANIMALS), hidden_size=32,
                                     num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    colors = folder / "colors.csv"
    with colors.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(sentences(COLORS, 150, seed=1))
    animals = folder / "animals.jsonl"
    animals.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in sentences(ANIMALS, 150, 2)))
    return [str(colors), str(animals)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def splits(task_files):
    return load_splits(task_files)


@pytest.fixture(scope="module")
def zoo(tiny_base, splits, cache):
    return build_zoo(splits, base=tiny_base, protocol=PROTOCOL, cache=cache, progress=False, log=lambda m: None)


def test_zoo_layout(zoo, splits):
    base_keys = set(read_tensors(zoo.base))
    assert "embeddings.word_embeddings.weight" in base_keys
    assert [e.name for e in zoo.entries] == ["colors", "animals"]
    for entry, split in zip(zoo.entries, splits):
        assert entry.path.name == split.name
        tensors = read_tensors(entry.path)
        assert set(tensors) == base_keys | {"classifier.weight", "classifier.bias"}
        assert tuple(tensors["classifier.weight"].shape) == (split.num_classes, 32)
        for name in ("config.json", "tokenizer.json", "task.json"):
            assert (entry.path / name).is_file()
        meta = json.loads((entry.path / "task.json").read_text())
        assert meta["classes"] == list(split.classes) and meta["train_size"] == 90 and meta["test_size"] == 60
        assert meta["individual_accuracy"] == entry.individual_accuracy
        assert 0.0 <= entry.individual_accuracy <= 1.0
        assert any(tensors[k].ne(v).any() for k, v in read_tensors(zoo.base).items())  # it trained


def test_zoo_is_reused_and_rekeyed(zoo, tiny_base, splits, cache):
    stamp = (zoo.entries[0].path / "model.safetensors").stat().st_mtime_ns
    again = build_zoo(splits, base=tiny_base, protocol=PROTOCOL, cache=cache, progress=False, log=lambda m: None)
    assert [e.reused for e in again.entries] == [True, True]
    assert again.paths == zoo.paths
    assert (again.entries[0].path / "model.safetensors").stat().st_mtime_ns == stamp
    assert again.individual == zoo.individual
    changed = build_zoo(splits[:1], base=tiny_base, protocol=TrainingProtocol(epochs=1, small_task_epochs=1, seed=5),
                        cache=cache, progress=False, log=lambda m: None)
    assert not changed.entries[0].reused
    assert changed.entries[0].path != zoo.entries[0].path
    assert changed.base == zoo.base


def test_fine_tuning_is_deterministic(zoo, splits):
    model, _, stats = fine_tune(zoo.base, splits[0], PROTOCOL, progress=False)
    saved = read_tensors(zoo.entries[0].path)
    state = {**{k: v for k, v in model.body.state_dict().items()},
             "classifier.weight": model.classifier.weight, "classifier.bias": model.classifier.bias}
    assert set(state) == set(saved)
    for name, value in state.items():
        assert torch.equal(value, saved[name]), name
    assert stats["epochs"] == 1 and stats["steps"] == 3


def test_a_fine_tune_learns_an_easy_task(tiny_base, splits, tmp_path):
    protocol = TrainingProtocol(epochs=10, small_task_epochs=10, learning_rate=3e-3, batch_size=16)
    zoo = build_zoo(splits[:1], base=tiny_base, protocol=protocol, cache=tmp_path, progress=False,
                    log=lambda m: None)
    assert zoo.entries[0].individual_accuracy >= 0.9


def test_eval_of_a_fine_tune_equals_its_individual_accuracy(zoo, splits, tiny_base, cache):
    for entry, split in zip(zoo.entries, splits):
        scores = evaluate_model(entry.path, [split], base=tiny_base, protocol=PROTOCOL, cache=cache)
        assert scores.accuracy[split.name] == pytest.approx(entry.individual_accuracy, abs=1e-9)
        assert scores.normalized == pytest.approx(1.0)


def test_single_model_merge_keeps_the_fine_tune(zoo, splits, tiny_base, cache, tmp_path):
    out = tmp_path / "one"
    primerge.merge(zoo.base, [zoo.entries[1].path], method="task_arithmetic", scale=1.0,
                   task_specific=HEAD_REGEX, out=out)
    assert (out / "task_heads" / "animals.safetensors").is_file()
    scores = evaluate_model(out, [splits[1]], base=tiny_base, protocol=PROTOCOL, cache=cache)
    assert scores.accuracy["animals"] == pytest.approx(zoo.entries[1].individual_accuracy, abs=1e-9)


def test_merge_then_cli_eval(zoo, task_files, tiny_base, cache, tmp_path, capsys):
    out = tmp_path / "merged"
    primerge.merge(zoo.base, zoo.paths, method="ties", task_specific=HEAD_REGEX, out=out)
    report = tmp_path / "scores.json"
    code = main(["eval", str(out), "--tasks", *task_files, "--base", str(tiny_base), "--cache", str(cache),
                 *CLI_PROTOCOL, "--json", str(report)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "colors" in printed and "animals" in printed and "Avg" in printed
    scores = json.loads(report.read_text())
    assert set(scores["accuracy"]) == {"colors", "animals"}
    assert all(0.0 <= v <= 1.0 for v in scores["accuracy"].values())
    expected = np.mean([scores["accuracy"][e.name] / e.individual_accuracy for e in zoo.entries])
    assert scores["normalized"] == pytest.approx(expected)


def test_eval_without_a_head_is_an_input_error(zoo, task_files, tiny_base, cache, capsys):
    with pytest.raises(InputError, match="no classification head for task"):
        evaluate_model(zoo.base, load_splits(task_files), base=tiny_base, protocol=TrainingProtocol(seed=9), cache=cache)
    code = main(["eval", str(zoo.base), "--tasks", task_files[0], "--base", str(tiny_base), "--cache", str(cache),
                 "--train-seed", "9"])
    assert code == 2
    assert "zoo build" in capsys.readouterr().err


def test_demo_end_to_end(zoo, task_files, tiny_base, cache, tmp_path):
    report = tmp_path / "report"
    result = run_demo(tasks=task_files, base=tiny_base, cache=cache, report=report, protocol=PROTOCOL,
                      progress=False, log=lambda m: None, pave=["tsv"])
    names = [spec.name + (" (per-task)" if spec.per_task else "") for spec in primerge.list_methods()
             if spec.admits(2)]  # two tasks: slerp-like methods of one model stay out of the table
    assert [r.label for r in result.rows] == ["Base (linear probe)", "Individual", *names, "tsv + PAVE"]
    plain = next(r for r in result.rows if r.label == "tsv")
    assert result.rows[-1].parameters == plain.parameters
    individual = result.rows[1]
    assert individual.accuracy == zoo.individual and individual.normalized == pytest.approx(1.0)
    for row in result.rows:
        assert set(row.accuracy) == {"colors", "animals"}
        assert all(0.0 <= v <= 1.0 for v in row.accuracy.values())
    with (report / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["row"] for r in table] == [r.label for r in result.rows]
    assert float(table[2]["colors"]) == pytest.approx(100 * result.rows[2].accuracy["colors"], abs=0.006)
    assert float(table[1]["normalized"]) == pytest.approx(100.0)
    markdown = (report / "results.md").read_text()
    assert "| row | colors | animals | Avg | Normalized |" in markdown
    assert (report / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((report / "results.json").read_text())["tasks"] == ["colors", "animals"]


def test_cli_demo_with_a_method_subset(task_files, tiny_base, cache, tmp_path, capsys, zoo, monkeypatch):
    # test_demo_end_to_end scored the same tsv merge: its scores must come from the cache
    def no_evaluation(*args, **kwargs):
        raise AssertionError("the cached scores of an identical merge were not reused")

    monkeypatch.setattr("primerge.evaluation.demo.evaluate_heads", no_evaluation)
    report = tmp_path / "r"
    code = main(["demo", "--tasks", ",".join(task_files), "--methods", "tsv", "--base", str(tiny_base),
                 "--cache", str(cache), *CLI_PROTOCOL, "--report", str(report), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "reusing" in printed and "Individual" in printed and "tsv" in printed and "ties" not in printed
    assert sorted(os.listdir(report)) == ["primerge-manifest.json", "results.csv", "results.json", "results.md",
                                         "results.png"]
    assert main(["demo", "--methods", "primee", "--report", str(report)]) == 2
    assert "Did you mean 'prime'" in capsys.readouterr().err


def test_score_cache_is_content_addressed(splits):
    from primerge.evaluation.demo import tensors_digest

    state = {"w": torch.ones(3, 2), "b": torch.zeros(())}
    heads = {s.name: torch.nn.Linear(2, s.num_classes) for s in splits}
    digest = tensors_digest(state, heads, splits, 64)
    assert digest == tensors_digest({k: v.clone() for k, v in state.items()}, heads, splits, 64)
    one_ulp = dict(state, w=torch.nextafter(state["w"], torch.tensor(2.0)))
    assert tensors_digest(one_ulp, heads, splits, 64) != digest
    assert tensors_digest(dict(state, w=state["w"].bfloat16()), heads, splits, 64) != digest
    assert tensors_digest(state, heads, splits, 32) != digest
    assert tensors_digest(state, heads, splits[:1], 64) != digest
    other_heads = dict(heads, colors=torch.nn.Linear(2, 2))
    assert tensors_digest(state, other_heads, splits, 64) != digest


def test_per_task_merge_folder_scores_like_the_demo(zoo, task_files, tiny_base, cache, tmp_path):
    per_task = [spec for spec in primerge.list_methods() if spec.per_task]
    if not per_task:
        pytest.skip("no per-task method is registered")
    spec = per_task[0]
    result = run_demo(tasks=task_files, methods=[spec.name], base=tiny_base, cache=cache, report=None,
                      protocol=PROTOCOL, progress=False, log=lambda m: None)
    row = result.rows[-1]
    assert row.label == f"{spec.name} (per-task)"
    out = tmp_path / "per-task"
    primerge.merge(zoo.base, zoo.paths, method=spec.name, task_specific=HEAD_REGEX, out=out)
    assert (out / "per_task" / "per_task.json").is_file()
    scores = evaluate_model(out, load_splits(task_files), base=tiny_base, protocol=PROTOCOL, cache=cache)
    assert scores.accuracy == pytest.approx(row.accuracy, abs=1e-9)


def test_reading_a_models_tensors_refuses_a_shard_outside_its_folder(tmp_path):
    """A shard index is user text: a shard named outside the folder is refused, never read."""
    from safetensors.torch import save_file

    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../outside.safetensors"}}))
    with pytest.raises(InputError, match="outside the model folder"):
        read_tensors(folder)
    save_file({"w": torch.ones(2)}, str(folder / "part.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "part.safetensors"}}))
    assert read_tensors(folder)["w"].tolist() == [1.0, 1.0]
