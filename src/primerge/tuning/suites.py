"""Validation suites: how a tuning trial's merged model is scored, one task at a time.

A suite is anything with this shape (:class:`Suite`): the model labels it scores, in order;
each fine-tune's own validation score (the normalisation of "normalized accuracy"); and the
validation score of a merged model on one task. The tuner reports the running mean after each
task, which is what lets Optuna prune a bad trial before every task is scored. The encoder
suite below is the offline benchmark's; the LLM suite (:mod:`primerge.tuning.llm_suite`) scores
causal LMs with lm-evaluation-harness; another plugs in by implementing the same members and
registering a factory in :data:`SUITES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from torch import nn

from primerge.util.errors import InputError
from primerge.util.cache_dirs import cache_root
from primerge.evaluation.demo import cached_scores, head_of
from primerge.util.hashing import state_digest
from primerge.evaluation.evaluate import MAX_LENGTH, evaluate_heads
from primerge.evaluation.model import body_from_state, load_body
from primerge.io.hf import load_tokenizer
from primerge.data.tasks import TaskSplit, load_splits
from primerge.core.recipe import Recipe
from primerge.tuning.cache import MergedModel
from primerge.tuning.settings import DEFAULT_SIZE
from primerge.tuning.holdout import ValidationSet, carve


class Suite(Protocol):
    """What the tuner needs from a benchmark."""

    labels: list[str]
    sets: dict[str, ValidationSet]  # each task's validation examples, by model label
    calibration: dict  # how a data-aware method's calibration block reads these tasks (e.g. prompt templates)

    def individual(self) -> dict[str, float]:
        """Each fine-tune's own validation score, by model label."""

    def score(self, model: MergedModel, label: str) -> float:
        """The merged model's validation score on task ``label`` (higher is better)."""

    def describe(self) -> str:
        """One line: tasks and validation sizes."""


def one_task_per_model(recipe: Recipe, splits: Sequence) -> list[str]:
    """The recipe's model labels, after checking that ``splits`` has one task per model."""
    labels = recipe.model_labels()
    if len(splits) != len(labels):
        raise InputError(f"{len(splits)} task(s) for {len(labels)} model(s): give one task per "
                         f"model, in the recipe's order ({', '.join(labels)}).")
    return labels


class EncoderSuite:
    """Classification tasks scored with each fine-tune's own head (``classifier.*``, which the
    recipe must mark task-specific) on validation sets carved from the training data.

    ``splits`` are the tasks in the recipe's model order. Scores are cached by content under
    ``<cache>/scores`` (a bit-identical model is never scored twice)."""

    def __init__(self, recipe: Recipe, splits: Sequence[TaskSplit], size: int = DEFAULT_SIZE,
                 cache: str | Path | None = None, max_length: int = MAX_LENGTH):
        self.labels = one_task_per_model(recipe, splits)
        if recipe.task_specific is None:
            raise InputError("the recipe marks no task-specific tensors; the encoder suite scores each task "
                             r"with its own head: add task_specific: ^classifier\. to the recipe.")
        self.recipe = recipe
        self.sets: dict[str, ValidationSet] = {lab: carve(s, size) for lab, s in zip(self.labels, splits)}
        self.config_folder = Path(recipe.base)
        try:
            self.tokenizer = load_tokenizer(self.config_folder)
        except InputError:  # a base saved without its tokenizer: the fine-tunes carry one
            self.tokenizer = load_tokenizer(Path(recipe.models[0].path))
        self.max_length = max_length
        self.calibration: dict = {}  # the block's defaults: each task's raw training texts
        self.root = cache_root(cache)
        self._current: LastModel | None = None
        self._individual: dict[str, float] | None = None

    def describe(self) -> str:
        sizes = ", ".join(f"{lab} {len(v.texts)}" for lab, v in self.sets.items())
        return f"encoder suite: validation examples per task (carved from training data): {sizes}"

    def individual(self) -> dict[str, float]:
        if self._individual is None:
            self._individual = {}
            for entry, label in zip(self.recipe.models, self.labels):
                body, head = load_body(Path(entry.path))
                if not head:
                    raise InputError(f"{entry.path}: the fine-tune has no classifier head to score it with.")
                split = self.sets[label].as_split()
                heads = {split.name: head_of(head, str(entry.path))}
                self._individual[label] = evaluate_heads(body, self.tokenizer, [split], heads,
                                                         max_length=self.max_length)[split.name]
        return self._individual

    def score(self, model: MergedModel, label: str) -> float:
        state = model.state_for(label)
        tensors = model.task_tensors.get(label)
        if not tensors:
            raise InputError(f"the merge returned no head for model '{label}'; the recipe's task_specific "
                             r"must match its classifier (e.g. ^classifier\.).")
        split = self.sets[label].as_split()
        heads = {split.name: head_of(tensors, f"the head of '{label}'")}

        current = self._current_for(state)

        def compute() -> dict[str, float]:
            if current.model is None:
                current.model = body_from_state(self.config_folder, state, "the merged model")
            return evaluate_heads(current.model, self.tokenizer, [split], heads, max_length=self.max_length)

        return cached_scores(self.root, state, heads, [split], self.max_length, compute, current.digest)[split.name]

    def _current_for(self, state: dict) -> LastModel:
        """Digest and (lazily) encoder of ``state``, kept while consecutive tasks share it."""
        if self._current is None or self._current.state is not state:
            self._current = LastModel(state, state_digest(state))
        return self._current


@dataclass
class LastModel:
    """The merged state a suite scored last, its content digest and the model built from it
    (lazily): kept while consecutive tasks of one trial share the state."""

    state: dict
    digest: str
    model: nn.Module | None = None


#: (recipe, task specs, validation size, cache, suite options) -> Suite. The options are the suite's own
#: settings from the command line (the LLM suite's prompt budget and device); a suite refuses any it lacks.
SuiteFactory = Callable[..., Suite]


def encoder_suite(recipe: Recipe, tasks: Sequence[str], size: int, cache: str | Path | None) -> Suite:
    """The encoder suite from task specs (packaged names or .csv/.jsonl files), one per model."""
    return EncoderSuite(recipe, load_splits(tasks), size, cache)


def _llm_suite(recipe: Recipe, tasks: Sequence[str], size: int, cache: str | Path | None, **options) -> Suite:
    from primerge.tuning.llm_suite import llm_suite  # lm-eval and peft: imported when asked for

    return llm_suite(recipe, tasks, size, cache, **options)


#: Suites ``primerge tune --suite`` can use, by name.
SUITES: dict[str, SuiteFactory] = {"encoder": encoder_suite, "llm": _llm_suite}
