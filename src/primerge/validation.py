"""Validate user-written mappings (recipes, method parameters, purify blocks) against pydantic
models, with one clear :class:`~primerge.errors.RecipeError` line per problem."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from primerge.errors import RecipeError, closest

M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: dict[str, Any], what: str, prefix: str = "") -> M:
    """``model.model_validate(data)``; an unknown key names the closest field, and validation
    errors are joined into one message. ``what`` names the thing in messages (e.g. "method
    'prime'"); ``prefix`` is put before field locations (e.g. "purify.")."""
    fields = model.model_fields
    for key in data:
        if key not in fields:
            raise RecipeError(
                f"{what}: unknown field '{prefix}{key}'.{closest(key, fields)} "
                f"Fields: {', '.join(fields) or 'none'}."
            )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{prefix}{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise RecipeError(f"invalid {what}: {problems}") from None
