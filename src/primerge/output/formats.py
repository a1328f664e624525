"""The output a recipe asks for: a registered folder format, or memory when there is no folder.

A new output format is one class (a :class:`~primerge.output.folder.FolderSink` subclass, or any
:class:`~primerge.output.base.Sink` built as ``cls(out, recipe, force=..., shard_size=...)``)
decorated with :func:`~primerge.output.base.output_format` and imported here.
"""

from __future__ import annotations

from primerge.util.errors import RecipeError, closest
from primerge.output import folder  # noqa: F401  (registers the model and lora formats)
from primerge.output.base import FORMATS, Sink
from primerge.output.folder import check_output
from primerge.output.memory import MemorySink
from primerge.core.recipe import Recipe


def open_sink(recipe: Recipe, out: object, *, force: bool, shard_size: int) -> Sink:
    """The sink of ``recipe.output.format`` writing to ``out``; in memory when ``out`` is None."""
    name = recipe.output.format
    if name not in FORMATS:
        raise RecipeError(f"unknown output format '{name}'.{closest(name, FORMATS)} "
                          f"Available: {', '.join(sorted(FORMATS))}.")
    if out is None:
        if name != "model":
            raise RecipeError(f"the {name} output (--as-lora / output.format) needs an output folder (--out).")
        return MemorySink()
    return FORMATS[name](check_output(out, recipe, force).path, recipe, force=force, shard_size=shard_size)
