"""Scores (accuracy, n, lm-eval's standard error) cached by content, so a rerun evaluates only what changed.

A score is keyed by the model's identity and the task's fingerprint (every prompt, label and label
word): the identity of a folder is the SHA-256 of its files (an adapter's also covers its base),
the identity of an in-memory merge is the SHA-256 of its tensors. Equal keys mean equal models on
equal data, so a cached accuracy is never stale; any change to a method's output re-evaluates.
Scores live in ``<cache>/llm/scores/<key>.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path


from primerge.evaluation.llm.estimates import Score
from primerge.evaluation.llm.prompts import PromptTask
from primerge.evaluation.model import FINGERPRINT_SKIP, folder_fingerprint
from primerge.io.manifest import MANIFEST
from primerge.util.hashing import state_digest

SCORE_FORMAT = "llm-eval-v2"  # v2: n and standard error with the accuracy


#: Files that do not change what a folder computes: documentation, and primerge's manifest (hashes of
#: the folder's files, the model card among them).
IDENTITY_SKIP = FINGERPRINT_SKIP | {MANIFEST}


def folder_identity(folder: Path, base: Path | None = None) -> str:
    """The identity of a model folder (and of the base an adapter applies to)."""
    parts = [folder_fingerprint(folder, IDENTITY_SKIP)] + ([folder_fingerprint(base)] if base is not None else [])
    return hashlib.sha256(":".join(parts).encode()).hexdigest()


def score_path(root: Path, identity: str, task: PromptTask) -> Path:
    key = hashlib.sha256(f"{SCORE_FORMAT}:{identity}:{task.fingerprint()}".encode()).hexdigest()
    return root / "llm" / "scores" / f"{key}.json"


def cached_scores(root: Path, identity: str, tasks: Sequence[PromptTask],
                  evaluate: Callable[[list[PromptTask]], dict[str, Score]]) -> dict[str, Score]:
    """The score of every task from the cache; ``evaluate`` runs once on the tasks not cached yet."""
    scores: dict[str, Score] = {}
    missing = []
    for task in tasks:
        path = score_path(root, identity, task)
        if path.is_file():
            record = json.loads(path.read_text())
            scores[task.name] = Score(float(record["accuracy"]), int(record["n"]), record["stderr"])
        else:
            missing.append(task)
    if missing:
        fresh = evaluate(missing)
        for task in missing:
            score = fresh[task.name]
            path = score_path(root, identity, task)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"task": task.name, "accuracy": score.accuracy, "n": score.n,
                                       "stderr": score.stderr}) + "\n")
            tmp.replace(path)
            scores[task.name] = score
    return {t.name: scores[t.name] for t in tasks}
