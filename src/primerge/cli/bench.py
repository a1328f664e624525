"""``primerge bench``: the command. Light to import: the zoo, the runs and torch load when it runs."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from primerge import bench
from primerge.bench import BASELINE, DEFAULT_METHODS, RAY_COLD, RAY_WARM


def _configs(args: argparse.Namespace, runs: list, inputs, workdir: Path, log: Callable[[str], None],
             ray_address: str | None) -> list:
    """(Row, recipe path) of every configuration: the methods, the same on Ray (with ``ray_address``:
    a fresh driver per merge, then merges in the warm driver, both from the same recipe), then the T
    and depth scaling pairs."""
    from primerge.bench.runs import Inputs, Row, parse_method, write_recipe
    from primerge.bench.zoo import build_zoo

    configs: list = []

    def add(group: str, inp: Inputs, run, label: str, recipe: Path | None = None) -> Path:
        if recipe is None:
            recipe = write_recipe(workdir / f"recipe-{len(configs)}.yaml", inp.base, inp.models, run, inp.extra)
        configs.append((Row(group, inp.name, label, len(inp.models), paths=tuple(_paths(inp))), recipe))
        return recipe

    for run in runs:
        add("methods", inputs, run, run.label)
    if ray_address is not None:
        execution = {"backend": "ray", "address": ray_address, "workers": args.ray_workers,
                     "gpus_per_worker": args.gpus_per_worker}
        on_ray = Inputs(inputs.name, inputs.base, inputs.models, {**inputs.extra, "execution": execution})
        for run in runs:
            add(RAY_WARM, on_ray, run, run.label, add(RAY_COLD, on_ray, run, run.label))
    if args.scaling and args.recipe is None:
        spec = zoo_spec(args)
        pair = (parse_method(BASELINE), parse_method("prime"))
        half = max(1, spec.tasks // 2)
        for run in pair:
            add("tasks", inputs.subset(f"L{spec.layers}", half), run, f"{run.label} T={half}")
            add("tasks", inputs, run, f"{run.label} T={spec.tasks}")
        shallow = replace(spec, layers=max(1, spec.layers // 2))
        shallow_inputs = Inputs.from_zoo(f"L{shallow.layers}", build_zoo(shallow, args.cache, log), spec.tasks)
        for run in pair:
            add("depth", shallow_inputs, run, f"{run.label} L={shallow.layers}")
            add("depth", inputs, run, f"{run.label} L={spec.layers}")
    return configs


def zoo_spec(args: argparse.Namespace):
    """The zoo the arguments describe (``--hidden`` and ``--noise-floor``: the realistic zoo)."""
    from primerge.bench.zoo import ZooSpec

    return ZooSpec(layers=args.layers, scale=args.scale, tasks=args.tasks, seed=args.seed, hidden_size=args.hidden,
                   noise_floor=args.noise_floor)


def _inputs(args: argparse.Namespace, log: Callable[[str], None]):
    """The recipe's base and models, or the cached zoo (built on first use)."""
    from primerge.bench.runs import Inputs
    from primerge.bench.zoo import build_zoo

    if args.recipe is not None:
        return Inputs.from_recipe(Path(args.recipe))
    spec = zoo_spec(args)
    floor = f", noise floor {spec.noise_floor:g} of each task vector's energy" if spec.noise_floor is not None else ""
    log(f"zoo: {spec.key}: {spec.parameters() / 1e6:.1f}M parameters per checkpoint, {spec.tasks} fine-tunes "
        f"(hidden {spec.hidden}, intermediate {spec.intermediate}, vocab {spec.vocab}{floor})")
    return Inputs.from_zoo(f"L{spec.layers}", build_zoo(spec, args.cache, log), spec.tasks)


def run_bench(args: argparse.Namespace, log: Callable[[str], None] = print) -> list[dict]:
    """Run the benchmark described by parsed ``args``; returns the result rows."""
    from primerge.bench.report import summarize
    from primerge.bench.runs import parse_method, parse_methods
    from primerge.io.writer import parse_size
    from primerge.core.recipe import build_recipe

    runs = parse_methods(args.methods)
    if not any(r.label == BASELINE for r in runs):
        runs.insert(0, parse_method(BASELINE))
    for run in runs:  # validate every method and the shard size before the long work
        build_recipe({"base": ".", "models": ["."], "method": run.method, "parameters": run.parameters})
    if args.shard_size is not None:
        parse_size(args.shard_size)
    if args.sweep:
        return _run_sweeps(args, runs, log)
    inputs = _inputs(args, log)
    with _ray_cluster(args, log) as address, _warm_driver(args, address, log) as warm:
        rows = _measure(args, _paths(inputs), lambda workdir: _configs(args, runs, inputs, workdir, log, address), log,
                        warm)
    floors = _floors(args, rows, log) if args.floors else None
    error = _accuracy(inputs, runs, log) if args.accuracy else None
    return summarize(rows, error, inputs, floors)


