"""The benchmark's table: medians and ratios against Task Arithmetic, as Markdown and CSV, with the
floors beside them (:mod:`primerge.bench.floors`): ``io_floor_s`` (reading the inputs and writing
the output) and ``svd_floor_s`` (the row's SVD flops at the machine's GEMM rate)."""

from __future__ import annotations

import csv
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from primerge.bench import BASELINE, RAY_COLD, RAY_WARM
from primerge.bench.runs import Inputs, Row

COLUMNS = ["group", "inputs", "method", "T", "runs", "wall_s", "cpu_s", "merge_s", "svd_s", "rss_mib",
           "wall_x", "merge_x", "rss_x", "io_floor_s", "svd_floor_s", "note"]


@dataclass(frozen=True)
class Floors:
    """The I/O floor of each inputs (by name) and the machine's GEMM rate (flop/s)."""

    io: dict[str, float]
    gemm_rate: float

    def of(self, row: Row) -> dict:
        """The row's floors: its inputs' I/O floor, its SVD flops at the GEMM rate."""
        flops = statistics.median(m.svd_flops for m in row.runs) if row.runs else 0.0
        io = self.io.get(row.inputs)
        return {"io_floor_s": round(io, 3) if io is not None else "",
                "svd_floor_s": round(flops / self.gemm_rate, 3) if self.gemm_rate > 0 else ""}


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


def summarize(rows: Sequence[Row], error: tuple[float, ...] | None, inputs: Inputs | None = None,
              floors: Floors | None = None) -> list[dict]:
    """Result dicts: method rows against ``task_arithmetic``, Ray rows (cold and warm) against the
    same method run locally, scaling rows against the first row of their pair (same method, T = 4
    or half depth), each with its floors when measured, then the accuracy row."""
    result: list[dict] = []
    for row in rows:
        if row.group == "methods":
            base = _find(rows, "methods", BASELINE)
        elif row.group in (RAY_COLD, RAY_WARM):
            base = _find(rows, "methods", row.label)
        else:
            base = next(r for r in rows if r.group == row.group and r.label.split()[0] == row.label.split()[0])
        result.append({**row.as_dict(base), **(floors.of(row) if floors is not None else {})})
    if error is not None:
        result.append({"group": "accuracy", "inputs": inputs.name if inputs else "",
                       "method": "prime vs prime:svd=exact", "T": len(inputs.models) if inputs else "",
                       "note": f"rel_err={error[0]:.3e} worst_matrix={error[1]:.3e}"
                               + (f" output_rounding={error[2]:.3e}" if len(error) > 2 else "")})
    return result

