"""``primerge eval MODEL --harness lm-eval``: any causal LM scored by lm-evaluation-harness.

MODEL is a causal-LM folder (a merge's output, a fine-tune, a base) or a PEFT LoRA adapter (applied
to ``--base`` or to the base its config names). Tasks are primerge's (packaged names, .csv/.jsonl
files: cast as prompts with the model's own tokenizer) or the names of lm-eval tasks available
offline (lm-eval's own, or YAMLs in ``--include-path`` folders). Primerge tasks report ``acc``;
an lm-eval task must report ``acc`` too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from primerge.util.errors import RecipeError
from primerge.evaluation.llm.harness import accuracies, evaluate_prompt_tasks, named_task_manager, run_harness
from primerge.evaluation.llm.models import checked_device, load_model
from primerge.evaluation.llm.prompts import cast_task
from primerge.evaluation.llm.zoo import CPU_PROTOCOL, LLMProtocol
from primerge.data.tasks import PACKAGED, is_table_spec, load_splits
from primerge.util.cache_dirs import cache_root


def evaluate_with_harness(model: str | Path, tasks: Sequence[str], base: str | Path | None = None,
                          cache: str | Path | None = None, protocol: LLMProtocol = CPU_PROTOCOL, device: str = "cpu",
                          batch_size: int = 32, include: Sequence[Path] = ()) -> dict[str, float]:
    """Accuracy per task (primerge task names, then lm-eval task names as given)."""
    if not tasks:
        raise RecipeError("name at least one task with --tasks.")
    ours = [t for t in tasks if is_table_spec(t) or t in PACKAGED]
    theirs = [t for t in tasks if t not in ours]
    root = cache_root(cache)
    splits = load_splits(ours)
    loaded, tokenizer = load_model(Path(model), base=Path(base) if base is not None else None,
                                   device=checked_device(device))
    scores: dict[str, float] = {}
    if splits:
        cast = [cast_task(s, tokenizer, protocol.max_prompt_tokens, 0, protocol.test_size) for s in splits]
        scores.update(evaluate_prompt_tasks(loaded, tokenizer, cast, root, batch_size=batch_size))
    if theirs:
        manager = named_task_manager(list(include), theirs)
        scores.update(accuracies(run_harness(loaded, tokenizer, theirs, manager, batch_size=batch_size), theirs))
    return scores
