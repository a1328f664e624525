"""The LLM options of ``primerge demo`` (``--suite llm``) and ``primerge eval`` (``--harness lm-eval``).

:mod:`primerge.cli.evaluate` owns the subcommands; it calls :func:`add_demo_options` /
:func:`add_eval_options` to add this suite's options (in their own help group) and dispatches to
:func:`cmd_demo` / :func:`cmd_eval` when the LLM suite is chosen. The shared options keep their
meaning: ``--tasks`` (packaged names or .csv/.jsonl files; for ``eval`` also lm-eval task names),
``--base`` (a causal-LM folder or a .gguf file; for ``eval``, the base of a LoRA adapter),
``--cache``, ``--methods``, ``--report``, ``--seed``, ``--train-seed``, ``--quiet``, and ``demo``'s
``--tuned`` with its budget and ``--search`` (:func:`primerge.cli.tune.add_budget_options`).

No option is silently ignored: an option that belongs to one suite (or to ``--tuned``) defaults to
``None`` here, its real default applied where it is read, so :func:`options_given` tells which
ones the command line set and :func:`refuse_options` refuses those the chosen suite would not use.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from primerge.util.errors import RecipeError
from primerge.evaluation.llm.protocol import KINDS, PRESETS


def _names(values) -> list[str]:
    return [v for value in values or [] for v in value.split(",") if v]


DEFAULT_PRESET = "cpu"
DEFAULT_DEVICE = "cpu"
#: How prompts are cast and where models run (``eval --harness lm-eval``, ``demo --suite llm``, ``tune --suite llm``).
PROMPT_OPTIONS = ("--preset", "--max-prompt-tokens", "--device")
#: The options of ``demo --suite llm`` alone.
LLM_DEMO_OPTIONS = (*PROMPT_OPTIONS, "--test-size", "--steps", "--zoos", "--as-lora", "--as-lora-rank")
#: The options of ``eval --harness lm-eval`` alone.
LLM_EVAL_OPTIONS = (*PROMPT_OPTIONS, "--test-size", "--include-path", "--allow-task-code")


def options_given(args, flags: Sequence[str]) -> list[str]:
    """The ``flags`` the command line set. Each such option defaults to ``None`` (its real default is
    applied where it is read), so an option was given exactly when its value is not ``None``."""
    return [flag for flag in flags if getattr(args, flag[2:].replace("-", "_")) is not None]


def refuse_options(args, flags: Sequence[str], owner: str, fix: str) -> None:
    """Refuse, in one line, any of ``flags`` given where the command would ignore it: they are
    ``owner``'s options; ``fix`` says what to do."""
    given = options_given(args, flags)
    if given:
        raise RecipeError(f"{', '.join(given)}: option(s) of {owner}; {fix}.")


def add_prompt_options(group) -> None:
    """``--preset``, ``--max-prompt-tokens`` and ``--device``: how prompts are cast and where models run
    (``eval``, ``demo`` and ``tune``)."""
    group.add_argument("--preset", choices=sorted(PRESETS),
                       help=f"suite size: {DEFAULT_PRESET} (default; sized for 2 CPU cores) or gpu (larger; use "
                            "with --device cuda)")
    group.add_argument("--max-prompt-tokens", type=int,
                       help="longest prompt in tokens, the template included; longer texts are cut at a word end "
                            f"(default: the preset's, {PRESETS[DEFAULT_PRESET].max_prompt_tokens} for cpu)")
    group.add_argument("--device", help=f"cpu, cuda or auto, for training, merging and lm-eval (default {DEFAULT_DEVICE})")


def device_of(args) -> str:
    """``--device``, or its default."""
    return args.device or DEFAULT_DEVICE


def _add_protocol_options(group) -> None:
    add_prompt_options(group)
    group.add_argument("--test-size", type=int, help="test examples per task (default: the preset's)")


def add_demo_options(parser: argparse.ArgumentParser) -> None:
    """``--suite`` and the LLM suite's options of ``primerge demo``."""
    parser.add_argument("--suite", choices=("encoder", "llm"), default="encoder",
                        help="encoder (default: all-MiniLM-L6-v2 with classification heads) or llm "
                             "(SmolLM2-135M LoRA and full fine-tunes, scored by lm-evaluation-harness)")
    group = parser.add_argument_group("LLM suite (--suite llm)")
    _add_protocol_options(group)
    group.add_argument("--steps", type=int, help="fine-tuning steps per task (default: the preset's)")
    group.add_argument("--zoos", nargs="+", metavar="KIND", help=f"zoos to build and merge: {', '.join(KINDS)} (default both)")
    group.add_argument("--as-lora", nargs="*", metavar="METHOD",
                       help="methods whose --as-lora output (a merged LoRA adapter) also gets a row on the LoRA "
                            "zoo (default: prime; give none to skip)")
    group.add_argument("--as-lora-rank", type=int, help="rank of those adapters (default 16)")


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    """``--harness lm-eval`` and its options on ``primerge eval``."""
    parser.add_argument("--harness", choices=("lm-eval",),
                        help="score a causal LM (folder or LoRA adapter) with lm-evaluation-harness instead")
    group = parser.add_argument_group("lm-eval harness (--harness lm-eval)")
    _add_protocol_options(group)
    group.add_argument("--include-path", type=Path, action="append",
                       help="a folder of your own lm-eval task YAMLs (repeatable); they can run Python code, so "
                            "--allow-task-code is required with it")
    group.add_argument("--allow-task-code", action="store_true", default=None,
                       help="run the lm-eval task YAMLs of --include-path, which can execute Python code "
                            "(!function tags import and call modules from their folder)")


