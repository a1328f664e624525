"""The model zoo: one full fine-tune of the base per task, cached on disk.

Protocol (docs/benchmarks.md, "Fine-tuning protocol"): a fresh linear head on the pooled features,
trained jointly with the whole body; AdamW (lr 1e-4, weight decay 0.01 on every parameter),
batch 32, max length 64, linear warm-up over the first 10% of steps then linear decay to 0,
length-bucketed batches, one seed per task. Tasks with fewer than ``small_task_threshold``
training examples get ``small_task_epochs`` instead of ``epochs``.

Cache layout under :func:`cache_root` (``$PRIMERGE_CACHE``, else ``$XDG_CACHE_HOME/primerge``,
else ``~/.cache/primerge``)::

    zoo/base-<fingerprint>/            the base, re-saved with exactly the keys of its state_dict
    zoo/<key>/<task>/                  a fine-tune: model.safetensors (body + classifier.*),
                                       config.json, tokenizer, task.json (classes, accuracy, ...)

``key`` hashes the protocol, the base's file fingerprint and the task's split fingerprint (every
text and label of both splits), so a change to any of them trains anew and an unchanged task is
reused. The folder is named after the task because a merge names each model's task-specific
tensors after its folder (``task_heads/<task>.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from primerge.util.errors import InputError
from primerge.evaluation.evaluate import evaluate_heads, pad_batch
from primerge.evaluation.model import (
    Classifier,
    folder_fingerprint,
    head_from_tensors,
    load_body,
    save_folder,
    split_head,
    read_tensors,
)
from primerge.io.hf import load_pretrained_body, load_tokenizer
from primerge.data.tasks import TaskSplit
from primerge.evaluation.protocol import TrainingProtocol  # noqa: F401  (re-exported)
from primerge.util.cache_dirs import cache_root

ZOO_FORMAT = 1




def task_key(protocol: TrainingProtocol, base_fingerprint: str, split: TaskSplit) -> str:
    """Hex key of one fine-tune: SHA-256 of the protocol, base and task fingerprints."""
    payload = {
        "format": ZOO_FORMAT,
        "protocol": protocol.effective(len(split.train_texts)),
        "base": base_fingerprint,
        "task": split.fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


@dataclass
class ZooEntry:
    """One fine-tune in the zoo."""

    name: str
    path: Path
    classes: list[str]
    individual_accuracy: float
    train_size: int
    test_size: int
    epochs: int
    train_seconds: float
    reused: bool

    def head(self) -> nn.Linear:
        return head_from_tensors(split_head(read_tensors(self.path))[1], str(self.path))


@dataclass
class Zoo:
    """The base copy and one fine-tune per task."""

    base: Path
    base_fingerprint: str
    root: Path
    entries: list[ZooEntry] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [e.path for e in self.entries]

    @property
    def individual(self) -> dict[str, float]:
        return {e.name: e.individual_accuracy for e in self.entries}

    def heads(self) -> dict[str, nn.Linear]:
        return {e.name: e.head() for e in self.entries}


def prepare_base(base: str | Path, root: Path, log: Callable[[str], None] = print) -> tuple[Path, str]:
    """Copy the base into the zoo as ``zoo/base-<fingerprint>/`` (its state_dict keys only, so the
    fine-tunes' body keys equal the base's exactly); reuse the copy when it exists."""
    base = Path(base)
    fingerprint = folder_fingerprint(base)
    target = root / "zoo" / f"base-{fingerprint[:20]}"
    meta = target / "base.json"
    if meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fingerprint:
        return target, fingerprint
    log(f"Preparing the base {base} -> {target}")
    body = load_pretrained_body(base)
    tokenizer = load_tokenizer(base)
    save_folder(target, body, tokenizer, metadata={"source": str(base), "fingerprint": fingerprint},
                metadata_name="base.json", inputs=[base])
    return target, fingerprint


def entry_path(root: Path, key: str, task: str) -> Path:
    return root / "zoo" / key / task


def read_entry(path: Path, key: str) -> ZooEntry | None:
    """The cached entry at ``path`` if its task.json carries ``key``, else None."""
    meta = path / "task.json"
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    if info.get("key") != key:
        return None
    return ZooEntry(
        name=info["task"],
        path=path,
        classes=list(info["classes"]),
        individual_accuracy=float(info["individual_accuracy"]),
        train_size=int(info["train_size"]),
        test_size=int(info["test_size"]),
        epochs=int(info["epochs"]),
        train_seconds=float(info["train_seconds"]),
        reused=True,
    )


def find_entry(split: TaskSplit, base_fingerprint: str, protocol: TrainingProtocol, root: Path) -> ZooEntry | None:
    """The cached fine-tune of ``split`` under this protocol and base, or None if not built."""
    key = task_key(protocol, base_fingerprint, split)
    return read_entry(entry_path(root, key, split.name), key)


def bucketed_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator, pool: int) -> list[list[int]]:
    """One epoch of batches: shuffle, sort pools of ``pool * batch_size`` examples by length, cut
    them into batches (little padding), then shuffle the batch order."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    size = batch_size * pool
    batches: list[list[int]] = []
    for start in range(0, len(perm), size):
        chunk = sorted(perm[start : start + size], key=lambda i: lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def batches_per_epoch(n: int, batch_size: int, pool: int) -> int:
    size = batch_size * pool
    return sum(math.ceil(min(size, n - start) / batch_size) for start in range(0, n, size))


def warmup_linear(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier for optimiser step s (0-based): (s+1)/w during the w = int(f * total) warm-up
    steps, then (total - s)/(total - w), reaching 0 after the last step."""
    warmup = int(warmup_fraction * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return multiplier


def fine_tune(
    base: Path,
    split: TaskSplit,
    protocol: TrainingProtocol,
    progress: bool = True,
) -> tuple[Classifier, object, dict]:
    """Fine-tune the body of ``base`` with a fresh head on ``split``'s training set.

    Deterministic on CPU for a given protocol: the task seed drives the head's initialisation,
    dropout and the batch order. Returns (model, tokenizer, stats)."""
    from tqdm.auto import tqdm

    seed = protocol.task_seed(split.name)
    torch.manual_seed(seed)
    body, _ = load_body(base)
    tokenizer = load_tokenizer(base)
    model = Classifier(body, split.num_classes)
    token_ids = tokenizer(list(split.train_texts), truncation=True, max_length=protocol.max_length)["input_ids"]
    lengths = [len(ids) for ids in token_ids]
    labels = torch.tensor(split.train_labels, dtype=torch.long)
    epochs = protocol.epochs_for(len(lengths))
    total = epochs * batches_per_epoch(len(lengths), protocol.batch_size, protocol.bucket_pool)
    optimizer = torch.optim.AdamW(model.parameters(), lr=protocol.learning_rate, weight_decay=protocol.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(total, protocol.warmup_fraction))
    generator = torch.Generator().manual_seed(seed)
    pad_id = tokenizer.pad_token_id or 0
    model.train()
    start, seen, running = time.perf_counter(), 0, None
    bar = tqdm(total=total, desc=f"fine-tune {split.name}", unit="step", disable=not progress, leave=True)
    for _ in range(epochs):
        for batch in bucketed_batches(lengths, protocol.batch_size, generator, protocol.bucket_pool):
            input_ids, mask = pad_batch([token_ids[i] for i in batch], pad_id)
            loss = nn.functional.cross_entropy(model(input_ids, mask), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(batch)
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            bar.set_postfix(loss=f"{running:.3f}", ex_per_s=f"{seen / (time.perf_counter() - start):.0f}")
            bar.update(1)
    bar.close()
    model.eval()
    stats = {"epochs": epochs, "steps": total, "seed": seed, "final_loss": running,
             "train_seconds": time.perf_counter() - start}
    return model, tokenizer, stats


def build_entry(
    base: Path,
    base_fingerprint: str,
    split: TaskSplit,
    protocol: TrainingProtocol,
    root: Path,
    progress: bool = True,
) -> ZooEntry:
    """Fine-tune, score on the test split (the Individual accuracy) and save one task's folder."""
    key = task_key(protocol, base_fingerprint, split)
    model, tokenizer, stats = fine_tune(base, split, protocol, progress=progress)
    individual = evaluate_heads(model.body, tokenizer, [split], {split.name: model.classifier},
                                max_length=protocol.max_length)[split.name]
    metadata = {
        "task": split.name,
        "classes": list(split.classes),
        "key": key,
        "protocol": protocol.as_dict(),
        "base_fingerprint": base_fingerprint,
        "task_fingerprint": split.fingerprint(),
        "train_size": len(split.train_texts),
        "test_size": len(split.test_texts),
        "individual_accuracy": individual,
        **stats,
    }
    path = save_folder(entry_path(root, key, split.name), model.body, tokenizer, model.classifier, metadata,
                       inputs=[base])
    return ZooEntry(split.name, path, list(split.classes), individual, len(split.train_texts),
                    len(split.test_texts), stats["epochs"], stats["train_seconds"], reused=False)


def build_zoo(
    splits: Sequence[TaskSplit],
    base: str | Path | None = None,
    protocol: TrainingProtocol | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Zoo:
    """Build (or reuse) the base copy and one fine-tune per split; returns the Zoo."""
    from primerge.evaluation.model import default_base

    protocol = protocol or TrainingProtocol()
    root = cache_root(cache)
    base_copy, fingerprint = prepare_base(base if base is not None else default_base(), root, log=log)
    zoo = Zoo(base_copy, fingerprint, root)
    for split in splits:
        if split.num_classes < 2:
            raise InputError(f"task '{split.name}' has fewer than 2 classes.")
        entry = find_entry(split, fingerprint, protocol, root)
        if entry is None:
            entry = build_entry(base_copy, fingerprint, split, protocol, root, progress=progress)
            log(f"{split.name}: trained in {entry.train_seconds:.0f}s ({entry.epochs} epochs), "
                f"test accuracy {100 * entry.individual_accuracy:.1f}% -> {entry.path}")
        else:
            log(f"{split.name}: reusing {entry.path} (test accuracy {100 * entry.individual_accuracy:.1f}%)")
        zoo.entries.append(entry)
    return zoo


def evaluate_model(
    model: str | Path,
    splits: Sequence[TaskSplit],
    base: str | Path | None = None,
    protocol: TrainingProtocol | None = None,
    cache: str | Path | None = None,
    batch_size: int = 128,
):
    """Score a model folder on ``splits`` (see :func:`primerge.evaluation.evaluate.evaluate_folder`).

    Heads come from the folder (``task_heads/``, or its own head for a zoo fine-tune), else from the
    zoo entry of each task under ``protocol`` and ``base``; the zoo's Individual accuracies, when
    built, give the normalized accuracy. Returns :class:`primerge.evaluation.evaluate.Scores`."""
    from primerge.evaluation.evaluate import Scores, evaluate_folder
    from primerge.evaluation.model import default_base

    model = Path(model)
    if not model.is_dir():
        raise InputError(f"model folder {model} does not exist.")
    protocol = protocol or TrainingProtocol()
    root = cache_root(cache)
    fingerprint = folder_fingerprint(Path(base) if base is not None else default_base())
    entries = {s.name: find_entry(s, fingerprint, protocol, root) for s in splits}
    built = {name: e for name, e in entries.items() if e is not None}
    base_copy = root / "zoo" / f"base-{fingerprint[:20]}"
    accuracy = evaluate_folder(
        model,
        splits,
        fallback_heads={name: e.head() for name, e in built.items()},
        fallback_tokenizer_folder=base_copy if base_copy.is_dir() else None,
        batch_size=batch_size,
        max_length=protocol.max_length,
    )
    return Scores(accuracy, {name: e.individual_accuracy for name, e in built.items()})
