"""Benchmark: merge time and peak RSS against the number of tensors (tiny tensors).

A checkpoint with N tensors of 8 float32 values each (base + ``--models`` fine-tunes, one
safetensors file each) is merged with Task Arithmetic in a child process
(``python -m primerge.bench RECIPE OUT cpu``, the whole merge including the read-back check and
manifest); wall time, the engine's own time and peak RSS (the child's rusage) are reported for
each N. Reading, planning, writing and sealing must be linear in N: the last column (µs per
tensor) should stay flat as N grows by 10x.

    python benchmarks/many_tensors.py                      # N = 2k, 20k, 200k
    python benchmarks/many_tensors.py --counts 2000 4000 --timeout 300

Run it against another checkout (e.g. the previous release) with PYTHONPATH=<checkout>/src.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from primerge.bench.runs import MERGED_LINE, RUNNER, Measurement


def make_checkpoints(folder: Path, count: int, models: int) -> tuple[Path, list[Path]]:
    """Base and fine-tunes with ``count`` tensors of shape (8,) named like a deep model's."""
    gen = torch.Generator().manual_seed(count)
    base = {f"model.layers.{i // 16}.block{i % 16}.weight": torch.randn(8, generator=gen) for i in range(count)}
    paths = []
    for label in ["base", *(f"ft{t}" for t in range(models))]:
        state = base if label == "base" else {k: v + 0.01 * torch.randn(8, generator=gen) for k, v in base.items()}
        path = folder / f"{label}.safetensors"
        save_file(state, str(path))
        paths.append(path)
    return paths[0], paths[1:]


def run(count: int, models: int, method: str, timeout: float, work: Path) -> dict:
    folder = work / f"n{count}"
    folder.mkdir()
    start = time.perf_counter()
    base, fts = make_checkpoints(folder, count, models)
    made = time.perf_counter() - start
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"base": str(base), "models": [str(m) for m in fts], "method": method}))
    out = folder / "merged"
    row = {"tensors": count, "generate_s": made}
    try:
        m = measure(recipe, out, timeout)
    except subprocess.TimeoutExpired:
        row.update(wall_s=float("inf"), merge_s=float("inf"), rss_mib=float("nan"))
        return row
    row.update(wall_s=m.wall_s, merge_s=m.merge_s, rss_mib=m.rss_mib)
    shutil.rmtree(folder, ignore_errors=True)
    return row


def measure(recipe: Path, out: Path, timeout: float) -> Measurement:
    """The child's wall time, engine time and peak RSS (``os.wait4``); killed past ``timeout``."""
    cmd = [*RUNNER, str(recipe), str(out), "cpu"]
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read().decode(errors="replace")
    if proc.returncode == -signal.SIGKILL:
        raise subprocess.TimeoutExpired(cmd, timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"merge failed (exit {proc.returncode}):\n{text[-2000:]}")
    found = MERGED_LINE.findall(text)
    return Measurement(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024,
                             float(found[-1]) if found else float("nan"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[2000, 20000, 200000])
    parser.add_argument("--models", type=int, default=2)
    parser.add_argument("--method", default="task_arithmetic")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per merge before it is given up")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="many-tensors-"))
    rows = []
    try:
        for count in args.counts:
            row = run(count, args.models, args.method, args.timeout, work)
            rows.append(row)
            print(f"N={count}: wall {row['wall_s']:.2f}s engine {row['merge_s']:.2f}s "
                  f"rss {row['rss_mib']:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.method}, T = {args.models}, tensors of 8 float32 values\n")
    print("| tensors | wall s | engine s | µs per tensor (wall) | peak RSS MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tensors']} | {r['wall_s']:.2f} | {r['merge_s']:.2f} | "
              f"{1e6 * r['wall_s'] / r['tensors']:.0f} | {r['rss_mib']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
