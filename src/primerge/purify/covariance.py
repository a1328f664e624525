"""Input covariances of every ``nn.Linear`` of a fine-tuned model on its task's data (PAVE Eq. 5).

A task's texts are tokenised (the model folder's tokenizer, else the base's), run in batches
through the fine-tuned model (``transformers.AutoModel``, float32, ``torch.inference_mode``), and a
forward hook on every linear layer accumulates, over the real (non-padding) token rows x of its
input, C = Σ x xᵀ / rows and the mean |x| per input feature (ASVD's scaling), in float64. Batches
are fed until ``samples`` token rows have been seen (the last batch is cut to the remainder).

Results are cached under ``<cache>/covariances/<key>.safetensors`` (cache = ``$PRIMERGE_CACHE``,
else ``~/.cache/primerge``); the key hashes the model folder's files, the tokenizer folder's files,
the texts and the settings, so a changed model or data set computes anew.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from primerge.util.errors import InputError
from primerge.io.files import content_digest
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
              batch_size: int) -> str:
    """SHA-256 of the model files, tokenizer files, texts and settings."""
    digest = hashlib.sha256(f"pave-cov/{FORMAT}/{samples}/{max_length}/{batch_size}".encode())
    digest.update(content_digest(model).encode() + b"\x02" + content_digest(tokenizer).encode() + b"\x03")
    for text in texts:
        digest.update(text.encode() + b"\x00")
    return digest.hexdigest()[:32]


def _load_model(folder: Path) -> nn.Module:
    from primerge.io.hf import load_pretrained_body

    return load_pretrained_body(folder).eval()


def _tokenizer_folder(model: Path, base: Path | None) -> Path:
    """The model folder when it has tokenizer files, else the base folder."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model", "vocab.json")
    if any((model / n).is_file() for n in names) or base is None:
        return model
    return base


def collect(model: nn.Module, tokenizer, texts: Sequence[str], samples: int, max_length: int,
            batch_size: int) -> Covariances:
    """Run ``texts`` through ``model`` until ``samples`` token rows, hooking every nn.Linear."""
    sums: dict[str, torch.Tensor] = {}
    abs_sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def fn(module, inputs, output):
            x = inputs[0]
            mask = state["mask"]
            if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
                x = x[mask]
            x = x.reshape(-1, x.shape[-1]).double()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
                abs_sums[name] = torch.zeros(x.shape[1], dtype=torch.float64)
                counts[name] = 0
            sums[name].addmm_(x.mT, x)
            abs_sums[name].add_(x.abs().sum(0))
            counts[name] += x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = 0
    try:
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                if rows >= samples:
                    break
                ids = tokenizer(list(texts[start:start + batch_size]), truncation=True,
                                max_length=max_length)["input_ids"]
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
                state["mask"] = mask
                model(input_ids=input_ids, attention_mask=mask.long())
                rows += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        state["mask"] = None
    if rows == 0:
        raise InputError("no token rows were produced from the task data; is it empty?")
    cov = {n: sums[n] / counts[n] for n in sums}
    abs_mean = {n: abs_sums[n] / counts[n] for n in sums}
    return Covariances(cov, abs_mean, rows)


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


def _load(path: Path) -> Covariances | None:
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            rows = int((handle.metadata() or {})["rows"])
    except (SafetensorError, OSError, KeyError, ValueError):
        return None  # a damaged cache entry is recomputed
    cov = {k[:-4]: v for k, v in tensors.items() if k.endswith("|cov")}
    abs_mean = {k[:-4]: v for k, v in tensors.items() if k.endswith("|abs")}
    return Covariances(cov, abs_mean, rows)


def model_covariances(model: Path, texts: Sequence[str], *, base: Path | None = None, samples: int = 4096,
                      max_length: int = 64, batch_size: int = 32, cache: Path | None = None) -> Covariances:
    """Covariances of ``model``'s linear inputs on ``texts``, from the cache when present."""
    model = Path(model)
    if not model.is_dir():
        raise InputError(f"{model}: PAVE needs the fine-tuned model's folder (config + tokenizer) "
                         "to run its data through it.")
    if not texts:
        raise InputError(f"{model}: the task data for PAVE has no texts.")
    tok_folder = _tokenizer_folder(model, base)
    key = cache_key(model, tok_folder, texts, samples, max_length, batch_size)
    path = (cache or cache_root()) / "covariances" / f"{key}.safetensors"
    if path.is_file():
        cached = _load(path)
        if cached is not None:
            cached.key = key
            return cached
    from primerge.io.hf import load_tokenizer

    tokenizer = load_tokenizer(tok_folder)
    result = collect(_load_model(model), tokenizer, texts, samples, max_length, batch_size)
    _save(path, result)
    result.key = key
    return result
