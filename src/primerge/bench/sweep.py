"""``primerge bench --sweep``: how wall time, engine time and peak RSS grow with the model's width or
the number of fine-tunes, and the fitted exponent of each.

A sweep axis is ``hidden`` (the zoo's hidden size; intermediate and head sizes follow it as in
:class:`primerge.bench.zoo.ZooSpec`, the vocabulary is held at ``SWEEP_VOCAB`` rows so that the
embedding does not swamp the matrices being studied) or ``tasks`` (T; the smaller T are the first
fine-tunes of the zoo with the largest). Every point merges with every method in its own child
process, interleaved with the other points like every other bench row.

The fitted exponent of a quantity y over the points x_i is the least-squares slope of log y on
log x (y ∝ x^b): b = Σ (log x_i − mean)(log y_i − mean) / Σ (log x_i − mean)². Engine time (the
merge itself, without the child's start-up) is the quantity the exponents are about; wall time
and peak RSS are reported beside it.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from primerge.bench.runs import Inputs, MethodRun, Row
from primerge.bench.zoo import ZooSpec, build_zoo

#: Vocabulary rows of every sweep zoo (the default zoo's): the embedding and head stay the same size.
SWEEP_VOCAB = 32000
AXES = ("hidden", "tasks")
#: The quantities whose growth is fitted, as (Measurement attribute, label).
FITTED = (("merge_s", "engine s"), ("wall_s", "wall s"), ("rss_mib", "peak RSS"))


@dataclass(frozen=True)
class Sweep:
    """One axis and its points, e.g. ``hidden=512,1024,2048``."""

    axis: str
    points: tuple[int, ...]

    @property
    def group(self) -> str:
        return f"sweep-{self.axis}"


def parse_sweep(text: str) -> Sweep:
    """``AXIS=V1,V2,...`` with AXIS in :data:`AXES` and at least two distinct positive integers."""
    axis, eq, values = text.partition("=")
    axis = axis.strip()
    if not eq or axis not in AXES:
        raise argparse.ArgumentTypeError(f"sweep '{text}' must be AXIS=V1,V2,... with AXIS one of {', '.join(AXES)}")
    try:
        points = tuple(sorted({int(v) for v in values.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"sweep '{text}': the points must be whole numbers") from None
    if len(points) < 2 or points[0] < 1:
        raise argparse.ArgumentTypeError(f"sweep '{text}' needs at least two distinct positive points")
    return Sweep(axis, points)


def sweep_spec(base: ZooSpec, axis: str, point: int) -> ZooSpec:
    """The zoo of one point: ``base`` at this hidden size (LLaMA's shapes when ``base`` has them, else
    scale = hidden / 768) or with T = point."""
    if axis == "tasks":
        return replace(base, tasks=point, vocab_rows=SWEEP_VOCAB)
    if base.hidden_size is not None:
        return replace(base, hidden_size=point, vocab_rows=SWEEP_VOCAB)
    return replace(base, scale=point / ZooSpec().hidden, vocab_rows=SWEEP_VOCAB)


def sweep_inputs(sweep: Sweep, base: ZooSpec, cache, log: Callable[[str], None]) -> list[tuple[int, Inputs]]:
    """(point, inputs) of every point; a tasks sweep builds one zoo, at the largest T."""
    if sweep.axis == "tasks":
        spec = sweep_spec(base, "tasks", sweep.points[-1])
        folder = build_zoo(spec, cache, log)
        return [(t, Inputs.from_zoo(f"L{spec.layers} T={t}", folder, t)) for t in sweep.points]
    found = []
    for hidden in sweep.points:
        spec = sweep_spec(base, "hidden", hidden)
        log(f"sweep zoo hidden {hidden}: hidden {spec.hidden}, intermediate {spec.intermediate}, "
            f"{spec.parameters() / 1e6:.1f}M parameters per checkpoint")
        found.append((hidden, Inputs.from_zoo(f"h{spec.hidden}", build_zoo(spec, cache, log), spec.tasks)))
    return found


def point_label(run: MethodRun, axis: str, point: int) -> str:
    return f"{run.label} {axis}={point}"


def fitted_exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope b of log y = a + b log x (module docstring)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def exponents(rows: Sequence[Row], sweep: Sweep, runs: Sequence[MethodRun]) -> list[dict]:
    """One result row per method: the fitted exponent of every :data:`FITTED` quantity over the
    sweep's points (the ``note`` column carries them)."""
    out = []
    for run in runs:
        labels = {point_label(run, sweep.axis, p): p for p in sweep.points}
        points = [(labels[r.label], r) for r in rows if r.group == sweep.group and r.label in labels and r.runs]
        if len(points) < 2:
            continue
        xs = [p for p, _ in points]
        fits = [f"{name} ∝ {sweep.axis}^{fitted_exponent(xs, [r.median(attr) for _, r in points]):.2f}"
                for attr, name in FITTED]
        out.append({"group": f"fit-{sweep.axis}", "inputs": f"{xs[0]}..{xs[-1]}", "method": run.label,
                    "T": "", "note": "; ".join(fits)})
    return out
