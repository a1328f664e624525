"""``primerge demo --suite llm --tuned`` on a tiny random LLaMA with two local tasks: every method is
tuned on validation prompts none of the fine-tunes trained on, each best recipe is scored on the
test prompts once, ``--search`` reaches the studies, and every option a suite would ignore is refused."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import primerge
from llm_fixtures import save_tiny_llama
from primerge.cli.main import main
from primerge.data.tasks import TaskSplit, load_splits
from primerge.evaluation.llm.zoo import LLMProtocol
from primerge.tuning.holdout import carve
from primerge.util.errors import InputError
from primerge.util.hashing import state_digest

pytest.importorskip("lm_eval")
pytest.importorskip("peft")

WORDS = ("posit", "the")
#: 40 rows per task: 16 test and 24 training examples; the fine-tunes train on the first 3 × 4 = 12.
TINY = LLMProtocol(max_prompt_tokens=48, test_size=8, steps=3, batch_size=4, lora_rank=2, lora_learning_rate=3e-3,
                   full_learning_rate=1e-3, eval_batch_size=16)
VALIDATION = 6
METHODS = ("task_arithmetic", "regmean")  # a data-free method and one that calibrates on its tasks' data


def task_file(path, shift: int) -> str:
    """40 short texts, distinct within and across tasks (each prompt fits the budget uncut); the label
    is a shifted parity."""
    word = ("on", "it")[shift]
    path.write_text("".join(json.dumps({"text": f"{i} {word}", "label": WORDS[(i + shift) % 2]}) + "\n"
                            for i in range(40)))
    return str(path)


class Recorder:
    """The order of events in a run: each lm-eval evaluation (its prompts), each test scoring of the
    demo's suite (the model's identity and its tasks), and the start and end of every tuning run."""

    def __init__(self):
        self.events: list[tuple] = []

    def spy(self, mp: pytest.MonkeyPatch) -> None:
        import primerge.evaluation.llm.demo as demo_module
        import primerge.evaluation.llm.harness as harness
        import primerge.tuning.llm_demo as llm_demo

        evaluate, score, tune = harness.evaluate_prompt_tasks, demo_module.Suite.score, llm_demo.tune

        def evaluated(model, tokenizer, tasks, *args, **kwargs):
            self.events.append(("eval", frozenset(p for t in tasks for p in t.test_prompts)))
            return evaluate(model, tokenizer, tasks, *args, **kwargs)

        def scored(suite, identity, load, tasks=None):
            self.events.append(("score", identity, tuple(t.name for t in tasks or suite.tasks)))
            return score(suite, identity, load, tasks)

        def tuned(*args, **kwargs):
            self.events.append(("tune", "start"))
            result = tune(*args, **kwargs)
            self.events.append(("tune", "end"))
            return result

        mp.setattr(harness, "evaluate_prompt_tasks", evaluated)
        mp.setattr(demo_module, "evaluate_prompt_tasks", evaluated)
        mp.setattr(demo_module.Suite, "score", scored)
        mp.setattr(llm_demo, "tune", tuned)

    def phases(self) -> list[tuple[list, list]]:
        """Per tuning run: (the events inside it, the events after it up to the next run or the end)."""
        starts = [i for i, e in enumerate(self.events) if e == ("tune", "start")]
        ends = [i for i, e in enumerate(self.events) if e == ("tune", "end")]
        bounds = starts[1:] + [len(self.events)]
        return [(self.events[s + 1:e], self.events[e + 1:b]) for s, e, b in zip(starts, ends, bounds)]


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """One ``demo --suite llm --tuned --search params weights`` run, every evaluation recorded."""
    from primerge.cli import llm as llm_cli

    root = tmp_path_factory.mktemp("llm-tuned")
    base = save_tiny_llama(root / "base", seed=7)
    tasks = [task_file(root / "alpha.jsonl", 0), task_file(root / "beta.jsonl", 1)]
    argv = ["demo", "--suite", "llm", "--tuned", "--base", str(base), "--tasks", *tasks, "--cache", str(root / "cache"),
            "--report", str(root / "report"), "--methods", *METHODS, "--as-lora", "--trials", "2",
            "--validation-size", str(VALIDATION), "--search", "params", "weights", "--quiet"]
    recorder, out = Recorder(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setitem(llm_cli.PRESETS, "cpu", TINY)
        recorder.spy(mp)
        code = main(argv)
    assert code == 0
    report = root / "report"
    return SimpleNamespace(root=root, base=base, tasks=tasks, report=report, events=recorder, out=out.getvalue(),
                           record=json.loads((report / "llm-results.json").read_text()))


def cast_splits(run):
    """Each task's fine-tuning prompts and test prompts, cast as the demo casts them."""
    from primerge.evaluation.llm.prompts import cast_task
    from primerge.io.hf import load_tokenizer

    tokenizer = load_tokenizer(run.base)
    splits = load_splits(run.tasks)
    every = [cast_task(s, tokenizer, TINY.max_prompt_tokens, len(s.train_texts), TINY.test_size) for s in splits]
    return splits, every


