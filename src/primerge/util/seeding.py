"""Seeds derived from names, so that a result never depends on the order things are visited.

Every random draw in primerge (randomized SVD sketches, DARE/DELLA drops, the benchmark zoo,
fine-tuning seeds) takes a seed derived here from the recipe seed and what is being drawn for
(a tensor name, a task name): the same inputs give the same bits whichever tensors or tasks
come before.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MASK_63 = 2**63 - 1


def derive_seed(*keys: object) -> int:
    """A 63-bit seed: the first 8 bytes (little-endian) of SHA-256 of the keys joined by ``/``."""
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & MASK_63


def generator(*keys: object) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of the keys."""
    import torch  # here, so that derive_seed costs no torch import (the CLI's defaults use it)

    return torch.Generator().manual_seed(derive_seed(*keys))
