"""Geometry on the hypersphere shared by the SLERP family (``slerp``, ``nuslerp``, ``multislerp``, ``karcher``).

These methods treat a tensor (or each of its rows) as a vector and interpolate directions along
great circles. The vectors are the models' weights θ_t = θ₀ + τ_t (``space: weights``) or their
task vectors τ_t (``space: task_vectors``, the origin moved to θ₀); :func:`points` gives them and
:func:`as_update` turns a result back into the update θ − θ₀ the stream adds to θ₀.

For two vectors a, b with cos Ω = â·b̂, spherical interpolation is (Shoemake 1985)

    slerp(t; a, b) = sin((1 − t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,

which tends to the linear interpolation (1 − t) a + t b as Ω → 0; near-parallel (and
antiparallel) pairs, where sin Ω vanishes, take the linear one (:func:`slerp_coefficients`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from primerge.methods.base import TensorContext

#: Where the sphere's centre is: the origin of weight space (vectors θ_t) or θ₀ (vectors τ_t).
Space = Literal["task_vectors", "weights"]


def points(taus: Tensor, ctx: TensorContext, space: Space) -> Tensor:
    """The vectors the sphere methods interpolate, (T, *shape): τ_t, or θ₀ + τ_t for ``weights``."""
    return taus if space == "task_vectors" else taus + ctx.base


def as_update(result: Tensor, ctx: TensorContext, space: Space) -> Tensor:
    """The update θ − θ₀ of a result in ``space`` (a τ already, or θ − θ₀)."""
    return result if space == "task_vectors" else result - ctx.base


def slerp_coefficients(cos: Tensor, t: float | Tensor, linear: Tensor) -> tuple[Tensor, Tensor]:
    """(c_a, c_b) with slerp(t; a, b) = c_a a + c_b b for cos Ω = ``cos``; (1 − t, t) where ``linear``.

    Ω is taken as 0 on the linear entries before acos, so no branch divides by a vanishing sin Ω.
    """
    omega = torch.acos(torch.where(linear, torch.zeros_like(cos), cos))
    sin_omega = torch.where(linear, torch.ones_like(cos), torch.sin(omega))
    c_a = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / sin_omega)
    c_b = torch.where(linear, t, torch.sin(t * omega) / sin_omega)
    return c_a, c_b

