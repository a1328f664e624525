"""The options of a tuning run (kept free of heavy imports: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from primerge.tuning.genome import Genome

#: Validation examples carved per task from its training split (:mod:`primerge.tuning.holdout`).
DEFAULT_SIZE = 150
#: Memory the merged-update cache of one study may hold (:mod:`primerge.tuning.cache`).
DEFAULT_CACHE_BYTES = 2 << 30


@dataclass(frozen=True)
class TuneSettings:
    """Budget and options of a tuning run."""

    trials: int = 20  # per method, the defaults trial included
    budget_minutes: float | None = None  # for all methods together
    seed: int = 0
    validation_size: int = DEFAULT_SIZE  # examples per task
    pave: bool = False
    method_params: bool = True  # False: the method's own parameters as the recipe gives them (--search without params)
    genome: Genome | None = None  # per-model weights and the scale's gradient over depth (--search)
    pave_targets: tuple[str, ...] = ("weight", "delta")
    task_data: dict[str, str] = field(default_factory=dict)  # model label -> task data (PAVE, calibration)
    cache_bytes: int = DEFAULT_CACHE_BYTES
