"""``primerge bench``: wall time, CPU time and peak memory of whole merges, measured.

A synthetic model zoo with the tensor names and shapes of a LLaMA-style decoder
(``embed_tokens``, q/k/v/o with grouped KV heads, gate/up/down, RMS norms,
``lm_head``) is generated once, tensor by tensor, into the cache
(``$PRIMERGE_CACHE``, else ``$XDG_CACHE_HOME/primerge``, else ~/.cache/primerge,
under ``bench/<key>``, the key naming every setting). Its task vectors have the
structure of real fine-tunes: a few strong directions shared by all tasks (with
task-specific weights), a few task-specific ones, a decaying tail and noise.

Every merge runs in its own child process (``python -m primerge.bench RECIPE OUT
DEVICE``, the same merge as ``primerge merge --force --quiet``); its
wall time, CPU time (user + system) and peak RSS come from ``os.wait4`` (the
child's own ``rusage``), and the engine's own merge time from its last output
line. Runs are interleaved over methods, each statistic is the median of
``--repeats`` runs, and ratios are taken against ``task_arithmetic`` measured in
the same session. Scaling rows compare T = 4 with T = 8 models and the zoo at
half depth with full depth; an accuracy row compares PRIME's automatic
(randomized) truncated SVD with its exact path on the float32 merged updates.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

#: Bumped whenever the generated tensors change, so stale caches are never reused.
GENERATOR_VERSION = 1
#: Element RMS of the base weights (LLaMA's initializer_range) and of every task vector.
BASE_STD = 0.02
TAU_RMS = 1e-3
#: Strong directions per matrix: shared by every task (task-weighted) and task-specific.
SHARED_DIRECTIONS = (1.0, 0.8, 0.6)
SPECIFIC_DIRECTIONS = (1.0, 0.8, 0.6)
#: Energy (squared Frobenius norm) fractions of a matrix task vector.
ENERGY = {"shared": 0.30, "specific": 0.25, "tail": 0.35, "noise": 0.10}
#: The tail has rank r_full // TAIL_DIVISOR and singular values ∝ j^-TAIL_DECAY.
TAIL_DIVISOR = 4
TAIL_DECAY = 0.7

DEFAULT_METHODS = "task_arithmetic,ties,tsv,tsv:svd=exact,prime,prime:svd=exact"
BASELINE = "task_arithmetic"


def cache_root(cache: str | Path | None = None) -> Path:
    """``cache``, else ``$PRIMERGE_CACHE``, else ``$XDG_CACHE_HOME/primerge``, else ~/.cache/primerge."""
    if cache is not None:
        return Path(cache).expanduser()
    if os.environ.get("PRIMERGE_CACHE"):
        return Path(os.environ["PRIMERGE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "primerge"


# --------------------------------------------------------------------------- the zoo


@dataclass(frozen=True)
class ZooSpec:
    """A LLaMA-style decoder zoo: base + ``tasks`` fine-tunes, bf16.

    ``scale`` 1.0 gives hidden 768, intermediate 2048, 12 query / 4 KV heads and a
    32,000-token vocabulary: about 100M parameters with 8 layers.
    """

    layers: int = 8
    scale: float = 1.0
    tasks: int = 8
    seed: int = 0

    heads = 12
    kv_heads = 4

    @property
    def hidden(self) -> int:
        return self.heads * max(1, round(64 * self.scale))

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def intermediate(self) -> int:
        return 32 * max(1, round(self.hidden * 8 / 3 / 32))

    @property
    def vocab(self) -> int:
        return max(64, round(32000 * self.scale))

    @property
    def key(self) -> str:
        return f"llama-L{self.layers}-s{self.scale:g}-T{self.tasks}-seed{self.seed}-v{GENERATOR_VERSION}"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, in the order of a Hugging Face LlamaForCausalLM."""
        h, kv, f = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)),
                (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    def parameters(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def config(self) -> dict:
        """A Hugging Face ``config.json`` for the architecture."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "max_position_embeddings": 2048, "tie_word_embeddings": False,
        }


def _generator(*keys: object) -> torch.Generator:
    digest = hashlib.sha256("/".join(map(str, keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm().clamp_min(1e-30)


def _directions(m: int, n: int, weights: Sequence[float], g: torch.Generator) -> torch.Tensor:
    """Σ_j w_j u_j v_jᵀ with orthonormal u (m) and v (n), unit Frobenius norm."""
    k = len(weights)
    U = torch.linalg.qr(torch.randn(m, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=g))[0]
    return _unit((U * torch.tensor(weights)) @ V.T)


def base_tensor(spec: ZooSpec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """θ₀ in float32: RMS norms are ones, every other weight N(0, 0.02²)."""
    if len(shape) == 1:
        return torch.ones(shape)
    return BASE_STD * torch.randn(shape, generator=_generator(spec.seed, name, "base"))


def task_vector(spec: ZooSpec, name: str, shape: tuple[int, ...], task: int) -> torch.Tensor:
    """τ_t in float32 with element RMS ``TAU_RMS``, seeded by (seed, name, task).

    A matrix gets shared directions (the same u, v for all tasks, task-perturbed weights),
    task-specific directions, a Gaussian-factor tail of rank r_full/4 with singular
    values ∝ j^-0.7, and i.i.d. noise, in the energy shares of ``ENERGY``. A vector gets noise.
    """
    g = _generator(spec.seed, name, "task", task)
    if len(shape) == 1:
        return TAU_RMS * torch.randn(shape, generator=g)
    m, n = shape
    shared_weights = [w * (1.0 + 0.25 * float(torch.randn((), generator=g))) for w in SHARED_DIRECTIONS]
    shared = _directions(m, n, shared_weights, _generator(spec.seed, name, "shared"))
    specific = _directions(m, n, SPECIFIC_DIRECTIONS, g)
    rank = max(1, min(m, n) // TAIL_DIVISOR)
    decay = torch.arange(1, rank + 1, dtype=torch.float32).pow(-TAIL_DECAY)
    tail = _unit((torch.randn(m, rank, generator=g) * decay) @ torch.randn(rank, n, generator=g))
    noise = _unit(torch.randn(m, n, generator=g))
    tau = (math.sqrt(ENERGY["shared"]) * shared + math.sqrt(ENERGY["specific"]) * specific
           + math.sqrt(ENERGY["tail"]) * tail + math.sqrt(ENERGY["noise"]) * noise)
    return tau * (TAU_RMS * math.sqrt(m * n))


class StreamingSafetensors:
    """Write one safetensors file tensor by tensor: the header is planned from the shapes,
    so only the tensor being written is ever held in memory."""

    def __init__(self, path: Path, tensors: Iterable[tuple[str, tuple[int, ...]]],
                 dtype: torch.dtype = torch.bfloat16):
        codes = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
        size = torch.empty((), dtype=dtype).element_size()
        header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        self._order: list[tuple[str, tuple[int, ...]]] = []
        offset = 0
        for name, shape in tensors:
            nbytes = math.prod(shape) * size
            header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tuple(shape)))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.dtype = dtype
        self._next = 0
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected, shape = self._order[self._next]
        if name != expected or tuple(tensor.shape) != shape or tensor.dtype != self.dtype:
            raise ValueError(f"expected {expected} {shape} {self.dtype}, got {name} "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        self._file.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
        self._file.close()


def model_names(spec: ZooSpec) -> list[str]:
    return ["base"] + [f"ft-{t}" for t in range(spec.tasks)]


def zoo_folder(spec: ZooSpec, cache: str | Path | None = None) -> Path:
    return cache_root(cache) / "bench" / spec.key


def build_zoo(spec: ZooSpec, cache: str | Path | None = None,
              log: Callable[[str], None] = print) -> Path:
    """The zoo's folder (``base/``, ``ft-0/`` ...), generated on first use and then reused.

    Generation streams: each tensor of the base and of every fine-tune is made, cast to
    bf16 and written before the next one is made. The folder appears atomically.
    """
    folder = zoo_folder(spec, cache)
    if (folder / "zoo.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{spec.key}-", dir=folder.parent))
    try:
        start = time.perf_counter()
        tensors = spec.tensors()
        writers = {}
        for label in model_names(spec):
            (temp / label).mkdir()
            (temp / label / "config.json").write_text(json.dumps(spec.config(), indent=2) + "\n")
            writers[label] = StreamingSafetensors(temp / label / "model.safetensors", tensors)
        for name, shape in tensors:
            base = base_tensor(spec, name, shape).to(torch.bfloat16)
            writers["base"].write(name, base)
            base32 = base.float()
            for t in range(spec.tasks):
                tuned = (base32 + task_vector(spec, name, shape, t)).to(torch.bfloat16)
                writers[f"ft-{t}"].write(name, tuned)
        for w in writers.values():
            w.close()
        info = {**asdict(spec), "key": spec.key, "parameters": spec.parameters(),
                "generator_version": GENERATOR_VERSION, "config": spec.config()}
        (temp / "zoo.json").write_text(json.dumps(info, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(temp, folder)
        log(f"generated zoo {spec.key} ({spec.parameters() / 1e6:.1f}M parameters x "
            f"{spec.tasks + 1} checkpoints) in {time.perf_counter() - start:.1f}s -> {folder}")
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


# --------------------------------------------------------------------------- methods and recipes


@dataclass(frozen=True)
class MethodRun:
    """A method and parameter overrides, written ``name`` or ``name:key=value;key=value``."""

    label: str
    method: str
    parameters: dict


def parse_method(text: str) -> MethodRun:
    text = text.strip()
    method, _, rest = text.partition(":")
    params: dict = {}
    for item in filter(None, (p.strip() for p in rest.split(";"))):
        key, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"method option '{item}' in '{text}' is not key=value")
        params[key.strip()] = yaml.safe_load(value.strip())
    return MethodRun(text, method.strip(), params)


def parse_methods(text: str) -> list[MethodRun]:
    """Split ``a,b:k=v;k2=v2,c`` into runs (commas separate methods)."""
    return [parse_method(t) for t in text.split(",") if t.strip()]


def write_recipe(path: Path, base: Path, models: Sequence[Path | dict], run: MethodRun,
                 extra: dict | None = None) -> Path:
    data = {**(extra or {}), "base": str(base), "models": [m if isinstance(m, dict) else str(m) for m in models],
            "method": run.method, "parameters": run.parameters}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass(frozen=True)
class Inputs:
    """What a benchmark merges: base, models and any extra recipe fields."""

    name: str
    base: Path
    models: tuple
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_zoo(cls, name: str, folder: Path, tasks: int) -> "Inputs":
        return cls(name, folder / "base", tuple(folder / f"ft-{t}" for t in range(tasks)))

    @classmethod
    def from_recipe(cls, path: Path) -> "Inputs":
        from primerge.recipe import load_recipe

        recipe = load_recipe(path)
        models = tuple({"path": str(m.path), "weight": m.weight, **({"name": m.name} if m.name else {})}
                       for m in recipe.models)
        extra = {k: v for k, v in (("matrices", recipe.matrices), ("task_specific", recipe.task_specific),
                                   ("seed", recipe.seed)) if v is not None}
        return cls(path.stem, recipe.base, models, extra)

    def subset(self, name: str, tasks: int) -> "Inputs":
        return Inputs(name, self.base, self.models[:tasks], self.extra)


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Measurement:
    """One merge in a child process: seconds, CPU seconds, peak RSS (MiB), engine seconds."""

    wall_s: float
    cpu_s: float
    rss_mib: float
    merge_s: float


MERGED_LINE = re.compile(r"merged with \S+ in ([0-9.]+)s")


#: The child command: this module's runner (``primerge merge`` with a precise time line).
RUNNER = [sys.executable, "-m", "primerge.bench"]


def child_merge(argv: Sequence[str]) -> int:
    """``RECIPE OUT DEVICE``: the whole merge as ``primerge merge --force --quiet`` does it,
    then one line ``merged with METHOD in SECONDSs`` (the engine's time, to the microsecond)."""
    from primerge.api import merge_recipe

    recipe, out, device = argv
    result = merge_recipe(recipe, out=out, device=device, force=True, quiet=True)
    print(f"merged with {result.method} in {result.seconds:.6f}s")
    return 0


def measure_merge(recipe: Path, out: Path, device: str = "cpu",
                  runner: Sequence[str] | None = None) -> Measurement:
    """Merge in a child process (``runner``, default :data:`RUNNER`, given RECIPE OUT DEVICE);
    measure it with the child's own rusage from ``os.wait4``."""
    cmd = [*(runner or RUNNER), str(recipe), str(out), device]
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"merge of {recipe} failed (exit {proc.returncode}):\n{text[-2000:]}")
    found = MERGED_LINE.findall(text)
    merge_s = float(found[-1]) if found else float("nan")
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    rss = usage.ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    return Measurement(wall, usage.ru_utime + usage.ru_stime, rss, merge_s)


@dataclass
class Row:
    """Medians of one configuration's runs and its ratios against the baseline."""

    group: str
    inputs: str
    label: str
    tasks: int
    runs: list[Measurement] = field(default_factory=list)
    note: str = ""

    def median(self, attr: str) -> float:
        return statistics.median(getattr(m, attr) for m in self.runs)

    def as_dict(self, baseline: "Row | None") -> dict:
        d = {"group": self.group, "inputs": self.inputs, "method": self.label, "T": self.tasks,
             "runs": len(self.runs)}
        for attr in ("wall_s", "cpu_s", "merge_s", "rss_mib"):
            d[attr] = round(self.median(attr), 3)
        for attr, key in (("wall_s", "wall_x"), ("merge_s", "merge_x"), ("rss_mib", "rss_x")):
            ref = baseline.median(attr) if baseline and baseline.runs else 0.0
            d[key] = round(self.median(attr) / ref, 3) if ref > 0 else ""
        d["note"] = self.note
        return d


def run_interleaved(configs: Sequence[tuple[Row, Path]], repeats: int, workdir: Path, device: str,
                    log: Callable[[str], None] = print, runner: Sequence[str] | None = None) -> None:
    """``repeats`` rounds, each merging every configuration once (interleaved)."""
    out = workdir / "merged"
    for rep in range(repeats):
        for row, recipe in configs:
            m = measure_merge(recipe, out, device, runner)
            row.runs.append(m)
            log(f"  [{rep + 1}/{repeats}] {row.inputs:<14} {row.label:<24} wall {m.wall_s:7.2f}s  "
                f"cpu {m.cpu_s:7.2f}s  merge {m.merge_s:7.2f}s  rss {m.rss_mib:7.0f} MiB")
    shutil.rmtree(out, ignore_errors=True)


# --------------------------------------------------------------------------- accuracy


def truncation_error(inputs: Inputs, fast: MethodRun, exact: MethodRun) -> tuple[float, float]:
    """‖θ_fast − θ_exact‖ / ‖θ_exact − θ₀‖ over every matrix parameter, on float32 updates.

    Returns (relative error over all matrices, worst single-matrix relative error).
    Computed in this process with the engine's own reader and methods, before the cast
    to the storage dtype (bf16 rounding of θ would otherwise swamp the comparison).
    """
    from primerge.engine import context
    from primerge.plan import build_plan
    from primerge.recipe import build_recipe

    def recipe(run: MethodRun):
        return build_recipe({**inputs.extra, "base": str(inputs.base), "models": list(
            m if isinstance(m, dict) else str(m) for m in inputs.models), "method": run.method,
            "parameters": run.parameters})

    r_fast, r_exact = recipe(fast), recipe(exact)
    p_fast, p_exact = r_fast.params, r_exact.params
    plan = build_plan(r_exact)
    diff2 = ref2 = 0.0
    worst = 0.0
    try:
        with torch.no_grad():
            for entry in plan.entries:
                if entry.kind != "matrix":
                    continue
                ctx = context(plan, entry)
                _, taus = plan.task_vectors(entry, torch.device("cpu"))
                u_exact = r_exact.spec.apply(taus, ctx, p_exact).double()
                u_fast = r_fast.spec.apply(taus, ctx, p_fast).double()
                d2, e2 = float((u_fast - u_exact).square().sum()), float(u_exact.square().sum())
                diff2, ref2 = diff2 + d2, ref2 + e2
                worst = max(worst, math.sqrt(d2 / e2) if e2 > 0 else 0.0)
    finally:
        plan.close()
    return math.sqrt(diff2 / ref2) if ref2 > 0 else 0.0, worst


# --------------------------------------------------------------------------- reporting

COLUMNS = ["group", "inputs", "method", "T", "runs", "wall_s", "cpu_s", "merge_s", "rss_mib",
           "wall_x", "merge_x", "rss_x", "note"]


def format_table(rows: Sequence[dict]) -> str:
    """A Markdown table of result dicts (``COLUMNS`` order)."""
    cells = [[str(r.get(c, "")) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(COLUMNS), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *(line(c) for c in cells)])


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _find(rows: Sequence[Row], group: str, label: str) -> Row | None:
    return next((r for r in rows if r.group == group and r.label == label), None)


def targets(rows: Sequence[Row], error: tuple[float, float] | None) -> list[str]:
    """The issue's targets, each 'met' or 'MISSED' with its numbers (where measured)."""
    lines = []

    def check(name: str, value: float, limit: float, fmt: str, below: bool = True) -> None:
        ok = value <= limit if below else value >= limit
        lines.append(f"{'met   ' if ok else 'MISSED'} {name}: {fmt.format(value)} "
                     f"({'≤' if below else '≥'} {fmt.format(limit)})")

    ta, prime = _find(rows, "methods", BASELINE), _find(rows, "methods", "prime")
    prime_exact = _find(rows, "methods", "prime:svd=exact")
    tsv_exact = _find(rows, "methods", "tsv:svd=exact")
    if ta and prime:
        check("PRIME wall / task_arithmetic wall", prime.median("wall_s") / ta.median("wall_s"), 2.0, "{:.2f}x")
        check("PRIME engine time / task_arithmetic engine time",
              prime.median("merge_s") / ta.median("merge_s"), 2.0, "{:.2f}x")
    if tsv_exact and prime:
        check("TSV(exact SVD) wall / PRIME wall", tsv_exact.median("wall_s") / prime.median("wall_s"),
              5.0, "{:.2f}x", below=False)
    if prime_exact and prime:
        lines.append(f"info   PRIME(exact SVD) wall / PRIME wall: "
                     f"{prime_exact.median('wall_s') / prime.median('wall_s'):.2f}x")
    if error is not None:
        check("PRIME truncated vs exact, relative error over all matrices", error[0], 1e-3, "{:.2e}")
        lines.append(f"info   worst single matrix relative error: {error[1]:.2e}")
    for method in (BASELINE, "prime"):
        t4, t8 = _find(rows, "tasks", f"{method} T=4"), _find(rows, "tasks", f"{method} T=8")
        if t4 and t8:
            check(f"{method} peak RSS T=8 / T=4", t8.median("rss_mib") / t4.median("rss_mib"), 1.5, "{:.2f}x")
            lines.append(f"info   {method} engine time T=8 / T=4: "
                         f"{t8.median('merge_s') / t4.median('merge_s'):.2f}x (linear in T: 2.00x)")
    for method in (BASELINE, "prime"):
        depth = [r for r in rows if r.group == "depth" and r.label.startswith(method + " ")]
        if len(depth) == 2:
            lines.append(f"info   {method} peak RSS {depth[1].label.split()[-1]} / {depth[0].label.split()[-1]}: "
                         f"{depth[1].median('rss_mib') / depth[0].median('rss_mib'):.2f}x "
                         f"(independent of depth: 1.00x)")
    return lines


# --------------------------------------------------------------------------- the command


def run_bench(args: argparse.Namespace, log: Callable[[str], None] = print) -> tuple[list[dict], list[str]]:
    """Run the benchmark described by parsed ``args``; returns (result dicts, target lines)."""
    runs = parse_methods(args.methods)
    if not any(r.label == BASELINE for r in runs):
        runs.insert(0, parse_method(BASELINE))
    from primerge.recipe import build_recipe  # validate every method before the long work

    for run in runs:
        build_recipe({"base": ".", "models": ["."], "method": run.method, "parameters": run.parameters})

    spec = ZooSpec(layers=args.layers, scale=args.scale, tasks=args.tasks, seed=args.seed)
    if args.recipe is not None:
        inputs = Inputs.from_recipe(Path(args.recipe))
    else:
        log(f"zoo: {spec.key}: {spec.parameters() / 1e6:.1f}M parameters per checkpoint, "
            f"{spec.tasks} fine-tunes (hidden {spec.hidden}, intermediate {spec.intermediate}, "
            f"vocab {spec.vocab})")
        inputs = Inputs.from_zoo(f"L{spec.layers}", build_zoo(spec, args.cache, log), spec.tasks)

    workdir = Path(tempfile.mkdtemp(prefix="primerge-bench-", dir=args.workdir))
    rows: list[Row] = []
    try:
        configs: list[tuple[Row, Path]] = []

        def add(group: str, inp: Inputs, run: MethodRun, label: str) -> None:
            row = Row(group, inp.name, label, len(inp.models))
            recipe = workdir / f"recipe-{len(configs)}.yaml"
            configs.append((row, write_recipe(recipe, inp.base, inp.models, run, inp.extra)))
            rows.append(row)

        for run in runs:
            add("methods", inputs, run, run.label)
        scaling = args.scaling and args.recipe is None
        if scaling:
            prime = parse_method("prime")
            baseline = parse_method(BASELINE)
            half = max(1, spec.tasks // 2)
            for run in (baseline, prime):
                add("tasks", inputs.subset(f"L{spec.layers}", half), run, f"{run.label} T={half}")
                add("tasks", inputs, run, f"{run.label} T={spec.tasks}")
            shallow = ZooSpec(layers=max(1, spec.layers // 2), scale=spec.scale, tasks=spec.tasks, seed=spec.seed)
            shallow_inputs = Inputs.from_zoo(f"L{shallow.layers}", build_zoo(shallow, args.cache, log), spec.tasks)
            for run in (baseline, prime):
                add("depth", shallow_inputs, run, f"{run.label} L={shallow.layers}")
                add("depth", inputs, run, f"{run.label} L={spec.layers}")
        log(f"running {len(configs)} configurations x {args.repeats} repeats (interleaved), "
            f"device {args.device}, {os.cpu_count()} CPUs visible")
        run_interleaved(configs, args.repeats, workdir, args.device, log)

        error = None
        if args.accuracy:
            fast = next((r for r in runs if r.method == "prime" and "svd" not in r.parameters), parse_method("prime"))
            exact = MethodRun("prime:svd=exact", "prime", {**fast.parameters, "svd": "exact"})
            start = time.perf_counter()
            error = truncation_error(inputs, fast, exact)
            log(f"accuracy: {fast.label} vs {exact.label}: relative error {error[0]:.2e} over all matrices, "
                f"worst matrix {error[1]:.2e} ({time.perf_counter() - start:.1f}s)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    return summarize(rows, error, inputs), targets(rows, error)


def summarize(rows: Sequence[Row], error: tuple[float, float] | None, inputs: Inputs | None = None) -> list[dict]:
    """Result dicts: method rows against ``task_arithmetic``, scaling rows against the first
    row of their pair (same method, T = 4 or half depth), then the accuracy row."""
    result: list[dict] = []
    for row in rows:
        if row.group == "methods":
            base = _find(rows, "methods", BASELINE)
        else:
            base = next(r for r in rows if r.group == row.group and r.label.split()[0] == row.label.split()[0])
        result.append(row.as_dict(base))
    if error is not None:
        result.append({"group": "accuracy", "inputs": inputs.name if inputs else "",
                       "method": "prime vs prime:svd=exact", "T": len(inputs.models) if inputs else "",
                       "note": f"rel_err={error[0]:.3e} worst_matrix={error[1]:.3e}"})
    return result


def cmd_bench(args: argparse.Namespace) -> int:
    result, lines = run_bench(args)
    print()
    print(f"machine: {os.cpu_count()} CPUs visible, torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, device {args.device}; medians of {args.repeats} runs; *_x = ratio to "
          f"{BASELINE} (methods) or to the first row of the pair (tasks, depth)")
    print(format_table(result))
    print()
    print("\n".join(lines))
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


def register(subparsers) -> None:
    """Add ``bench`` to the main CLI's argparse subparsers."""
    bench = subparsers.add_parser(
        "bench", help="measure wall time, CPU time and peak RSS of merges on a cached LLaMA-style zoo",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)


if __name__ == "__main__":
    sys.exit(child_merge(sys.argv[1:]))