def _floors(args: argparse.Namespace, rows: list, log: Callable[[str], None]):
    """The machine's GEMM rate and the I/O floor of every inputs the rows merged (bench.floors)."""
    import tempfile

    from primerge.bench.floors import gemm_rate, io_floor, output_bytes
    from primerge.bench.report import Floors

    rate = gemm_rate(args.repeats)
    log(f"floors: float32 GEMM at {rate / 1e9:.1f} GFLOP/s")
    io = {}
    for name, paths in {row.inputs: row.paths for row in rows}.items():
        io[name] = io_floor(paths, output_bytes(paths[0]), Path(args.workdir or tempfile.gettempdir()), args.repeats)
        log(f"floors: reading {name}'s {len(paths)} checkpoints and writing the merged model takes {io[name]:.2f}s")
    return Floors(io, rate)


def _run_sweeps(args: argparse.Namespace, runs: list, log: Callable[[str], None]) -> list[dict]:
    """Every ``--sweep`` axis over every method (module :mod:`primerge.bench.sweep`): the rows, each
    against the same method at the axis' first point, then the fitted exponents."""
    from primerge.bench.report import summarize
    from primerge.bench.runs import Row, write_recipe
    from primerge.bench.sweep import exponents, point_label, sweep_inputs

    base = zoo_spec(args)
    points = [(sweep, point, inputs) for sweep in args.sweep for point, inputs in sweep_inputs(sweep, base, args.cache, log)]

    def configs(workdir: Path) -> list:
        return [(Row(sweep.group, inputs.name, point_label(run, sweep.axis, point), len(inputs.models)),
                 write_recipe(workdir / f"recipe-{i}-{j}.yaml", inputs.base, inputs.models, run))
                for i, (sweep, point, inputs) in enumerate(points) for j, run in enumerate(runs)]

    paths = [p for _, _, inputs in points for p in _paths(inputs)]
    rows = _measure(args, paths, configs, log)
    return summarize(rows, None) + [fit for sweep in args.sweep for fit in exponents(rows, sweep, runs)]


def _paths(inputs) -> list[Path]:
    return [inputs.base, *(m["path"] if isinstance(m, dict) else m for m in inputs.models)]


def _measure(args: argparse.Namespace, paths: list[Path], make_configs: Callable[[Path], list],
             log: Callable[[str], None], warm=None) -> list:
    """Write the configurations' recipes into a scratch folder outside every input, run them
    interleaved ``--repeats`` times (the warm Ray rows in ``warm``), remove the folder; returns the
    measured rows."""
    from primerge.bench.runs import run_interleaved
    from primerge.io.writer import make_scratch, remove_scratch

    workdir, created = make_scratch(args.workdir, "primerge-bench-", paths)  # never inside an input
    try:
        configs = make_configs(workdir)
        log(f"running {len(configs)} configurations x {args.repeats} repeats (interleaved), "
            f"device {args.device}, {os.cpu_count()} CPUs visible")
        run_interleaved(configs, args.repeats, workdir, args.device, log, shard_size=args.shard_size, warm=warm)
    finally:
        remove_scratch(workdir, created)
    return [row for row, _ in configs]


def _accuracy(inputs, runs: list, log: Callable[[str], None]):
    """PRIME's ``svd: auto`` (or the first PRIME run's own setting) against its exact path."""
    from primerge.bench.accuracy import truncation_error
    from primerge.bench.runs import MethodRun, parse_method

    fast = next((r for r in runs if r.method == "prime" and "svd" not in r.parameters), parse_method("prime"))
    exact = MethodRun("prime:svd=exact", "prime", {**fast.parameters, "svd": "exact"})
    start = time.perf_counter()
    error = truncation_error(inputs, fast, exact)
    log(f"accuracy: {fast.label} vs {exact.label}: relative error {error.total:.2e} over all matrices, "
        f"worst matrix {error.worst:.2e}; storing the exact result in the output dtype moves it by "
        f"{error.rounding:.2e} ({time.perf_counter() - start:.1f}s)")
    return error


@contextmanager
def _ray_cluster(args: argparse.Namespace, log: Callable[[str], None]) -> Iterator[str | None]:
    """With ``--ray-workers N``: a private one-node Ray cluster of N CPUs for the Ray rows (started
    once, so the rows measure merging on Ray, not starting a cluster); else nothing. Its node keeps
    up to 4N idle workers (Ray's default keeps one per CPU and stops the oldest idle ones beyond
    that as soon as another job starts its own: each cold row's driver would stop the warm
    driver's workers)."""
    if not args.ray_workers:
        yield None
        return
    from primerge.bench.cluster import local_cluster

    start = time.perf_counter()
    with local_cluster([args.ray_workers], gpus=args.ray_workers * args.gpus_per_worker,
                       idle_workers=4 * args.ray_workers) as address:
        log(f"ray: a local cluster at {address} ({args.ray_workers} CPUs) started in "
            f"{time.perf_counter() - start:.1f}s")
        yield address


