"""An accuracy measured on n examples, with its standard error and a 95% interval.

An accuracy is the mean of n per-example scores x_i ∈ {0, 1}. Its standard error is
lm-evaluation-harness's for a ``mean`` metric (``lm_eval.api.metrics.mean_stderr``): the sample
standard deviation over √n,

    se = √(Σ (x_i − p̂)² / (n − 1)) / √n = √(p̂ (1 − p̂) / (n − 1))    (undefined for n < 2),

read from lm-eval's results where it ran, or by this formula for 0/1 scores (:meth:`Score.of`).
The 95% interval is Wilson's score interval (Wilson 1927), which, unlike p̂ ± 1.96·se, stays in
[0, 1] and keeps its coverage near 0 and 1 and for small n:

    (p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n),    z = Φ⁻¹(0.975).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # Φ⁻¹(0.975)


@dataclass(frozen=True)
class Score:
    """Accuracy (a fraction) on ``n`` examples and its standard error (``None`` when n < 2)."""

    accuracy: float
    n: int
    stderr: float | None

    @classmethod
    def of(cls, accuracy: float, n: int) -> Score:
        """The score of ``n`` 0/1 results with mean ``accuracy``, lm-eval's standard error included."""
        stderr = math.sqrt(max(0.0, accuracy * (1 - accuracy)) / (n - 1)) if n > 1 else None
        return cls(accuracy, n, stderr)

    def interval(self) -> tuple[float, float]:
        """Wilson's 95% score interval (module docstring); (0, 1) when nothing was scored."""
        if self.n < 1:
            return 0.0, 1.0
        p, n, z2 = self.accuracy, self.n, Z95 ** 2
        centre = (p + z2 / (2 * n)) / (1 + z2 / n)
        half = Z95 * math.sqrt(max(0.0, p * (1 - p)) / n + z2 / (4 * n * n)) / (1 + z2 / n)
        return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))  # it holds p̂ (up to rounding)

    def text(self) -> str:
        """'71.0% ± 4.6 (n=100)': accuracy and standard error in points."""
        error = "" if self.stderr is None else f" ± {100 * self.stderr:.1f}"
        return f"{100 * self.accuracy:.1f}%{error} (n={self.n})"

    def cell(self, interval: bool = False) -> str:
        """'71.0 ± 4.6' (percent, standard error), with ' [61.5–79.1]' (the 95% interval) if asked."""
        error = "" if self.stderr is None else f" ± {100 * self.stderr:.1f}"
        return f"{100 * self.accuracy:.1f}{error}" + (f" [{self.interval_text()}]" if interval else "")

    def interval_text(self) -> str:
        """'61.5–79.1': the 95% interval in percent."""
        low, high = self.interval()
        return f"{100 * low:.1f}–{100 * high:.1f}"

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.n, "stderr": self.stderr, "ci95": list(self.interval())}
