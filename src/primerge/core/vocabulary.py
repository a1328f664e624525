"""Vocabulary alignment: embedding and output-head rows matched across models by token string.

The recipe's ``tokenizer`` (mergekit's ``tokenizer_source``) chooses the output vocabulary, read
from each folder's ``tokenizer.json`` (:mod:`primerge.io.tokenizer`):

- ``base`` (default): the base's tokens and row count;
- ``union``: the base's tokens keep their ids; the tokens the base lacks are added to the base's
  tokenizer, model by model in recipe order and each model's in id order, with their added-token
  properties (special or not); rows R = max(R_base, largest id + 1);
- a model's name: that model's tokenizer and row count.

Vocabulary tensors (:data:`primerge.core.tensor_names.VOCAB_TENSORS` with an axis of the checkpoint's row
count R, the rows of its input embedding) are aligned row by row. For output row i of token s:

- s in the base: θ₀[i] = θ_base[id_base(s)]; τ_t[i] = θ_t[id_t(s)] − θ₀[i] when model t has s,
  else 0 (task vectors exist only for rows present in the base and in that model);
- s not in the base: θ₀[i] = Σ_{t ∋ s} |w_t| θ_t[id_t(s)] / Σ_{t ∋ s} |w_t| (the plain mean when
  those weights are all 0) and τ_t[i] = 0: every method maps rows that are zero in every task
  vector to zero update rows, so the merged row is that weighted mean;
- i padding (no token of the output tokenizer has id i, e.g. a vocabulary padded to a multiple
  of 64): the tokenizer source's row i (zero if it has none), τ_t[i] = 0. A model's own padding
  rows are never read.

Every row the alignment reads is accounted for: each tokenizer is checked to say one thing (no
duplicate keys, no id of two tokens: :func:`~primerge.io.tokenizer.read_vocabulary`) and every id
it gives must be a row of its model's input embedding (a tokenizer larger than its weights is
refused with the fix, so no output grows rows from ids the weights do not have).

A model is aligned (:class:`~primerge.core.sources.VocabAligned`) when its token ids or row count
differ from the output's. A model without ``tokenizer.json`` whose vocabulary tensors have the
base's shapes is taken to share the base's vocabulary (rows by position, as always); different
shapes without tokenizers to align by is refused with the fix. LoRA adapters keep the base's rows:
one that changes a vocabulary tensor is refused when the output vocabulary is not the base's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from primerge.util.errors import InputError, quoted
from primerge.io.readers import Checkpoint, TensorInfo
from primerge.io.tokenizer import Vocabulary, extended_tokenizer, read_vocabulary
from primerge.core.tensor_names import VOCAB_TENSORS, input_embedding
from primerge.core.sources import FullFineTune, TaskVectorSource, VocabAligned

RESIZED_HINT = ("A resized vocabulary: give every model folder its tokenizer.json so primerge aligns the "
                "rows by token string (recipe tokenizer: base | union | MODEL), or resize the embeddings "
                "to the base's before merging.")


@dataclass(frozen=True)
class OutputVocabulary:
    """The merged model's vocabulary: ``tokens`` (string -> id), ``rows`` R_out, the tokenizer
    ``source`` (base, union or a model name) and its ``folder``; ``added`` are the tokens (with
    their properties) a union added to the base's tokenizer."""

    source: str
    tokens: dict[str, int]
    rows: int
    folder: Path | None
    added: tuple[tuple[str, dict[str, bool]], ...] = ()

    def index(self, tokens: dict[str, int]) -> Tensor:
        """Row of each output row in a checkpoint whose tokenizer has ``tokens`` (−1: absent or padding)."""
        rows = torch.full((self.rows,), -1, dtype=torch.long)
        for token, i in self.tokens.items():
            j = tokens.get(token)
            if j is not None:
                rows[i] = j
        return rows

    def padding(self) -> Tensor:
        """Output rows no token has (bool, R_out)."""
        pad = torch.ones(self.rows, dtype=torch.bool)
        pad[list(self.tokens.values())] = False
        return pad


def embedding_rows(checkpoint: Checkpoint) -> int | None:
    """R: the rows of the checkpoint's input embedding (``None`` without one)."""
    name = input_embedding(checkpoint.names)
    return checkpoint.info(name).shape[0] if name is not None else None


def vocab_axes(checkpoint: Checkpoint, rows: int) -> dict[str, int]:
    """Every vocabulary tensor of ``checkpoint`` with its token axis (the first of size ``rows``)."""
    axes = {}
    for name in checkpoint.names:
        shape = checkpoint.info(name).shape
        if VOCAB_TENSORS.search(name) and rows in shape and checkpoint.info(name).dtype.is_floating_point:
            axes[name] = shape.index(rows)
    return axes


