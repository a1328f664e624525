"""``primerge demo``: the PRIME paper's Table 1 on the offline benchmark, end to end.

1. Build or reuse the zoo (one fine-tune per task, :mod:`primerge.evaluation.zoo`).
2. Row "Base": a linear probe on the frozen base (:mod:`primerge.evaluation.probe`).
3. Row "Individual": each task's own fine-tune on its own test split.
4. One row per registered method (``primerge.list_methods()``, so methods added later join
   without touching this file): merge the zoo's bodies with the method at its registered
   defaults through the public ``primerge.merge`` (heads marked task-specific, kept unmerged),
   then score the merged body with each task's own head.

Columns: accuracy per task, Avg, and Normalized (mean over tasks of accuracy / Individual).

Evaluating a merged body costs far more than most merges, so scores are cached by content: the
key hashes the merged tensors themselves, the heads, the tasks' split fingerprints and the
evaluation settings. A rerun that produces bit-identical weights reuses the scores; any change
in a method's output (new code, new parameters) changes the key, so a cached score is never stale.
The report folder gets the table as Markdown and CSV, a grouped bar chart (PNG) and a JSON
record with the timings and the parameters of every row.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

import primerge
from primerge.util.errors import RecipeError
from primerge.evaluation.evaluate import average, evaluate_heads, normalized_accuracy
from primerge.evaluation.model import HEAD_PREFIX, HEAD_REGEX, body_from_state, head_from_tensors
from primerge.io.hf import load_tokenizer
from primerge.evaluation.probe import base_probe
from primerge.data.tasks import DEFAULT_TASKS, TaskSplit, load_splits
from primerge.evaluation.zoo import TrainingProtocol, Zoo, build_zoo
from primerge.io.destination import Destination, destination
from primerge.io.manifest import Ledger
from primerge.io.writer import atomic_folder
from primerge.util.cache_dirs import cache_root
from primerge.util.hashing import state_digest, tensor_bytes
from primerge.core.calibration_block import block_for
from primerge.core.purify_block import paper_rank_ratio

#: The report files as the demo wrote them before it wrote a manifest (such a folder is replaced).
REPORT_FILES = ("results.md", "results.csv", "results.png", "results.json")

MERGE_SEED = 42


@dataclass
class Row:
    """One line of the table: accuracies per task (fractions) plus what produced them."""

    label: str
    accuracy: dict[str, float]
    individual: dict[str, float]
    parameters: dict | None = None
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    setting: str | None = None  # PAVE or tuned setting, in words
    tuned: bool = False  # a setting chosen on validation data (the tuned table)

    @property
    def average(self) -> float:
        return average(self.accuracy)

    @property
    def normalized(self) -> float:
        return normalized_accuracy(self.accuracy, self.individual)

    def as_dict(self) -> dict:
        return {
            "row": self.label,
            "accuracy": self.accuracy,
            "average": self.average,
            "normalized": self.normalized,
            "parameters": self.parameters,
            "merge_seconds": self.merge_seconds,
            "eval_seconds": self.eval_seconds,
            "setting": self.setting,
            "tuned": self.tuned,
        }


@dataclass
class DemoResult:
    rows: list[Row]
    tasks: list[str]
    report: Path | None
    timings: dict[str, float] = field(default_factory=dict)
    zoo: Zoo | None = None
    splits: list[TaskSplit] = field(default_factory=list)
    protocol: TrainingProtocol | None = None
    seed: int = MERGE_SEED
    task_specs: list[str] = field(default_factory=list)  # the tasks as named (packaged names or files)
    pave: list[str] = field(default_factory=list)  # methods with PAVE rows
    pave_targets: list[str] = field(default_factory=list)


def select_methods(names: Sequence[str] | None, tasks: int) -> list:
    """Registered method specs for merging ``tasks`` fine-tunes: every method that merges that many
    (two-model methods such as slerp do not join a larger zoo's table), or those named (an unknown
    name, or one that cannot merge ``tasks`` models, raises RecipeError)."""
    if not names:
        return [spec for spec in primerge.list_methods() if spec.admits(tasks)]
    specs = [primerge.get_method(name) for name in names]
    if len({s.name for s in specs}) != len(specs):
        raise RecipeError("a method is named twice in --methods.")
    for spec in specs:
        spec.check_models(tasks)
    return specs


def merged_row(spec, zoo: Zoo, splits: Sequence[TaskSplit], tokenizer, zoo_heads: dict, seed: int,
               max_length: int, quiet: bool, purify: dict | None = None, data: dict | None = None) -> Row:
    """Merge the zoo with ``spec`` at its defaults, in memory, and score it (:func:`scored_row`).

    With ``purify`` the task vectors are PAVE-purified first (recipe field ``purify``) and the row
    is labelled so (``+ PAVE``, ``+ PAVE delta`` for ``target: delta``). A data-aware method
    (RegMean) gets ``data`` (model label -> task) as its calibration data (:func:`primerge.core.calibration_block.block_for`)."""
    start = time.perf_counter()
    result = primerge.merge(zoo.base, [str(p) for p in zoo.paths], method=spec.name,
                            task_specific=HEAD_REGEX, seed=seed, quiet=quiet, purify=purify,
                            calibration=block_for(spec, data or {}))
    label = f"{spec.name} (per-task)" if result.per_task else spec.name
    if purify is not None:
        label += " + PAVE" + (" delta" if purify.get("target") == "delta" else "")
    return scored_row(result, label, zoo, splits, tokenizer, zoo_heads, max_length,
                      time.perf_counter() - start)


def scored_row(result, label: str, zoo: Zoo, splits: Sequence[TaskSplit], tokenizer, zoo_heads: dict,
               max_length: int, merge_seconds: float) -> Row:
    """Score a merge's result on every test split with each task's head as the merge returned it
    (the zoo's head when it returned none).

    One merged body serves every task; a per-task method (``result.per_task``, e.g. EMR) gives
    each task its own rebuilt state, and task t is scored with task t's state."""
    start = time.perf_counter()
    heads = dict(zoo_heads)
    for name, tensors in (result.task_tensors or {}).items():
        if name in heads:
            heads[name] = head_of(tensors, f"the {result.method} merge's head of {name}")
    per_task = result.per_task and result.task_states is not None
    states = {s.name: result.task_states[s.name] if per_task else result.state_dict for s in splits}
    accuracy: dict[str, float] = {}
    groups = [[s] for s in splits] if per_task else [list(splits)]
    for group in groups:
        state = states[group[0].name]

        def score(state=state, group=group) -> dict[str, float]:
            body = body_from_state(zoo.base, state, f"the {result.method} merge")
            return evaluate_heads(body, tokenizer, group, heads, max_length=max_length)

        accuracy.update(cached_scores(zoo.root, state, heads, group, max_length, score))
    return Row(label, accuracy, zoo.individual, result.parameters, merge_seconds, time.perf_counter() - start)


def head_of(tensors: dict[str, torch.Tensor], origin: str) -> nn.Linear:
    """A task's head from its tensors, named ``classifier.weight``/``classifier.bias`` or
    ``weight``/``bias``."""
    stripped = {k[len(HEAD_PREFIX):] if k.startswith(HEAD_PREFIX) else k: v for k, v in tensors.items()}
    return head_from_tensors(stripped, origin)


def tensors_digest(state: dict[str, torch.Tensor], heads: dict, splits: Sequence[TaskSplit],
                   max_length: int, state_hex: str | None = None) -> str:
    """SHA-256 of the weights (:func:`state_digest`, or ``state_hex`` when already computed), of
    each task's head and split, and of the evaluation settings: equal digests mean equal scores."""
    digest = hashlib.sha256(f"eval-v2:{max_length}:{state_hex or state_digest(state)}".encode())
    for split in splits:
        head = heads[split.name]
        digest.update(split.fingerprint().encode())
        digest.update(tensor_bytes(head.weight) + tensor_bytes(head.bias))
    return digest.hexdigest()


def cached_scores(root: Path, state: dict, heads: dict, splits: Sequence[TaskSplit], max_length: int,
                  compute: Callable[[], dict[str, float]], state_hex: str | None = None) -> dict[str, float]:
    """Scores of a merged body from ``root/scores/<digest>.json``, computed and stored if absent."""
    path = root / "scores" / f"{tensors_digest(state, heads, splits, max_length, state_hex)}.json"
    if path.is_file():
        return {k: float(v) for k, v in json.loads(path.read_text()).items()}
    scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(scores, indent=2) + "\n")
    tmp.replace(path)
    return scores