def test_tuned_rows_follow_each_zoo_s_defaults_table(tuned_run):
    """Each zoo's table gains one tuned row per method, labelled and with its setting; the report has the
    tuned tables with n per task and an interval on every accuracy, and tuning/<zoo>/ with the best
    recipes, the trials (2 per study) and the summary."""
    for kind in ("lora", "full"):
        rows = tuned_run.record["tables"][kind]
        assert [(r["row"], r["tuned"]) for r in rows] == [("Zero-shot base", False), ("Individual", False),
                                                          *((m, False) for m in METHODS),
                                                          *((f"{m} (tuned)", True) for m in METHODS)]
        assert all("normalized validation" in r["setting"] and "2 trials" in r["setting"] for r in rows[-2:])
        folder = tuned_run.report / "tuning" / kind
        assert {"task_arithmetic.yaml", "regmean.yaml", "trials.csv", "summary.md"} <= {p.name for p in folder.iterdir()}
        trials = [line.split(",")[0] for line in (folder / "trials.csv").read_text().splitlines()[1:]]
        assert trials == [m for m in METHODS for _ in range(2)]
        assert tuned_run.record["tuning"][kind]["validation"]["alpha"]["n"] == VALIDATION
    markdown = (tuned_run.report / "llm-results.md").read_text()
    for kind in ("LoRA adapters", "Full fine-tunes"):
        section = markdown.split(f"### {kind} (tuned)")[1].split("###")[0]
        header, _, *body = [line for line in section.splitlines() if line.startswith("|")]
        assert f"alpha (n={TINY.test_size})" in header and f"beta (n={TINY.test_size})" in header
        assert [line.split("|")[1].strip() for line in body] == ["Zero-shot base", "Individual",
                                                                 *(f"{m} (tuned)" for m in METHODS)]
        for line in body:  # accuracy ± se [95% interval] in both task columns, Avg ± se
            cells = [c.strip() for c in line.split("|")[2:5]]
            assert all(" ± " in c and "[" in c for c in cells[:2]) and " ± " in cells[2]
        assert "- **task_arithmetic (tuned)**:" in section
    tuned = markdown.split("## Tuned on validation data")[1]
    assert tuned.count("did not see (they trained on the first 12 of 24") == 2  # alpha and beta
    assert markdown.index("## LoRA adapters") < markdown.index("## Tuned on validation data")
    assert (tuned_run.report / "llm-results-tuned.png").read_bytes()[:4] == b"\x89PNG"
    assert "Full fine-tunes, tuned on validation data, scored on test once" in tuned_run.out


def test_a_tuned_row_is_its_written_recipe_scored_on_test(tuned_run, tmp_path):
    """The tuned row's parameters and accuracies are those of the best recipe merged from its file and
    scored by lm-eval directly (a fresh score cache)."""
    from primerge.evaluation.llm.harness import evaluate_prompt_tasks
    from primerge.evaluation.llm.models import model_from_state
    from primerge.evaluation.llm.prompts import cast_task
    from primerge.io.hf import load_tokenizer

    row = tuned_run.record["tables"]["full"][-2]
    assert row["row"] == "task_arithmetic (tuned)"
    merged = primerge.merge_recipe(tuned_run.report / "tuning" / "full" / "task_arithmetic.yaml")
    assert row["parameters"] == json.loads(json.dumps(merged.parameters))
    tokenizer = load_tokenizer(tuned_run.base)
    tasks = [cast_task(s, tokenizer, TINY.max_prompt_tokens, 0, TINY.test_size) for s in load_splits(tuned_run.tasks)]
    direct = evaluate_prompt_tasks(model_from_state(tuned_run.base, merged.state_dict, "test"), tokenizer, tasks,
                                   tmp_path)
    assert {t: s["accuracy"] for t, s in row["scores"].items()} == {t: s.accuracy for t, s in direct.items()}


