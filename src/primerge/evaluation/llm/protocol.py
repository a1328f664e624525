"""The settings of the LLM suite (free of heavy imports: the CLI reads its presets)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from primerge.util.errors import InputError

if TYPE_CHECKING:
    from primerge.evaluation.llm.training import TrainSettings

KINDS = ("lora", "full")


@dataclass(frozen=True)
class LLMProtocol:
    """Every setting of the LLM suite. The CPU defaults are sized by measurement (docs/benchmarks.md,
    "LLM results"); :data:`GPU_PROTOCOL` is the larger configuration for ``--device cuda``."""

    max_prompt_tokens: int = 32
    test_size: int = 300
    steps: int = 24
    batch_size: int = 8
    lora_rank: int = 16
    lora_learning_rate: float = 3e-3
    full_learning_rate: float = 1e-4
    warmup_fraction: float = 0.1
    seed: int = 0
    eval_batch_size: int = 32

    @property
    def train_size(self) -> int:
        return self.steps * self.batch_size

    def settings(self, kind: str) -> TrainSettings:
        from primerge.evaluation.llm.training import TrainSettings  # torch: imported when training

        if kind not in KINDS:
            raise InputError(f"unknown zoo kind {kind!r}; choose from {', '.join(KINDS)}.")
        rate = self.lora_learning_rate if kind == "lora" else self.full_learning_rate
        return TrainSettings(kind=kind, steps=self.steps, batch_size=self.batch_size, learning_rate=rate,
                             lora_rank=self.lora_rank, warmup_fraction=self.warmup_fraction, seed=self.seed)

    def as_dict(self) -> dict:
        return asdict(self)


CPU_PROTOCOL = LLMProtocol()
GPU_PROTOCOL = LLMProtocol(max_prompt_tokens=64, test_size=1000, steps=150, batch_size=16, lora_learning_rate=5e-4,
                           full_learning_rate=3e-5, eval_batch_size=64)
PRESETS = {"cpu": CPU_PROTOCOL, "gpu": GPU_PROTOCOL}
