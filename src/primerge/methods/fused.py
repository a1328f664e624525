"""Fused attention projections (Q, K and V stored in one weight), shared by the methods
that treat each third separately (Subspace Boosting, DRM)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field
from torch import Tensor

from primerge.methods.base import MethodParams
from primerge.util.patterns import compiled
from primerge.util.schema import Regex

#: Names of fused attention input projections: ViT/BLIP ``qkv``, PyTorch MultiheadAttention
#: ``in_proj_weight``, GPT-2 ``c_attn``.
QKV_PATTERN = r"qkv|in_proj|c_attn"


class FusedQKVParams(MethodParams):
    """Parameter mixin: the regex that names fused Q/K/V weights (``split_qkv`` is per method)."""

    qkv_pattern: Regex = Field(QKV_PATTERN, description="regex naming fused Q/K/V weights")


def fused_qkv_axis(name: str, shape: tuple[int, ...], pattern: str) -> int | None:
    """Axis along which a fused Q/K/V weight splits into thirds, or ``None`` if it is not one.

    A 2-D weight named by ``pattern`` (a bounded-time search) with shape (3n, n) splits along axis 0,
    with shape (n, 3n) along axis 1.
    """
    if len(shape) != 2 or not compiled(pattern, "qkv_pattern").search(name):
        return None
    m, n = shape
    if m == 3 * n:
        return 0
    if n == 3 * m:
        return 1
    return None


def per_slice(fn: Callable[[Tensor], Tensor], x: Tensor, axis: int | None, *, tasks: bool = False) -> Tensor:
    """``fn`` applied to the three equal Q/K/V slices of ``x`` along ``axis``, put back together;
    ``fn(x)`` when ``axis`` is ``None`` (not a fused weight). With ``tasks``, ``x`` is a (T, m, n)
    stack: it is sliced along ``axis + 1`` and each result (m', n') joined along ``axis``."""
    if axis is None:
        return fn(x)
    return torch.cat([fn(part) for part in x.chunk(3, dim=axis + int(tasks))], dim=axis)
