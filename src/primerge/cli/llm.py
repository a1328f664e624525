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
from dataclasses import replace
from pathlib import Path

from primerge.util.errors import RecipeError
from primerge.evaluation.llm.protocol import KINDS, PRESETS


def _names(values) -> list[str]:
    return [v for value in values or [] for v in value.split(",") if v]


def _add_protocol_options(group) -> None:
    group.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                       help="suite size: cpu (default; sized for 2 CPU cores) or gpu (larger; use with --device cuda)")
    group.add_argument("--test-size", type=int, help="test examples per task (default: the preset's)")
    group.add_argument("--max-prompt-tokens", type=int, help="longest prompt in tokens (default: the preset's)")
    group.add_argument("--device", default="cpu", help="cpu, cuda or auto, for training, merging and lm-eval")


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
                       help="a folder of your own lm-eval task YAMLs (repeatable)")


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


def cmd_eval(args) -> int:
    from primerge.evaluation.llm.evaluate import evaluate_with_harness

    scores = evaluate_with_harness(args.model, _names(args.tasks), base=args.base, cache=args.cache,
                                   protocol=protocol_of(args), device=args.device, batch_size=args.batch_size,
                                   include=args.include_path)
    print(f"{'task':<28}{'accuracy':>10}")
    for name, value in scores.items():
        print(f"{name:<28}{100 * value:>9.1f}%")
    print(f"{'Avg':<28}{100 * sum(scores.values()) / len(scores):>9.1f}%")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "harness": "lm-eval", "accuracy": scores}, indent=2) + "\n")
    return 0
