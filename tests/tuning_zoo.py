"""A tiny trained zoo for the tuning tests: a random 2-layer BERT with its own vocabulary, three
user tasks (CSV and JSONL) and one real fine-tune each (seconds on a CPU).

Import the fixtures into a test module (``from tuning_zoo import tuning_zoo``). Everything is seeded.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from primerge.evaluation.model import HEAD_REGEX  # noqa: E402
from primerge.data.tasks import load_splits  # noqa: E402
from primerge.evaluation.zoo import TrainingProtocol, build_zoo  # noqa: E402
from test_evaluation_zoo import FILLER, SPECIAL, sentences  # noqa: E402  (the same text generator)

PROTOCOL = TrainingProtocol(epochs=10, small_task_epochs=10, learning_rate=3e-3, batch_size=16)
TASKS = {"colors": ["red", "blue"], "animals": ["cat", "dog", "bird"], "sizes": ["big", "small"]}


def write_task(path, rows) -> str:
    """A task file: CSV or JSONL by suffix, ``text`` and ``label`` columns."""
    if path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
    else:
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    return str(path)


@pytest.fixture(scope="session")
def tuning_zoo(tmp_path_factory) -> dict:
    """Base, task files, splits, the zoo and a recipe dict marking the heads task-specific.

    Every module that imports this fixture gets its own session instance; they share one folder, so
    the second finds the fine-tunes in the zoo's cache (same base, tasks and protocol) and trains none."""
    root = tmp_path_factory.getbasetemp() / "tuning-zoo"
    root.mkdir(exist_ok=True)
    vocab = root / "vocab.txt"
    words = SPECIAL + FILLER + [w for keys in TASKS.values() for w in keys]
    vocab.write_text("\n".join(words) + "\n")
    config = transformers.BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    base = root / "base"
    transformers.BertModel(config).save_pretrained(base)
    transformers.BertTokenizer(vocab=str(vocab)).save_pretrained(base)
    files = [write_task(root / f"{name}{'.jsonl' if name == 'animals' else '.csv'}", sentences(keys, 150, seed))
             for seed, (name, keys) in enumerate(TASKS.items(), start=1)]
    cache = root / "cache"
    splits = load_splits(files)
    zoo = build_zoo(splits, base=base, protocol=PROTOCOL, cache=cache, progress=False, log=lambda m: None)
    recipe = {"base": str(zoo.base), "models": [str(p) for p in zoo.paths], "method": "task_arithmetic",
              "task_specific": HEAD_REGEX, "seed": 42}
    return {"root": root, "files": files, "splits": splits, "zoo": zoo, "cache": cache, "recipe": recipe}
