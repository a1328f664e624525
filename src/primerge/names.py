"""A model's tensor names aligned with the base's: one added or removed prefix, and tied embeddings.

Name families (matched with ``re.search``): :data:`EMBEDDINGS` are input embeddings
(``shared``, ``embed_tokens``, ``wte``, ``word_embeddings``, ``embed_in``); :data:`TIED` adds the
output heads that transformers ties to them (``lm_head``, ``embed_out``). :data:`VOCAB_TENSORS`
are the tensors with one row (or entry) per token: those, and the MLM / seq2seq logit biases.

**Tied embeddings.** transformers saves a model whose head is tied to its input embedding
(``tie_word_embeddings``) without the head, and other tools save both. :func:`map_names` makes
both merge the same way:

- a tied name the base stores but a model does not (``lm_head.weight``, T5's
  ``encoder.embed_tokens.weight``) is read from that model's input embedding: its effective
  value, so τ(head) = θ_t(embedding) − θ₀(head);
- a tied name a model stores but the base does not is ignored when it equals the model's input
  embedding (a saved duplicate), so the output keeps the base's layout (no duplicated head);
- a head that differs from its embedding in a model whose base stores none (the fine-tune untied
  it) is refused, with the fix: untie the base, so the merged model keeps a head of its own.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from primerge.errors import InputError
from primerge.io.readers import Checkpoint

EMBEDDINGS = re.compile(r"(?:^|\.)(shared|embed_tokens|wte|word_embeddings|embed_in)\.weight$")
TIED = re.compile(r"(?:^|\.)(shared|embed_tokens|wte|word_embeddings|embed_in|lm_head|embed_out)\.weight$")
VOCAB_TENSORS = re.compile(TIED.pattern + r"|(?:^|\.)predictions\.(?:decoder\.)?bias$|(?:^|\.)final_logits_bias$")


def prefix_map(base_names: list[str], model_names: set[str]) -> dict[str, str] | None:
    """Map base names to model names, allowing one added or removed leading prefix.

    A model saved with a task wrapper (``bert.encoder...`` for a base ``encoder...``) or the
    reverse is recognised; returns ``None`` when no single prefix fits.
    """
    if all(n in model_names for n in base_names):
        return {n: n for n in base_names}
    for p in sorted({m.split(".", 1)[0] + "." for m in model_names if "." in m}):
        if all(p + n in model_names for n in base_names):
            return {n: p + n for n in base_names}
    for p in sorted({b.split(".", 1)[0] + "." for b in base_names if "." in b}):
        if all(n.startswith(p) and n[len(p):] in model_names for n in base_names):
            return {n: n[len(p):] for n in base_names}
    return None


def rows_differ(name: str, base_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> bool:
    """Whether ``name`` is a vocabulary tensor whose shapes differ in one axis only (its token rows,
    which :mod:`primerge.vocabulary` aligns or refuses)."""
    differing = [a != b for a, b in zip(base_shape, model_shape)]
    return bool(VOCAB_TENSORS.search(name)) and len(base_shape) == len(model_shape) and sum(differing) == 1


def input_embedding(names: list[str]) -> str | None:
    """The input embedding among ``names`` (``shared`` first, then by family order, shortest name)."""
    order = ["shared", "embed_tokens", "wte", "word_embeddings", "embed_in"]
    found = [(order.index(m.group(1)), len(n), n) for n in names if (m := EMBEDDINGS.search(n))]
    return min(found)[2] if found else None


def _renamer(mapping: dict[str, str]) -> Callable[[str], str]:
    """The prefix change of ``mapping`` (every pair differs by the same added or removed prefix)."""
    if not mapping:
        return lambda name: name
    base, model = next(iter(mapping.items()))
    if model.endswith(base):
        added = model[: len(model) - len(base)]
        return lambda name: added + name
    removed = base[: len(base) - len(model)]
    return lambda name: name.removeprefix(removed)


def _with_tied(shared: list[str], model: Checkpoint) -> tuple[dict[str, str], list[str]] | None:
    """Names mapped with every tied name the model lacks read from its input embedding; notes."""
    tied = [n for n in shared if TIED.search(n)]
    rest = [n for n in shared if n not in tied]
    names = prefix_map(rest, set(model.names)) if rest else {}
    embedding = input_embedding(model.names)
    if names is None or embedding is None:
        return None
    rename, notes = _renamer(names), []
    for name in tied:
        if rename(name) in model:
            names[name] = rename(name)
        else:
            names[name] = embedding
            notes.append(f"'{name}' is not stored (tied): read from its input embedding '{embedding}'")
    return names, notes


def _duplicates(model: Checkpoint, extra: set[str]) -> set[str]:
    """The tied names among ``extra`` whose values equal the model's input embedding (saved duplicates)."""
    embedding = input_embedding(model.names)
    candidates = [n for n in extra if TIED.search(n) and embedding is not None and n != embedding]
    if not candidates:
        return set()
    value = model.load(embedding)
    return {n for n in candidates if model.info(n).shape == model.info(embedding).shape
            and torch.equal(model.load(n), value)}


def map_names(base: Checkpoint, model: Checkpoint, shared: list[str], heads: list[str], label: str
              ) -> tuple[dict[str, str], list[str]]:
    """Base name -> model name for every ``shared`` base tensor (see the module docstring), and
    notes on what was reconciled; ``heads`` are the model's task-specific tensors."""
    names, notes = prefix_map(shared, set(model.names)), []
    if names is None:
        names, notes = _with_tied(shared, model) or (None, [])
    if names is None:
        missing = [n for n in shared if n not in model]
        raise InputError(f"{model.path}: {len(missing)} tensors of the base {base.path} are missing "
                         f"(first: '{missing[0]}'). Is '{label}' a fine-tune of this base?")
    renamed = [(b, m) for b, m in names.items() if m.endswith("." + b) or b.endswith("." + m)]
    if renamed:
        notes.append(f"names carry another prefix ('{renamed[0][1]}' for the base's '{renamed[0][0]}'): mapped")
    extra = set(model.names) - set(names.values()) - set(heads)
    duplicates = _duplicates(model, extra)
    notes += [f"'{n}' equals the input embedding (a tied duplicate): not merged" for n in sorted(duplicates)]
    extra = sorted(extra - duplicates)
    if extra and TIED.search(extra[0]):
        raise InputError(f"{model.path}: tensor '{extra[0]}' differs from the input embedding '"
                         f"{input_embedding(model.names)}' (the fine-tune unties them) but the base "
                         f"{base.path} stores no '{extra[0]}' (it ties them): the merge would drop it. "
                         f"Fix: untie the base (load it, set config.tie_word_embeddings=False, "
                         f"save_pretrained) and merge with that copy.")
    if extra:
        raise InputError(f"{model.path}: {len(extra)} tensors are not in the base {base.path} "
                         f"(first: '{extra[0]}'). If they are per-task heads, name them with "
                         f"task_specific: REGEX in the recipe.")
    return names, notes
