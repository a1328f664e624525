"""Validation splits carved from a task's training data — the tuner's only data.

Rule (deterministic, independent of every other seed): shuffle the indices of the task's
training split with ``numpy.random.default_rng(VALIDATION_SEED)`` and take the first
k = min(size, max(1, ⌊FRACTION · n_train⌋)) as the validation set, in that order. The test split
is never read: :func:`carve` touches only ``train_texts`` and ``train_labels``.

The fine-tunes of the offline benchmark were trained on the whole training split, so the
validation examples are ones they have seen: validation accuracies run higher than test
accuracies. They rank settings; the test split scores the chosen one once.

Fine-tunes trained on a known prefix of the split (``trained_on = m``: the first m training
examples, as the LLM track's zoos are, ``primerge demo --suite llm --tuned``) get validation none
of them has seen: the shuffle covers only the other n_train − m examples and
k = min(size, n_train − m). (The 20% cap keeps a carve from taking much of the data fine-tunes
train on; these examples are data no fine-tune uses.) ``primerge tune`` does not know how a
user's fine-tunes were trained and keeps ``trained_on = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from primerge.util.errors import InputError
from primerge.data.tasks import TaskSplit
from primerge.tuning.settings import DEFAULT_SIZE

VALIDATION_SEED = 1
FRACTION = 0.2


@dataclass(frozen=True)
class ValidationSet:
    """The held-out examples of one task, labels as class indices."""

    name: str
    classes: tuple[str, ...]
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    origin: str = ""  # how the set was carved, in words

    def as_split(self) -> TaskSplit:
        """A :class:`TaskSplit` whose *test* slot holds the validation examples (its train slot is
        empty), so the evaluation code scores validation without knowing it."""
        return TaskSplit(self.name, self.classes, (), (), self.texts, self.labels, self.origin)


def carve(split: TaskSplit, size: int = DEFAULT_SIZE, seed: int = VALIDATION_SEED,
          trained_on: int = 0) -> ValidationSet:
    """The validation set of ``split`` (module docstring), from its training examples only; with
    ``trained_on = m``, from those after the first m (the ones the fine-tunes trained on)."""
    if size < 1:
        raise InputError(f"the validation size must be at least 1, got {size}.")
    n = len(split.train_texts)
    if n < 2:
        raise InputError(f"task '{split.name}' has {n} training example(s): too few to carve a validation set.")
    if trained_on:
        return _carve_unseen(split, size, seed, min(trained_on, n))
    k = min(size, max(1, int(FRACTION * n)))
    order = np.random.default_rng(seed).permutation(n)[:k]
    origin = (f"validation = {k} of the {n} training examples (shuffled, seed {seed}; min({size}, "
              f"⌊{FRACTION:g}·{n}⌋)); the split: {split.origin or 'as given'}")
    return _held_out(split, order, origin)


def _carve_unseen(split: TaskSplit, size: int, seed: int, seen: int) -> ValidationSet:
    """The validation set from the training examples after the first ``seen``."""
    n = len(split.train_texts)
    if seen >= n:
        raise InputError(f"task '{split.name}': the fine-tunes trained on all {n} of its training examples, so "
                         "none is left for validation; train them on fewer (e.g. fewer --steps) or give the task "
                         "more examples.")
    k = min(size, n - seen)
    order = seen + np.random.default_rng(seed).permutation(n - seen)[:k]
    origin = (f"validation = {k} of the {n - seen} training examples the fine-tunes did not see (they trained on "
              f"the first {seen} of {n}; shuffled, seed {seed}; min({size}, {n - seen})); "
              f"the split: {split.origin or 'as given'}")
    return _held_out(split, order, origin)


def _held_out(split: TaskSplit, order, origin: str) -> ValidationSet:
    return ValidationSet(split.name, split.classes, tuple(split.train_texts[i] for i in order),
                         tuple(split.train_labels[i] for i in order), origin)