def run_demo(
    tasks: Sequence[str] = DEFAULT_TASKS,
    methods: Sequence[str] | None = None,
    base: str | Path | None = None,
    cache: str | Path | None = None,
    report: str | Path | None = "demo-report",
    protocol: TrainingProtocol | None = None,
    seed: int = MERGE_SEED,
    progress: bool = True,
    log: Callable[[str], None] = print,
    pave: Sequence[str] = (),
    pave_targets: Sequence[str] = ("weight",),
) -> DemoResult:
    """Build/reuse the zoo, fill the table (Base, Individual, one row per method), write the report.

    Each method named in ``pave`` gets one more row per target in ``pave_targets`` whose task
    vectors are purified by PAVE (the authors' ρ for the method, every task purified, each
    task's own training split as calibration data)."""
    timings: dict[str, float] = {}
    protocol = protocol or TrainingProtocol()
    specs = select_methods(methods, len(tasks))
    target = report_destination(report, tasks, base, cache)  # checked before the long work
    clock = started = time.perf_counter()
    splits = load_splits(tasks)
    zoo = build_zoo(splits, base=base, protocol=protocol, cache=cache, progress=progress, log=log)
    timings["zoo_seconds"] = time.perf_counter() - clock
    clock = time.perf_counter()
    rows = [Row("Base (linear probe)", base_probe(zoo.base, splits, log=log), zoo.individual)]
    timings["probe_seconds"] = time.perf_counter() - clock
    rows.append(Row("Individual", zoo.individual, zoo.individual))
    tokenizer = load_tokenizer(zoo.base)
    zoo_heads = zoo.heads()
    data = {s.name: str(task) for s, task in zip(splits, tasks)}  # each task's training texts: PAVE, RegMean
    for spec in specs:
        log(f"merging {len(zoo.paths)} fine-tunes with {spec.name} and evaluating ...")
        row = merged_row(spec, zoo, splits, tokenizer, zoo_heads, seed, protocol.max_length, quiet=not progress,
                         data=data)
        log(f"{spec.name}: avg {100 * row.average:.1f}%, merge {row.merge_seconds:.0f}s, "
            f"evaluation {row.eval_seconds:.0f}s")
        rows.append(row)
    for spec in select_methods(pave, len(tasks)) if pave else []:
        for pave_target in pave_targets:
            log(f"merging with {spec.name} on PAVE-purified task vectors ({pave_target}) and evaluating ...")
            row = merged_row(spec, zoo, splits, tokenizer, zoo_heads, seed, protocol.max_length,
                             quiet=not progress, purify={"data": data, "target": pave_target}, data=data)
            row.setting = f"PAVE {pave_target}, ρ = {paper_rank_ratio(spec.name):g} (the authors'), every task purified"
            log(f"{row.label}: avg {100 * row.average:.1f}%, merge {row.merge_seconds:.0f}s")
            rows.append(row)
    timings["total_seconds"] = time.perf_counter() - started
    names = [s.name for s in splits]
    result = DemoResult(rows, names, None, timings, zoo, splits, protocol, seed, [str(t) for t in tasks],
                        list(pave), list(pave_targets))
    if target is not None:
        publish_report(result, target)
    return result


