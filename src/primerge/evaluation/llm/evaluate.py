"""``primerge eval MODEL --harness lm-eval``: any causal LM scored by lm-evaluation-harness.

MODEL is a causal-LM folder (a merge's output, a fine-tune, a base) or a PEFT LoRA adapter (applied
to ``--base`` or to the base its config names). Tasks are primerge's (packaged names, .csv/.jsonl
files: cast as prompts with the model's own tokenizer) or the names of lm-eval tasks available
offline (lm-eval's own, or YAMLs in ``--include-path`` folders). Primerge tasks report ``acc``;
an lm-eval task must report ``acc`` too. Every score comes with its n and lm-eval's standard error,
and every task with the examples it was scored on (:class:`HarnessResult`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from primerge.util.errors import RecipeError
from primerge.evaluation.llm.estimates import Score
from primerge.evaluation.llm.harness import evaluate_prompt_tasks, named_task_manager, run_harness, scores
from primerge.evaluation.llm.models import checked_device, load_model
from primerge.evaluation.llm.prompts import cast_task, scored_examples
from primerge.evaluation.llm.zoo import CPU_PROTOCOL, LLMProtocol
from primerge.data.tasks import PACKAGED, is_table_spec, load_splits
from primerge.util.cache_dirs import cache_root


@dataclass
class HarnessResult:
    """Each task's score, and the examples it was scored on, in words."""

    scores: dict[str, Score]
    examples: dict[str, str]

    def as_dict(self) -> dict:
        return {"accuracy": {t: s.accuracy for t, s in self.scores.items()},
                "scores": {t: s.as_dict() for t, s in self.scores.items()}, "examples": self.examples}


def evaluate_with_harness(model: str | Path, tasks: Sequence[str], base: str | Path | None = None,
                          cache: str | Path | None = None, protocol: LLMProtocol = CPU_PROTOCOL, device: str = "cpu",
                          batch_size: int = 32, include: Sequence[Path] = ()) -> HarnessResult:
    """Scores per task (primerge task names, then lm-eval task names as given)."""
    if not tasks:
        raise RecipeError("name at least one task with --tasks.")
    ours = [t for t in tasks if is_table_spec(t) or t in PACKAGED]
    theirs = [t for t in tasks if t not in ours]
    root = cache_root(cache)
    splits = load_splits(ours)
    loaded, tokenizer = load_model(Path(model), base=Path(base) if base is not None else None,
                                   device=checked_device(device))
    result = HarnessResult({}, {})
    if splits:
        cast = [cast_task(s, tokenizer, protocol.max_prompt_tokens, 0, protocol.test_size) for s in splits]
        result.scores.update(evaluate_prompt_tasks(loaded, tokenizer, cast, root, batch_size=batch_size))
        result.examples.update({t.name: scored_examples(t, s) for t, s in zip(cast, splits)})
    if theirs:
        manager = named_task_manager(list(include), theirs)
        result.scores.update(scores(run_harness(loaded, tokenizer, theirs, manager, batch_size=batch_size), theirs))
        result.examples.update({t: "the split its lm-eval task definition evaluates" for t in theirs})
    return result
