"""The LLM demo's tables and report: ``llm-results.md``, ``.csv``, ``.png`` and ``.json``.

One table per zoo (LoRA adapters, full fine-tunes): accuracy per task (%, ± lm-eval's standard
error; the Markdown and CSV add Wilson's 95% interval, and every table's header gives n per task),
Avg (± its standard error), Normalized (mean over tasks of accuracy / the zoo's Individual
accuracy) and the merge time in seconds. With ``--tuned`` each zoo also gets its tuned table (the
zero-shot base, Individual and every method at the setting chosen on validation data, scored on
test once), with each row's setting and the validation data it was chosen on; the bar chart of
the tuned tables is ``llm-results-tuned.png`` and the tuning reports are ``tuning/<zoo>/``.

The tasks' test sets are independent samples, so the standard error of Avg = (1/T) Σ_t acc_t is

    se(Avg) = √(Σ_t se_t²) / T,

the standard error of a mean of T independent estimates (Var(Σ X_t) = Σ Var(X_t)).
"""

from __future__ import annotations

import csv
import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

import primerge
from primerge.evaluation.demo import percent

ZOO_TITLES = {"lora": "LoRA adapters", "full": "Full fine-tunes"}
PREFIX = "llm-results"
#: The report's files as the plain demo writes them (no manifest): a folder of these is an earlier report.
REPORT_FILES = tuple(f"{PREFIX}{suffix}" for suffix in (".md", ".csv", ".png", ".json"))


def average_stderr(scores: Sequence) -> float | None:
    """se(Avg) = √(Σ_t se_t²) / T over independent tasks (module docstring); ``None`` when a task has none."""
    errors = [s.stderr for s in scores]
    if not errors or any(e is None for e in errors):
        return None
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def average_cell(row, tasks: Sequence[str]) -> str:
    """'71.0 ± 2.3': Avg in percent, ± its standard error."""
    error = average_stderr([row.scores[t] for t in tasks])
    return percent(row.average) + ("" if error is None else f" ± {100 * error:.1f}")


def frame(rows: Sequence, tasks: Sequence[str], interval: bool = False):
    """Accuracy per task (% ± standard error, and the 95% interval if ``interval``; n in the header),
    Avg ± standard error, Normalized and ``merge s``, as a DataFrame."""
    import pandas as pd

    sizes = {t: rows[0].scores[t].n for t in tasks}
    body = [[r.label, *(r.scores[t].cell(interval) for t in tasks), average_cell(r, tasks), percent(r.normalized),
             "" if r.merge_seconds is None else f"{r.merge_seconds:.1f}"] for r in rows]
    return pd.DataFrame(body, columns=["row", *(f"{t} (n={sizes[t]})" for t in tasks), "Avg", "Normalized", "merge s"])


def text_table(rows: Sequence, tasks: Sequence[str]) -> str:
    table = frame(rows, tasks)
    width = max(len(label) for label in table["row"])
    return table.to_string(index=False, justify="left", formatters={"row": lambda label: label.ljust(width)})


def markdown_table(rows: Sequence, tasks: Sequence[str]) -> str:
    return frame(rows, tasks, interval=True).to_markdown(index=False, disable_numparse=True)


def defaults_rows(rows: Sequence) -> list:
    """The defaults table: every row not tuned."""
    return [r for r in rows if not r.tuned]


def tuned_rows(rows: Sequence) -> list:
    """The tuned table: the reference rows (zero-shot base, Individual: no parameters) and the tuned
    rows; empty when nothing was tuned."""
    tuned = [r for r in rows if r.tuned]
    return [r for r in rows if not r.tuned and r.parameters is None] + tuned if tuned else []


def text_tables(result) -> str:
    """Every zoo's table for the terminal, each under its title, then every zoo's tuned table."""
    tables = [f"{ZOO_TITLES[kind]}\n{text_table(defaults_rows(rows), result.tasks)}"
              for kind, rows in result.tables.items()]
    tables += [f"{ZOO_TITLES[kind]}, tuned on validation data, scored on test once\n"
               f"{text_table(tuned_rows(rows), result.tasks)}"
               for kind, rows in result.tables.items() if tuned_rows(rows)]
    return "\n\n".join(tables)


def spread_cells(score) -> list:
    """n, standard error and 95% interval (%) of one score: the CSV's columns after the accuracies."""
    stderr = "" if score.stderr is None else f"{100 * score.stderr:.2f}"
    return [score.n, stderr, *(f"{100 * bound:.2f}" for bound in score.interval())]


