"""PEFT LoRA adapter folders as merge inputs (``adapter_config.json`` + ``adapter_model.safetensors``).

Nothing here imports peft: the config is JSON, the weights a safetensors file (a ``.bin``
adapter goes through :func:`primerge.io.readers.open_checkpoint` and its pickle policy).

Keys are ``base_model.model.<module>.<part>``; ``<module>`` is a module name of the model the
adapter was trained on (the engine maps it onto the base's names, allowing one added or removed
leading prefix, as for full checkpoints). What each key contributes to the task vector of one
base tensor (peft's ``get_delta_weight`` and ``merge``):

- ``<module>.lora_A.weight`` A (k × in), ``<module>.lora_B.weight`` B (out × k):
  τ(``<module>.weight``) = s · B A, with s = α / k, rsLoRA (``use_rslora``) s = α / √k. k and α
  are per module: the first key K of ``rank_pattern`` / ``alpha_pattern`` with
  ``re.match(rf"(.*\\.)?({K})$", module)``, else ``r`` / ``lora_alpha``.
- A Conv1D weight stored (in, out) (GPT-2, ``fan_in_fan_out``) takes τ = s · (B A)ᵀ; the
  orientation is read from the base tensor's shape, and from ``fan_in_fan_out`` when square.
- ``<module>.lora_embedding_A`` (k × num), ``<module>.lora_embedding_B`` (dim × k):
  τ(``<module>.weight``) = s · (B A)ᵀ (nn.Embedding).
- ``<module>.lora_B.bias`` (``lora_bias``): τ(``<module>.bias``) = s · b.
- Any other tensor (``modules_to_save``, ``bias: all | lora_only``; ``.base_layer`` dropped from
  the name) is a full trained value θ_saved: τ = θ_saved − θ₀.

The config is untrusted input: ``r`` must be a positive integer, ``lora_alpha`` a finite number,
``rank_pattern`` / ``alpha_pattern`` objects mapping regular expressions to such values, and the
switches booleans (:class:`LoraSettings`); the patterns are matched in bounded time
(:class:`primerge.util.patterns.Pattern`), so a catastrophic pattern is an error, not a hang.

Base tensors the adapter does not mention have τ = 0. Refused, with the file and the fix named,
rather than mis-merged: non-LoRA ``peft_type``; DoRA (``use_dora``, ``lora_magnitude_vector``);
every other variant switch found set in the config (aLoRA, VeRA-style, MiCA, ...); adapters
trained on a modified base (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ initialisation) unless converted
back to plain LoRA; convolution LoRA (A or B not 2-D); key shapes that contradict the config.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from primerge.util.errors import InputError
from primerge.io.files import kind, load_json
from primerge.io.user_paths import user_path
from primerge.io.readers import Checkpoint, member, open_checkpoint
from primerge.util.patterns import Pattern

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

#: Config fields that do not change what the saved tensors mean (training, targeting,
#: initialisation bookkeeping) or that this module reads.
KNOWN_FIELDS = frozenset({
    "peft_type", "task_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern",
    "fan_in_fan_out", "bias", "lora_bias", "modules_to_save", "init_lora_weights", "target_modules",
    "exclude_modules", "lora_dropout", "layers_to_transform", "layers_pattern", "megatron_config",
    "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
    "qalora_group_size", "ensure_weight_tying",
})

#: ``init_lora_weights`` values that leave the base weights as they are.
PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
#: Initialisations that train the adapter against a modified (residual or quantized) base.
MODIFIED_BASE_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


@dataclass(frozen=True)
class LoraWeight:
    """One adapted weight: τ = scaling · B A (``transposed``: its transpose), B A of ``shape``."""

    module: str
    a: str
    b: str
    rank: int
    scaling: float
    shape: tuple[int, int]
    transposed: bool
    embedding: bool = False  # nn.Embedding: always τ = s·(B A)ᵀ
    fan_in_fan_out: bool = False  # the orientation of a square Conv1D weight


@dataclass(frozen=True)
class LoraBias:
    """A ``lora_bias`` vector: τ = scaling · b."""

    key: str
    scaling: float


AdapterTensor = LoraWeight | LoraBias | str  # str: the key of a full trained value


def is_adapter(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it holds something named ``adapter_config.json``;
    :func:`open_adapter` refuses it unless that is a regular JSON file)."""
    path = user_path(path, "model path", InputError)
    return kind(path) == "folder" and kind(path / CONFIG_NAME, follow=False) is not None


