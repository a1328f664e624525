"""The ``analyze`` and ``select`` subcommands (registered by :mod:`primerge.cli.main`)."""

from __future__ import annotations

from pathlib import Path


def _list(value: str) -> list[str]:
    return [v for v in value.split(",") if v]


def register(subparsers) -> None:
    analyze = subparsers.add_parser(
        "analyze", help="report on a recipe's task vectors: interference, PRIME F(r), rank collapse, signs, HO-GSVD")
    analyze.add_argument("recipe", help="recipe YAML file (no merge is run)")
    analyze.add_argument("--out", required=True, type=Path, help="report folder (index.md, PNG, CSV, JSON)")
    analyze.add_argument("--method", help="method whose merged task vector the rank-collapse section "
                                          "measures, at its defaults (default: the recipe's, with its parameters)")
    analyze.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    analyze.add_argument("--force", action="store_true", help="write into a non-empty report folder")
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")
    analyze.set_defaults(func=cmd_analyze)

    select = subparsers.add_parser(
        "select", help="pick k experts from candidates by HO-GSVD alignment with a pre-selected pool")
    select.add_argument("--base", required=True, type=Path, help="base model (folder or .safetensors)")
    select.add_argument("--pool", required=True, type=_list, help="comma-separated pre-selected model paths")
    select.add_argument("--candidates", required=True, type=_list, help="comma-separated candidate model paths")
    select.add_argument("--k", required=True, type=int, help="number of experts to pick")
    select.add_argument("--task-specific", help="regex of per-task tensors to ignore (e.g. '^classifier\\.')")
    select.add_argument("--matrices", help="regex of the matrix parameters (default: the recipe default)")
    select.add_argument("--pi", type=float, default=1e-2, help="HO-GSVD regularisation π (default 1e-2)")
    select.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    select.add_argument("--quiet", action="store_true", help="no progress bar")
    select.set_defaults(func=cmd_select)


def cmd_analyze(args) -> int:
    from primerge.analysis.report import analyze
    from primerge.core.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    report = analyze(recipe, args.out, method=args.method, device=args.device, quiet=args.quiet, force=args.force)
    prime = report.summary["prime"]
    print(f"PRIME r* = {prime['selected']}; retention: "
          + ", ".join(f"{k} {v:.3f}" for k, v in prime["retention"].items()))
    print(f"report: {report.out / 'index.md'} ({len(report.figures)} figures, {len(report.tables)} tables)")
    return 0


def cmd_select(args) -> int:
    from primerge.analysis.alignment import candidate_scores, greedy_select, pool_alignment
    from primerge.util.errors import RecipeError

    if not args.pool or not args.candidates:
        raise RecipeError("select needs at least one --pool model and one --candidates model.")
    if not 1 <= args.k <= len(args.candidates):
        raise RecipeError(f"--k must be between 1 and the number of candidates ({len(args.candidates)}).")
    models = [*args.pool, *args.candidates]
    labels, A = pool_alignment(args.base, models, task_specific=args.task_specific, matrices=args.matrices,
                               pi=args.pi, device=args.device, quiet=args.quiet)
    pool = list(range(len(args.pool)))
    cands = list(range(len(args.pool), len(models)))
    print("mean alignment with the pool (higher = better aligned):")
    for c, score in sorted(candidate_scores(A, pool, cands).items(), key=lambda kv: -kv[1]):
        print(f"  {labels[c]:<24}{score:.4f}  {models[c]}")
    print(f"greedy picks (k = {args.k}, score = mean alignment with pool + earlier picks):")
    for rank, (c, score) in enumerate(greedy_select(A, pool, cands, args.k), start=1):
        print(f"  {rank}. {labels[c]:<21}{score:.4f}  {models[c]}")
    return 0
