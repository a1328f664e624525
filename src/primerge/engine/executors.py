"""Where the units of a merge run: this process (:class:`primerge.engine.stream.LocalExecutor`) or a Ray
cluster (:mod:`primerge.engine.ray`, ``pip install "primerge[ray]"``).

Every executor runs the same pure function of (plan, unit, pre-pass result) and hands each unit's
tensors to the output's unit writer where the unit ran, so every backend writes the same bytes.

Floors: above the engine and the outputs, below the API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from primerge.engine.stream import Executor, LocalExecutor, resolve_device

if TYPE_CHECKING:
    from primerge.core.recipe import ExecutionConfig


def make_executor(config: ExecutionConfig, device: str) -> Executor:
    """The executor a recipe's ``execution`` block asks for, merging on ``device``."""
    if config.backend == "ray":
        from primerge.engine.ray import RayExecutor

        return RayExecutor(config, device)
    return LocalExecutor(resolve_device(device))
