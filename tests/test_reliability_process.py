"""Real merges in subprocesses: interruption at any point, SIGKILL, a file-size limit, thread counts.

The zoo is a synthetic decoder-like checkpoint set (a few hundred KB per tensor) so one
merge takes about a second after start-up, long enough to be interrupted in every phase.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from primerge.io.manifest import verify_folder
from primerge.io.writer import LOCK_SUFFIX, TEMP_MARK

pytestmark = pytest.mark.slow

SHAPES = {f"layers.{i}.{kind}": shape for i in range(12)
          for kind, shape in {"attn.q.weight": (192, 192), "attn.v.weight": (96, 192), "mlp.up.weight": (384, 192),
                              "mlp.down.weight": (192, 384), "norm.weight": (192,)}.items()}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("process_zoo")
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen) * 0.02 for k, s in SHAPES.items()}
    base["embed.weight"] = torch.randn(512, 192, generator=gen)
    paths = []
    for t in range(4):
        state = {}
        for k, v in base.items():
            delta = torch.randn(v.shape, generator=gen) * 1e-3
            if v.dim() == 2:
                delta += torch.randn(v.shape[0], 4, generator=gen) @ torch.randn(4, v.shape[1], generator=gen) * 2e-3
            state[k] = (v + delta).to(torch.bfloat16)
        folder = root / f"ft{t}"
        folder.mkdir()
        save_file(state, str(folder / "model.safetensors"))
        (folder / "config.json").write_text("{}")
        paths.append(folder)
    (root / "base").mkdir()
    save_file({k: v.to(torch.bfloat16) for k, v in base.items()}, str(root / "base" / "model.safetensors"))
    (root / "base" / "config.json").write_text('{"model_type": "toy"}')
    return {"root": root, "base": root / "base", "models": paths}


def recipe(zoo, folder: Path, method: str, **parameters) -> Path:
    path = folder / f"{method}.yaml"
    path.write_text(yaml.safe_dump({"base": str(zoo["base"]), "models": [str(m) for m in zoo["models"]],
                                    "method": method, "parameters": parameters}))
    return path


def primerge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "primerge", *args]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.primerge-*"))


def merge_args(recipe_path: Path, out: Path) -> list[str]:
    return ["merge", str(recipe_path), "--out", str(out), "--quiet", "--shard-size", "400KB"]


def test_interrupting_a_merge_at_any_point_loses_nothing(zoo, tmp_path):
    """SIGINT and SIGTERM at 10 moments from start-up to past the end of a TIES merge (model-wide
    trim: two pre-passes, then merge, write, read-back check, rename): inputs untouched; the output
    is absent or complete and identical to an uninterrupted run's; nothing else is left; a rerun
    succeeds."""
    before = digest(zoo["root"])
    path = recipe(zoo, tmp_path, "ties", trim_scope="model")
    start = time.perf_counter()
    subprocess.run(primerge_cmd("--version"), check=True, capture_output=True)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    subprocess.run(primerge_cmd(*merge_args(path, tmp_path / "reference")), check=True)
    work = time.perf_counter() - start - startup
    reference = digest(tmp_path / "reference")

    outcomes = []
    for i, fraction in enumerate([-0.5, 0.0, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0, 1.2]):
        sig = (signal.SIGINT, signal.SIGTERM)[i % 2]
        out = tmp_path / f"out{i}"
        child = subprocess.Popen(primerge_cmd(*merge_args(path, out)), stderr=subprocess.PIPE, text=True)
        time.sleep(max(0.0, startup + work * fraction))
        child.send_signal(sig)
        _, err = child.communicate(timeout=120)
        outcomes.append(child.returncode)
        if out.exists():  # finished before the signal landed (or just as it did): complete and verified
            assert digest(out) == reference, (fraction, child.returncode, err)
        elif child.returncode in (130, 143):  # primerge's own handling: one line, no traceback
            assert "Traceback" not in err, err
        else:  # the signal came during interpreter start-up, before primerge ran
            assert child.returncode in (-sig, 1), (fraction, child.returncode, err)
        assert leftovers(out) == [], (fraction, leftovers(out))
        assert digest(zoo["root"]) == before
    assert any(code in (130, 143) for code in outcomes), outcomes  # some landed mid-merge

    rerun = tmp_path / "out0"
    subprocess.run(primerge_cmd(*merge_args(path, rerun), "--force"), check=True)
    assert digest(rerun) == reference


def test_sigkill_leaves_only_a_marked_folder_and_its_lock_that_a_rerun_clears(zoo, tmp_path):
    path = recipe(zoo, tmp_path, "prime")
    out = tmp_path / "merged"
    child = subprocess.Popen(primerge_cmd(*merge_args(path, out)))
    deadline = time.monotonic() + 60
    while not any(p.glob("*.safetensors") for p in leftovers(out)):  # it is writing shards
        assert time.monotonic() < deadline and child.poll() is None, "the merge ended before it was killed"
        time.sleep(0.02)
    child.kill()
    child.wait()
    marked = leftovers(out)  # the temporary folder, and its lock file that no process holds now
    assert not out.exists() and len(marked) == 2 and TEMP_MARK in marked[0].name
    assert marked[1].name == marked[0].name + LOCK_SUFFIX and marked[0].is_dir()
    subprocess.run(primerge_cmd(*merge_args(path, out)), check=True)
    assert leftovers(out) == [] and verify_folder(out).ok


def test_a_file_size_limit_fails_the_write_cleanly(zoo, tmp_path):
    """RLIMIT_FSIZE makes the next shard write fail with EFBIG, as a full disk fails it with ENOSPC."""
    path = recipe(zoo, tmp_path, "task_arithmetic")
    out = tmp_path / "merged"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))

    done = subprocess.run(primerge_cmd(*merge_args(path, out)), preexec_fn=limit, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("primerge: error: ") and "Traceback" not in done.stderr
    assert "write failed" in done.stderr and "File too large" in done.stderr, done.stderr
    assert not out.exists() and leftovers(out) == []


def test_byte_identical_across_thread_counts(zoo, tmp_path):
    """A merge's files are the same bytes in a process with 1 and with 2 threads (primerge.util.deterministic).
    Every method's updates with 1 and 2 threads, as the stream computes them: the method contract's
    'threads' (tests/test_method_contract.py)."""
    path = recipe(zoo, tmp_path, "prime", svd="randomized")
    outputs = []
    for threads in (1, 2):
        code = (f"import torch; torch.set_num_threads({threads}); from primerge.cli.main import main; "
                f"assert main({merge_args(path, tmp_path / f'prime-{threads}')!r}) == 0; "
                f"assert torch.get_num_threads() == {threads}")
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        outputs.append(digest(tmp_path / f"prime-{threads}"))
    assert outputs[0] == outputs[1]


@pytest.mark.skipif(os.cpu_count() == 1, reason="needs two cores for two threads to matter")
def test_two_threads_are_really_used(zoo):
    """Guard for the test above: torch in a child really runs with the thread count it is given."""
    code = "import torch; torch.set_num_threads(2); print(torch.get_num_threads())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "2"