def _checked(vocab: Vocabulary | None, rows: int | None) -> Vocabulary | None:
    """``vocab``, refused when one of its ids has no row in an embedding of ``rows`` rows: the
    alignment reads row id_t(s) of every token, so each must exist (a tokenizer that does not belong
    to the weights, or an embedding that was not resized after tokens were added)."""
    if vocab is None or rows is None or vocab.next_id <= rows:
        return vocab
    token, i = max(vocab.tokens.items(), key=lambda item: item[1])
    raise InputError(f"{vocab.file}: token {quoted(token)} has id {i}, but the model's input embedding has {rows} "
                     f"rows (ids 0..{rows - 1}); the tokenizer does not match the weights. Fix: resize the "
                     f"embeddings (model.resize_token_embeddings(len(tokenizer))) and save again, or give the "
                     f"folder the tokenizer.json it was trained with.")


def union(base: Vocabulary, base_rows: int, models: list[Vocabulary | None]) -> OutputVocabulary:
    """The base's tokens, then every model's tokens the base lacks (see the module docstring)."""
    added: dict[str, dict[str, bool]] = {}
    origins: dict[str, Path] = {}
    for vocab in models:
        for token in sorted(vocab.tokens, key=vocab.tokens.get) if vocab else []:
            if token not in base.tokens and token not in added:
                added[token] = vocab.added.get(token, {"special": False, "normalized": True})
                origins[token] = vocab.file
    if not added:
        return OutputVocabulary("union", base.tokens, base_rows, base.file.parent)
    _, ids = extended_tokenizer(base.file, list(added.items()), origins)
    tokens = {**base.tokens, **ids}
    rows = max(base_rows, max(tokens.values()) + 1)
    return OutputVocabulary("union", tokens, rows, base.file.parent, tuple(added.items()))


def output_vocabulary(choice: str, base: Vocabulary | None, base_rows: int, labels: list[str],
                      models: list[Vocabulary | None], model_rows: list[int | None]) -> OutputVocabulary | None:
    """The output vocabulary the recipe's ``tokenizer`` asks for (``None``: base, without tokenizer)."""
    if choice == "base":
        return OutputVocabulary("base", base.tokens, base_rows, base.file.parent) if base else None
    if base is None:
        raise InputError(f"tokenizer: {choice} needs the base's tokenizer.json; the base folder has none. "
                         f"Save the base's tokenizer there (tokenizer.save_pretrained).")
    if choice == "union":
        return union(base, base_rows, models)
    t = labels.index(choice)
    if models[t] is None:
        raise InputError(f"tokenizer: {choice} needs that model's tokenizer.json; its folder has none.")
    return OutputVocabulary(choice, models[t].tokens, model_rows[t], models[t].file.parent)


def _resized(info: TensorInfo, axis: int, rows: int) -> TensorInfo:
    shape = list(info.shape)
    shape[axis] = rows
    return replace(info, shape=tuple(shape))


def _broadcast(weights: Tensor, like: Tensor) -> Tensor:
    """(k,) weights shaped to multiply (k, ...) rows."""
    return weights.reshape(-1, *[1] * (like.dim() - 1))