def report_destination(report: str | Path | None, tasks: Sequence[str], base: str | Path | None,
                       cache: str | Path | None, legacy: Sequence[str] = REPORT_FILES) -> Destination | None:
    """The checked report folder (never over the cache, the base or a task file; replaces only an
    earlier demo report, or a folder of ``legacy`` files, a report written without a manifest), or
    ``None`` without a report."""
    if report is None:
        return None
    inputs = [cache_root(cache), *([base] if base is not None else []), *(t for t in tasks if Path(t).suffix)]
    return destination(report, inputs, force=True, kind="demo-report", legacy=legacy)


@contextmanager
def report_folder(target: Destination) -> Iterator[Path]:
    """A temporary folder that becomes the report, with a manifest, when the block succeeds."""
    with atomic_folder(target) as folder:
        yield folder
        Ledger(folder, kind="demo-report").seal()


def publish_report(result: DemoResult, target: Destination) -> None:
    """Write ``result``'s report atomically at ``target`` (replacing only an earlier demo report)."""
    with report_folder(target) as folder:
        write_report(replace(result, report=folder), result.zoo, result.protocol, result.seed)
    result.report = target.path


def tuned_section(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    """The tuned table (each method at the setting chosen on validation data, scored on test
    once) and the settings, for results.md."""
    settings = "\n".join(f"- **{r.label}**: {r.setting}" for r in rows if r.tuned)
    return ("## Tuned on validation data (primerge tune), scored on test once\n\n"
            f"{markdown_table(rows, tasks)}\n\n### Tuned settings\n{settings}\n\n"
            "Trials, plots and recipes: `tuning/`.\n\n")


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def table_cells(rows: Sequence[Row], tasks: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    header = ["", *tasks, "Avg", "Normalized"]
    body = [[r.label, *(percent(r.accuracy[t]) for t in tasks), percent(r.average), percent(r.normalized)]
            for r in rows]
    return header, body


def text_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    """A fixed-width table for the terminal (accuracy %)."""
    header, body = table_cells(rows, tasks)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [header, *body]
    out = []
    for n, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: Sequence[Row], tasks: Sequence[str]) -> str:
    header, body = table_cells(rows, tasks)
    header[0] = "row"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], tasks: Sequence[str], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["row", *tasks, "avg", "normalized", "merge_seconds", "eval_seconds", "parameters",
                         "setting"])
        for r in rows:
            writer.writerow([
                r.label,
                *(f"{100 * r.accuracy[t]:.2f}" for t in tasks),
                f"{100 * r.average:.2f}",
                f"{100 * r.normalized:.2f}",
                "" if r.merge_seconds is None else f"{r.merge_seconds:.1f}",
                "" if r.eval_seconds is None else f"{r.eval_seconds:.1f}",
                "" if r.parameters is None else json.dumps(r.parameters, sort_keys=True),
                r.setting or "",
            ])


