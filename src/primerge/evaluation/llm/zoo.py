"""The LLM zoo: one LoRA adapter and one full fine-tune of the base per task, cached on disk.

Cache layout under ``<cache>/llm/`` (:func:`primerge.util.cache_dirs.cache_root`)::

    base-<sha256 of the GGUF>/          the converted base (convert.py)
    zoo/lora-<key>/<task>/              a PEFT adapter (adapter_config.json, adapter_model.safetensors)
    zoo/full-<key>/<task>/              a full fine-tune (model.safetensors, config.json, tokenizer)
    tasks/, datasets/, scores/          lm-eval task files, their Arrow cache, cached accuracies

``key`` hashes the training settings of that kind, the base's fingerprint and the task's training
prompts (not its test prompts: a larger test set re-evaluates, it does not retrain). Each folder
holds ``task.json`` with its key and training statistics; a folder whose key does not match is
trained anew. Folders are named after the task because a merge names per-task outputs after them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from primerge.evaluation.llm.prompts import PromptTask
from primerge.evaluation.llm.protocol import CPU_PROTOCOL, GPU_PROTOCOL, KINDS, PRESETS, LLMProtocol  # noqa: F401
from primerge.evaluation.llm.training import TrainSettings, fine_tune
from primerge.evaluation.model import writing_folder

ZOO_FORMAT = 2  # 2: fine-tunes trained with the ranking loss
TASK_FILE = "task.json"


def train_fingerprint(task: PromptTask, count: int) -> str:
    """SHA-256 of the task's label words and its first ``count`` training prompts and labels."""
    digest = hashlib.sha256()
    for part in (task.name, task.verbaliser.template, *task.words):
        digest.update(part.encode() + b"\x00")
    for prompt, label in zip(task.train_prompts[:count], task.train_labels[:count]):
        digest.update(f"{label}\x00{prompt}\x00".encode())
    return digest.hexdigest()


def zoo_key(settings: TrainSettings, base_fingerprint: str) -> str:
    payload = {"format": ZOO_FORMAT, "settings": asdict(settings), "base": base_fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class LLMZooEntry:
    name: str
    path: Path
    stats: dict
    reused: bool


@dataclass
class LLMZoo:
    kind: str
    base: Path
    root: Path
    entries: list[LLMZooEntry] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        return [e.path for e in self.entries]

    @property
    def train_seconds(self) -> float:
        return sum(e.stats["train_seconds"] for e in self.entries if not e.reused)


def read_entry(path: Path, task_key: str) -> LLMZooEntry | None:
    meta = path / TASK_FILE
    if not meta.is_file():
        return None
    info = json.loads(meta.read_text())
    if info.get("key") != task_key:
        return None
    return LLMZooEntry(info["task"], path, info["stats"], reused=True)


def save_entry(path: Path, model, tokenizer, metadata: dict) -> None:
    """The adapter (peft) or the full model, the tokenizer and task.json, written atomically."""
    with writing_folder(path) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / TASK_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def build_entry(kind: str, task: PromptTask, base: Path, settings: TrainSettings, path: Path, task_key: str,
                device: str, progress: bool) -> LLMZooEntry:
    from primerge.evaluation.llm.models import load_model

    model, tokenizer = load_model(base, device=device)
    trained, stats = fine_tune(model, tokenizer, task, settings, progress=progress)
    metadata = {"task": task.name, "kind": kind, "key": task_key, "settings": asdict(settings),
                "label_words": list(task.words), "stats": stats}
    save_entry(path, trained, tokenizer, metadata)
    return LLMZooEntry(task.name, path, stats, reused=False)


def build_llm_zoo(kind: str, tasks: Sequence[PromptTask], base: Path, base_fingerprint: str, protocol: LLMProtocol,
                  root: Path, device: str = "cpu", progress: bool = True,
                  log: Callable[[str], None] = print) -> LLMZoo:
    """Train (or reuse) one fine-tune of ``kind`` per task; returns the zoo."""
    settings = protocol.settings(kind)
    folder = root / "llm" / "zoo" / f"{kind}-{zoo_key(settings, base_fingerprint)}"
    zoo = LLMZoo(kind, base, root)
    for task in tasks:
        task_key = train_fingerprint(task, protocol.train_size)[:20]
        path = folder / task.name
        entry = read_entry(path, task_key)
        if entry is None:
            entry = build_entry(kind, task, base, settings, path, task_key, device, progress)
            log(f"{kind} {task.name}: trained {entry.stats['steps']} steps in {entry.stats['train_seconds']:.0f}s "
                f"(final loss {entry.stats['final_loss']:.3f}) -> {path}")
        else:
            log(f"{kind} {task.name}: reusing {path}")
        zoo.entries.append(entry)
    return zoo
