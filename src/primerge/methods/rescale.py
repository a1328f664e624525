"""mergekit's ``rescale``: a sparsified task vector scaled back to the L1 norm it had.

For a mask m applied to τ: τ̂ = (m ⊙ τ) · ‖τ‖₁ / ‖m ⊙ τ‖₁, left unscaled when either norm is
below 1e-7 (mergekit 0.1.5 ``sparsify.rescaled_masked_tensor`` with its L1 norm). The papers'
own rescales differ (DARE's 1/(1 − p), DELLA's 1/p_i per entry); the methods that offer this one
name it ``rescale: l1``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import Normalize

#: How survivors of a random drop are rescaled: by their keep probability (the papers), to the task
#: vector's L1 norm (mergekit ``rescale: true``), or not at all.
Rescale = Literal["keep_probability", "l1", "none"]

#: Norms below this are left unscaled (no division by a vanishing norm).
NORM_FLOOR = 1e-7


def l1_rescaled(masked: Tensor, original: Tensor) -> Tensor:
    """Each task's ``masked`` (T, *shape) scaled to the L1 norm of its ``original`` row."""
    before = original.reshape(original.shape[0], -1).abs().sum(1)
    after = masked.reshape(masked.shape[0], -1).abs().sum(1)
    usable = (before >= NORM_FLOOR) & (after >= NORM_FLOOR)
    factor = torch.where(usable, before / torch.where(usable, after, 1.0), 1.0)
    return masked * factor.reshape(-1, *(1,) * (masked.dim() - 1))


def rescale_field(paper: str) -> Any:
    """The ``rescale`` parameter of a method that drops entries at random; ``paper`` is its papers'
    own rescale (e.g. ``1/(1-p)``)."""
    return Field("keep_probability", description=f"survivors times {paper} (paper), rescaled to τ_t's L1 norm "
                 "(l1: mergekit rescale: true) or kept as they are (none)")


def normalize_field() -> Any:
    """The ``normalize`` parameter of a method with a ``ties`` or ``linear`` combine."""
    return Field(None, description="unset: the combine's own (ties: count, linear: none); weights: divide by "
                 "the models' weights (mergekit normalize: true)")
