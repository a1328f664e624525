"""The ``primerge`` command line.

Every primerge error becomes one line on stderr and exit code 2 (``verify`` exits 1
when a folder does not match its manifest); an interrupt
(Ctrl-C or SIGTERM) exits 130/143 after the temporary output is removed; output into a pipe whose
reader has gone (``primerge methods | head``) ends quietly with 141, as ``yes | head`` does.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from primerge.version import __version__
from primerge.util.errors import PrimergeError


def _cmd_plan(args: argparse.Namespace) -> int:
    from primerge.api import dry_run

    size = {"shard_size": args.shard_size} if args.shard_size is not None else {}
    report = dry_run(args.recipe, out=args.out, device=args.device, allow_pickle=args.allow_pickle,
                       lora_rank=args.as_lora, max_memory=args.max_memory,
                       calibrate=not getattr(args, "no_calibration", False), download=args.download, **size)
    print(report.to_text())
    if report.problems:
        print(f"primerge: error: {' '.join(report.problems)}", file=sys.stderr)
        return 2
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from primerge.api import merge_recipe
    from primerge.output.lora import LARGE_ERROR

    if args.dry_run:
        return _cmd_plan(args)
    size = {"shard_size": args.shard_size} if args.shard_size is not None else {}
    execution = {key: value for key in ("backend", "address", "workers", "cpus_per_worker", "gpus_per_worker")
                 if (value := getattr(args, key)) is not None}
    result = merge_recipe(args.recipe, out=args.out, device=args.device, force=args.force, quiet=args.quiet,
                          allow_pickle=args.allow_pickle, lora_rank=args.as_lora, execution=execution,
                          max_memory=args.max_memory, download=args.download, **size)
    c = result.counts
    if result.report:
        print(result.report)
    if result.lora is not None:
        lora = result.lora
        print(f"LoRA adapter, rank {lora['rank']}: {len(lora['modules'])} modules, largest "
              f"relative error {lora['max_relative_error']:.2e} (per module in lora_report.json)")
        if lora["large_errors"]:
            worst = ", ".join(f"{w['module']} ({w['relative_error']:.2f})" for w in lora["large_errors"][:3])
            print(f"primerge: warning: {len(lora['large_errors'])} modules are approximated worse than "
                  f"{LARGE_ERROR:g} relative error at rank {lora['rank']} (worst: {worst}); --as-lora "
                  f"{lora['suggested_rank']} keeps every module within {LARGE_ERROR:g}.", file=sys.stderr)
    experts = f"{c['experts']} expert tensors ({c['expert_matrices']} matrices), " if c["experts"] else ""
    vocab = f", {c['vocab_aligned']} vocabulary-aligned" if c["vocab_aligned"] else ""
    print(f"merged with {result.method} in {result.seconds:.1f}s -> {result.out} "
          f"({c['matrix'] + c['reshaped']} matrices, {experts}{c['fallback']} other merged tensors, {c['copy']} copied, "
          f"{c['task_specific']} task-specific{vocab})")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from primerge.io.manifest import verify_folder

    report = verify_folder(args.folder)
    if report.recovered:
        print(f"note {report.recovered}")
    for problem in report.problems:
        print(f"FAIL {problem}")
    for rel in report.unlisted:
        print(f"note {rel}: not listed in the manifest (hub or git metadata, not checked)")
    state = "OK" if report.ok else f"FAILED ({len(report.problems)} problems)"
    print(f"{state}: {report.files} files, {report.tensors} tensors checked in {report.folder}")
    return 0 if report.ok else 1


def _cmd_methods(args: argparse.Namespace) -> int:
    from primerge.methods import list_methods
    from primerge.methods.table import cli_lines

    for spec in list_methods():
        print("\n".join(cli_lines(spec)))
    return 0


def _merge_options(parser: argparse.ArgumentParser, *, out_required: bool) -> None:
    """The options ``merge`` and ``plan`` share."""
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--out", required=out_required, help="output folder (written atomically)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--shard-size", help="largest safetensors shard, e.g. 2GB (default) or 500MB")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read .bin/.pt pickle checkpoints (with torch.load(weights_only=True))")
    parser.add_argument("--as-lora", type=int, metavar="RANK", default=None,
                        help="write a PEFT LoRA adapter of this rank instead of a full model")
    parser.add_argument("--max-memory", metavar="SIZE", help="memory the merge may use, e.g. 16GB (default: "
                        "what the machine has available); a merge that needs more is refused before it starts")
    parser.add_argument("--download", action="store_true", help="download hub ids (org/name[@revision]) missing "
                        "from the local Hugging Face cache (default: offline, refused with the download command)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="primerge", description="Merge fine-tuned checkpoints of one base model (PRIME, TSV, TIES, ...).")
    parser.add_argument("--version", action="version", version=f"primerge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    merge = sub.add_parser("merge", help="merge the models of a YAML recipe into one model folder")
    _merge_options(merge, out_required=True)
    merge.add_argument("--force", action="store_true", help="replace an existing output folder")
    merge.add_argument("--quiet", action="store_true", help="no progress bar")
    merge.add_argument("--dry-run", action="store_true", help="print the pre-flight plan (as `primerge plan`) "
                       "and stop")
    ray = merge.add_argument_group("distributed execution (pip install 'primerge[ray]')")
    ray.add_argument("--backend", choices=["local", "ray"], help="where the units run (default: the recipe's, "
                     "else local)")
    ray.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (default: start a local runtime)")
    ray.add_argument("--workers", type=int, help="units merged at once (default: the cluster's CPUs)")
    ray.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per unit (default 1)")
    ray.add_argument("--gpus-per-worker", type=float, help="GPUs reserved per unit; units then merge on CUDA")
    merge.set_defaults(func=_cmd_merge)

    plan = sub.add_parser("plan", help="pre-flight: treatments, differences, memory, disk and time of a recipe's "
                          "merge, from the headers and a short calibration; nothing is written")
    _merge_options(plan, out_required=False)
    plan.add_argument("--no-calibration", action="store_true", help="skip the timed calibration")
    plan.set_defaults(func=_cmd_plan)

    verify = sub.add_parser("verify", help="check an output folder against its primerge-manifest.json")
    verify.add_argument("folder", help="a folder written by primerge merge")
    verify.set_defaults(func=_cmd_verify)

    methods = sub.add_parser("methods", help="list every method with its parameters and defaults")
    methods.set_defaults(func=_cmd_methods)

    from primerge.cli import analyze, bench, convert, evaluate, moe, tune

    for lab in (moe, convert, evaluate, tune, analyze, bench):
        lab.register(sub)
    return parser


def _import_torch() -> None:
    """Import torch with SIGINT/SIGTERM/SIGHUP held back until it is done: its C++ start-up calls
    back into Python, and an exception a signal handler raises there aborts the process (SIGABRT)
    instead of unwinding. A signal that arrives meanwhile lands right after, as usual."""
    from primerge.io.publish import signals_deferred

    with signals_deferred():
        import torch  # noqa: F401


def _terminate(signum, frame):
    raise SystemExit(128 + signum)


#: SIGTERM / SIGHUP unwind like Ctrl-C (temporary output removed); SIGXFSZ (a file-size limit
#: was hit) is ignored so the write fails with an error primerge reports instead of a core dump.
_HANDLERS = {"SIGTERM": _terminate, "SIGHUP": _terminate, "SIGXFSZ": signal.SIG_IGN}


#: Exit status when stdout's reader went away (``primerge methods | head``): the status a process
#: killed by SIGPIPE reports, as ``yes | head`` does.
BROKEN_PIPE = 128 + 13


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush into a closed pipe cannot fail."""
    try:
        target = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (a test's capture): nothing will be flushed to a pipe
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, target)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``primerge`` console script; returns the exit code."""
    if hasattr(sys.stdout, "reconfigure"):  # names may hold lone surrogates (undecodable path bytes)
        sys.stdout.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    previous = {}
    for name, handler in _HANDLERS.items():
        if hasattr(signal, name):
            previous[name] = signal.signal(getattr(signal, name), handler)
    try:
        _import_torch()
        return args.func(args)
    except PrimergeError as exc:
        print(f"primerge: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("primerge: interrupted; no incomplete output was left in place.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return BROKEN_PIPE
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)
