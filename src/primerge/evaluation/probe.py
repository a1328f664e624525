"""The "Base" row: a linear probe on the frozen base's pooled features.

For each task, the frozen base encodes the train and test texts into pooled features (BERT's
pretrained pooler: tanh(W_p h_[CLS] + b_p)); the features are standardised (mean and scale from
the training split) and a multinomial logistic regression (scikit-learn, L2, C = 1) is fitted on
the training split and scored on the test split. This is what the base knows without any
fine-tuning: a fine-tune or a merge that cannot beat it has learnt nothing usable.

Results are cached as JSON beside the zoo's base copy, keyed by the probe settings and the task's
split fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from primerge.evaluation.evaluate import MAX_LENGTH, features
from primerge.evaluation.model import load_body
from primerge.io.hf import load_tokenizer
from primerge.data.tasks import TaskSplit


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of the logistic-regression probe (they key its cache)."""

    C: float = 1.0
    max_iter: int = 2000
    standardize: bool = True
    max_length: int = MAX_LENGTH


def fit_probe(
    train_x: np.ndarray, train_y: Sequence[int], test_x: np.ndarray, test_y: Sequence[int], config: ProbeConfig
) -> float:
    """Fit logistic regression on (train_x, train_y); return its accuracy on (test_x, test_y)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps = [StandardScaler()] if config.standardize else []
    classifier = make_pipeline(*steps, LogisticRegression(C=config.C, max_iter=config.max_iter))
    classifier.fit(train_x, np.asarray(train_y))
    return float(np.mean(classifier.predict(test_x) == np.asarray(test_y)))


def probe_key(split: TaskSplit, config: ProbeConfig) -> str:
    payload = json.dumps({"probe": asdict(config), "task": split.fingerprint()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def base_probe(
    base: Path,
    splits: Sequence[TaskSplit],
    config: ProbeConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Probe accuracy per task for the base folder ``base``, cached in ``base/probe/``."""
    config = config or ProbeConfig()
    cache = Path(base) / "probe"
    scores: dict[str, float] = {}
    todo = []
    for split in splits:
        path = cache / f"{split.name}-{probe_key(split, config)}.json"
        if path.is_file():
            scores[split.name] = float(json.loads(path.read_text())["accuracy"])
        else:
            todo.append((split, path))
    if todo:
        body, _ = load_body(Path(base))
        tokenizer = load_tokenizer(Path(base))
        for split, path in todo:
            log(f"linear probe on the frozen base: {split.name}")
            train_x = features(body, tokenizer, split.train_texts, max_length=config.max_length).numpy()
            test_x = features(body, tokenizer, split.test_texts, max_length=config.max_length).numpy()
            scores[split.name] = fit_probe(train_x, split.train_labels, test_x, split.test_labels, config)
            cache.mkdir(parents=True, exist_ok=True)
            record = {"task": split.name, "accuracy": scores[split.name], "config": asdict(config)}
            path.write_text(json.dumps(record, indent=2) + "\n")
    return {split.name: scores[split.name] for split in splits}