def protocol_of(args):
    """The preset's protocol with the options given on the command line."""
    protocol = PRESETS[args.preset or DEFAULT_PRESET]
    overrides = {name: getattr(args, name) for name in ("test_size", "max_prompt_tokens", "steps")
                 if getattr(args, name, None) is not None}
    for name, value in overrides.items():
        if value < 1:
            raise RecipeError(f"--{name.replace('_', '-')} must be at least 1.")
    if getattr(args, "train_seed", None) is not None:
        overrides["seed"] = args.train_seed
    return replace(protocol, **overrides)


def check_as_lora(args, zoos: Sequence[str]) -> None:
    """``--as-lora`` rows exist on the LoRA zoo only, and ``--as-lora-rank`` sizes them: refuse either
    where it would change nothing."""
    if "lora" not in zoos:
        refuse_options(args, ("--as-lora", "--as-lora-rank"), "the LoRA zoo's rows", "add lora to --zoos or drop them")
    elif args.as_lora == []:
        refuse_options(args, ("--as-lora-rank",), "--as-lora METHOD", "name a method after --as-lora or drop it")


def cmd_demo(args) -> int:
    """``demo --suite llm`` (:func:`primerge.evaluation.llm.demo.run_llm_demo`); with ``--tuned``, every
    method also tuned on validation data (:func:`primerge.tuning.llm_demo.run_tuned_llm_demo`)."""
    from primerge.cli.tune import settings_from, task_specs
    from primerge.evaluation.llm.demo import LLM_DEFAULT_TASKS, run_llm_demo
    from primerge.evaluation.llm.report import PREFIX, text_tables

    zoos = _names(args.zoos) or list(KINDS)
    check_as_lora(args, zoos)
    options = dict(
        tasks=task_specs(args.tasks) or list(LLM_DEFAULT_TASKS), methods=_names(args.methods) or None,
        as_lora=["prime"] if args.as_lora is None else _names(args.as_lora), zoos=zoos, base=args.base,
        cache=args.cache, report=args.report, protocol=protocol_of(args), seed=args.seed, device=device_of(args),
        progress=not args.quiet)
    if args.as_lora_rank is not None:
        options["as_lora_rank"] = args.as_lora_rank
    if args.tuned:
        from primerge.tuning.llm_demo import run_tuned_llm_demo

        result = run_tuned_llm_demo(settings_from(args), **options)
    else:
        result = run_llm_demo(**options)
    print()
    print(text_tables(result))
    tuned = f", {PREFIX}-tuned.png and tuning/<zoo>/" if args.tuned else ""
    print(f"\nreport: {result.report}/{PREFIX}.md, .csv, .png{tuned} ({result.timings['total_seconds']:.0f} s in all)")
    return 0


TASK_CODE = ("lm-eval task YAML can execute Python code: a !function tag imports and calls a module from the "
             "task's folder, with your permissions")


def check_task_code(folders: list[Path], allowed: bool) -> None:
    """Refuse ``--include-path`` folders unless ``--allow-task-code`` says their code may run; say so,
    on stderr, before anything runs when it does."""
    if not folders:
        return
    named = ", ".join(str(f) for f in folders)
    if not allowed:
        raise RecipeError(f"--include-path {named}: {TASK_CODE}. Add --allow-task-code if you trust these folders "
                          f"as you would trust a Python script.")
    print(f"primerge: note: running the task YAMLs of {named}; {TASK_CODE}.", file=sys.stderr)


def cmd_eval(args) -> int:
    from primerge.evaluation.llm.evaluate import evaluate_with_harness

    include = args.include_path or []
    check_task_code(include, bool(args.allow_task_code))

    result = evaluate_with_harness(args.model, _names(args.tasks), base=args.base, cache=args.cache,
                                   protocol=protocol_of(args), device=device_of(args), batch_size=args.batch_size,
                                   include=include)
    print(score_table(result.scores))
    print("\nscored on (lm-eval's standard error; Wilson's 95% interval):")
    for name, examples in result.examples.items():
        print(f"  {name}: {examples}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "harness": "lm-eval", **result.as_dict()},
                                        indent=2) + "\n")
    return 0


def score_table(scores: dict) -> str:
    """Task, n, accuracy, standard error and 95% interval per task, then the average accuracy."""
    lines = [f"{'task':<28}{'n':>6}{'accuracy':>10}{'± se':>7}{'95% interval':>15}"]
    for name, score in scores.items():
        stderr = "-" if score.stderr is None else f"{100 * score.stderr:.1f}"
        lines.append(f"{name:<28}{score.n:>6}{100 * score.accuracy:>9.1f}%{stderr:>7}{score.interval_text():>15}")
    average = sum(s.accuracy for s in scores.values()) / len(scores)
    lines.append(f"{'Avg':<28}{'':>6}{100 * average:>9.1f}%")
    return "\n".join(lines)
