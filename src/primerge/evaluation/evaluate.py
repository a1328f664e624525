"""Accuracy of an encoder body with each task's own classification head.

A merged model is one body shared by all tasks; task t is scored with its own fine-tuned head
(``classifier.*``, never merged) on its test split. The metrics are the papers' (PRIME Table 1):

- accuracy_t = mean(argmax logits == label) on task t's test split;
- Avg = mean_t accuracy_t;
- Normalized = mean_t (accuracy_t / individual_t), individual_t being the accuracy of task t's own
  fine-tune — how much of the fine-tunes' skill the merge keeps.

Inference runs under ``torch.inference_mode`` with the body in eval mode, in batches of texts of
similar length (sorted by character length, so nothing needs tokenizing ahead), tokenizing one
batch at a time: the test set streams through and memory stays flat.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from primerge.util.errors import InputError
from primerge.io.user_paths import component
from primerge.evaluation.model import (
    HEAD_PREFIX,
    body_from_state,
    head_from_tensors,
    load_body,
    pooled_features,
    read_tensors,
    split_head,
)
from primerge.io.hf import load_tokenizer
from primerge.data.tasks import TaskSplit

EVAL_BATCH = 128
MAX_LENGTH = 64


def pad_batch(token_ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest one: (input_ids, attention_mask), both (b, L)."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return input_ids, mask


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``texts`` in batches of similar character length (longest first)."""
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    return pad_batch(ids, tokenizer.pad_token_id or 0)


@torch.inference_mode()
def iter_features(
    body: nn.Module,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = EVAL_BATCH,
    max_length: int = MAX_LENGTH,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (indices, pooled features (b, hidden)) batch by batch, without gradients."""
    body.eval()
    for indices in length_sorted_batches(texts, batch_size):
        input_ids, mask = tokenize(tokenizer, [texts[i] for i in indices], max_length)
        yield indices, pooled_features(body, input_ids, mask).float()


def features(body: nn.Module, tokenizer, texts: Sequence[str], **kwargs) -> torch.Tensor:
    """Pooled features of every text, (n, hidden), in the order of ``texts`` (for the probe)."""
    out: torch.Tensor | None = None
    for indices, feats in iter_features(body, tokenizer, texts, **kwargs):
        if out is None:
            out = torch.empty((len(texts), feats.shape[1]))
        out[indices] = feats
    if out is None:
        raise InputError("no texts to encode.")
    return out


@torch.inference_mode()
def predict(body: nn.Module, head: nn.Linear, tokenizer, texts: Sequence[str], **kwargs) -> torch.Tensor:
    """Predicted class index of every text: argmax of head(features)."""
    predictions = torch.empty(len(texts), dtype=torch.long)
    head.eval()
    for indices, feats in iter_features(body, tokenizer, texts, **kwargs):
        predictions[indices] = head(feats).argmax(dim=-1)
    return predictions


def accuracy(predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Fraction of predictions equal to the labels."""
    predictions = torch.as_tensor(predictions)
    labels = torch.as_tensor(labels)
    if predictions.shape != labels.shape or labels.numel() == 0:
        raise ValueError(f"need as many predictions as labels (>0), got {predictions.shape} and {labels.shape}")
    return (predictions == labels).float().mean().item()


def average(scores: Mapping[str, float]) -> float:
    """Avg = mean over tasks."""
    return sum(scores.values()) / len(scores)


def normalized_accuracy(scores: Mapping[str, float], individual: Mapping[str, float]) -> float:
    """Normalized = mean over tasks of accuracy_t / individual_t (tasks present in both)."""
    tasks = [t for t in scores if t in individual]
    if not tasks:
        raise ValueError("no task has an individual accuracy to normalize by")
    if any(individual[t] <= 0 for t in tasks):
        raise ValueError("an individual accuracy of 0 cannot normalize")
    return sum(scores[t] / individual[t] for t in tasks) / len(tasks)


@dataclass
class Scores:
    """Accuracy per task (fractions in [0, 1]) with the summary metrics."""

    accuracy: dict[str, float]
    individual: dict[str, float] = field(default_factory=dict)

    @property
    def average(self) -> float:
        return average(self.accuracy)

    @property
    def normalized(self) -> float | None:
        if not any(t in self.individual for t in self.accuracy):
            return None
        return normalized_accuracy(self.accuracy, self.individual)

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "average": self.average, "normalized": self.normalized}


