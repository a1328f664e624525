"""Accuracies cached by content, so a rerun evaluates only what changed.

A score is keyed by the model's identity and the task's fingerprint (every prompt, label and label
word): the identity of a folder is the SHA-256 of its files (an adapter's also covers its base),
the identity of an in-memory merge is the SHA-256 of its tensors. Equal keys mean equal models on
equal data, so a cached accuracy is never stale; any change to a method's output re-evaluates.
Scores live in ``<cache>/llm/scores/<key>.json``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from primerge.evaluation.llm.prompts import PromptTask
from primerge.evaluation.model import FINGERPRINT_SKIP, folder_fingerprint
from primerge.io.manifest import MANIFEST

SCORE_FORMAT = "llm-eval-v1"


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


def cached_accuracies(root: Path, identity: str, tasks: Sequence[PromptTask],
                      evaluate: Callable[[list[PromptTask]], dict[str, float]]) -> dict[str, float]:
    """Accuracy per task from the cache; ``evaluate`` runs once on the tasks not cached yet."""
    scores: dict[str, float] = {}
    missing = []
    for task in tasks:
        path = score_path(root, identity, task)
        if path.is_file():
            scores[task.name] = float(json.loads(path.read_text())["accuracy"])
        else:
            missing.append(task)
    if missing:
        fresh = evaluate(missing)
        for task in missing:
            path = score_path(root, identity, task)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"task": task.name, "accuracy": fresh[task.name]}) + "\n")
            tmp.replace(path)
            scores[task.name] = fresh[task.name]
    return {t.name: scores[t.name] for t in tasks}
