"""LiNeS: layer-increasing network scaling of a merged update (Wang et al. 2025).

A post-scaling any method's output can take (recipe field ``lines``): the merged
update of transformer block ℓ of L (ℓ = 0 … L−1) is multiplied by

    λ(ℓ) = α + β · ℓ / (L − 1)

so shallow layers, which hold general features, move less than deep ones.
Blocks are found by ``block_pattern`` (the first capture group is ℓ); L = 1 + the
largest index. [decision] Parameters outside any block get ℓ = 0 when their name
matches ``early_pattern`` (embeddings, which sit below the first block) and ℓ = L − 1
otherwise (final norms, poolers and heads sit above the last block). With one
block (L = 1) every parameter is scaled by α.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from primerge.util.errors import RecipeError
from primerge.util.patterns import Pattern, checked

BLOCK_PATTERN = r"(?:^|\.)(?:layers?|h|blocks?)\.(\d+)\."
EARLY_PATTERN = r"embed|wte|wpe|position|token_type|shared"


class LinesConfig(BaseModel):
    """LiNeS settings; ``alpha`` and ``beta`` have no universal default and must be given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    alpha: float = Field(description="scale of the first block's update")
    beta: float = Field(description="extra scale reached by the last block")
    block_pattern: str = Field(BLOCK_PATTERN, description="regex whose first group is the block index")
    early_pattern: str = Field(EARLY_PATTERN, description="non-block parameters scaled as block 0")

    @field_validator("block_pattern", "early_pattern")
    @classmethod
    def _compiles(cls, value: str, info) -> str:
        checked(value, f"lines.{info.field_name}")
        if info.field_name == "block_pattern" and Pattern(value, "lines.block_pattern").groups < 1:
            raise ValueError("needs a capture group for the block index, e.g. layers\\.(\\d+)\\.")
        return value


def _block_index(text: str | None, name: str, config: LinesConfig) -> int:
    """The block index ℓ a ``block_pattern`` captured in ``name``: a decimal number below 10⁶."""
    if text is None or not text.isascii() or not text.isdigit() or len(text) > 6:
        raise RecipeError(f"lines.block_pattern '{config.block_pattern}' captures {text!r:.40} in tensor "
                          f"'{name}', which is not a block number; its first group must capture digits, "
                          f"e.g. layers\\.(\\d+)\\.")
    return int(text)


def layer_scales(names: list[str], config: LinesConfig) -> dict[str, float]:
    """λ(ℓ) for every parameter name (LiNeS Eq. 1 with ℓ counted from 0)."""
    block = Pattern(config.block_pattern, "lines.block_pattern")
    index: dict[str, int | None] = {}
    for name in names:
        match = block.search(name)
        index[name] = _block_index(match.group(1), name, config) if match else None
    found = [i for i in index.values() if i is not None]
    depth = max(found) + 1 if found else 1

    def scale(layer: int) -> float:
        return config.alpha + (config.beta * layer / (depth - 1) if depth > 1 else 0.0)

    early = Pattern(config.early_pattern, "lines.early_pattern")
    return {
        name: scale(i if i is not None else (0 if early.search(name) else depth - 1))
        for name, i in index.items()
    }