def check_head(head: nn.Linear, split: TaskSplit, origin: str) -> None:
    if head.out_features != split.num_classes:
        raise InputError(
            f"{origin}: the head of task '{split.name}' has {head.out_features} outputs but the task "
            f"has {split.num_classes} classes {list(split.classes)}."
        )


def evaluate_heads(
    body: nn.Module,
    tokenizer,
    splits: Sequence[TaskSplit],
    heads: Mapping[str, nn.Linear],
    batch_size: int = EVAL_BATCH,
    max_length: int = MAX_LENGTH,
) -> dict[str, float]:
    """Accuracy of ``body`` on each split's test set with ``heads[split.name]``."""
    scores = {}
    for split in splits:
        head = heads[split.name]
        check_head(head, split, "evaluation")
        predictions = predict(body, head, tokenizer, split.test_texts, batch_size=batch_size, max_length=max_length)
        scores[split.name] = accuracy(predictions, split.test_labels)
    return scores


def folder_heads(folder: Path, names: Sequence[str]) -> dict[str, nn.Linear]:
    """Heads stored with a model folder: ``task_heads/<task>.safetensors`` (a merge's output), or
    the folder's own ``classifier.*`` when its ``task.json`` names the task (a zoo fine-tune)."""
    from safetensors.torch import load_file

    heads: dict[str, nn.Linear] = {}
    for name in names:
        path = folder / "task_heads" / f"{component(name)}.safetensors"
        if path.is_file():
            tensors = load_file(path)
            head = {k[len(HEAD_PREFIX) :] if k.startswith(HEAD_PREFIX) else k: v for k, v in tensors.items()}
            heads[name] = head_from_tensors(head, str(path))
    meta = folder / "task.json"
    if meta.is_file():
        task = json.loads(meta.read_text()).get("task")
        if task in names and task not in heads:
            _, head = split_head(read_tensors(folder))
            heads[task] = head_from_tensors(head, str(folder))
    return heads


PER_TASK_META = Path("per_task") / "per_task.json"


def evaluate_folder(
    folder: Path,
    splits: Sequence[TaskSplit],
    fallback_heads: Mapping[str, nn.Linear] | None = None,
    fallback_tokenizer_folder: Path | None = None,
    batch_size: int = EVAL_BATCH,
    max_length: int = MAX_LENGTH,
) -> dict[str, float]:
    """Evaluate a saved model folder on ``splits``; heads come from the folder first (see
    :func:`folder_heads`), then ``fallback_heads`` (the zoo's). Its tokenizer is the folder's,
    else the fallback folder's. A per-task merge output (``per_task/per_task.json``, e.g. EMR)
    scores task t with task t's own rebuilt model (``primerge.load_task_state``)."""
    folder = Path(folder)
    heads = dict(fallback_heads or {})
    heads.update(folder_heads(folder, [s.name for s in splits]))
    missing = [s.name for s in splits if s.name not in heads]
    if missing:
        raise InputError(
            f"{folder}: no classification head for task(s) {missing}; build them with "
            f"'primerge zoo build --tasks {' '.join(missing)}' or merge with task_specific='^classifier\\.'."
        )
    tokenizer = _tokenizer_for(folder, fallback_tokenizer_folder)
    if (folder / PER_TASK_META).is_file():
        from primerge.output.per_task import load_task_state

        scores = {}
        for split in splits:
            body = body_from_state(folder, load_task_state(folder, split.name), f"{folder} (task {split.name})")
            scores.update(evaluate_heads(body, tokenizer, [split], heads, batch_size=batch_size,
                                         max_length=max_length))
        return scores
    body, _ = load_body(folder)
    return evaluate_heads(body, tokenizer, splits, heads, batch_size=batch_size, max_length=max_length)


def _tokenizer_for(folder: Path, fallback: Path | None):
    has_tokenizer = any((folder / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    if has_tokenizer or fallback is None:
        return load_tokenizer(folder)
    return load_tokenizer(fallback)
