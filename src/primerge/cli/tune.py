"""``primerge tune RECIPE --tasks ...``: the command line of :mod:`primerge.tuning`.

The recipe gives the base, the models (one fine-tune per task, in ``--tasks`` order), the
task-specific heads, the seed and any fixed ``purify`` block; ``--methods`` picks the methods to
tune (default: the recipe's; ``all``: every registered one). ``--search`` names what each study
searches: ``params`` (the methods' own parameters, the default), ``weights`` (one weight per
model) and ``scale-gradient:K`` (the scale as K anchors over depth) — :mod:`primerge.tuning.genome`.
``--suite llm`` takes the prompt options of ``eval --harness lm-eval`` and ``demo --suite llm``
(``--preset``, ``--max-prompt-tokens``, ``--device``).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from primerge.cli import llm as llm_cli
from primerge.util.errors import RecipeError
from primerge.tuning.settings import DEFAULT_SIZE, TuneSettings

DEFAULTS = TuneSettings()


def _names(values: list[str] | None) -> list[str]:
    """Accept both ``--x a b`` and ``--x a,b``."""
    return [v for value in values or [] for v in value.split(",") if v]


#: The options of a tuning run (``tune``; ``demo`` takes them with ``--tuned`` only).
TUNING_OPTIONS = ("--trials", "--budget", "--validation-size", "--tune-seed", "--search")


def add_budget_options(parser: argparse.ArgumentParser) -> None:
    """Trials, budget, validation size, TPE seed and ``--search`` (shared by ``tune`` and ``demo --tuned``,
    both suites). Each defaults to ``None``: :func:`settings_from` applies :class:`TuneSettings`' defaults,
    and ``demo`` refuses them without ``--tuned`` (:func:`primerge.cli.llm.options_given`)."""
    parser.add_argument("--trials", type=int,
                        help=f"trials per method, the defaults included (default {DEFAULTS.trials})")
    parser.add_argument("--budget", type=float, metavar="MIN",
                        help="time budget in minutes for all methods together (default: none)")
    parser.add_argument("--validation-size", type=int,
                        help=f"validation examples per task, carved from the training data (default {DEFAULT_SIZE})")
    parser.add_argument("--tune-seed", type=int, help=f"seed of Optuna's TPE sampler (default {DEFAULTS.seed})")
    parser.add_argument("--search", nargs="+", metavar="PART",
                        help="what each study searches (default params): params (each method's own parameters), "
                             "weights or weights:LOW:HIGH (one weight per model, default range 0 to 1), "
                             "scale-gradient:K (the method's scale as K anchors over depth, interpolated per layer "
                             "as mergekit does); e.g. --search params weights scale-gradient:3")


def settings_from(args, pave: bool = False, targets: tuple[str, ...] = ("weight", "delta")) -> TuneSettings:
    """The run's settings from :func:`add_budget_options`' options; :class:`TuneSettings`' defaults for
    those not given (``--search``: the methods' own parameters, no genome)."""
    from primerge.tuning.genome import parse_search

    given = {"trials": args.trials, "budget_minutes": args.budget, "seed": args.tune_seed,
             "validation_size": args.validation_size}
    if args.search is not None:
        given["method_params"], given["genome"] = parse_search(_names(args.search))
    return TuneSettings(**{name: value for name, value in given.items() if value is not None}, pave=pave,
                        pave_targets=targets)


def register(subparsers) -> None:
    """Add ``tune`` to an argparse subparsers object."""
    tune = subparsers.add_parser(
        "tune", help="search each method's settings on validation data carved from the training data (Optuna)")
    tune.add_argument("recipe", type=Path, help="recipe YAML: base, models, seed (and task_specific: the heads, for the encoder suite)")
    tune.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                      help="one task per model, in the recipe's order: packaged names or .csv/.jsonl files")
    tune.add_argument("--methods", nargs="+", metavar="METHOD",
                      help="methods to tune (default: the recipe's method; 'all': every registered method)")
    add_budget_options(tune)
    tune.add_argument("--pave", action="store_true",
                      help="also tune PAVE: ρ, target and which models are purified (the tasks are the data)")
    tune.add_argument("--pave-targets", nargs="+", choices=["weight", "delta"], default=["weight", "delta"],
                      help="PAVE targets to search (default both)")
    tune.add_argument("--suite", default="encoder",
                      help="validation suite: encoder (default; classification heads marked task_specific) or llm "
                           "(causal LMs or LoRA adapters of the base, scored by lm-evaluation-harness)")
    tune.add_argument("--out", type=Path, default=Path("tune-report"),
                      help="report folder: <method>.yaml, trials.csv, plots/, summary.md (default tune-report)")
    tune.add_argument("--cache", type=Path, help="cache folder (default: $PRIMERGE_CACHE, else ~/.cache/primerge)")
    tune.add_argument("--quiet", action="store_true", help="print only the final table")
    llm_cli.add_prompt_options(tune.add_argument_group("LLM suite (--suite llm)"))
    tune.set_defaults(func=cmd_tune)


def suite_options(args) -> dict:
    """The suite's own options: the LLM suite's protocol, device and lm-eval's progress bars (off with
    ``--quiet``); none for the encoder suite (which refuses the LLM suite's options rather than ignore
    them)."""
    if args.suite == "llm":
        return {"protocol": llm_cli.protocol_of(args), "device": llm_cli.device_of(args), "progress": not args.quiet}
    llm_cli.refuse_options(args, llm_cli.PROMPT_OPTIONS, "the LLM suite", "add --suite llm or drop them")
    return {}


def task_specs(values: list[str] | None) -> list[str]:
    """Task names as given; .csv/.jsonl paths made absolute (the written recipes refer to them)."""
    from primerge.data.tasks import is_table_spec

    return [str(Path(v).expanduser().resolve()) if is_table_spec(v) else v for v in _names(values)]


def cmd_tune(args) -> int:
    from primerge.methods import list_methods
    from primerge.core.recipe import load_recipe
    from primerge.tuning.report import genome_rows, summary_rows, text_table, validation_rows
    from primerge.tuning.run import tune
    from primerge.tuning.suites import SUITES

    settings = settings_from(args, args.pave, tuple(args.pave_targets))  # --search checked before anything is read
    recipe = load_recipe(args.recipe)
    tasks = task_specs(args.tasks)
    settings = replace(settings, task_data=dict(zip(recipe.model_labels(), tasks)))
    methods = _names(args.methods)
    if methods == ["all"]:
        methods = [spec.name for spec in list_methods()]
    if args.suite not in SUITES:
        raise RecipeError(f"unknown suite '{args.suite}'; choose one of: {', '.join(sorted(SUITES))}.")
    suite = SUITES[args.suite](recipe, tasks, settings.validation_size, args.cache, **suite_options(args))
    result = tune(recipe, suite, methods or None, settings, args.out, log=(lambda m: None) if args.quiet else print)
    print()
    print(text_table(*summary_rows(result.results)))
    header, rows = genome_rows(result.results, list(result.individual))
    if rows:
        print("\nchosen weights and scale over depth:")
        print(text_table(header, rows))
    print("\nvalidation accuracy per task (%, ± standard error; n examples):")
    print(text_table(*validation_rows(result)))
    print(f"\nbest recipes, trials.csv, plots/ and summary.md in {args.out} ({result.seconds / 60:.1f} min in all)")
    return 0
