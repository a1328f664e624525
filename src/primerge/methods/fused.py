"""Fused attention projections (Q, K and V stored in one weight), shared by the methods
that treat each third separately (Subspace Boosting, DRM)."""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from pydantic import Field, field_validator
from torch import Tensor

from primerge.methods.base import MethodParams

#: Names of fused attention input projections: ViT/BLIP ``qkv``, PyTorch MultiheadAttention
#: ``in_proj_weight``, GPT-2 ``c_attn``.
QKV_PATTERN = r"qkv|in_proj|c_attn"


class FusedQKVParams(MethodParams):
    """Parameter mixin: the regex that names fused Q/K/V weights (``split_qkv`` is per method)."""

    qkv_pattern: str = Field(QKV_PATTERN, description="regex naming fused Q/K/V weights")

    @field_validator("qkv_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        return value


def fused_qkv_axis(name: str, shape: tuple[int, ...], pattern: str) -> int | None:
    """Axis along which a fused Q/K/V weight splits into thirds, or ``None`` if it is not one.

    A 2-D weight named by ``pattern`` (``re.search``) with shape (3n, n) splits along axis 0,
    with shape (n, 3n) along axis 1.
    """
    if len(shape) != 2 or not re.search(pattern, name):
        return None
    m, n = shape
    if m == 3 * n:
        return 0
    if n == 3 * m:
        return 1
    return None


def per_slice(fn: Callable[[Tensor], Tensor], x: Tensor, axis: int) -> Tensor:
    """Apply ``fn`` to the three equal slices of ``x`` along ``axis`` and put them back together."""
    return torch.cat([fn(part) for part in x.chunk(3, dim=axis)], dim=axis)
