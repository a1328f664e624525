"""The tuning report: trial table (CSV), Optuna's plots (PNG), summary (Markdown, JSON, terminal).

``<out>/trials.csv``: one row per trial of every method (state complete | pruned | repeat | failed,
normalized validation accuracy in %, validation accuracy per task scored, seconds, whether a merge
ran, the parameters). ``<out>/plots/<method>-history.png``: Optuna's optimization history;
``<method>-importances.png``: Optuna's parameter importances (PED-ANOVA, Optuna's default) when
the method has at least two tuned parameters and enough complete trials. ``summary.md`` /
``summary.json``: per method the defaults and tuned validation scores, the best setting, the
trials and the time; the validation data (n per task and how it was carved) and each task's
validation accuracy of the fine-tunes and of every best recipe, with its standard error and 95%
interval (:mod:`primerge.evaluation.llm.estimates`); the best recipes are ``<out>/<method>.yaml``.
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from primerge.util.errors import OutputError
from primerge.evaluation.llm.estimates import Score
from primerge.tuning.genome import WEIGHTS, grouped, search_parts
from primerge.tuning.run import TuneResult
from primerge.tuning.study import SWITCH_PREFIX, MethodResult

MIN_TRIALS_FOR_IMPORTANCE = 4


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def _value_text(value) -> str:
    """A value in words: floats to 4 significant digits, a gradient as ``[a, b, c]``."""
    if isinstance(value, list):
        return "[" + ", ".join(_value_text(v) for v in value) + "]"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def setting_text(params: dict) -> str:
    """A setting in words: ``name=value`` pairs, a scale's gradient as one list ``scale=[a, b, c]``
    (:func:`primerge.tuning.genome.grouped`), the models' weights as ``weights: a=0.8, b=0``, PAVE's
    switches as ``purified: a, b``."""
    parts, purified, switches = [], [], False
    for key, value in grouped(params).items():
        if key.startswith(SWITCH_PREFIX):
            switches = True
            purified += [key[len(SWITCH_PREFIX):]] if value else []
        elif key == WEIGHTS:
            parts.append(f"{WEIGHTS}: " + ", ".join(f"{label}={_value_text(w)}" for label, w in value.items()))
        else:
            parts.append(f"{key}={_value_text(value)}")
    if switches:
        parts.append(f"purified: {', '.join(purified) or 'none (plain merge)'}")
    return ", ".join(parts) or "defaults"


def summary_rows(results: Sequence[MethodResult]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "trials", "pruned", "defaults (val)", "tuned (val)", "recipe (val)", "minutes",
              "best setting"]
    rows = []
    for r in results:
        pruned = sum(t.state == "pruned" for t in r.trials)
        rows.append([r.method, str(len(r.trials)), str(pruned), _pct(r.default_value), _pct(r.best_value),
                     _pct(r.confirmed_value), f"{r.seconds / 60:.1f}", setting_text(r.best_params)])
    return header, rows


def validation_rows(tuned: TuneResult, interval: bool = False) -> tuple[list[str], list[list[str]]]:
    """Validation accuracy per task (%, ± standard error, and the 95% interval if ``interval``) of
    the fine-tunes on their own tasks and of every method's best recipe as merged from its file."""
    labels = list(tuned.individual)

    def cells(scores: dict[str, float]) -> list[str]:
        return [Score.of(scores[t], tuned.sizes[t]).cell(interval) for t in labels]

    header = ["model", *(f"{t} (n={tuned.sizes[t]})" for t in labels)]
    rows = [["fine-tunes (own task)", *cells(tuned.individual)]]
    rows += [[f"{r.method} (best recipe)", *cells(r.confirmed_scores)] for r in tuned.results if r.confirmed_scores]
    return header, rows


def genome_rows(results: Sequence[MethodResult], labels: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Each method's chosen weight per model and scale over depth (``--search weights`` /
    ``scale-gradient:K``); no rows when neither was searched."""
    header = ["method", *(f"weight {label}" for label in labels), "scale over depth (first block -> last)"]
    rows = []
    for r in results:
        setting = grouped(r.best_params)
        weights = setting.get(WEIGHTS, {})
        gradient = next((f"{k}={_value_text(v)}" for k, v in setting.items() if isinstance(v, list)), "")
        if weights or gradient:
            rows.append([r.method, *(_value_text(weights[t]) if t in weights else "" for t in labels), gradient])
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Fixed-width columns, first and last left-aligned."""
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    last = len(header) - 1
    lines = []
    for n, line in enumerate([header, *rows]):
        lines.append("  ".join(c.ljust(w) if i in (0, last) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths))).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def write_trials(path: Path, results: Sequence[MethodResult], labels: Sequence[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "trial", "state", "normalized", *labels, "seconds", "merged", "parameters"])
        for r in results:
            for t in r.trials:
                writer.writerow([t.method, t.number, t.state, _pct(t.value), *(_pct(t.scores.get(x)) for x in labels),
                                 f"{t.seconds:.1f}", "yes" if t.merged else "no",
                                 json.dumps(t.params, sort_keys=True)])


