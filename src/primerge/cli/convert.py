"""The ``convert`` subcommand: a mergekit configuration (or a model card embedding one) as primerge's
own recipe, printed as YAML with the places where semantics differ as comments."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert", help="print the primerge recipe of a mergekit configuration or model card (nothing is read "
                        "but the file)")
    convert.add_argument("config", type=Path, help="mergekit YAML, or a model card (README.md) embedding one")
    convert.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    from primerge.core.mergekit import recipe_data
    from primerge.core.recipe import Recipe
    from primerge.io.files import read_bounded
    from primerge.io.user_paths import user_path
    from primerge.util.errors import RecipeError
    from primerge.util.schema import validate

    path = user_path(args.config, "config")
    data = recipe_data(read_bounded(path, "recipe", "recipe", RecipeError), path)
    try:
        recipe = validate(Recipe, data, "recipe")  # paths as written: relative to the file's folder
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    header = [f"# primerge recipe of {path}"]
    if recipe.origin is not None:
        header += ["# where primerge's semantics differ from mergekit's:"] + [f"#   - {n}" for n in recipe.origin.notes]
    print("\n".join(header))
    print(recipe.to_yaml(), end="")
    return 0
