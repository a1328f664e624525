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

**The conventions table.** :data:`TENSOR_CLASSES` names what a tensor is (``embed``, ``lm_head``,
``norm``, ``self_attn``, ``mlp``; ``other`` when nothing matches; the first matching row wins, case
ignored, so a norm inside attention, Qwen3's ``self_attn.q_norm``, is a ``norm``), and
:func:`layer_index` which transformer block it sits in (LiNeS's
:data:`~primerge.methods.lines_scaling.BLOCK_PATTERN`, the one block rule). The parameter language
filters and ramps parameters by them (:mod:`primerge.core.parameters`).
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from primerge.util.errors import InputError
from primerge.io.readers import Checkpoint
from primerge.methods.lines_scaling import BLOCK_PATTERN

EMBEDDINGS = re.compile(r"(?:^|\.)(shared|embed_tokens|wte|word_embeddings|embed_in)\.weight$")
TIED = re.compile(r"(?:^|\.)(shared|embed_tokens|wte|word_embeddings|embed_in|lm_head|embed_out)\.weight$")
VOCAB_TENSORS = re.compile(TIED.pattern + r"|(?:^|\.)predictions\.(?:decoder\.)?bias$|(?:^|\.)final_logits_bias$")

#: (class, pattern) rows, searched in order with case ignored; the first match names the class.
TENSOR_CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((cls, re.compile(pattern, re.IGNORECASE)) for cls, pattern in (
    ("embed", r"embed_tokens|embed_in\b|(?:^|\.)(?:wte|wpe|shared)\.|word_embeddings|position_embeddings"
              r"|token_type_embeddings|embed_positions"),
    ("lm_head", r"(?:^|\.)(?:lm_head|embed_out)\."),
    ("norm", r"norm|(?:^|\.)ln_?\w*\."),
    ("self_attn", r"attn|attention"),
    ("mlp", r"mlp|feed_forward|ffn|intermediate|DenseReluDense|experts?\.|(?:^|\.)(?:c_fc|c_proj|fc\d|w\d)\."
            r"|output\.dense"),
))
OTHER_CLASS = "other"
_BLOCK = re.compile(BLOCK_PATTERN)


def tensor_class(name: str) -> str:
    """The class of ``name`` in :data:`TENSOR_CLASSES` (``other`` when no row matches)."""
    return next((cls for cls, pattern in TENSOR_CLASSES if pattern.search(name)), OTHER_CLASS)


def layer_index(name: str) -> int | None:
    """The transformer block ``name`` sits in (the number after ``layers.``, ``h.``, ``blocks.``,
    as LiNeS counts blocks), or ``None`` outside every block (embeddings, final norm, head)."""
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else None


Rename = Callable[[str], str]


def renames(base_names: list[str], model_names: set[str]) -> list[Rename]:
    """Candidate maps from base names to model names: identity, then one leading prefix added
    (``bert.encoder...`` for a base ``encoder...``) or removed, for every prefix either side has."""
    added = sorted({m.split(".", 1)[0] + "." for m in model_names if "." in m})
    removed = sorted({b.split(".", 1)[0] + "." for b in base_names if "." in b})
    return ([lambda n: n] + [lambda n, p=p: p + n for p in added]
            + [lambda n, p=p: n[len(p):] if n.startswith(p) else "\0" + n for p in removed])


def find_rename(base_names: list[str], model_names: set[str]) -> Rename | None:
    """The first candidate :func:`renames` that finds every base name in the model, or ``None``."""
    return next((r for r in renames(base_names, model_names) if all(r(n) in model_names for n in base_names)), None)


def prefix_map(base_names: list[str], model_names: set[str]) -> dict[str, str] | None:
    """{base name: model name} by :func:`find_rename`, or ``None`` when no single prefix fits."""
    rename = find_rename(base_names, model_names)
    return None if rename is None else {n: rename(n) for n in base_names}


def missing_tensors(base: Checkpoint, model: Checkpoint, wanted: list[str], label: str) -> InputError:
    """The error for a model that lacks base tensors, judged under the name prefix that finds the
    most of them (so a ``bert.``-prefixed model with one missing tensor blames that one)."""
    names = set(model.names)
    rename = max(renames(wanted, names), key=lambda r: sum(r(n) in names for n in wanted))
    missing = [n for n in wanted if rename(n) not in names]
    shown = ", ".join(f"'{rename(n)}'" for n in missing[:3]) + (", ..." if len(missing) > 3 else "")
    return InputError(f"{model.path}: {len(missing)} tensors of the base {base.path} are missing ({shown}). "
                      f"Is '{label}' a fine-tune of this base?")


def rows_differ(name: str, base_shape: tuple[int, ...], model_shape: tuple[int, ...]) -> bool:
    """Whether ``name`` is a vocabulary tensor whose shapes differ in one axis only (its token rows,
    which :mod:`primerge.core.vocabulary` aligns or refuses)."""
    differing = [a != b for a, b in zip(base_shape, model_shape)]
    return bool(VOCAB_TENSORS.search(name)) and len(base_shape) == len(model_shape) and sum(differing) == 1


def input_embedding(names: list[str]) -> str | None:
    """The input embedding among ``names`` (``shared`` first, then by family order, shortest name)."""
    order = ["shared", "embed_tokens", "wte", "word_embeddings", "embed_in"]
    found = [(order.index(m.group(1)), len(n), n) for n in names if (m := EMBEDDINGS.search(n))]
    return min(found)[2] if found else None


def _with_tied(shared: list[str], model: Checkpoint) -> tuple[Rename, dict[str, str], list[str]] | None:
    """The prefix change, the names mapped with every tied name the model lacks read from its
    input embedding, and notes; ``None`` when that does not find every name either."""
    tied = [n for n in shared if TIED.search(n)]
    rest = [n for n in shared if n not in tied]
    rename = find_rename(rest, set(model.names))
    embedding = input_embedding(model.names)
    if rename is None or embedding is None:
        return None
    names, notes = {n: rename(n) for n in rest}, []
    for name in tied:
        if rename(name) in model:
            names[name] = rename(name)
        else:
            names[name] = embedding
            notes.append(f"'{name}' is not stored (tied): read from its input embedding '{embedding}'")
    return rename, names, notes


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
    """Base name -> model name for every ``shared`` base tensor the model has (see the module
    docstring), and notes on what was reconciled; ``heads`` are the model's task-specific tensors.

    Every floating base tensor must be there; the base's integer buffers (BERT's ``position_ids``)
    may be missing (they are copied from the base) and do not take part in finding the prefix."""
    floating = [n for n in shared if base.info(n).dtype.is_floating_point]
    rename = find_rename(floating, set(model.names))
    if rename is not None:
        names, notes = {n: rename(n) for n in floating}, []
    elif (tied := _with_tied(floating, model)) is not None:
        rename, names, notes = tied
    else:
        raise missing_tensors(base, model, floating, label)
    names.update({n: rename(n) for n in shared if n not in names and rename(n) in model})
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