def plot_study(result: MethodResult, folder: Path, log: Callable[[str], None]) -> list[Path]:
    """Optuna's optimization history and (when meaningful) parameter importances as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    written = []
    complete = [t for t in result.trials if t.state == "complete"]
    plots = [("history", ovm.plot_optimization_history)]
    if len(result.best_params) >= 2 and len(complete) >= MIN_TRIALS_FOR_IMPORTANCE:
        plots.append(("importances", ovm.plot_param_importances))
    for name, plot in plots:
        path = folder / f"{result.method}-{name}.png"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                ax = plot(result.study)
            ax.set_title(f"{result.method}: {ax.get_title()}")
            ax.figure.tight_layout()
            ax.figure.savefig(path, dpi=110)
            plt.close(ax.figure)
            written.append(path)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            log(f"  {result.method}: no {name} plot ({exc})")
    return written


def _genome_section(results: Sequence[MethodResult], labels: Sequence[str]) -> str:
    header, rows = genome_rows(results, labels)
    return f"\n\n## Chosen weights and scale gradient\n\n{markdown_table(header, rows)}" if rows else ""


def write_report(tuned: TuneResult, log: Callable[[str], None] = print) -> None:
    """trials.csv, plots/, summary.md and summary.json in ``tuned.out``."""
    out = tuned.out
    labels = list(tuned.individual)
    try:
        write_trials(out / "trials.csv", tuned.results, labels)
        (out / "plots").mkdir(exist_ok=True)
        plots = {r.method: [p.name for p in plot_study(r, out / "plots", log)] for r in tuned.results}
        header, rows = summary_rows(tuned.results)
        s = tuned.settings
        (out / "summary.md").write_text(
            "# primerge tune\n\nNormalized validation accuracy (%): mean over tasks of the merged model's "
            "validation accuracy / the task's own fine-tune's.\n\n"
            f"{markdown_table(header, rows)}\n\n{tuned.suite}\n\n"
            f"TPE seed {s.seed}, at most {s.trials} trials per method"
            + (f", budget {s.budget_minutes:g} min" if s.budget_minutes else "")
            + f"; {tuned.seconds / 60:.1f} min in all.\n\n## Validation accuracy per task\n\n"
            "%, ± standard error (lm-eval's for a mean of 0/1 scores) [Wilson's 95% interval]:\n\n"
            f"{markdown_table(*validation_rows(tuned, interval=True))}\n\n"
            + "\n".join(f"- **{t}**: {how}" for t, how in tuned.examples.items())
            + _genome_section(tuned.results, labels)
            + "\n\n## Search spaces\n\nSearched: "
            + ", ".join(search_parts(s.method_params, s.genome) + (["PAVE"] if s.pave else [])) + ".\n\n"
            + "\n".join(f"- **{r.method}**: {r.space}" for r in tuned.results) + "\n")
        (out / "summary.json").write_text(json.dumps({
            "seconds": tuned.seconds,
            "settings": {"trials": s.trials, "budget_minutes": s.budget_minutes, "seed": s.seed,
                         "validation_size": s.validation_size, "pave": s.pave,
                         "search": search_parts(s.method_params, s.genome)},
            "individual_validation": tuned.individual,
            "validation": {t: {"n": tuned.sizes[t], "examples": tuned.examples[t],
                               "individual": Score.of(tuned.individual[t], tuned.sizes[t]).as_dict()}
                           for t in tuned.individual},
            "methods": [{"method": r.method, "space": r.space, "default_value": r.default_value,
                         "best_value": r.best_value, "confirmed_value": r.confirmed_value,
                         "confirmed_scores": {t: Score.of(v, tuned.sizes[t]).as_dict()
                                              for t, v in r.confirmed_scores.items()},
                         "best_params": r.best_params, "best_setting": grouped(r.best_params),
                         "recipe": r.recipe_path.name if r.recipe_path else None,
                         "seconds": r.seconds,
                         "merges": r.merges, "trials": len(r.trials), "plots": plots[r.method]}
                        for r in tuned.results],
        }, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write the tuning report in {out}: {exc}") from exc
