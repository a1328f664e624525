"""``primerge tune --suite llm``: validation prompts carved from the training data only, lm-eval
scores that equal a direct evaluation of the same model, cached by content, and the CLI end to end,
on a tiny random LlamaForCausalLM and two fine-tunes of it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
import torch
from safetensors.torch import load_file, save_file

from llm_fixtures import save_tiny_llama
from primerge.cli.main import main
from primerge.data.tasks import load_splits
from primerge.core.recipe import build_recipe

pytest.importorskip("lm_eval")

WORDS = ("posit", "the")


def task_file(path, shift: int):
    """40 labelled texts; the label is a (shifted) parity of the row."""
    rows = [{"text": f"{i} on", "label": WORDS[(i + shift) % 2]} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def llm_zoo(tmp_path_factory):
    """A tiny base, two full fine-tunes of it (perturbed copies) and one task file per fine-tune."""
    root = tmp_path_factory.mktemp("llm-tune")
    base = save_tiny_llama(root / "base", seed=5)
    state = load_file(str(base / "model.safetensors"))
    models = []
    for seed in (1, 2):
        folder = root / f"ft{seed}"
        save_tiny_llama(folder, seed=5)
        g = torch.Generator().manual_seed(seed)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in state.items()},
                  str(folder / "model.safetensors"))
        models.append(str(folder))
    tasks = [task_file(root / "a.jsonl", 0), task_file(root / "b.jsonl", 1)]
    recipe = build_recipe({"base": str(base), "models": models, "method": "task_arithmetic"})
    return {"root": root, "recipe": recipe, "tasks": tasks}


def test_validation_prompts_come_from_training_texts_only(llm_zoo, tmp_path):
    from primerge.evaluation.llm.prompts import cast_task
    from primerge.tuning.llm_suite import LLMSuite

    splits = load_splits(llm_zoo["tasks"])
    suite = LLMSuite(llm_zoo["recipe"], splits, size=10, cache=tmp_path / "c")
    for label, split in zip(suite.labels, splits):
        prompts = suite.tasks[label].test_prompts
        assert 1 <= len(prompts) <= 10
        whole = cast_task(split, suite.tokenizer, 32, len(split.train_texts), len(split.test_texts))
        assert len(set(whole.train_prompts) | set(whole.test_prompts)) == 40  # every text its own prompt
        assert set(prompts) <= set(whole.train_prompts) and not set(prompts) & set(whole.test_prompts)


def test_scores_equal_lm_eval_on_the_same_model_and_are_cached(llm_zoo, tmp_path, monkeypatch):
    import primerge
    from primerge.evaluation.llm import harness
    from primerge.evaluation.llm.models import load_model, model_from_state
    from primerge.tuning.cache import MergedModel
    from primerge.tuning.llm_suite import LLMSuite

    suite = LLMSuite(llm_zoo["recipe"], load_splits(llm_zoo["tasks"]), size=10, cache=tmp_path / "c")
    merged = primerge.merge_recipe(llm_zoo["recipe"])
    model = MergedModel.of(merged)
    direct = model_from_state(suite.base, merged.state_dict, "test")
    for label in suite.labels:
        expected = harness.evaluate_prompt_tasks(direct, suite.tokenizer, [suite.tasks[label]], tmp_path / "d")
        assert suite.score(model, label) == pytest.approx(expected[suite.tasks[label].name].accuracy)
    individual = suite.individual()
    for entry, label in zip(llm_zoo["recipe"].models, suite.labels):
        own = load_model(entry.path, suite.base)[0]
        expected = harness.evaluate_prompt_tasks(own, suite.tokenizer, [suite.tasks[label]], tmp_path / "d")
        assert individual[label] == pytest.approx(expected[suite.tasks[label].name].accuracy)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached score was evaluated again")

    monkeypatch.setattr(harness, "evaluate_prompt_tasks", refuse)
    again = LLMSuite(llm_zoo["recipe"], load_splits(llm_zoo["tasks"]), size=10, cache=tmp_path / "c")
    assert [again.score(MergedModel.of(primerge.merge_recipe(llm_zoo["recipe"])), lab) for lab in again.labels] == \
        [suite.score(model, lab) for lab in suite.labels]
    assert again.individual() == individual


def test_cli_tune_with_the_llm_suite(llm_zoo, tmp_path, capsys, monkeypatch):
    """A recipe of relative paths in its own folder, run from another folder: the best recipe is merged
    from the report (relative to it) and merges again from anywhere; the output gives n and the
    standard error per task and how the validation sets were carved; the prompt options reach the
    suite."""
    from primerge.core.recipe import load_recipe

    (tmp_path / "recipes").mkdir()
    paths = [llm_zoo["recipe"].base, *(m.path for m in llm_zoo["recipe"].models)]
    relative = [os.path.relpath(p, tmp_path / "recipes") for p in paths]
    (tmp_path / "recipes" / "recipe.yaml").write_text(json.dumps(
        {"base": relative[0], "models": relative[1:], "method": "task_arithmetic"}))
    monkeypatch.chdir(tmp_path)
    argv = ["tune", "recipes/recipe.yaml", "--suite", "llm", "--tasks", *llm_zoo["tasks"], "--trials", "3",
            "--validation-size", "8", "--out", "reports/out", "--cache", "c", "--max-prompt-tokens", "40"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    written = tmp_path / "reports" / "out" / "task_arithmetic.yaml"
    assert (tmp_path / "reports" / "out" / "trials.csv").is_file()
    assert not Path(yaml.safe_load(written.read_text())["base"]).is_absolute()
    monkeypatch.chdir(tmp_path / "recipes")
    best = load_recipe(written)
    assert best.base.samefile(llm_zoo["recipe"].base)
    assert [m.path.samefile(e.path) for m, e in zip(best.models, llm_zoo["recipe"].models)] == [True, True]
    assert "validation = 4 of the 24 training examples (shuffled, seed 1" in out and "a.jsonl: 40 rows" in out
    assert "ft1 (n=4)" in out and " ± " in out
    summary = json.loads((tmp_path / "reports" / "out" / "summary.json").read_text())
    assert summary["validation"]["ft1"]["n"] == 4 and "Wilson's 95% interval" in (written.parent / "summary.md").read_text()
    score = summary["methods"][0]["confirmed_scores"]["ft1"]
    assert score["ci95"][0] <= score["accuracy"] <= score["ci95"][1]


def test_cli_tune_prompt_options(llm_zoo, tmp_path, capsys):
    """--max-prompt-tokens reaches the LLM suite (a budget below the template is its error, naming
    the option); the encoder suite refuses the LLM suite's options; an unknown suite is refused."""
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(json.dumps({"base": str(llm_zoo["recipe"].base),
                                       "models": [str(m.path) for m in llm_zoo["recipe"].models]}))
    common = ["tune", str(recipe_file), "--tasks", *llm_zoo["tasks"], "--out", str(tmp_path / "o"),
              "--cache", str(tmp_path / "c")]
    assert main([*common, "--suite", "llm", "--max-prompt-tokens", "6"]) == 2
    assert "leaving fewer than 4 of 6 for the text; raise --max-prompt-tokens." in capsys.readouterr().err
    assert main([*common, "--max-prompt-tokens", "64"]) == 2
    assert "--max-prompt-tokens: option(s) of the LLM suite; add --suite llm" in capsys.readouterr().err
    assert main([*common, "--suite", "nope"]) == 2
