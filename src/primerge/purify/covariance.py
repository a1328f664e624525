"""Input covariances of every ``nn.Linear`` of a fine-tuned model on its task's data (PAVE Eq. 5).

A task's texts are tokenised (the model folder's tokenizer, else the base's), run in batches
through the fine-tuned model (``transformers.AutoModel``, float32, ``torch.inference_mode``), and a
forward hook on every linear layer accumulates, over the real (non-padding) token rows x of its
input, C = Σ x xᵀ / rows and the mean |x| per input feature (ASVD's scaling), in float64. Batches
are fed until ``samples`` token rows have been seen (the last batch is cut to the remainder).

A PEFT LoRA adapter folder is run as its base (the ``base`` folder) with the adapter merged into
the weights by peft (:func:`primerge.io.hf.load_adapted_body`: W + s·B A), so its covariances are
those of the adapted model, the same as of that model saved in full. With a ``template`` (a
prompt with one ``{text}`` field) each text runs as its prompt, cut at a word end so the prompt
has at most ``max_length`` tokens (:func:`primerge.data.prompts.fit_text`, the LLM track's rule).

The same pass gives RegMean its Gram matrices (:mod:`primerge.calibration`, which reads a cached
file one matrix at a time), and its pieces (:func:`token_batches`, :class:`InputStatistics`) run the
RegMean++ pass through the merged model.

Results are cached under ``<cache>/covariances/<key>.safetensors`` (cache = ``$PRIMERGE_CACHE``,
else ``~/.cache/primerge``); the key hashes the model folder's files (an adapter's and its base's),
the tokenizer folder's files, the texts, the template and the settings, so a changed model, base or
data set computes anew.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from primerge.data.prompts import Verbaliser, fit_text, prompt_length
from primerge.io.adapters import is_adapter
from primerge.util.errors import InputError
from primerge.util.hashing import content_digest
from primerge.util.cache_dirs import cache_root

FORMAT = 2


@dataclass
class Covariances:
    """Per linear module: ``cov`` (n, n) = XᵀX/rows, ``abs_mean`` (n,) = mean |x|, float64."""

    cov: dict[str, torch.Tensor]
    abs_mean: dict[str, torch.Tensor]
    rows: int
    key: str = ""  # the cache key: model, tokenizer, texts and settings (purified results reuse it)

    def modules(self) -> list[str]:
        return sorted(self.cov)


def cache_key(model: Path, tokenizer: Path, texts: Sequence[str], samples: int, max_length: int,
              batch_size: int, base: Path | None = None, template: str | None = None) -> str:
    """SHA-256 (32 hex digits) of the model files, tokenizer files, texts and settings; of the base's
    files too when ``base`` is given (an adapter's), and of the template when there is one."""
    digest = hashlib.sha256(f"pave-cov/{FORMAT}/{samples}/{max_length}/{batch_size}".encode())
    digest.update(content_digest(model).encode() + b"\x02" + content_digest(tokenizer).encode() + b"\x03")
    if base is not None:
        digest.update(b"adapter-on\x00" + content_digest(base).encode() + b"\x03")
    if template is not None:
        digest.update(b"template\x00" + template.encode() + b"\x03")
    for text in texts:
        digest.update(text.encode() + b"\x00")
    return digest.hexdigest()[:32]


def _load_model(folder: Path, adapter_base: Path | None) -> nn.Module:
    """The full model of ``folder``, or the adapter of ``folder`` applied to ``adapter_base``."""
    from primerge.io.hf import load_adapted_body, load_pretrained_body

    body = load_pretrained_body(folder) if adapter_base is None else load_adapted_body(folder, adapter_base)
    return body.eval()


def _tokenizer_folder(model: Path, base: Path | None) -> Path:
    """The model folder when it has tokenizer files, else the base folder."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")
    if any((model / n).is_file() for n in names) or base is None:
        return model
    return base


def prompts(tokenizer, texts: Sequence[str], template: str, max_length: int) -> list[str]:
    """Each text as ``template``'s prompt of it, the text cut at a word end so the prompt has at
    most ``max_length`` tokens (:func:`~primerge.data.prompts.fit_text`); a template that leaves
    no room for a text, or a text cut to nothing, is an error (the prompt would not hold the text)."""
    frame = Verbaliser(template)
    overhead = prompt_length(tokenizer, frame, "")
    if overhead >= max_length:
        raise InputError(f"the calibration template {template[:60]!r} is {overhead} tokens on its own, leaving no room "
                         f"for a text in max_length {max_length}; raise calibration.max_length.")
    out = []
    for text in texts:
        cut = fit_text(text, frame, tokenizer, max_length)
        if text.strip() and not cut:
            raise InputError(f"the calibration text {text[:40]!r} does not fit in a prompt of {max_length} tokens "
                             f"even cut to its first character; raise calibration.max_length.")
        out.append(frame.prompt(cut))
    return out


def token_batches(tokenizer, texts: Sequence[str], samples: int, max_length: int, batch_size: int,
                  template: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, mask) of ``batch_size`` texts at a time (right-padded with the tokenizer's pad
    id, else 0; mask true on real tokens) until ``samples`` token rows (the last text cut to the
    remainder). With a ``template`` each text is its :func:`prompts` (fitted as its batch comes)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = 0
    for start in range(0, len(texts), batch_size):
        if rows >= samples:
            return
        batch = list(texts[start:start + batch_size])
        if template is not None:
            batch = prompts(tokenizer, batch, template, max_length)
        ids = tokenizer(batch, truncation=True, max_length=max_length)["input_ids"]
        kept, budget = [], samples - rows
        for seq in ids:
            if budget <= 0:
                break
            seq = seq[:budget] if len(seq) > budget else seq
            kept.append(seq)
            budget -= len(seq)
        width = max(len(s) for s in kept)
        input_ids = torch.full((len(kept), width), pad, dtype=torch.long)
        mask = torch.zeros((len(kept), width), dtype=torch.bool)
        for i, seq in enumerate(kept):
            input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, :len(seq)] = True
        rows += int(mask.sum())
        yield input_ids, mask


class InputStatistics:
    """Forward hooks that accumulate, per linear module, Σ x xᵀ, Σ |x| and the row count over the
    real (``mask``) token rows x of its input, in float64. Set :attr:`mask` to the batch's mask
    before each forward pass; a 2-D input (a pooler's first tokens) counts every row."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.abs_sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.mask: torch.Tensor | None = None

    def _hook(self, name: str):
        def fn(module, inputs, output):
            x = inputs[0]
            if self.mask is not None and x.dim() == 3 and x.shape[:2] == self.mask.shape:
                x = x[self.mask]
            x = x.reshape(-1, x.shape[-1]).double()
            if name not in self.sums:
                self.sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                self.abs_sums[name] = torch.zeros(x.shape[1], dtype=torch.float64)
                self.counts[name] = 0
            self.sums[name].addmm_(x.mT, x)
            self.abs_sums[name].add_(x.abs().sum(0))
            self.counts[name] += x.shape[0]
        return fn

    @contextmanager
    def hooked(self, modules: dict[str, nn.Module]) -> Iterator[InputStatistics]:
        """The hooks on ``modules`` (name -> module) while the block runs."""
        handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.mask = None

    def second_moments(self) -> dict[str, torch.Tensor]:
        """C = Σ x xᵀ / count per module (the Gram matrix XᵀX / rows)."""
        return {n: self.sums[n] / self.counts[n] for n in self.sums}

    def covariances(self, rows: int) -> Covariances:
        """C (:meth:`second_moments`) and mean |x| per module; ``rows`` token rows were run."""
        abs_mean = {n: self.abs_sums[n] / self.counts[n] for n in self.sums}
        return Covariances(self.second_moments(), abs_mean, rows)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def collect(model: nn.Module, tokenizer, texts: Sequence[str], samples: int, max_length: int,
            batch_size: int, template: str | None = None) -> Covariances:
    """Run ``texts`` (as ``template``'s prompts, when given) through ``model`` until ``samples``
    token rows, hooking every nn.Linear."""
    rows = 0
    with InputStatistics().hooked(linear_modules(model)) as stats, torch.inference_mode():
        for input_ids, mask in token_batches(tokenizer, texts, samples, max_length, batch_size, template):
            stats.mask = mask
            model(input_ids=input_ids, attention_mask=mask.long())
            rows += int(mask.sum())
    if rows == 0:
        raise InputError("no token rows were produced from the task data; is it empty?")
    return stats.covariances(rows)


def _save(path: Path, cov: Covariances) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{n}|cov": c.contiguous() for n, c in cov.cov.items()}
    tensors.update({f"{n}|abs": a.contiguous() for n, a in cov.abs_mean.items()})
    fd, tmp = tempfile.mkstemp(prefix=".cov-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"rows": str(cov.rows), "format": str(FORMAT)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _load(path: Path) -> Covariances:
    """A covariance file that :func:`_readable` accepted, in memory."""
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        rows = int(handle.metadata()["rows"])
    cov = {k[:-4]: v for k, v in tensors.items() if k.endswith("|cov")}
    abs_mean = {k[:-4]: v for k, v in tensors.items() if k.endswith("|abs")}
    return Covariances(cov, abs_mean, rows)


def covariance_file(model: Path, texts: Sequence[str], *, base: Path | None = None, samples: int = 4096,
                    max_length: int = 64, batch_size: int = 32, cache: Path | None = None,
                    template: str | None = None) -> tuple[Path, str]:
    """The cache file of ``model``'s covariances on ``texts`` (as ``template``'s prompts, when
    given) and its key, computed first when it is missing or damaged. ``model`` is a model folder,
    or a LoRA adapter folder applied to the ``base`` folder. The file holds ``<module>|cov`` and
    ``<module>|abs`` per linear module."""
    model = Path(model)
    if not model.is_dir():
        raise InputError(f"{model}: running the task's data through this model needs its folder (config and "
                         "tokenizer files, or a base folder with the tokenizer).")
    adapter_base = _adapter_base(model, base)
    if not texts:
        raise InputError(f"{model}: the task data has no texts.")
    tok_folder = _tokenizer_folder(model, base)
    key = cache_key(model, tok_folder, texts, samples, max_length, batch_size, adapter_base, template)
    path = (cache or cache_root()) / "covariances" / f"{key}.safetensors"
    if not _readable(path):
        from primerge.io.hf import load_tokenizer

        tokenizer = load_tokenizer(tok_folder)
        _save(path, collect(_load_model(model, adapter_base), tokenizer, texts, samples, max_length, batch_size,
                            template))
    return path, key


def _adapter_base(model: Path, base: Path | None) -> Path | None:
    """The folder the LoRA adapter ``model`` is applied to (``base``); None for a full model."""
    if not is_adapter(model):
        return None
    if base is None or not Path(base).is_dir():
        raise InputError(f"{model}: running the task's data through a LoRA adapter applies it to the recipe's base, "
                         f"which must then be a model folder (config.json and weights), not {base}.")
    return Path(base)


def _readable(path: Path) -> bool:
    """Whether ``path`` is a whole covariance file (safetensors checks that the header's offsets
    cover the file, so a truncated file is not)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return int((handle.metadata() or {})["rows"]) > 0
    except (SafetensorError, OSError, KeyError, ValueError):
        return False  # a damaged cache entry is recomputed


def model_covariances(model: Path, texts: Sequence[str], *, base: Path | None = None, samples: int = 4096,
                      max_length: int = 64, batch_size: int = 32, cache: Path | None = None) -> Covariances:
    """Covariances of ``model``'s linear inputs on ``texts`` (:func:`covariance_file`), in memory."""
    path, key = covariance_file(model, texts, base=base, samples=samples, max_length=max_length,
                                batch_size=batch_size, cache=cache)
    found = _load(path)
    found.key = key
    return found
