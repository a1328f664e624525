"""A merged model written as a PEFT LoRA adapter (``--as-lora R``, ``output: {lora_rank: R}``).

Per matrix parameter (a linear weight by the recipe's matrix rule) with merged update
Δ = θ − θ₀ (m × n), the adapter holds the best rank-R approximation (Eckart–Young):
Δ_R = U_R Σ_R V_Rᵀ, B = U_R Σ_R^{1/2} (m × R), A = Σ_R^{1/2} V_Rᵀ (R × n), and
``lora_alpha = r = R`` so peft's scaling α/r is 1 and B A = Δ_R. A matrix with min(m, n) < R gets
zero columns (B A is still Δ). The relative error ε = ‖Δ − B A‖_F / ‖Δ‖_F is measured per module
(ε = 0 up to rounding when R ≥ rank Δ, e.g. when every input is a LoRA of rank ≤ R/T).

LoRA cannot carry the other merged tensors, so the adapter stores them in full, as peft loads them:

- the bias of a LoRA-adapted module: ``bias: "lora_only"``, stored as ``<module>.base_layer.bias``
  (peft saves and restores the trained bias of every LoRA layer that way);
- every other changed tensor (norms, embeddings, heads outside the matrix rule, the bias of a
  module without LoRA): its module in ``modules_to_save``, the changed tensors stored under
  ``<module>.<name>``; peft starts the saved copy from the base module, so unchanged tensors
  need not be stored.

Tensors whose merged update is exactly zero are left out: the base supplies them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from primerge.errors import OutputError
from primerge.io.adapters import CONFIG_NAME, PEFT_PREFIX
from primerge.io.writer import save_tensors
from primerge.linalg import fit_rank, truncated_svd
from primerge.output.base import MergedTensor, MergedUpdate
from primerge.seeding import derive_seed

WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "lora_report.json"


@dataclass
class LoraExport:
    """Collect merged tensors one at a time; :meth:`write` saves the adapter folder."""

    rank: int
    seed: int = 42
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    errors: dict[str, float] = field(default_factory=dict)  # module -> ε
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor name -> merged value

    def add(self, merged: MergedTensor) -> None:
        """One output tensor; merged ones (float32 update Δ, value θ₀ + Δ) enter the adapter."""
        if not isinstance(merged, MergedUpdate) or not bool(merged.update.any()):
            return
        name = merged.name
        if merged.kind == "matrix" and name.endswith(".weight"):
            module = name.removesuffix(".weight")
            A, B, error = low_rank(merged.update, self.rank, derive_seed(self.seed, name))
            self.factors[module] = (A.cpu(), B.cpu())
            self.errors[module] = error
        else:
            self.full[name] = merged.value

    def layout(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The adapter's tensors and its config (see the module docstring)."""
        tensors: dict[str, torch.Tensor] = {}
        for module, (A, B) in self.factors.items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.contiguous()
        saved, biases = set(), False
        for name, value in self.full.items():
            module, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            if leaf == "bias" and module in self.factors:
                tensors[f"{PEFT_PREFIX}{module}.base_layer.bias"] = value.contiguous()
                biases = True
                continue
            clash = [m for m in self.factors if module == "" or m == module or m.startswith(module + ".")]
            if clash:
                raise OutputError(
                    f"tensor '{name}' changed, but its module '{module or '(the model)'}' contains the "
                    f"LoRA module '{clash[0]}'; a PEFT adapter cannot hold both. Write a full model "
                    f"(drop --as-lora) or exclude '{name}' from the merge."
                )
            saved.add(module)
            tensors[f"{PEFT_PREFIX}{name}"] = value.contiguous()
        config = {
            "peft_type": "LORA", "task_type": None, "r": self.rank, "lora_alpha": self.rank,
            "target_modules": sorted(self.factors), "modules_to_save": sorted(saved) or None,
            "bias": "lora_only" if biases else "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "lora_dropout": 0.0, "init_lora_weights": True,
            "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        }
        return tensors, config

    def write(self, folder: Path, base: Path, ledger=None) -> list[str]:
        """Write ``adapter_model.safetensors``, ``adapter_config.json`` and ``lora_report.json``."""
        if not self.factors and not self.full:
            raise OutputError("the merge changed no tensor of the base; there is no adapter to write.")
        tensors, config = self.layout()
        config["base_model_name_or_path"] = str(base)
        save_tensors(folder / WEIGHTS_NAME, tensors, {"format": "pt"}, ledger=ledger)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (folder / REPORT_NAME).write_text(json.dumps(self.report(), indent=2) + "\n")
        return [WEIGHTS_NAME, CONFIG_NAME, REPORT_NAME]

    def report(self) -> dict:
        """Rank, per-module relative errors and the tensors stored in full."""
        return {
            "rank": self.rank,
            "max_relative_error": max(self.errors.values(), default=0.0),
            "modules": {m: {"relative_error": e} for m, e in sorted(self.errors.items())},
            "full_tensors": sorted(self.full),
        }

    def card_section(self) -> str:
        """The card section: what was approximated, how well, and what is stored in full."""
        rows = [f"| `{m}` | {e:.2e} |" for m, e in sorted(self.errors.items())]
        return "\n".join([
            f"## LoRA adapter (rank {self.rank})",
            "",
            f"Written as a PEFT LoRA adapter (`{WEIGHTS_NAME}`, `{CONFIG_NAME}`; load it with "
            f"`PeftModel.from_pretrained(base, folder)`). Each merged matrix update Δ is replaced by its "
            f"best rank-{self.rank} approximation B A (lora_alpha = r, scaling 1); the relative error "
            f"‖Δ − B A‖_F / ‖Δ‖_F per module is below and in `{REPORT_NAME}`. "
            f"{len(self.full)} other changed tensors are stored in full (modules_to_save, LoRA-layer biases).",
            "",
            "| module | relative error |",
            "|---|---|",
            *rows,
            "",
        ])


def low_rank(update: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, ε): A = Σ_R^{1/2} V_Rᵀ, B = U_R Σ_R^{1/2} from the top-R triplets of Δ (zero-padded to
    R when min(m, n) < R), ε = ‖Δ − B A‖_F / ‖Δ‖_F (float32)."""
    top = fit_rank(truncated_svd(update, min(rank, min(update.shape)), seed=seed), rank)
    root = top.S.sqrt()
    B = top.U * root
    A = (top.V * root).mT
    error = float(torch.linalg.matrix_norm(update - B @ A) / torch.linalg.matrix_norm(update))
    return A.float(), B.float(), error
