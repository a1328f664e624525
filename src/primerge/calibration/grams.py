"""The input Gram matrices a data-aware method reads, as the plan carries them (``Plan.grams``).

:class:`GramFiles` maps a tensor name to its layer's Gram matrices, one per task, read lazily from
safetensors files (one matrix at a time, never the whole file), so it holds only paths: a plan that
carries it pickles to a remote worker, which reads the same files.

RegMean's Grams (``reads_grams: own``, :func:`own_grams`) are the covariances of PAVE's data pass
(:func:`primerge.purify.covariance.covariance_file`): task t's training texts (as the block's
prompt template for model t makes them, when it has one) through model t, C = XᵀX / rows per linear
layer, computed once per model, data and settings and cached. A LoRA adapter runs as the recipe's
base folder with the adapter merged in by peft, so its Grams are those of the adapted model. A checkpoint
tensor ``<module>.weight`` is matched to its hooked module as PAVE matches them
(:func:`primerge.purify.pave.match_modules`: a wrapper prefix such as ``bert.`` on either side).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from primerge.core.calibration_block import CalibrationConfig, task_texts
from primerge.core.plan import Plan
from primerge.purify.covariance import covariance_file
from primerge.purify.pave import match_modules
from primerge.util.errors import InputError

#: Where one task's Gram matrix of one tensor is: (file, tensor key in the file).
Location = tuple[str, str]


@dataclass(frozen=True)
class GramFiles:
    """(tensor name) -> (T, n, n) float64 Gram matrices in model order, read from ``locations[t]``
    (one mapping per task); ``None`` for a tensor some task has none of (its layer never ran)."""

    locations: tuple[dict[str, Location], ...]

    def __call__(self, name: str) -> Tensor | None:
        if not self.locations or any(name not in where for where in self.locations):
            return None
        grams = []
        for where in self.locations:
            path, key = where[name]
            with safe_open(path, framework="pt") as handle:
                grams.append(handle.get_tensor(key).double())
        return torch.stack(grams)

    def tensors(self) -> list[str]:
        """The tensors every task has a Gram matrix of."""
        return sorted(set.intersection(*(set(w) for w in self.locations))) if self.locations else []


def calibration_texts(config: CalibrationConfig, label: str) -> list[str]:
    """Model ``label``'s task texts, an unreadable task named by its field."""
    try:
        return task_texts(config.data[label])
    except InputError as exc:
        raise InputError(f"calibration.data.{label}: {exc}") from None


def own_grams(plan: Plan, *, cache: Path | None = None) -> GramFiles:
    """RegMean's Grams: each model's covariance file on its own task's texts (module docstring)."""
    recipe, config = plan.recipe, plan.recipe.calibration_config
    base_folder = Path(recipe.base) if Path(recipe.base).is_dir() else None
    matrices = [e.name for e in plan.entries if e.kind == "matrix"]
    locations = []
    for label, entry in zip(recipe.model_labels(), recipe.models):
        path, _ = covariance_file(Path(entry.path), calibration_texts(config, label), base=base_folder,
                                  samples=config.samples, max_length=config.max_length,
                                  batch_size=config.batch_size, cache=cache, template=config.template_for(label))
        with safe_open(str(path), framework="pt") as handle:
            modules = [k[:-len("|cov")] for k in handle.keys() if k.endswith("|cov")]
        found = match_modules(matrices, modules)
        locations.append({name: (str(path), f"{module}|cov") for name, module in found.items()})
    return GramFiles(tuple(locations))
