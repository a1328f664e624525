"""Validate user-written mappings (recipes, method parameters, purify blocks) against pydantic
models, with one clear :class:`~primerge.errors.RecipeError` line per problem."""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, AliasChoices, BaseModel, ValidationError

from primerge.errors import RecipeError, closest

M = TypeVar("M", bound=BaseModel)


def _compiles(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return value


#: A string field holding a regular expression (matched with ``re.search``); checked to compile.
Regex = Annotated[str, AfterValidator(_compiles)]


def accepted_names(model: type[BaseModel]) -> dict[str, str]:
    """Every key a model accepts (field names and their ``AliasChoices``) -> the field it sets."""
    names: dict[str, str] = {}
    for field_name, info in model.model_fields.items():
        names[field_name] = field_name
        alias = info.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [alias] if isinstance(alias, str) else []
        names.update({choice: field_name for choice in choices if isinstance(choice, str)})
    return names


def validate(model: type[M], data: dict[str, Any], what: str, prefix: str = "") -> M:
    """``model.model_validate(data)``; an unknown key names the closest field, a field given under
    two of its names is refused, and validation errors are joined into one message. ``what`` names
    the thing in messages (e.g. "method 'prime'"); ``prefix`` is put before field locations (e.g.
    "purify.")."""
    names = accepted_names(model)
    given: dict[str, str] = {}
    for key in data:
        if key not in names:
            raise RecipeError(
                f"{what}: unknown field '{prefix}{key}'.{closest(key, names)} "
                f"Fields: {', '.join(model.model_fields) or 'none'}."
            )
        if names[key] in given:
            raise RecipeError(f"{what}: '{prefix}{given[names[key]]}' and '{prefix}{key}' name the same "
                              f"field; give one of them.")
        given[names[key]] = key
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{prefix}{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise RecipeError(f"invalid {what}: {problems}") from None
