"""Validate user-written mappings (recipes, method parameters, purify blocks) against pydantic
models, with one clear :class:`~primerge.util.errors.RecipeError` line per problem."""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, AliasChoices, BaseModel, ValidationError

from primerge.util.errors import QUOTE_LIMIT, RecipeError, closest, quoted
from primerge.util.patterns import checked

M = TypeVar("M", bound=BaseModel)


def _compiles(value: str) -> str:
    return checked(value, "pattern")


#: A string field holding a regular expression, matched in bounded time (:mod:`primerge.util.patterns`);
#: checked to compile, to be at most 2,000 characters and not to unroll into huge automata.
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
                f"{what}: unknown field {quoted(f'{prefix}{key}')}.{closest(str(key), names)} "
                f"Fields: {', '.join(model.model_fields) or 'none'}."
            )
        if names[key] in given:
            raise RecipeError(f"{what}: '{prefix}{given[names[key]]}' and '{prefix}{key}' name the same "
                              f"field; give one of them.")
        given[names[key]] = key
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(f"invalid {what}: {'; '.join(_problems(exc, prefix))}") from None


def _field_path(loc: tuple) -> str:
    """``models[0].weight`` from pydantic's location, without the union-member tags it inserts
    (``literal['auto']``, ``constrained-float``, ``function-after[...]``)."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", part) and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path


_TYPE_TAGS = {"int", "float", "str", "bool", "list", "dict", "none", "is-instance", "lax-or-strict"}


def _phrase(err: dict) -> str:
    """What a field needs, from one pydantic error: "it must be greater than 0" for a type or
    range error, the validator's own sentence for a value error."""
    message = err["msg"]
    if err["type"] == "value_error":
        return _clipped(message.removeprefix("Value error, "))
    return "it must be " + re.sub(r", unable to parse .*$", "", message.removeprefix("Input should be "))


def _clipped(sentence: str) -> str:
    """A validator's sentence, which may hold the user's value, cut to a few hundred characters."""
    return sentence if len(sentence) <= 2 * QUOTE_LIMIT else sentence[:2 * QUOTE_LIMIT - 3] + "..."


def _problems(exc: ValidationError, prefix: str) -> list[str]:
    """One sentence per field: its name, the value given, and what it accepts (every alternative of
    a union field joined with "or")."""
    by_field: dict[str, list[dict]] = {}
    for err in exc.errors():
        by_field.setdefault(_field_path(err["loc"]), []).append(err)
    problems = []
    for path, errors in by_field.items():
        given = errors[0].get("input")
        if errors[0]["type"] == "missing":
            problems.append(f"'{prefix}{path}' is required")
            continue
        phrases = list(dict.fromkeys(_phrase(e) for e in errors))
        wanted = "it must be " + " or ".join(p.removeprefix("it must be ") for p in phrases) if all(
            p.startswith("it must be ") for p in phrases) else "; or ".join(phrases)
        problems.append(f"'{prefix}{path}' = {quoted(given)} is not accepted: {wanted}")
    return problems
