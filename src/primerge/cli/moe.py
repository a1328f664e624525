"""The ``moe`` subcommand (registered by :mod:`primerge.cli.main`): a mixture of experts from a base
and dense fine-tunes, from mergekit-moe's configuration as it is or a primerge recipe with an
``moe:`` block (:mod:`primerge.core.moe`)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    moe = subparsers.add_parser(
        "moe", help="build a mixture of experts (Mixtral, Qwen2-MoE, Qwen3-MoE) from a base and dense fine-tunes: "
                    "a mergekit-moe configuration or a recipe with an moe: block")
    moe.add_argument("config", help="mergekit-moe YAML (base_model, experts, gate_mode, ...) or a primerge recipe; "
                                    "relative paths are read from the file's folder")
    moe.add_argument("--out", help="output model folder (written atomically); required unless --dry-run")
    moe.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    moe.add_argument("--shard-size", help="largest safetensors shard, e.g. 2GB (default) or 500MB")
    moe.add_argument("--max-memory", metavar="SIZE", help="memory the build may use, e.g. 16GB")
    moe.add_argument("--force", action="store_true", help="replace an existing output folder")
    moe.add_argument("--quiet", action="store_true", help="no progress bar")
    moe.add_argument("--download", action="store_true", help="download hub ids (org/name[@revision]) missing from "
                     "the local Hugging Face cache (default: offline)")
    moe.add_argument("--dry-run", action="store_true", help="print the plan (architecture, experts, router, "
                                                            "memory, disk) and stop")
    moe.set_defaults(func=cmd_moe)


def moe_recipe(path: str, download: bool = False):
    """The recipe of ``path``: a mergekit-moe configuration translated, or a primerge recipe (hub ids
    fetched when missing from the cache only with ``download``)."""
    from primerge.core.moe import from_mergekit, is_mergekit_moe
    from primerge.core.recipe import build_recipe
    from primerge.io.files import load_yaml
    from primerge.io.user_paths import user_path
    from primerge.util.errors import RecipeError

    file = user_path(path, "configuration")
    data = load_yaml(file, "configuration", error=RecipeError)
    try:
        recipe = build_recipe(from_mergekit(data) if is_mergekit_moe(data) else data, relative_to=file.parent,
                              download=download)
    except RecipeError as exc:
        raise RecipeError(f"{file}: {exc}") from None
    if not hasattr(recipe, "moe"):
        raise RecipeError(f"{file}: neither a mergekit-moe configuration (base_model, experts) nor a recipe with an "
                          f"moe: block; a plain merge runs with primerge merge.")
    return recipe


def cmd_moe(args: argparse.Namespace) -> int:
    from primerge.api import dry_run, merge_recipe
    from primerge.util.errors import RecipeError

    recipe = moe_recipe(args.config, args.download)
    size = {"shard_size": args.shard_size} if args.shard_size is not None else {}
    if args.dry_run:
        report = dry_run(recipe, out=args.out, device=args.device, max_memory=args.max_memory, **size)
        print(report.to_text())
        if report.problems:
            print(f"primerge: error: {' '.join(report.problems)}", file=sys.stderr)
            return 2
        return 0
    if args.out is None:
        raise RecipeError("primerge moe needs --out (the output folder), or --dry-run.")
    result = merge_recipe(recipe, out=args.out, device=args.device, force=args.force, quiet=args.quiet,
                          max_memory=args.max_memory, **size)
    block = recipe.moe
    print(f"{len(block.experts)} experts ({block.experts_per_token} per token), router {block.gate_mode}, "
          f"in {result.seconds:.1f}s -> {result.out}")
    return 0
