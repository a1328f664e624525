"""The LLM options of ``primerge demo`` (``--suite llm``) and ``primerge eval`` (``--harness lm-eval``).

:mod:`primerge.cli.evaluate` owns the subcommands; it calls :func:`add_demo_options` /
:func:`add_eval_options` to add this suite's options (in their own help group) and dispatches to
:func:`cmd_demo` / :func:`cmd_eval` when the LLM suite is chosen. The shared options keep their
meaning: ``--tasks`` (packaged names or .csv/.jsonl files; for ``eval`` also lm-eval task names),
``--base`` (a causal-LM folder or a .gguf file; for ``eval``, the base of a LoRA adapter),
``--cache``, ``--methods``, ``--report``, ``--seed``, ``--train-seed``, ``--quiet``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from primerge.util.errors import RecipeError
from primerge.evaluation.llm.protocol import KINDS, PRESETS


def _names(values) -> list[str]:
    return [v for value in values or [] for v in value.split(",") if v]


def add_prompt_options(group) -> None:
    """``--preset``, ``--max-prompt-tokens`` and ``--device``: how prompts are cast and where models run
    (``eval``, ``demo`` and ``tune``)."""
    group.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                       help="suite size: cpu (default; sized for 2 CPU cores) or gpu (larger; use with --device cuda)")
    group.add_argument("--max-prompt-tokens", type=int,
                       help="longest prompt in tokens, the template included; longer texts are cut at a word end "
                            f"(default: the preset's, {PRESETS['cpu'].max_prompt_tokens} for cpu)")
    group.add_argument("--device", default="cpu", help="cpu, cuda or auto, for training, merging and lm-eval")


def prompt_options_given(args) -> list[str]:
    """The prompt options (:func:`add_prompt_options`) set to other than their defaults."""
    given = {"--preset": args.preset != "cpu", "--max-prompt-tokens": args.max_prompt_tokens is not None,
             "--device": args.device != "cpu"}
    return [name for name, changed in given.items() if changed]


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
    group.add_argument("--as-lora-rank", type=int, default=16, help="rank of those adapters (default 16)")


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    """``--harness lm-eval`` and its options on ``primerge eval``."""
    parser.add_argument("--harness", choices=("lm-eval",),
                        help="score a causal LM (folder or LoRA adapter) with lm-evaluation-harness instead")
    group = parser.add_argument_group("lm-eval harness (--harness lm-eval)")
    _add_protocol_options(group)
    group.add_argument("--include-path", type=Path, action="append", default=[],
                       help="a folder of your own lm-eval task YAMLs (repeatable); they can run Python code, so "
                            "--allow-task-code is required with it")
    group.add_argument("--allow-task-code", action="store_true",
                       help="run the lm-eval task YAMLs of --include-path, which can execute Python code "
                            "(!function tags import and call modules from their folder)")


def protocol_of(args):
    protocol = PRESETS[args.preset]
    overrides = {name: getattr(args, name) for name in ("test_size", "max_prompt_tokens", "steps")
                 if getattr(args, name, None) is not None}
    for name, value in overrides.items():
        if value < 1:
            raise RecipeError(f"--{name.replace('_', '-')} must be at least 1.")
    if getattr(args, "train_seed", None) is not None:
        overrides["seed"] = args.train_seed
    return replace(protocol, **overrides)


def cmd_demo(args) -> int:
    from primerge.evaluation.llm.demo import LLM_DEFAULT_TASKS, run_llm_demo
    from primerge.evaluation.llm.report import PREFIX, text_tables

    if args.pave:
        raise RecipeError("--pave rows belong to the encoder suite; drop --pave or use --suite encoder.")
    result = run_llm_demo(
        tasks=_names(args.tasks) or list(LLM_DEFAULT_TASKS), methods=_names(args.methods) or None,
        as_lora=["prime"] if args.as_lora is None else _names(args.as_lora), as_lora_rank=args.as_lora_rank,
        zoos=_names(args.zoos) or list(KINDS), base=args.base, cache=args.cache, report=args.report,
        protocol=protocol_of(args), seed=args.seed, device=args.device, progress=not args.quiet)
    print()
    print(text_tables(result))
    print(f"\nreport: {result.report}/{PREFIX}.md, .csv, .png ({result.timings['total_seconds']:.0f} s in all)")
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

    check_task_code(args.include_path, args.allow_task_code)

    result = evaluate_with_harness(args.model, _names(args.tasks), base=args.base, cache=args.cache,
                                   protocol=protocol_of(args), device=args.device, batch_size=args.batch_size,
                                   include=args.include_path)
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
