"""lm-evaluation-harness integration: local task files, offline runs, numbers checked against a direct
log-likelihood computation on a tiny random LlamaForCausalLM."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from llm_fixtures import byte_level_tokenizer, save_tiny_llama, tiny_llama
from tokenizer_families import save_family_tokenizer
from primerge.cli.main import main
from primerge.util.errors import InputError
from primerge.evaluation.llm.estimates import Score
from primerge.evaluation.llm.harness import (check_task_names, evaluate_prompt_tasks, harness_name, run_harness, scores,
                                             task_manager, write_task)
from primerge.evaluation.llm.prompts import PromptTask, Verbaliser, label_tokens, split_answer

pytest.importorskip("lm_eval")

VERBALISER = Verbaliser("Text: {text}\nAnswer:", ("posit", "negative"))  # one single-token, one multi-token word


def two_example_task(tokenizer) -> PromptTask:
    prompts = ("Text: the pot is on\nAnswer:", "Text: a nose at it\nAnswer:")
    return PromptTask(name="two", classes=("yes", "no"), verbaliser=VERBALISER,
                      answer_ids=label_tokens("two", VERBALISER, tokenizer, ("yes", "no")),
                      train_prompts=(), train_labels=(), test_prompts=prompts, test_labels=(0, 1))


def direct_loglikelihood(model, tokenizer, prompt: str, answer: str) -> float:
    """Σ_j log p(y_j | prompt, y_<j) from one unpadded forward pass."""
    context, target = split_answer(tokenizer, prompt, answer)
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    positions = range(len(context) - 1, len(context) + len(target) - 1)
    return sum(logprobs[p, t].item() for p, t in zip(positions, target))


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def test_harness_matches_direct_loglikelihoods(tmp_path, no_network):
    model, tokenizer = tiny_llama(seed=3), byte_level_tokenizer()
    task = two_example_task(tokenizer)
    assert [len(ids) for ids in task.answer_ids][0] == 1 and len(task.answer_ids[1]) > 1
    folder = write_task(task, tmp_path)
    name = harness_name(task.name)
    results = run_harness(model, tokenizer, [name], task_manager([folder], defaults=False), batch_size=2,
                          log_samples=True)
    samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
    predictions = []
    for sample, prompt in zip(samples, task.test_prompts):
        harness = [resp[0] for resp in sample["filtered_resps"]]
        direct = [direct_loglikelihood(model, tokenizer, prompt, VERBALISER.answer(c)) for c in range(2)]
        assert harness == pytest.approx(direct, abs=1e-4)
        predictions.append(max(range(2), key=lambda c: direct[c]))
    expected = sum(p == y for p, y in zip(predictions, task.test_labels)) / 2
    assert results["results"][name]["acc,none"] == pytest.approx(expected)
    score = evaluate_prompt_tasks(model, tokenizer, [task], tmp_path, batch_size=2)["two"]
    assert (score.accuracy, score.n) == (pytest.approx(expected), 2)
    # lm-eval's standard error of a mean of 0/1 scores: sqrt(p(1 - p) / (n - 1)), as Score.of states it
    assert score.stderr == pytest.approx(Score.of(expected, 2).stderr, abs=1e-12)


def test_without_progress_lm_eval_writes_nothing_to_stderr(tmp_path, capfd, no_network):
    """``--quiet`` (``progress=False``) hides lm-eval's progress bars, the task-building ones too, and
    the scores are those of a run with them."""
    model, tokenizer = tiny_llama(seed=3), byte_level_tokenizer()
    task = two_example_task(tokenizer)
    shown = evaluate_prompt_tasks(model, tokenizer, [task], tmp_path / "a", batch_size=2)
    assert "Running loglikelihood requests" in capfd.readouterr().err
    hidden = evaluate_prompt_tasks(model, tokenizer, [task], tmp_path / "b", batch_size=2, progress=False)
    assert capfd.readouterr().err == "" and hidden == shown


def test_standard_error_and_interval_of_a_score():
    """Score.of is lm-eval's mean_stderr on 0/1 scores; Wilson's interval holds the estimate and stays
    in [0, 1]; for 30 of 100 it is (0.21895, 0.39585) (by hand: centre (0.3 + 1.96²/200) / (1 + 1.96²/100)
    = 0.30740, half-width 1.96 √(0.0021 + 1.96²/40000) / (1 + 1.96²/100) = 0.08845)."""
    from lm_eval.api.metrics import mean_stderr

    for hits, n in ((30, 100), (0, 7), (7, 7), (1, 2)):
        score = Score.of(hits / n, n)
        assert score.stderr == pytest.approx(mean_stderr([1.0] * hits + [0.0] * (n - hits)), abs=1e-12)
        low, high = score.interval()
        assert 0.0 <= low <= hits / n <= high <= 1.0
    assert Score.of(0.3, 100).interval() == pytest.approx((0.2189, 0.3958), abs=5e-5)
    assert Score.of(1.0, 1).stderr is None and Score.of(0.5, 0).interval() == (0.0, 1.0)


def test_task_files_are_local_and_reusable(tmp_path):
    task = two_example_task(byte_level_tokenizer())
    folder = write_task(task, tmp_path)
    config = (folder / f"{harness_name('two')}.yaml").read_text()
    assert "dataset_path: json" in config and str(folder / "two.test.jsonl") in config
    rows = [json.loads(line) for line in (folder / "two.test.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": p, "label": y} for p, y in zip(task.test_prompts, task.test_labels)]
    stamp = (folder / "two.test.jsonl").stat().st_mtime_ns
    assert write_task(task, tmp_path) == folder and (folder / "two.test.jsonl").stat().st_mtime_ns == stamp


def jsonl_task(path, rows):
    path.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows) + "\n")
    return path


def test_cli_eval_folder_and_adapter_agree_with_direct_scores(tmp_path, capsys, no_network):
    """``primerge eval --harness lm-eval`` on a model folder and on a LoRA adapter of it."""
    from peft import LoraConfig, get_peft_model

    base = save_tiny_llama(tmp_path / "base", seed=5)
    rows = [(f"the pot {i} is on", "posit" if i % 2 else "the") for i in range(10)]
    data = jsonl_task(tmp_path / "toy.jsonl", rows)
    assert main(["eval", str(base), "--harness", "lm-eval", "--tasks", str(data), "--cache", str(tmp_path / "c"),
                 "--json", str(tmp_path / "base.json")]) == 0
    base_acc = json.loads((tmp_path / "base.json").read_text())["accuracy"]["toy"]
    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_llama(seed=5), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload().eval()
    assert main(["eval", str(tmp_path / "adapter"), "--harness", "lm-eval", "--tasks", str(data), "--base", str(base),
                 "--cache", str(tmp_path / "c"), "--json", str(tmp_path / "adapter.json")]) == 0
    adapter_acc = json.loads((tmp_path / "adapter.json").read_text())["accuracy"]["toy"]
    tokenizer = byte_level_tokenizer()
    from primerge.evaluation.llm.prompts import cast_task
    from primerge.data.tasks import load_splits

    task = cast_task(load_splits([str(data)])[0], tokenizer, 32, 0, 100)
    for model, accuracy in ((tiny_llama(seed=5), base_acc), (merged, adapter_acc)):
        scores = [[direct_loglikelihood(model, tokenizer, p, task.verbaliser.answer(c)) for c in range(2)]
                  for p in task.test_prompts]
        direct = sum(max(range(2), key=lambda c: s[c]) == y for s, y in zip(scores, task.test_labels))
        assert accuracy == pytest.approx(direct / len(task.test_labels))
    assert "toy" in capsys.readouterr().out


def test_cli_runs_a_named_lm_eval_task_from_an_include_path(tmp_path, capsys, no_network):
    """An lm-eval task YAML of the user's, named on the command line, runs offline like ours."""
    tokenizer = byte_level_tokenizer()
    base = save_tiny_llama(tmp_path / "base", seed=3)
    folder = write_task(two_example_task(tokenizer), tmp_path / "mine")
    name = harness_name("two")
    assert main(["eval", str(base), "--harness", "lm-eval", "--tasks", name, "--include-path", str(folder),
                 "--allow-task-code", "--json", str(tmp_path / "s.json"), "--cache", str(tmp_path / "c")]) == 0
    direct = evaluate_prompt_tasks(tiny_llama(seed=3), tokenizer, [two_example_task(tokenizer)], tmp_path)
    assert json.loads((tmp_path / "s.json").read_text())["accuracy"] == {name: pytest.approx(direct["two"].accuracy)}


