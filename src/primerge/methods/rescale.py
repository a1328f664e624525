"""mergekit's ``rescale``: a sparsified task vector scaled back to the L1 norm it had.

For a mask m applied to τ: τ̂ = (m ⊙ τ) · ‖τ‖₁ / ‖m ⊙ τ‖₁, left unscaled when either norm is
below 1e-7 (mergekit 0.1.5 ``sparsify.rescaled_masked_tensor`` with its L1 norm). The papers'
own rescales differ (DARE's 1/(1 − p), DELLA's 1/p_i per entry); the methods that offer this one
name it ``rescale: l1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Norms below this are left unscaled (no division by a vanishing norm).
NORM_FLOOR = 1e-7


def l1_rescaled(masked: Tensor, original: Tensor) -> Tensor:
    """Each task's ``masked`` (T, *shape) scaled to the L1 norm of its ``original`` row."""
    before = original.reshape(original.shape[0], -1).abs().sum(1)
    after = masked.reshape(masked.shape[0], -1).abs().sum(1)
    usable = (before >= NORM_FLOOR) & (after >= NORM_FLOOR)
    factor = torch.where(usable, before / torch.where(usable, after, 1.0), 1.0)
    return masked * factor.reshape(-1, *(1,) * (masked.dim() - 1))
