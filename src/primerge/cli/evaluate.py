"""The benchmark's subcommands: ``zoo build``, ``eval`` and ``demo``.

:func:`register` adds them to the main CLI's argparse subparsers; each sets ``func(args) -> int``.
Errors are raised as primerge errors and turned into exit code 2 by :mod:`primerge.cli.main`.

Tasks are named on the command line as packaged task names or ``.csv`` / ``.jsonl`` files with
``text`` and ``label`` columns; the base is the packaged all-MiniLM-L6-v2 unless ``--base`` names
another Hugging Face encoder folder.

``demo`` and ``eval`` refuse, in one line, every option the chosen suite would ignore: the encoder's
training options with ``--suite llm`` / ``--harness lm-eval``, the LLM suite's without them, the
tuning options without ``--tuned`` and ``--pave-targets`` without ``--pave``
(:func:`primerge.cli.llm.refuse_options`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from primerge.data.tasks import DEFAULT_TASKS, PACKAGED
from primerge.cli import llm as llm_cli
from primerge.cli import tune as tuning_cli
from primerge.evaluation.protocol import TrainingProtocol

DEFAULTS = TrainingProtocol()
#: How the encoder zoo is trained: options of the encoder suite alone (``zoo build``, ``eval``, ``demo``).
TRAINING_OPTIONS = ("--epochs", "--small-task-epochs", "--train-seed")
#: The options of the encoder ``demo`` alone (``--train-seed`` also seeds the LLM suite's fine-tunes).
ENCODER_DEMO_OPTIONS = ("--epochs", "--small-task-epochs", "--pave", "--pave-targets")


def _names(values: list[str] | None) -> list[str]:
    """Accept both ``--tasks a b`` and ``--tasks a,b``."""
    return [v for value in values or [] for v in value.split(",") if v]


def _add_common(parser: argparse.ArgumentParser, tasks_default: bool = True) -> None:
    help_tasks = (
        f"tasks: packaged names ({', '.join(PACKAGED)}) or .csv/.jsonl files with 'text' and 'label' "
        "columns" + (" (default: all packaged tasks)" if tasks_default else "")
    )
    parser.add_argument("--tasks", nargs="+", metavar="TASK", required=not tasks_default, help=help_tasks)
    parser.add_argument("--base", type=Path, help="base Hugging Face encoder folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--cache", type=Path,
                        help="cache folder (default: $PRIMERGE_CACHE, else ~/.cache/primerge)")
    parser.add_argument("--epochs", type=int, help=f"fine-tuning epochs (default {DEFAULTS.epochs})")
    parser.add_argument("--small-task-epochs", type=int,
                        help=f"epochs for tasks with < {DEFAULTS.small_task_threshold} training examples "
                             f"(default {DEFAULTS.small_task_epochs})")
    parser.add_argument("--train-seed", type=int, help=f"fine-tuning seed (default {DEFAULTS.seed})")


def _protocol(args) -> TrainingProtocol:
    """The encoder's training protocol: the options given, :class:`TrainingProtocol`'s defaults for the rest."""
    given = {"epochs": args.epochs, "small_task_epochs": args.small_task_epochs, "seed": args.train_seed}
    return TrainingProtocol(**{name: value for name, value in given.items() if value is not None})


def register(subparsers) -> None:
    """Add ``zoo`` (with ``build``), ``eval`` and ``demo`` to an argparse subparsers object."""
    zoo = subparsers.add_parser("zoo", help="the fine-tuned model zoo of the offline benchmark")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", metavar="{build}", required=True)
    build = zoo_sub.add_parser("build", help="fine-tune the base on each task (cached; reused when unchanged)")
    _add_common(build)
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    build.set_defaults(func=cmd_zoo_build)

    evaluate = subparsers.add_parser(
        "eval", help="accuracy of a model folder on tasks' test splits, with each task's own head")
    evaluate.add_argument("model", type=Path, help="model folder (a merge's output, a fine-tune, a base)")
    _add_common(evaluate, tasks_default=False)
    evaluate.add_argument("--batch-size", type=int, default=128, help="inference batch size (default 128)")
    evaluate.add_argument("--json", type=Path, help="also write the scores to this JSON file")
    llm_cli.add_eval_options(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    demo = subparsers.add_parser(
        "demo", help="fine-tune, merge with every method, evaluate, and report the table (offline)")
    _add_common(demo)
    demo.add_argument("--methods", nargs="+", metavar="METHOD",
                      help="methods to compare (default: every registered method at its defaults; with --suite llm: task_arithmetic, ties, tsv, prime and regmean, or 'all')")
    demo.add_argument("--report", type=Path, default=Path("demo-report"),
                      help="report folder: results.md, results.csv, results.png (default demo-report)")
    demo.add_argument("--pave", nargs="+", metavar="METHOD",
                      help="also merge these methods on PAVE-purified task vectors (e.g. prime ties)")
    demo.add_argument("--pave-targets", nargs="+", choices=["weight", "delta"],
                      help="PAVE rows per target: weight (the paper's Eq. 6, default) and/or delta")
    demo.add_argument("--tuned", action="store_true",
                      help="also tune every method on validation data (primerge tune) and add the tuned table "
                           "(both suites; --trials, --budget, --validation-size, --tune-seed and --search set it)")
    tuning_cli.add_budget_options(demo)
    demo.add_argument("--seed", type=int, default=42, help="merge seed (default 42)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    llm_cli.add_demo_options(demo)
    demo.set_defaults(func=cmd_demo)


def cmd_zoo_build(args) -> int:
    from primerge.data.tasks import load_splits
    from primerge.evaluation.zoo import build_zoo

    splits = load_splits(_names(args.tasks) or list(DEFAULT_TASKS))
    zoo = build_zoo(splits, base=args.base, protocol=_protocol(args), cache=args.cache, progress=not args.quiet)
    print(f"\nbase: {zoo.base}")
    print(f"{'task':<18}{'train':>7}{'test':>7}{'epochs':>8}{'accuracy':>10}  folder")
    for e in zoo.entries:
        print(f"{e.name:<18}{e.train_size:>7}{e.test_size:>7}{e.epochs:>8}{100 * e.individual_accuracy:>9.1f}%  {e.path}")
    return 0


def cmd_eval(args) -> int:
    if args.harness:
        llm_cli.refuse_options(args, TRAINING_OPTIONS, "the encoder zoo's training",
                               "drop them (lm-eval scores the model as it is)")
        return llm_cli.cmd_eval(args)
    llm_cli.refuse_options(args, llm_cli.LLM_EVAL_OPTIONS, "--harness lm-eval", "add --harness lm-eval or drop them")
    from primerge.data.tasks import load_splits
    from primerge.evaluation.zoo import evaluate_model

    splits = load_splits(_names(args.tasks))
    scores = evaluate_model(args.model, splits, base=args.base, protocol=_protocol(args), cache=args.cache,
                            batch_size=args.batch_size)
    print(f"{'task':<18}{'accuracy':>10}{'individual':>12}{'normalized':>12}")
    for name, value in scores.accuracy.items():
        ind = scores.individual.get(name)
        extra = f"{100 * ind:>11.1f}%{100 * value / ind:>11.1f}%" if ind else f"{'-':>12}{'-':>12}"
        print(f"{name:<18}{100 * value:>9.1f}%{extra}")
    normalized = scores.normalized
    print(f"{'Avg':<18}{100 * scores.average:>9.1f}%"
          + (f"{'':>12}{100 * normalized:>11.1f}%" if normalized is not None else ""))
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), **scores.as_dict()}, indent=2) + "\n")
    return 0


def check_demo_options(args) -> None:
    """Refuse every option the chosen demo would ignore (module docstring)."""
    if args.suite == "llm":
        llm_cli.refuse_options(args, ENCODER_DEMO_OPTIONS, "the encoder suite", "drop them or use --suite encoder")
    else:
        llm_cli.refuse_options(args, llm_cli.LLM_DEMO_OPTIONS, "the LLM suite", "add --suite llm or drop them")
    if not args.pave:
        llm_cli.refuse_options(args, ("--pave-targets",), "--pave", "add --pave METHOD ... or drop it")
    if not args.tuned:
        llm_cli.refuse_options(args, tuning_cli.TUNING_OPTIONS, "--tuned", "add --tuned or drop them")


def cmd_demo(args) -> int:
    check_demo_options(args)
    if args.suite == "llm":
        return llm_cli.cmd_demo(args)
    from primerge.evaluation.demo import run_demo, text_table

    options = dict(
        tasks=tuning_cli.task_specs(args.tasks) or list(DEFAULT_TASKS),
        methods=_names(args.methods) or None,
        base=args.base,
        cache=args.cache,
        report=args.report,
        protocol=_protocol(args),
        seed=args.seed,
        progress=not args.quiet,
        pave=_names(args.pave),
    )
    if args.pave_targets:
        options["pave_targets"] = tuple(args.pave_targets)
    if args.tuned:
        from primerge.cli.tune import settings_from
        from primerge.tuning.demo import run_tuned_demo

        result = run_tuned_demo(settings_from(args), **options)
    else:
        result = run_demo(**options)
    plain = [r for r in result.rows if not r.tuned]
    print()
    print(text_table(plain, result.tasks))
    if len(plain) < len(result.rows):
        print(f"\ntuned on validation data ({result.timings['tuning_seconds'] / 60:.1f} min), scored on test once:\n")
        print(text_table(plain[:2] + [r for r in result.rows if r.tuned], result.tasks))
    print(f"\nreport: {result.report}/results.md, results.csv, results.png "
          f"({result.timings['total_seconds']:.0f} s in all)")
    return 0
