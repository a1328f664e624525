"""The LLM demo's tables and report: ``llm-results.md``, ``.csv``, ``.png`` and ``.json``.

One table per zoo (LoRA adapters, full fine-tunes): accuracy per task (%, ± lm-eval's standard
error; the Markdown and CSV add Wilson's 95% interval and n), Avg, Normalized (mean over tasks of
accuracy / the zoo's Individual accuracy) and the merge time in seconds.
"""

from __future__ import annotations

import csv
import json
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

import primerge
from primerge.evaluation.demo import percent

ZOO_TITLES = {"lora": "LoRA adapters", "full": "Full fine-tunes"}
PREFIX = "llm-results"


def frame(rows: Sequence, tasks: Sequence[str], interval: bool = False):
    """Accuracy per task (% ± standard error, and the 95% interval if ``interval``; n in the header),
    Avg, Normalized and ``merge s``, as a DataFrame."""
    import pandas as pd

    sizes = {t: rows[0].scores[t].n for t in tasks}
    body = [[r.label, *(r.scores[t].cell(interval) for t in tasks), percent(r.average), percent(r.normalized),
             "" if r.merge_seconds is None else f"{r.merge_seconds:.1f}"] for r in rows]
    return pd.DataFrame(body, columns=["row", *(f"{t} (n={sizes[t]})" for t in tasks), "Avg", "Normalized", "merge s"])


def text_table(rows: Sequence, tasks: Sequence[str]) -> str:
    table = frame(rows, tasks)
    width = max(len(label) for label in table["row"])
    return table.to_string(index=False, justify="left", formatters={"row": lambda label: label.ljust(width)})


def markdown_table(rows: Sequence, tasks: Sequence[str]) -> str:
    return frame(rows, tasks, interval=True).to_markdown(index=False, disable_numparse=True)


def text_tables(result) -> str:
    """Every zoo's table for the terminal, each under its title."""
    return "\n\n".join(f"{ZOO_TITLES[kind]}\n{text_table(rows, result.tasks)}" for kind, rows in result.tables.items())


def spread_cells(score) -> list:
    """n, standard error and 95% interval (%) of one score: the CSV's columns after the accuracies."""
    stderr = "" if score.stderr is None else f"{100 * score.stderr:.2f}"
    return [score.n, stderr, *(f"{100 * bound:.2f}" for bound in score.interval())]


def write_csv(result, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        spread = [f"{t}_{part}" for t in result.tasks for part in ("n", "stderr", "ci95_low", "ci95_high")]
        writer.writerow(["zoo", "row", *result.tasks, *spread, "avg", "normalized", "merge_seconds", "eval_seconds",
                         "parameters"])
        for kind, rows in result.tables.items():
            for r in rows:
                writer.writerow([kind, r.label, *(f"{100 * r.accuracy[t]:.2f}" for t in result.tasks),
                                 *(cell for t in result.tasks for cell in spread_cells(r.scores[t])),
                                 f"{100 * r.average:.2f}", f"{100 * r.normalized:.2f}",
                                 "" if r.merge_seconds is None else f"{r.merge_seconds:.2f}",
                                 "" if r.eval_seconds is None else f"{r.eval_seconds:.1f}",
                                 "" if r.parameters is None else json.dumps(r.parameters, sort_keys=True)])


def bar_chart(result, path: Path) -> None:
    """One panel per zoo: normalized accuracy of every row as horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(result.tables)
    height = 0.45 * max(len(rows) for rows in result.tables.values()) + 1.5
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), height), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = result.tables[kind]
        values = [100 * r.normalized for r in rows]
        colors = ["#9e9e9e" if r.parameters is None and r.label != "Individual" else
                  "#222222" if r.parameters is None else "#1f77b4" for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), [r.label for r in rows])
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
        ax.set_xlim(0, max(110, max(values) + 8))
        ax.set_xlabel("normalized accuracy (% of the individual fine-tunes)")
        ax.set_title(ZOO_TITLES[kind])
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_llm_report(result, protocol, seed: int) -> None:
    """llm-results.md / .csv / .png / .json in the report folder."""
    folder = result.report
    folder.mkdir(parents=True, exist_ok=True)
    tables = "\n\n".join(f"## {ZOO_TITLES[kind]}\n\n{markdown_table(rows, result.tasks)}"
                         for kind, rows in result.tables.items())
    words = "\n".join(f"- {task}: {described}" for task, described in result.label_words.items())
    params = "\n".join(f"- **{kind} / {r.label}**: `{json.dumps(r.parameters, sort_keys=True)}`"
                       for kind, rows in result.tables.items() for r in rows if r.parameters is not None)
    timings = "\n".join(f"- {k}: {v:.0f} s" for k, v in result.timings.items())
    examples = "\n".join(f"- {task}: {how}" for task, how in result.examples.items())
    (folder / f"{PREFIX}.md").write_text(
        "# primerge demo --suite llm: merged decoders vs. individual fine-tunes (lm-eval accuracy)\n\n"
        "Accuracy (%) per task ± lm-eval's standard error [Wilson's 95% interval], n test prompts per task; "
        "Avg = mean over tasks; Normalized = mean over tasks of accuracy / the zoo's Individual accuracy; "
        "merge s = wall time of the merge.\n\n"
        f"{tables}\n\nBase model: `{result.base}`; merge seed {seed}; protocol "
        f"`{json.dumps(protocol.as_dict(), sort_keys=True)}`.\n\n## Test examples\n{examples}\n\n"
        f"## Label words\n{words}\n\n"
        f"## Method parameters (registered defaults)\n{params}\n\n## Timings\n{timings}\n")
    write_csv(result, folder / f"{PREFIX}.csv")
    bar_chart(result, folder / f"{PREFIX}.png")
    record = {
        "tasks": result.tasks,
        "tables": {kind: [r.as_dict() for r in rows] for kind, rows in result.tables.items()},
        "timings": result.timings, "seed": seed, "protocol": protocol.as_dict(), "base": str(result.base),
        "label_words": result.label_words, "examples": result.examples, "primerge": primerge.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    (folder / f"{PREFIX}.json").write_text(json.dumps(record, indent=2) + "\n")