class AlignedBase(Checkpoint):
    """The base with its vocabulary tensors in the output's rows (θ₀ of the module docstring);
    every other tensor as the base stores it. ``base_index`` is the base's row of each output row
    (−1: not a base token); ``contributors`` (w_t, model, row of each output row in the model) give
    the rows of tokens the base lacks; ``pad_source`` the padding rows (``None``: the base)."""

    def __init__(self, inner: Checkpoint, axes: dict[str, int], out: OutputVocabulary, base_index: Tensor,
                 contributors: list[tuple[float, TaskVectorSource, Tensor]], pad_source: TaskVectorSource | None):
        infos = {n: _resized(inner.info(n), axes[n], out.rows) if n in axes else inner.info(n) for n in inner.names}
        super().__init__(inner.path, inner.folder, infos, inner.support)
        self.inner, self.axes, self.out, self.base_index = inner, axes, out, base_index
        self.contributors, self.pad_source = contributors, pad_source

    def load(self, name: str) -> Tensor:
        if name not in self.axes:
            return self.inner.load(name)
        axis, raw = self.axes[name], self.inner.load(name)
        rows = raw.float().movedim(axis, 0)
        theta = rows.new_zeros((self.out.rows, *rows.shape[1:]))
        have = self.base_index >= 0
        theta[have] = rows[self.base_index[have]]
        pad_rows = rows if self.pad_source is None else self._model_rows(self.pad_source, name)
        pad = self.out.padding() & (torch.arange(self.out.rows) < pad_rows.shape[0])
        theta[pad] = pad_rows[pad.nonzero().squeeze(1)]
        self._mean_of_models(name, theta, ~have & ~self.out.padding())
        return theta.movedim(0, axis).to(raw.dtype)

    def _model_rows(self, source: TaskVectorSource, name: str) -> Tensor:
        return source.head(source.names[name]).float().movedim(self.axes[name], 0)

    def _mean_of_models(self, name: str, theta: Tensor, new: Tensor) -> None:
        """θ₀[i] = Σ |w_t| θ_t[id_t(s_i)] / Σ |w_t| over the models that have token s_i (``new`` rows),
        the plain mean where those weights are all 0."""
        if not bool(new.any()):
            return
        present = [new & (index >= 0) for _, _, index in self.contributors]
        weight_sum = sum(abs(w) * p.float() for (w, _, _), p in zip(self.contributors, present))
        total, denominator = torch.zeros_like(theta), torch.zeros(self.out.rows)
        for (weight, source, index), rows in zip(self.contributors, present):
            if bool(rows.any()):
                factor = torch.where(weight_sum > 0, abs(weight), 1.0)[rows]
                values = self._model_rows(source, name)[index[rows]]
                total[rows] += _broadcast(factor, values) * values
                denominator[rows] += factor
        theta[new] = total[new] / _broadcast(denominator[new], theta)

    def stored(self, name: str) -> dict[str, Tensor]:
        """The tensors ``name`` (outside the vocabulary) is stored as in the base."""
        stored = getattr(self.inner, "stored", None)
        return stored(name) if stored is not None else {name: self.inner.load(name)}

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class VocabularyAlignment:
    """What alignment decided: the output vocabulary (``None``: the base's rows, by position),
    whether the base's rows changed (the output's tokenizer files and config then follow
    ``out.source``), the vocabulary tensors, the models aligned by token string, and notes for
    the pre-flight report."""

    out: OutputVocabulary | None
    changed: bool
    tensors: tuple[str, ...]
    models: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def aligned(self) -> bool:
        """Whether any rows are matched by token string (rather than by position)."""
        return self.changed or bool(self.models)


def _source_vocabulary(source: TaskVectorSource, base_rows: int) -> tuple[Vocabulary | None, int]:
    """A full fine-tune's tokenizer vocabulary and embedding rows (adapters: none, the base's rows)."""
    if not isinstance(source, FullFineTune):
        return None, base_rows
    rows = embedding_rows(source.checkpoint) or base_rows
    return _checked(read_vocabulary(source.checkpoint.folder), rows), rows


def _check_rows(base: Checkpoint, source: FullFineTune, axes: dict[str, int], rows: int, aligned: bool) -> None:
    """Every vocabulary tensor of ``source`` has ``rows`` token rows and otherwise the base's shape."""
    for name, axis in axes.items():
        if name not in source.names:
            continue
        info, base_info = source.checkpoint.info(source.names[name]), base.info(name)
        if info.shape != _resized(base_info, axis, rows).shape:
            hint = (f"Its embedding has {rows} rows; re-export the model." if aligned else RESIZED_HINT)
            raise InputError(f"tensor '{name}': shape {list(info.shape)} in {info.file} but {list(base_info.shape)} "
                             f"in the base {base_info.file}. {hint}")


def _note(label: str, tokens: dict[str, int], rows: int, base: dict[str, int], choice: str) -> str:
    """What alignment does to one model's rows, in words."""
    new = [t for t in sorted(tokens, key=tokens.get) if t not in base]
    lacking = sum(1 for t in base if t not in tokens)
    fate = "dropped (tokenizer: base)" if choice == "base" else "rows = weighted mean of the models that have them"
    parts = [f"{label}: {len(tokens)} tokens in {rows} rows ({rows - len(tokens)} padding) aligned by token string"]
    if new:
        parts.append(f"{len(new)} tokens not in the base ({', '.join(new[:3])}{', ...' if len(new) > 3 else ''}) "
                     f"-> {fate}")
    if lacking:
        parts.append(f"{lacking} base tokens it lacks -> no task vector on those rows")
    return "; ".join(parts)


def _refuse_adapters(sources: tuple[TaskVectorSource, ...], axes: dict[str, int], choice: str) -> None:
    """An adapter keeps the base's rows: refuse one that changes a vocabulary tensor of changed rows."""
    for source in sources:
        touched = [n for n in axes if n in source.names]
        if not isinstance(source, FullFineTune) and touched:
            raise InputError(f"model '{source.label}' (an adapter) changes '{touched[0]}' in the base's "
                             f"vocabulary, but tokenizer: {choice} changes the output's rows. Merge it with "
                             f"tokenizer: base, or merge the adapter into its model first.")


