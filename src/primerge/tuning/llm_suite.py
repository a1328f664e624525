"""The LLM validation suite: ``primerge tune --suite llm``.

Each model of the recipe (a causal-LM fine-tune or LoRA adapter of the recipe's base) has one task;
the task's validation set is carved from its *training* split by the tuner's rule
(:func:`primerge.tuning.holdout.carve`; with ``trained_on = m``, from the training examples after
the first m, which the fine-tunes trained on: ``primerge demo --suite llm --tuned``) and cast as prompts with verbalised labels as the LLM
track casts them (:func:`primerge.evaluation.llm.prompts.cast_task`, its validation examples in the
test slot). lm-evaluation-harness scores every model (multiple choice over the label words by
log-likelihood, ``acc``), as ``primerge demo --suite llm`` does: a fine-tune from its folder (an
adapter applied to the base with peft), a trial's merged model built on the base's config from the
merged tensors. Accuracies are cached by content (:mod:`primerge.evaluation.llm.scores`), so a
model already scored on a validation set is never scored again. Prompts are cast with the
protocol's budget (``primerge tune --max-prompt-tokens`` / ``--preset``, as ``eval`` and ``demo``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from primerge.data.tasks import load_splits
from primerge.evaluation.llm.protocol import CPU_PROTOCOL, LLMProtocol
from primerge.util.cache_dirs import cache_root
from primerge.core.recipe import Recipe
from primerge.tuning.cache import MergedModel
from primerge.tuning.settings import DEFAULT_SIZE
from primerge.tuning.suites import LastModel, one_task_per_model
from primerge.tuning.holdout import carve


class LLMSuite:
    """Validation accuracy from lm-eval for each model's task (module docstring).

    ``splits`` are the tasks in the recipe's model order; ``protocol`` gives the prompt budget and the
    evaluation batch size; ``device`` is where models are scored; ``trained_on`` is how many leading
    training examples of each split the fine-tunes trained on (none of them is a validation example);
    ``progress``: lm-eval's progress bars.
    """

    def __init__(self, recipe: Recipe, splits: Sequence, size: int = DEFAULT_SIZE, cache: str | Path | None = None,
                 protocol: LLMProtocol = CPU_PROTOCOL, device: str = "cpu", trained_on: int = 0,
                 progress: bool = True):
        from primerge.evaluation.llm.models import checked_device
        from primerge.evaluation.llm.prompts import cast_task, prompt_calibration
        from primerge.io.hf import load_tokenizer

        self.labels = one_task_per_model(recipe, splits)
        self.recipe, self.base = recipe, Path(recipe.base)
        self.device = checked_device(device)
        self.batch_size = protocol.eval_batch_size
        self.tokenizer = load_tokenizer(self.base)
        self.sets = {label: carve(split, size, trained_on=trained_on) for label, split in zip(self.labels, splits)}
        self.tasks = {label: cast_task(self.sets[label].as_split(), self.tokenizer, protocol.max_prompt_tokens, 0, size,
                                       test_part="validation") for label in self.labels}
        self.calibration = prompt_calibration(self.tasks, protocol.max_prompt_tokens)
        self.root = cache_root(cache)
        self.progress = progress
        self._individual: dict[str, float] | None = None
        self._current: LastModel | None = None

    def describe(self) -> str:
        sizes = ", ".join(f"{label} {len(task.test_prompts)}" for label, task in self.tasks.items())
        return f"llm suite (lm-eval): validation prompts per task (carved from training data): {sizes}"

    def individual(self) -> dict[str, float]:
        from primerge.evaluation.llm.models import adapter_base, is_adapter, load_model
        from primerge.evaluation.llm.scores import folder_identity

        if self._individual is None:
            self._individual = {}
            for entry, label in zip(self.recipe.models, self.labels):
                folder = Path(entry.path)
                base = adapter_base(folder, self.base) if is_adapter(folder) else None
                identity = folder_identity(folder, base)
                self._individual[label] = self._accuracy(identity, label, lambda: load_model(folder, self.base,
                                                                                            self.device)[0])
        return self._individual

    def score(self, model: MergedModel, label: str) -> float:
        from primerge.evaluation.llm.models import model_from_state
        from primerge.util.hashing import state_digest

        state = model.state_for(label)
        if self._current is None or self._current.state is not state:
            self._current = LastModel(state, state_digest(state))
        current = self._current

        def build():
            if current.model is None:
                current.model = model_from_state(self.base, state, "the merged model", self.device)
            return current.model

        return self._accuracy(current.digest, label, build)

    def _accuracy(self, identity: str, label: str, build) -> float:
        """The cached accuracy of the model ``identity`` on ``label``'s validation prompts;
        ``build()`` gives the model when it must be scored."""
        from primerge.evaluation.llm.harness import evaluate_prompt_tasks
        from primerge.evaluation.llm.scores import cached_scores

        task = self.tasks[label]
        scores = cached_scores(self.root, identity, [task], lambda missing: evaluate_prompt_tasks(
            build(), self.tokenizer, missing, self.root, batch_size=self.batch_size, progress=self.progress))
        return scores[task.name].accuracy


def llm_suite(recipe: Recipe, tasks: Sequence[str], size: int, cache: str | Path | None,
              protocol: LLMProtocol = CPU_PROTOCOL, device: str = "cpu", progress: bool = True) -> LLMSuite:
    """The LLM suite from task specs (packaged names or .csv/.jsonl files), one per model."""
    return LLMSuite(recipe, load_splits(tasks), size, cache, protocol, device, progress=progress)