def test_unknown_lm_eval_task_is_one_clear_error(tmp_path):
    folder = write_task(two_example_task(byte_level_tokenizer()), tmp_path)
    manager = task_manager([folder], defaults=False)
    with pytest.raises(InputError, match=r"no task 'primerge_tow'.*Did you mean 'primerge_two'"):
        check_task_names(manager, ["primerge_tow"])


def test_bad_metric_is_refused():
    with pytest.raises(InputError, match="no 'acc' metric"):
        scores({"results": {"t": {"exact_match,none": 1.0}}}, ["t"])


def test_cli_eval_reports_n_stderr_and_the_examples_without_git_noise(tmp_path, capfd, monkeypatch, no_network):
    """Run outside any git repository (where lm-eval's simple_evaluate printed ``fatal: not a git
    repository``): the table gives n, the standard error and the 95% interval per task, then which
    test examples were scored and how the split was made; the JSON has the same numbers."""
    base = save_tiny_llama(tmp_path / "base", seed=5)
    rows = [(f"the pot {i} is on", "posit" if i % 2 else "the") for i in range(40)] + [("the pot 0 is on", "the")]
    jsonl_task(tmp_path / "toy.jsonl", rows)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "base", "--harness", "lm-eval", "--tasks", "toy.jsonl", "--cache", "c", "--test-size", "10",
                 "--json", "s.json"]) == 0
    out, err = capfd.readouterr()
    assert "git" not in err and "fatal" not in err
    record = json.loads((tmp_path / "s.json").read_text())
    score = Score(**{k: record["scores"]["toy"][k] for k in ("accuracy", "n", "stderr")})
    assert score.n == 10 and record["accuracy"]["toy"] == score.accuracy
    assert record["scores"]["toy"]["ci95"] == list(score.interval())
    assert score.stderr == pytest.approx(Score.of(score.accuracy, 10).stderr, abs=1e-12)
    line = next(line for line in out.splitlines() if line.startswith("toy "))
    assert line.split() == ["toy", "10", f"{100 * score.accuracy:.1f}%", f"{100 * score.stderr:.1f}",
                            score.interval_text()]
    examples = record["examples"]["toy"]
    assert examples.startswith("the first 10 of the 16 test examples (toy.jsonl: 41 rows, 1 duplicate texts removed, ")
    assert f"toy: {examples}" in out


