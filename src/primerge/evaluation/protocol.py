"""The encoder zoo's training protocol (free of heavy imports: the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from primerge.util.seeding import derive_seed


@dataclass(frozen=True)
class TrainingProtocol:
    """Every setting that changes a fine-tune; its hash keys the cache."""

    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    epochs: int = 2
    small_task_epochs: int = 6
    small_task_threshold: int = 1000
    batch_size: int = 32
    max_length: int = 64
    warmup_fraction: float = 0.1
    bucket_pool: int = 50
    seed: int = 0

    def epochs_for(self, train_size: int) -> int:
        return self.small_task_epochs if train_size < self.small_task_threshold else self.epochs

    def task_seed(self, task: str) -> int:
        """A seed per task derived from the protocol seed and the task name (order-independent)."""
        return derive_seed(f"{self.seed}:{task}") & 0xFFFFFFFF

    def as_dict(self) -> dict:
        return asdict(self)

    def effective(self, train_size: int) -> dict:
        """The settings one task actually trains with (the epoch rule resolved): what its key hashes,
        so changing the small-task rule retrains only the tasks it touches."""
        settings = self.as_dict()
        del settings["small_task_epochs"], settings["small_task_threshold"]
        settings["epochs"] = self.epochs_for(train_size)
        return settings