@contextmanager
def _warm_driver(args: argparse.Namespace, address: str | None, log: Callable[[str], None]):
    """With a Ray cluster: the warm driver of the warm Ray rows (:mod:`primerge.bench.warm`), its
    session open; else nothing."""
    if address is None:
        yield None
        return
    from primerge.bench.warm import WarmDriver

    with WarmDriver(address, args.ray_workers, args.gpus_per_worker) as warm:
        log(f"ray: the warm driver started in {warm.started_s:.1f}s (its session opened in {warm.opened_s:.1f}s, "
            f"{warm.warm_workers} workers warm)")
        yield warm


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from primerge.bench.report import format_table, write_csv
    from primerge.util.cache_dirs import cache_root

    result = run_bench(args)
    print()
    print(f"machine: {os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, device {args.device}; medians of {args.repeats} runs; *_x = ratio to "
          f"{BASELINE} (methods) or to the first row of the pair (tasks, depth)")
    print(format_table(result))
    csv_path = Path(args.csv) if args.csv else cache_root(args.cache) / "bench" / "results.csv"
    print(f"\nCSV: {write_csv(csv_path, result)}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help="comma-separated methods, each NAME or NAME:key=value;key=value "
                             f"(default {DEFAULT_METHODS}); {BASELINE} is always included")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration; medians (default 3)")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the zoo (default 8)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="width scale: 1.0 = hidden 768, vocab 32000, ~100M parameters (default 1.0)")
    parser.add_argument("--hidden", type=int, metavar="N",
                        help="the zoo has LLaMA's shapes at hidden size N (a multiple of 64; head dim 64, a "
                             "quarter as many KV heads, intermediate 256·⌈8N/3/256⌉, vocab 32000) instead of --scale")
    parser.add_argument("--noise-floor", type=float, metavar="F",
                        help="realistic spectra: every matrix task vector is a few strong directions over a "
                             "Gaussian noise floor holding the share F of its energy (e.g. 0.5), instead of the "
                             "default zoo's power-law tail")
    parser.add_argument("--tasks", type=int, default=8, help="fine-tunes in the zoo (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="zoo generation seed (default 0)")
    parser.add_argument("--recipe", help="benchmark this recipe's base and models instead of the zoo")
    parser.add_argument("--device", default="cpu", help="passed to every merge: cpu, cuda or auto")
    parser.add_argument("--cache", type=Path,
                        help="cache folder (default: $PRIMERGE_CACHE, else ~/.cache/primerge)")
    parser.add_argument("--workdir", help="where merged outputs are written (default: system temp)")
    parser.add_argument("--csv", help="CSV output path (default: <cache>/bench/results.csv)")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false",
                        help="skip the T=4 vs T=8 and half-depth vs full-depth rows")
    parser.add_argument("--no-accuracy", dest="accuracy", action="store_false",
                        help="skip PRIME's truncated-vs-exact SVD error check")
    parser.add_argument("--no-floors", dest="floors", action="store_false",
                        help="skip the floors: the I/O floor (reading the inputs, writing the output) and the "
                             "compute floor (each merge's SVD flops at the machine's measured GEMM rate)")
    parser.add_argument("--ray-workers", type=int, default=0, metavar="N",
                        help="also run every method on a local Ray cluster with N workers (pip install "
                             "'primerge[ray]'), cold (a fresh driver per merge, start-up included) and warm (in "
                             "one driver holding a Ray session); ratios against the same method run locally")
    parser.add_argument("--shard-size", help="output shard size of every merge (default primerge's, 2GiB); Ray "
                        "rows split the shards into units sized for the workers whatever this size")
    parser.add_argument("--sweep", action="append", type=_sweep, metavar="AXIS=V1,V2,...",
                        help="instead of the methods table: every method at each point of a zoo axis, hidden "
                             "(e.g. hidden=512,1024,2048,4096) or tasks (e.g. tasks=2,4,8,16), with the fitted "
                             "exponent of engine time, wall time and peak RSS; repeatable; the zoo's other "
                             "settings come from --layers/--scale/--tasks, its vocabulary is 32000 rows")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0,
                        help="GPUs per Ray worker (with --ray-workers and --device cuda)")


def _sweep(text: str):
    from primerge.bench.sweep import parse_sweep

    return parse_sweep(text)


def register(subparsers) -> None:
    """Add ``bench`` to the main CLI's argparse subparsers."""
    parser = subparsers.add_parser(
        "bench", help="measure wall time, CPU time and peak RSS of merges on a cached LLaMA-style zoo",
        description=bench.__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.set_defaults(func=cmd_bench)