def _wrap(sources: tuple[TaskVectorSource, ...], tokens: dict[str, dict[str, int]], rows: dict[str, int],
          axes: dict[str, int], out: OutputVocabulary, base_index: Tensor, base_tokens: dict[str, int]
          ) -> tuple[list[TaskVectorSource], list[tuple[float, TaskVectorSource, Tensor]], list[str]]:
    """Every full fine-tune as :class:`VocabAligned`; the contributors of new rows; notes."""
    aligned, contributors, notes = [], [], []
    restricted_to_base = base_index >= 0
    for source in sources:
        if not isinstance(source, FullFineTune):
            aligned.append(source)
            continue
        index = out.index(tokens[source.label])
        contributors.append((source.weight, source, index))
        restricted = torch.where(restricted_to_base, index, -1)
        aligned.append(VocabAligned(source, {n: (a, restricted) for n, a in axes.items() if n in source.names}))
        notes.append(_note(source.label, tokens[source.label], rows[source.label], base_tokens, out.source))
    return aligned, contributors, notes


def padded(out: OutputVocabulary | None, multiple: int | None) -> OutputVocabulary | None:
    """``out`` with its rows rounded up to a multiple of ``multiple`` (the new rows are padding)."""
    if out is None or multiple is None or out.rows % multiple == 0:
        return out
    return replace(out, rows=-(-out.rows // multiple) * multiple)


def align_vocabulary(choice: str, base: Checkpoint, sources: tuple[TaskVectorSource, ...], labels: list[str],
                     pad_to_multiple_of: int | None = None
                     ) -> tuple[Checkpoint, tuple[TaskVectorSource, ...], VocabularyAlignment]:
    """The base and sources with vocabulary rows aligned to the output vocabulary ``choice`` (its rows
    rounded up to ``pad_to_multiple_of``). Rows merge by position (nothing is wrapped) when every
    model's vocabulary is the output's; once one differs, every full fine-tune is aligned by token string."""
    base_rows = embedding_rows(base)
    if base_rows is None:
        if choice != "base":
            raise InputError(f"{base.path}: tokenizer: {choice}, but the base has no input embedding to align.")
        return base, sources, VocabularyAlignment(None, False, ())
    axes = vocab_axes(base, base_rows)
    base_vocab = _checked(read_vocabulary(base.folder), base_rows)
    vocabs, counts = zip(*[_source_vocabulary(s, base_rows) for s in sources])
    for source, vocab, count in zip(sources, vocabs, counts):
        if isinstance(source, FullFineTune):  # no tokenizer: the base's vocabulary, so the base's rows
            _check_rows(base, source, axes, count if vocab is not None else base_rows, aligned=vocab is not None)
    out = padded(output_vocabulary(choice, base_vocab, base_rows, labels, list(vocabs), list(counts)), pad_to_multiple_of)
    if out is None and pad_to_multiple_of is not None:
        raise InputError(f"{base.path}: tokenizer.pad_to_multiple_of needs the base's tokenizer.json to tell tokens "
                         f"from padding rows; save the base's tokenizer there (tokenizer.save_pretrained).")
    if out is None:
        return base, sources, VocabularyAlignment(None, False, tuple(axes))
    tokens = {s.label: v.tokens if v is not None else base_vocab.tokens for s, v in zip(sources, vocabs)}
    rows = {s.label: c for s, c in zip(sources, counts)}
    changed = out.tokens != base_vocab.tokens or out.rows != base_rows
    full = [s for s in sources if isinstance(s, FullFineTune)]
    if not changed and all(tokens[s.label] == out.tokens and rows[s.label] == out.rows for s in full):
        return base, sources, VocabularyAlignment(out, False, tuple(axes))
    if changed:
        _refuse_adapters(sources, axes, choice)
    base_index = out.index(base_vocab.tokens)
    aligned, contributors, notes = _wrap(sources, tokens, rows, axes, out, base_index, base_vocab.tokens)
    if changed:
        pad_source = None if choice in ("base", "union") else sources[labels.index(choice)]
        base = AlignedBase(base, axes, out, base_index, contributors, pad_source)
        notes.append(f"output vocabulary ({out.source}): {len(out.tokens)} tokens in {out.rows} rows "
                     f"(the base: {len(base_vocab)} in {base_rows})")
    models = tuple(s.label for s in full)
    return base, tuple(aligned), VocabularyAlignment(out, changed, tuple(axes), models, tuple(notes))