def test_cli_eval_scores_the_text_under_a_bos_tokenizer(tmp_path, no_network):
    """A model whose tokenizer adds a BOS token (Llama-2's design): every scored prompt keeps its text
    within the budget (before the fix, every text longer than the budget became empty)."""
    from primerge.evaluation.llm.prompts import prompt_length, verbaliser_for
    from primerge.io.hf import load_tokenizer

    folder = save_family_tokenizer("llama2", tmp_path / "base")
    tokenizer = load_tokenizer(folder)
    model = tiny_llama(seed=2, vocab_size=len(tokenizer))
    model.config.bos_token_id, model.config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    model.save_pretrained(folder)
    words = "the film was a long and winding story about people who talk at night".split()
    rows = [(" ".join(words[i % 5:] + words[:i % 5]) + f" {i}", "posit" if i % 2 else "the") for i in range(30)]
    data = jsonl_task(tmp_path / "toy.jsonl", rows)
    assert main(["eval", str(folder), "--harness", "lm-eval", "--tasks", str(data), "--cache", str(tmp_path / "c"),
                 "--max-prompt-tokens", "24"]) == 0
    prompts = [json.loads(line)["prompt"] for line in
               next((tmp_path / "c" / "llm" / "tasks").glob("toy-*/toy.test.jsonl")).read_text().splitlines()]
    verbaliser = verbaliser_for(load_splits_of(data))
    assert len(prompts) == 12
    for prompt in prompts:
        text = prompt[len("Text: "):prompt.index("\nIs this")]
        assert text and any(text == r[0][:len(text)] for r in rows)
        assert prompt_length(tokenizer, verbaliser, text) <= 24 and tokenizer.encode(prompt)[0] == tokenizer.bos_token_id


def load_splits_of(data):
    from primerge.data.tasks import load_splits

    return load_splits([str(data)])[0]