def test_each_best_recipe_is_scored_on_test_once_after_its_tuning(tuned_run):
    """Inside each tuning run nothing is scored on test (every evaluation is of validation prompts);
    after it, each of the zoo's tuned recipes is scored once, on every test task."""
    phases = tuned_run.events.phases()
    assert len(phases) == 2  # one tuning run per zoo
    _, every = cast_splits(tuned_run)
    test_prompts = {p for task in every for p in task.test_prompts}
    for inside, after in phases:
        evaluations = [e[1] for e in inside if e[0] == "eval"]
        assert evaluations and not any(e[0] == "score" for e in inside)
        assert all(not prompts & test_prompts for prompts in evaluations)
        scorings = [e for e in after if e[0] == "score"]
        assert [s[2] for s in scorings] == [("alpha", "beta")] * len(METHODS)
        assert len({s[1] for s in scorings}) == len(METHODS)  # two different models


def test_validation_prompts_are_unseen_training_examples(tuned_run):
    """Every prompt evaluated while tuning is a training example of its task that the fine-tunes did not
    train on (they trained on the first protocol.train_size), never a test example; VALIDATION per task."""
    splits, every = cast_splits(tuned_run)
    trained = {p for task in every for p in task.train_prompts[:TINY.train_size]}
    unseen = {p for task in every for p in task.train_prompts[TINY.train_size:]}
    tests = {p for task in every for p in task.test_prompts}
    validation = set().union(*(e[1] for inside, _ in tuned_run.events.phases() for e in inside if e[0] == "eval"))
    assert validation <= unseen and not validation & trained and not validation & tests
    assert len(validation) == 2 * VALIDATION
    assert len(set().union(trained, unseen, tests)) == sum(len(t.train_prompts) + len(t.test_prompts) for t in every)


def test_search_weights_reaches_the_studies(tuned_run):
    """--search params weights: each study searched a weight per model, and the best recipe sets them."""
    for kind in ("lora", "full"):
        folder = tuned_run.report / "tuning" / kind
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["settings"]["search"] == ["params", "weights:0:1"]
        assert {"weight[alpha]", "weight[beta]"} <= set(summary["methods"][0]["best_params"])
        written = yaml.safe_load((folder / "task_arithmetic.yaml").read_text())
        weights = [m["weight"] for m in written["models"]]
        assert [pytest.approx(w) for w in weights] == [summary["methods"][0]["best_params"][f"weight[{t}]"]
                                                       for t in ("alpha", "beta")]


def test_a_data_aware_method_calibrates_on_each_model_s_task(tuned_run):
    """RegMean's tuned recipe carries the calibration block the tuning run adds from its task data: each
    model's task file as given (absolute), its prompt template and the prompt budget."""
    for kind in ("lora", "full"):
        written = yaml.safe_load((tuned_run.report / "tuning" / kind / "regmean.yaml").read_text())
        calibration = written["calibration"]
        assert calibration["data"] == {name: str(Path(t).resolve()) for name, t in zip(("alpha", "beta"), tuned_run.tasks)}
        assert set(calibration["template"]) == {"alpha", "beta"} and calibration["max_length"] == TINY.max_prompt_tokens


def test_the_encoder_demo_takes_search_too():
    """``demo --tuned --search`` parses to the same settings as ``tune --search`` (encoder and LLM suites)."""
    from primerge.cli.main import build_parser
    from primerge.cli.tune import settings_from
    from primerge.tuning.genome import WeightSpace

    for suite in ("encoder", "llm"):
        args = build_parser().parse_args(["demo", "--suite", suite, "--tuned", "--search", "weights:-1:1"])
        settings = settings_from(args)
        assert settings.method_params is False and settings.genome.weights == WeightSpace(-1.0, 1.0)
    tune_args = build_parser().parse_args(["tune", "r.yaml", "--tasks", "a", "--search", "weights:-1:1"])
    assert settings_from(tune_args) == settings


def test_carve_after_the_trained_prefix():
    """trained_on = m: the validation examples are drawn from training examples m.., deterministically,
    k = min(size, n − m); none left is one error naming the fix; trained_on = 0 keeps the old rule."""
    texts = tuple(f"text {i}" for i in range(30))
    split = TaskSplit("t", ("a", "b"), texts, tuple(i % 2 for i in range(30)), (), (), "given")
    held = carve(split, size=100, trained_on=12)
    assert set(held.texts) == set(texts[12:]) and len(held.texts) == 18
    small = carve(split, size=5, trained_on=12)
    assert small == carve(split, size=5, trained_on=12) and set(small.texts) <= set(texts[12:])
    assert len(small.texts) == 5 and "did not see (they trained on the first 12 of 30" in small.origin
    assert carve(split, size=100) == carve(split, size=100, trained_on=0) and len(carve(split, 100).texts) == 6
    with pytest.raises(InputError, match="trained on all 30 of its training examples, so none is left"):
        carve(split, size=5, trained_on=30)