def _number(value: Any, what: str, file: Path, *, integer: bool = False) -> float | int:
    """``value`` as a positive integer (``integer``) or a finite number, else an InputError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        ok = False
    elif integer:
        ok = isinstance(value, int) and 1 <= value < 2**31
    else:
        ok = abs(value) < 2**53 if isinstance(value, int) else math.isfinite(value)
    if not ok:
        need = "a positive integer" if integer else "a finite number"
        raise InputError(f"{file}: {what} is {value!r:.60}; it must be {need}. Re-save the adapter with peft.")
    return value


@dataclass(frozen=True)
class LoraSettings:
    """The validated fields of a LoRA config that give each module its rank k and scaling s."""

    r: int | None
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: list[tuple[Pattern, int]] = field(default_factory=list)
    alpha_pattern: list[tuple[Pattern, float]] = field(default_factory=list)

    @classmethod
    def read(cls, config: dict[str, Any], file: Path) -> "LoraSettings":
        r = config.get("r")
        flags = {}
        for key in ("use_rslora", "fan_in_fan_out"):
            if config.get(key) not in (None, True, False):
                raise InputError(f"{file}: {key} is {config[key]!r:.60}; it must be true or false.")
            flags[key] = bool(config.get(key))
        return cls(
            None if r is None else _number(r, "r", file, integer=True),
            _number(config.get("lora_alpha", 8), "lora_alpha", file),
            rank_pattern=_patterns(config, "rank_pattern", file, integer=True),
            alpha_pattern=_patterns(config, "alpha_pattern", file, integer=False), **flags,
        )

    def rank(self, module: str) -> int | None:
        return _lookup(self.rank_pattern, module, self.r)

    def alpha(self, module: str) -> float:
        return _lookup(self.alpha_pattern, module, self.lora_alpha)


def _patterns(config: dict[str, Any], key: str, file: Path, integer: bool) -> list[tuple[Pattern, Any]]:
    """peft's ``rank_pattern`` / ``alpha_pattern``: key K matches a module name when
    ``re.match(rf"(.*\\.)?({K})$", module)``; compiled once, matched in bounded time."""
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise InputError(f"{file}: {key} must map module-name patterns to values, not "
                         f"{type(patterns).__name__}.")
    return [(Pattern(rf"(.*\.)?({k})$", f"{file}: {key} key '{k[:80]}'", InputError),
             _number(v, f"{key}['{k[:80]}']", file, integer=integer)) for k, v in patterns.items()]


def _lookup(patterns: list[tuple[Pattern, Any]], module: str, default: Any) -> Any:
    """The value of the first pattern matching ``module``, else ``default``."""
    return next((value for pattern, value in patterns if pattern.match(module)), default)


class Adapter:
    """A LoRA adapter read lazily: ``tensors`` maps each base-tensor name in the adapter's own
    naming (``<module>.weight``) to what holds its task vector; nothing is read until asked."""

    def __init__(self, path: Path, config: dict[str, Any], weights: Checkpoint):
        self.path = path
        self.config_file = path / CONFIG_NAME
        self.config = config
        self.settings = LoraSettings.read(config, self.config_file)
        self.weights = weights
        self.base_model = config.get("base_model_name_or_path")
        self.tensors: dict[str, AdapterTensor] = _parse_keys(self, weights)

    def fail(self, message: str) -> InputError:
        return InputError(f"{self.path}: {message}")

    def targets(self) -> list[str]:
        """Names (in the adapter's model) of the tensors this adapter changes."""
        return list(self.tensors)

    def scaling(self, module: str, rank: int) -> float:
        """s = α/k (rsLoRA: α/√k) for ``module``, checking k against ``r`` / ``rank_pattern``."""
        expected = self.settings.rank(module)
        if rank < 1:
            raise self.fail(f"module '{module}' has LoRA factors of rank 0; the adapter file is damaged.")
        if expected is not None and expected != rank:
            raise self.fail(
                f"module '{module}' has LoRA rank {rank} in the weights but {expected} in "
                f"{CONFIG_NAME} (r / rank_pattern); the config does not belong to these weights."
            )
        alpha = float(self.settings.alpha(module))
        return alpha / math.sqrt(rank) if self.settings.use_rslora else alpha / rank

    def is_lowrank(self, target: str) -> bool:
        """Whether ``target``'s task vector is a LoRA product s·B A."""
        return isinstance(self.tensors[target], LoraWeight)

    def shape(self, target: str) -> tuple[int, ...]:
        """Shape of the task vector ``target`` as the adapter stores it (before orientation)."""
        entry = self.tensors[target]
        if isinstance(entry, LoraWeight):
            return entry.shape[::-1] if entry.transposed else entry.shape
        return self.weights.info(entry.key if isinstance(entry, LoraBias) else entry).shape

    def orient(self, target: str, base_shape: tuple[int, ...], base_file: Path) -> None:
        """Check ``target`` against the base tensor's shape and fix a LoRA weight's orientation.

        B A (out × in) fits an nn.Linear weight as is and a Conv1D weight (in × out) transposed;
        a square weight follows ``fan_in_fan_out``.
        """
        entry = self.tensors[target]
        if isinstance(entry, LoraWeight) and not entry.embedding:
            if entry.shape[0] == entry.shape[1]:
                self.tensors[target] = replace(entry, transposed=entry.fan_in_fan_out)
            elif tuple(base_shape) == entry.shape[::-1]:
                self.tensors[target] = replace(entry, transposed=True)
        shape = tuple(self.shape(target))
        if shape != tuple(base_shape):
            raise self.fail(
                f"tensor '{target}' gets a task vector of shape {list(shape)} but is "
                f"{list(base_shape)} in the base {base_file}. Was the adapter trained on this base?"
            )

    def factors(self, target: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) in float32 with τ = L R: L = s·B, R = A, or L = s·Aᵀ, R = Bᵀ when transposed."""
        entry = self.tensors[target]
        if not isinstance(entry, LoraWeight):
            raise TypeError(f"'{target}' is not a LoRA weight")
        a = self.weights.load(entry.a).float()
        b = self.weights.load(entry.b).float()
        if entry.transposed:
            return a.mT * entry.scaling, b.mT
        return b * entry.scaling, a

    def delta(self, target: str, base: torch.Tensor) -> torch.Tensor:
        """Dense τ (float32, on ``base``'s device) of a tensor the adapter changes; ``base`` is θ₀."""
        entry = self.tensors[target]
        if isinstance(entry, LoraWeight):
            left, right = self.factors(target)
            return left.to(base.device) @ right.to(base.device)
        if isinstance(entry, LoraBias):
            return self.weights.load(entry.key).to(device=base.device, dtype=torch.float32) * entry.scaling
        return self.weights.load(entry).to(device=base.device, dtype=torch.float32) - base

    def full_value(self, target: str) -> torch.Tensor:
        """The stored value of a full tensor (``modules_to_save``), e.g. a task-specific head."""
        entry = self.tensors[target]
        if not isinstance(entry, str):
            raise self.fail(f"'{target}' is a LoRA delta, not a stored tensor; it cannot be kept per task.")
        return self.weights.load(entry)

    def close(self) -> None:
        self.weights.close()


def _read_config(file: Path) -> dict[str, Any]:
    config = load_json(file, "adapter config")
    if not isinstance(config, dict):
        raise InputError(f"{file}: expected a JSON object (peft's LoraConfig).")
    return config


def check_config(config: dict[str, Any], file: Path) -> None:
    """Refuse every adapter whose weights do not mean τ = s·B A on the unmodified base."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InputError(f"{file}: peft_type is {peft_type!r}; primerge merges LoRA adapters only "
                         f"(peft_type \"LORA\").")
    if config.get("use_dora"):
        raise InputError(f"{file}: DoRA adapters (use_dora) rescale every column by a learnt magnitude; "
                         f"their delta is not s·B A. Merge the adapter into a full model with peft's "
                         f"merge_and_unload() and give primerge that model.")
    init = config.get("init_lora_weights", True)
    if init not in PLAIN_INITS:
        if isinstance(init, str) and init.lower().startswith(MODIFIED_BASE_INITS):
            raise InputError(f"{file}: init_lora_weights={init!r} trains the adapter against a modified "
                             f"base. Convert it to a plain LoRA with save_pretrained(..., "
                             f"path_initial_model_for_weight_conversion=...) or merge it with peft first.")
        raise InputError(f"{file}: init_lora_weights={init!r} selects a LoRA variant primerge does not "
                         f"read; merge the adapter with peft's merge_and_unload() first.")
    for key, value in config.items():
        if key not in KNOWN_FIELDS and value not in (None, False, {}, [], "", 0):
            raise InputError(f"{file}: '{key}': {value!r} switches on a LoRA variant or feature primerge "
                             f"does not read, so its delta would not be s·B A. Merge the adapter with "
                             f"peft's merge_and_unload() and give primerge the full model.")


def _parse_keys(adapter: Adapter, weights: Checkpoint) -> dict[str, AdapterTensor]:
    """Group the adapter's keys by the base tensor they change (see the module docstring)."""
    pairs: dict[str, dict[str, str]] = {}
    biases: dict[str, str] = {}
    tensors: dict[str, AdapterTensor] = {}
    for key in weights.names:
        name = key.removeprefix(PEFT_PREFIX)
        match = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight|\.bias)?", name)
        if match and match.group(3) == ".bias" and match.group(2) == "lora_B":
            biases[match.group(1)] = key
        elif match and (match.group(3) == ".weight") != match.group(2).startswith("lora_embedding"):
            pairs.setdefault(match.group(1), {})[match.group(2)] = key
        elif re.search(r"(^|\.)lora_", name):
            kind = "a DoRA magnitude vector" if "lora_magnitude_vector" in name else "not a LoRA factor primerge reads"
            raise adapter.fail(f"key '{key}' is {kind}; the adapter uses a LoRA variant primerge does "
                               f"not merge. Merge it with peft's merge_and_unload() first.")
        else:
            target = name.replace(".base_layer.", ".")
            if target in tensors:
                raise adapter.fail(f"tensor '{target}' is stored twice ('{key}').")
            tensors[target] = key
    for module, parts in pairs.items():
        target = f"{module}.weight"
        if target in tensors:
            raise adapter.fail(f"'{target}' is both LoRA-adapted and stored in full.")
        tensors[target] = _lora_weight(adapter, weights, module, parts)
    for module, key in biases.items():
        lora = tensors.get(f"{module}.weight")
        if not isinstance(lora, LoraWeight) or f"{module}.bias" in tensors:
            raise adapter.fail(f"'{key}' (lora_bias) needs the LoRA factors of '{module}' and no "
                               f"stored '{module}.bias'.")
        tensors[f"{module}.bias"] = LoraBias(key, lora.scaling)
    return tensors


def _lora_weight(adapter: Adapter, weights: Checkpoint, module: str, parts: dict[str, str]) -> LoraWeight:
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    if a_name not in parts or b_name not in parts:
        missing = a_name if a_name not in parts else b_name
        raise adapter.fail(f"module '{module}' has no {missing} factor; the adapter file is incomplete.")
    a_shape, b_shape = weights.info(parts[a_name]).shape, weights.info(parts[b_name]).shape
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise adapter.fail(f"module '{module}' has LoRA factors of shapes {list(a_shape)} and "
                           f"{list(b_shape)}: convolution LoRA is not supported. Merge the adapter "
                           f"with peft's merge_and_unload() first.")
    if a_shape[0] != b_shape[1]:
        raise adapter.fail(f"module '{module}': A is {list(a_shape)} and B {list(b_shape)}; "
                           f"their ranks differ.")
    rank = a_shape[0]
    return LoraWeight(
        module, parts[a_name], parts[b_name], rank, adapter.scaling(module, rank),
        (b_shape[0], a_shape[1]), transposed=embedding, embedding=embedding,
        fan_in_fan_out=adapter.settings.fan_in_fan_out,
    )


def open_adapter(path: str | Path, open_weights: Callable[[Path], Checkpoint] = open_checkpoint) -> Adapter:
    """Open a PEFT LoRA adapter folder lazily; raises :class:`InputError` when it cannot be merged.

    ``open_weights`` opens the weight file (the readers' policy for ``.bin`` files applies); the
    config and weights must lie in the folder (the readers' symlink and regular-file policy, :func:`member`).
    """
    path = user_path(path, "adapter folder", InputError)
    config_file = member(path, CONFIG_NAME, "adapter config")
    config = _read_config(config_file)
    check_config(config, config_file)
    files = [member(path, name, "adapter weight file") for name in WEIGHT_NAMES
             if kind(path / name, follow=False) is not None]
    if not files:
        raise InputError(f"{path}: {CONFIG_NAME} is there but no adapter weights "
                         f"({' or '.join(WEIGHT_NAMES)}); copy the whole adapter folder.")
    return Adapter(path, config, open_weights(files[0]))