def row_colors(rows: Sequence[Row]) -> list:
    """Base grey, Individual black, methods from a qualitative palette (distinct up to 20)."""
    import matplotlib

    palette = matplotlib.colormaps["tab20"]
    methods = [r for r in rows if r.parameters is not None]
    colors, k = [], 0
    for r in rows:
        if r.parameters is not None:
            colors.append(palette(k % 20) if len(methods) <= 20 else matplotlib.colormaps["turbo"](k / len(methods)))
            k += 1
        else:
            colors.append("#222222" if r.label == "Individual" else "#9e9e9e")
    return colors


def bar_chart(rows: Sequence[Row], tasks: Sequence[str], path: Path) -> None:
    """Grouped bars: one group per task plus Avg, one bar per row; the legend sits outside."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*tasks, "Avg"]
    width = 0.85 / len(rows)
    fig, ax = plt.subplots(figsize=(min(14, max(9, 1.2 * len(groups) + 0.06 * len(groups) * len(rows))), 5.5))
    for i, (r, color) in enumerate(zip(rows, row_colors(rows))):
        values = [100 * r.accuracy[t] for t in tasks] + [100 * r.average]
        offsets = [g + (i - (len(rows) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(offsets, values, width, label=r.label, color=color)
    ax.set_xticks(range(len(groups)), groups, rotation=15)
    ax.set_ylabel("test accuracy (%)")
    lowest = min(min(100 * v for v in r.accuracy.values()) for r in rows)
    ax.set_ylim(max(0, lowest - 10), 100)
    ax.set_title("Merged models vs. individual fine-tunes (each task scored with its own head)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: DemoResult, zoo: Zoo, protocol: TrainingProtocol, seed: int) -> None:
    """results.md, results.csv, results.png and results.json in the report folder."""
    folder = result.report
    folder.mkdir(parents=True, exist_ok=True)
    rows, tasks = result.rows, result.tasks
    plain = [r for r in rows if not r.tuned]
    tuned = [r for r in rows if r.tuned]
    params = "\n".join(f"- **{r.label}**: `{json.dumps(r.parameters, sort_keys=True)}`"
                       + (f" — {r.setting}" if r.setting else "")
                       + f" (merge {r.merge_seconds:.0f} s, evaluation {r.eval_seconds:.0f} s)"
                       for r in plain if r.parameters is not None)
    sizes = "\n".join(f"- {e.name}: {e.train_size} train / {e.test_size} test, {e.epochs} epochs, "
                      f"classes {', '.join(e.classes)}" for e in zoo.entries)
    (folder / "results.md").write_text(
        "# primerge demo: merged models vs. individual fine-tunes\n\n"
        "Test accuracy (%) per task; Avg = mean over tasks; Normalized = mean over tasks of "
        "accuracy / Individual.\n\n"
        f"{markdown_table(plain, tasks)}\n\n"
        f"Base model: `{zoo.base}`; merge seed {seed}; split seed 0; fine-tuning "
        f"`{json.dumps(protocol.as_dict(), sort_keys=True)}`.\n\n"
        f"## Tasks\n{sizes}\n\n## Method parameters (registered defaults)\n{params}\n\n"
        + (tuned_section(plain[:2] + tuned, tasks) if tuned else "")
        + "## Timings\n" + "\n".join(f"- {k}: {v:.0f} s" for k, v in result.timings.items()) + "\n"
    )
    write_csv(rows, tasks, folder / "results.csv")
    bar_chart(plain, tasks, folder / "results.png")
    if tuned:
        bar_chart(plain[:2] + tuned, tasks, folder / "results-tuned.png")
    record = {
        "tasks": tasks,
        "rows": [r.as_dict() for r in rows],
        "timings": result.timings,
        "seed": seed,
        "protocol": protocol.as_dict(),
        "base": str(zoo.base),
        "zoo": {e.name: str(e.path) for e in zoo.entries},
        "primerge": primerge.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    (folder / "results.json").write_text(json.dumps(record, indent=2) + "\n")
