"""Experiment: peak RSS of a merge when safetensors tensors are read with plain reads
instead of through safetensors' memory map (a monkeypatch of Checkpoint.load).

With the memory map, every page of every input file that a merge touches stays mapped,
and counts in the process's RSS, until the checkpoint is closed at the end of the merge:
peak RSS then grows with the total input size (depth x models), not with the largest
tensor. Reading each tensor with ``readinto`` into a fresh buffer keeps only the
tensors in use resident.

    python benchmarks/rss_pread.py --zoo-layers 4 8 --repeats 2     # driver (interleaved)
    python benchmarks/rss_pread.py --child RECIPE OUT DEVICE        # one patched merge
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import torch

from primerge.bench.runs import Inputs, child_merge, measure_merge, parse_methods, write_recipe
from primerge.bench.zoo import ZooSpec, build_zoo
from primerge.io import readers


def patch_checkpoint_load() -> None:
    """Replace Checkpoint.load for .safetensors files by a header lookup + readinto."""
    original = readers.Checkpoint.load
    headers: dict[Path, tuple[int, dict]] = {}

    def load(self, name: str) -> torch.Tensor:
        info = self._infos[name]
        if info.file.suffix != ".safetensors":
            return original(self, name)
        if info.file not in headers:
            with open(info.file, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                headers[info.file] = (8 + size, json.loads(f.read(size)))
        data_start, header = headers[info.file]
        start, end = header[name]["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        with open(info.file, "rb", buffering=0) as f:
            f.seek(data_start + start)
            f.readinto(buffer.numpy().data)
        return buffer.view(info.dtype).reshape(info.shape)

    readers.Checkpoint.load = load


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=3, metavar=("RECIPE", "OUT", "DEVICE"))
    parser.add_argument("--zoo-layers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--methods", default="task_arithmetic,prime")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        patch_checkpoint_load()
        return child_merge(args.child)
    patched_runner = [sys.executable, str(Path(__file__).resolve()), "--child"]
    work = Path(tempfile.mkdtemp(prefix="rss-pread-"))
    configs = []
    try:
        for layers in args.zoo_layers:
            folder = build_zoo(ZooSpec(layers=layers, scale=args.scale))
            inputs = Inputs.from_zoo(f"L{layers}", folder, 8)
            for run in parse_methods(args.methods):
                recipe = write_recipe(work / f"r{len(configs)}.yaml", inputs.base, inputs.models, run)
                for variant, runner in (("mmap", None), ("pread", patched_runner)):
                    configs.append((f"L{layers} {run.label} {variant}", recipe, runner, []))
        for _ in range(args.repeats):
            for label, recipe, runner, results in configs:
                m = measure_merge(recipe, work / "out", "cpu", runner)
                results.append(m)
                print(f"{label:<32} wall {m.wall_s:6.2f}s merge {m.merge_s:6.2f}s rss {m.rss_mib:6.0f} MiB", flush=True)
        print("\n| config | wall_s | merge_s | peak RSS MiB |\n|---|---|---|---|")
        for label, _, _, results in configs:
            med = lambda a: sorted(getattr(r, a) for r in results)[len(results) // 2]  # noqa: E731
            print(f"| {label} | {med('wall_s'):.2f} | {med('merge_s'):.2f} | {med('rss_mib'):.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
