"""A merged model written as a PEFT LoRA adapter (``--as-lora R``, ``output: {lora_rank: R}``).

Per matrix parameter (a linear weight by the recipe's matrix rule) with merged update
Δ = θ − θ₀ (m × n), the adapter holds the best rank-R approximation (Eckart–Young):
Δ_R = U_R Σ_R V_Rᵀ, B = U_R Σ_R^{1/2} (m × R), A = Σ_R^{1/2} V_Rᵀ (R × n), and
``lora_alpha = r = R`` so peft's scaling α/r is 1 and B A = Δ_R. A matrix with min(m, n) < R gets
rank min(m, n) (``rank_pattern`` / ``alpha_pattern`` say so per module), which holds Δ exactly,
rather than zero columns. The relative error ε = ‖Δ − B A‖_F / ‖Δ‖_F is measured per module
(ε = 0 up to rounding when R ≥ rank Δ, e.g. when every input is a LoRA of rank ≤ R/T); a module
with ε > :data:`LARGE_ERROR` is reported with the rank it would need for ε ≤ :data:`LARGE_ERROR`.

The config names the base by its absolute path, and ``task_type`` is the LoRA inputs' (which must
agree), else ``output.lora_task_type``, else the one the base's architecture implies
(``...ForCausalLM`` → ``CAUSAL_LM``, ...), so ``AutoPeftModelFor...`` loads the folder from anywhere.

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
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from primerge.util.errors import OutputError, RecipeError
from primerge.io.adapters import CONFIG_NAME, PEFT_PREFIX
from primerge.output.card import md_code
from primerge.io.writer import save_tensors
from primerge.linalg import truncated_svd
from primerge.output.base import MergedTensor, MergedUpdate
from primerge.util.seeding import derive_seed
from primerge.core.sources import LoraAdapter

WEIGHTS_NAME = "adapter_model.safetensors"
REPORT_NAME = "lora_report.json"
#: A module approximated worse than this (relative Frobenius error) is named with the rank it needs.
LARGE_ERROR = 0.1
#: The peft task type implied by a transformers architecture's class-name suffix.
ARCHITECTURE_TASKS = {"ForCausalLM": "CAUSAL_LM", "ForConditionalGeneration": "SEQ_2_SEQ_LM",
                      "ForSeq2SeqLM": "SEQ_2_SEQ_LM", "ForSequenceClassification": "SEQ_CLS",
                      "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
                      "Model": "FEATURE_EXTRACTION"}


@dataclass(frozen=True)
class LoraModule:
    """A matrix update as LoRA factors: ``A`` (r × n), ``B`` (m × r), relative error ``error``, and
    when ``error`` > :data:`LARGE_ERROR` the rank ``needed`` for :data:`LARGE_ERROR`."""

    module: str
    A: torch.Tensor
    B: torch.Tensor
    error: float
    needed: int | None = None


@dataclass(frozen=True)
class LoraParts:
    """The unit writer of a LoRA output: each changed tensor as a :class:`LoraModule` (matrix
    weights) or as its full merged value, computed where the unit runs."""

    rank: int
    seed: int

    def write(self, unit, tensors: Iterable[MergedTensor]) -> list[LoraModule | MergedTensor]:
        parts: list[LoraModule | MergedTensor] = []
        for merged in tensors:
            if not isinstance(merged, MergedUpdate) or not bool(merged.update.any()):
                continue
            name = merged.name
            if merged.kind == "matrix" and name.endswith(".weight"):
                A, B, error = low_rank(merged.update, self.rank, derive_seed(self.seed, name))
                needed = rank_for(merged.update, LARGE_ERROR) if error > LARGE_ERROR else None
                parts.append(LoraModule(name.removesuffix(".weight"), A.cpu(), B.cpu(), error, needed))
            else:
                parts.append(MergedTensor(name, merged.value, merged.kind))
        return parts


@dataclass
class LoraExport:
    """Collects the changed tensors (:class:`LoraParts`); :meth:`write` saves the adapter folder."""

    rank: int
    task_type: str | None = None
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    errors: dict[str, float] = field(default_factory=dict)  # module -> ε
    needed: dict[str, int] = field(default_factory=dict)  # module -> rank for ε ≤ LARGE_ERROR
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # tensor name -> merged value

    def take(self, part: LoraModule | MergedTensor) -> None:
        """One changed tensor: LoRA factors of a matrix update, or a tensor stored in full."""
        if isinstance(part, LoraModule):
            self.factors[part.module] = (part.A, part.B)
            self.errors[part.module] = part.error
            if part.needed is not None:
                self.needed[part.module] = part.needed
        else:
            self.full[part.name] = part.value

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
        capped = {re.escape(m): A.shape[0] for m, (A, _) in sorted(self.factors.items()) if A.shape[0] != self.rank}
        config = {
            "peft_type": "LORA", "task_type": self.task_type, "r": self.rank, "lora_alpha": self.rank,
            "target_modules": sorted(self.factors), "modules_to_save": sorted(saved) or None,
            "bias": "lora_only" if biases else "none", "use_rslora": False, "use_dora": False,
            "fan_in_fan_out": False, "lora_dropout": 0.0, "init_lora_weights": True,
            "rank_pattern": capped, "alpha_pattern": capped, "inference_mode": True,
        }
        return tensors, config

    def write(self, folder: Path, base: Path, ledger=None) -> list[str]:
        """Write ``adapter_model.safetensors``, ``adapter_config.json`` and ``lora_report.json``."""
        if not self.factors and not self.full:
            raise OutputError("the merge changed no tensor of the base; there is no adapter to write.")
        tensors, config = self.layout()
        config["base_model_name_or_path"] = str(Path(base).resolve())
        save_tensors(folder / WEIGHTS_NAME, tensors, {"format": "pt"}, ledger=ledger)
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (folder / REPORT_NAME).write_text(json.dumps(self.report(), indent=2) + "\n")
        return [WEIGHTS_NAME, CONFIG_NAME, REPORT_NAME]

    def report(self) -> dict:
        """Rank, per-module relative errors and ranks, the tensors stored in full, and the modules
        approximated worse than :data:`LARGE_ERROR` (worst first) with the rank that fixes them."""
        worst = sorted(self.needed, key=lambda m: -self.errors[m])
        return {
            "rank": self.rank,
            "max_relative_error": max(self.errors.values(), default=0.0),
            "modules": {m: {"relative_error": e, "rank": self.factors[m][0].shape[0]}
                        for m, e in sorted(self.errors.items())},
            "full_tensors": sorted(self.full),
            "large_errors": [{"module": m, "relative_error": self.errors[m], "rank_needed": self.needed[m]}
                             for m in worst],
            "suggested_rank": max(self.needed.values(), default=None),
        }

    def card_section(self) -> str:
        """The card section: what was approximated, how well, and what is stored in full."""
        rows = [f"| {md_code(m, table=True)} | {e:.2e} |" for m, e in sorted(self.errors.items())]
        return "\n".join([
            f"## LoRA adapter (rank {self.rank})",
            "",
            f"Written as a PEFT LoRA adapter (`{WEIGHTS_NAME}`, `{CONFIG_NAME}`, task type "
            f"`{self.task_type}`; load it with `PeftModel.from_pretrained(base, folder)` or "
            f"`AutoPeftModel....from_pretrained(folder)`). Each merged matrix update Δ is replaced by its "
            f"best rank-{self.rank} approximation B A (rank min(m, n) where a module is smaller; "
            f"lora_alpha = r, scaling 1); the relative error ‖Δ − B A‖_F / ‖Δ‖_F per module is below "
            f"and in `{REPORT_NAME}`. {len(self.full)} other changed tensors are stored in full "
            f"(modules_to_save, LoRA-layer biases).",
            "",
            "| module | relative error |",
            "|---|---|",
            *rows,
            "",
        ])


def rank_for(update: torch.Tensor, tolerance: float) -> int:
    """The smallest k with ‖Δ − Δ_k‖_F / ‖Δ‖_F ≤ ``tolerance`` (Eckart–Young, from Δ's singular values)."""
    energy = torch.linalg.svdvals(update.double()).square()
    tail = (energy.sum() - energy.cumsum(0)).clamp_min(0) / energy.sum()
    return int((tail.sqrt() > tolerance).sum()) + 1


def low_rank(update: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, ε): A = Σ_r^{1/2} V_rᵀ, B = U_r Σ_r^{1/2} from the top-r triplets of Δ, r = min(R, m, n),
    ε = ‖Δ − B A‖_F / ‖Δ‖_F (float32)."""
    top = truncated_svd(update, min(rank, min(update.shape)), seed=seed)
    root = top.S.sqrt()
    B = top.U * root
    A = (top.V * root).mT
    error = float(torch.linalg.matrix_norm(update - B @ A) / torch.linalg.matrix_norm(update))
    return A.float(), B.float(), error


def lora_task_type(plan, override: str | None) -> str | None:
    """The adapter's peft ``task_type``: ``override``, else the LoRA inputs' (which must agree),
    else the one the base's ``config.json`` architecture implies (:data:`ARCHITECTURE_TASKS`)."""
    if override is not None:
        return override
    types = {s.adapter.config.get("task_type") for s in plan.sources if isinstance(s, LoraAdapter)} - {None}
    if len(types) > 1:
        raise RecipeError(f"the LoRA inputs disagree on task_type ({', '.join(sorted(types))}); say which the "
                          f"merged adapter has with output.lora_task_type.")
    if types:
        return types.pop()
    folder = plan.base.folder
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (TypeError, OSError, ValueError, AttributeError):
        return None
    return next((task for suffix, task in ARCHITECTURE_TASKS.items()
                 if architectures and str(architectures[0]).endswith(suffix)), None)