def write_csv(result, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        spread = [f"{t}_{part}" for t in result.tasks for part in ("n", "stderr", "ci95_low", "ci95_high")]
        writer.writerow(["zoo", "row", *result.tasks, *spread, "avg", "avg_stderr", "normalized", "merge_seconds",
                         "eval_seconds", "parameters", "tuned", "setting"])
        for kind, rows in result.tables.items():
            for r in rows:
                error = average_stderr([r.scores[t] for t in result.tasks])
                writer.writerow([kind, r.label, *(f"{100 * r.accuracy[t]:.2f}" for t in result.tasks),
                                 *(cell for t in result.tasks for cell in spread_cells(r.scores[t])),
                                 f"{100 * r.average:.2f}", "" if error is None else f"{100 * error:.2f}",
                                 f"{100 * r.normalized:.2f}",
                                 "" if r.merge_seconds is None else f"{r.merge_seconds:.2f}",
                                 "" if r.eval_seconds is None else f"{r.eval_seconds:.1f}",
                                 "" if r.parameters is None else json.dumps(r.parameters, sort_keys=True),
                                 "yes" if r.tuned else "no", r.setting or ""])


def bar_chart(tables: Mapping[str, Sequence], path: Path, title: str = "") -> None:
    """One panel per zoo: normalized accuracy of every row as horizontal bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(tables)
    height = 0.45 * max(len(rows) for rows in tables.values()) + 1.5
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), height), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = tables[kind]
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
        ax.set_title(ZOO_TITLES[kind] + title)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def tuned_section(result, tuning: Mapping) -> str:
    """The tuned tables of results.md: per zoo, the table, the validation data and each row's setting."""
    carved = {label: how for run in tuning.values() for label, how in run.examples.items()}  # alike for every zoo
    parts = ["## Tuned on validation data (primerge tune), scored on test once\n\n"
             "Per zoo, every method's settings were searched on validation prompts (Optuna; objective: "
             "normalized validation accuracy, the mean over tasks of the merged model's accuracy / the task's "
             "own fine-tune's), carved from training examples the fine-tunes did not train on; each best "
             "recipe, merged from its file, was scored on the test prompts once."
             + ("\n\nValidation data:\n" + "\n".join(f"- {label}: {how}" for label, how in carved.items())
                if carved else "")]
    for kind, rows in result.tables.items():
        table = tuned_rows(rows)
        if table:
            settings = "\n".join(f"- **{r.label}**: {r.setting}" for r in table if r.tuned)
            parts.append(f"### {ZOO_TITLES[kind]} (tuned)\n\n{markdown_table(table, result.tasks)}\n\n"
                         f"Tuned settings:\n{settings}\n\nTrials, plots and the best recipes: `tuning/{kind}/` "
                         "(summary.md).")
    return "\n\n".join(parts) + "\n\n"


def write_llm_report(result, protocol, seed: int, tuning: Mapping | None = None) -> None:
    """llm-results.md / .csv / .png / .json in the report folder; with tuned rows also their tables
    and llm-results-tuned.png. ``tuning``: each zoo's tuning run (its validation data, in words)."""
    folder = result.report
    folder.mkdir(parents=True, exist_ok=True)
    plain = {kind: defaults_rows(rows) for kind, rows in result.tables.items()}
    tuned = {kind: tuned_rows(rows) for kind, rows in result.tables.items() if tuned_rows(rows)}
    tables = "\n\n".join(f"## {ZOO_TITLES[kind]}\n\n{markdown_table(rows, result.tasks)}" for kind, rows in plain.items())
    words = "\n".join(f"- {task}: {described}" for task, described in result.label_words.items())
    params = "\n".join(f"- **{kind} / {r.label}**: `{json.dumps(r.parameters, sort_keys=True)}`"
                       for kind, rows in plain.items() for r in rows if r.parameters is not None)
    timings = "\n".join(f"- {k}: {v:.0f} s" for k, v in result.timings.items())
    examples = "\n".join(f"- {task}: {how}" for task, how in result.examples.items())
    (folder / f"{PREFIX}.md").write_text(
        "# primerge demo --suite llm: merged decoders vs. individual fine-tunes (lm-eval accuracy)\n\n"
        "Accuracy (%) per task ± lm-eval's standard error [Wilson's 95% interval], n test prompts per task "
        "in each column's header; Avg = mean over tasks ± its standard error √(Σ se²)/T (the tasks' test "
        "sets are independent); Normalized = mean over tasks of accuracy / the zoo's Individual accuracy; "
        "merge s = wall time of the merge.\n\n"
        f"{tables}\n\n" + (tuned_section(result, tuning or {}) if tuned else "")
        + f"Base model: `{result.base}`; merge seed {seed}; protocol "
        f"`{json.dumps(protocol.as_dict(), sort_keys=True)}`.\n\n## Test examples\n{examples}\n\n"
        f"## Label words\n{words}\n\n"
        f"## Method parameters (registered defaults)\n{params}\n\n## Timings\n{timings}\n")
    write_csv(result, folder / f"{PREFIX}.csv")
    bar_chart(plain, folder / f"{PREFIX}.png")
    if tuned:
        bar_chart(tuned, folder / f"{PREFIX}-tuned.png", " (tuned)")
    record = {
        "tasks": result.tasks,
        "tables": {kind: [r.as_dict() for r in rows] for kind, rows in result.tables.items()},
        "timings": result.timings, "seed": seed, "protocol": protocol.as_dict(), "base": str(result.base),
        "label_words": result.label_words, "examples": result.examples, "primerge": primerge.__version__,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    if tuning:
        record["tuning"] = {kind: {"folder": f"tuning/{kind}", "validation": {
            label: {"n": run.sizes[label], "examples": how} for label, how in run.examples.items()}}
            for kind, run in tuning.items()}
    (folder / f"{PREFIX}.json").write_text(json.dumps(record, indent=2) + "\n")