def test_scored_states_groups_tasks_by_their_weights():
    """One merged body: one group of every task; a per-task merge: one group per task, each with its state."""
    from primerge.tuning.cache import MergedModel
    from primerge.tuning.llm_demo import scored_states

    tasks = [SimpleNamespace(name=n) for n in ("a", "b", "c")]
    body = {"w": torch.zeros(2)}
    assert [(s is body, [t.name for t in g]) for s, g in scored_states(MergedModel(body, None, {}), tasks)] == \
        [(True, ["a", "b", "c"])]
    own = {n: {"w": torch.full((2,), float(i))} for i, n in enumerate("abc")}
    groups = scored_states(MergedModel(body, own, {}), tasks)
    assert [(state_digest(s), [t.name for t in g]) for s, g in groups] == \
        [(state_digest(own[n]), [n]) for n in "abc"]


@pytest.mark.parametrize("extra, message", [
    (["--suite", "llm", "--epochs", "3"], "--epochs: option(s) of the encoder suite; drop them or use --suite encoder."),
    (["--suite", "llm", "--small-task-epochs", "3", "--pave-targets", "delta"],
     "--small-task-epochs, --pave-targets: option(s) of the encoder suite"),
    (["--suite", "llm", "--pave", "prime"], "--pave: option(s) of the encoder suite"),
    (["--steps", "3"], "--steps: option(s) of the LLM suite; add --suite llm or drop them."),
    (["--zoos", "lora", "--as-lora-rank", "4", "--preset", "cpu"], "--preset, --zoos, --as-lora-rank: option(s) of "
                                                                   "the LLM suite"),
    (["--max-prompt-tokens", "40", "--test-size", "9", "--device", "cpu"], "--max-prompt-tokens, --device, --test-size"),
    (["--search", "weights"], "--search: option(s) of --tuned; add --tuned or drop them."),
    (["--suite", "llm", "--trials", "3", "--validation-size", "9"], "--trials, --validation-size: option(s) of --tuned"),
    (["--pave-targets", "delta"], "--pave-targets: option(s) of --pave"),
    (["--suite", "llm", "--zoos", "full", "--as-lora", "prime"], "--as-lora: option(s) of the LoRA zoo's rows"),
    (["--suite", "llm", "--as-lora", "--as-lora-rank", "4"], "--as-lora-rank: option(s) of --as-lora METHOD"),
    (["--suite", "llm", "--tuned", "--search", "weights:1:0"], "the weights' range needs finite LOW < HIGH"),
])
def test_demo_refuses_options_it_would_ignore(tmp_path, capsys, extra, message):
    """Exit 2, one line, before anything is built or written."""
    code = main(["demo", "--cache", str(tmp_path / "c"), "--report", str(tmp_path / "r"), "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_tuned_demo_refuses_tasks_without_unseen_training_examples(tmp_path, capsys, monkeypatch):
    """Fine-tunes that would train on every training example leave no validation: one line, before any
    base is converted or fine-tune trained."""
    from primerge.cli import llm as llm_cli

    monkeypatch.setitem(llm_cli.PRESETS, "cpu", TINY)
    tasks = [task_file(tmp_path / "alpha.jsonl", 0), task_file(tmp_path / "beta.jsonl", 1)]
    code = main(["demo", "--suite", "llm", "--tuned", "--tasks", *tasks, "--steps", "6", "--cache", str(tmp_path / "c"),
                 "--report", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "task 'alpha': the fine-tunes trained on all 24 of its training examples, so none is left" in err[0]
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_eval_refuses_the_other_harness_s_options(tmp_path, capsys):
    for extra, message in ((["--harness", "lm-eval", "--epochs", "2"], "--epochs: option(s) of the encoder zoo's"),
                           (["--preset", "gpu", "--include-path", str(tmp_path)],
                            "--preset, --include-path: option(s) of --harness lm-eval")):
        code = main(["eval", str(tmp_path), "--tasks", "rt_sentiment", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0]
