"""What the truncated SVDs of a merge did: how many matrices each path solved, and why.

:func:`primerge.linalg.truncated.truncated_svd` (and the factored SVD of low-rank task vectors)
:func:`record` every matrix they solve into the :class:`SVDOutcomes` opened by the innermost
:func:`recording` of the current context, if any; without one, nothing is kept. The record is a
small picklable value that adds up (``+``), so work units running on other processes or machines
return theirs and the run reduces them in any order to the same totals.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
import math
from dataclasses import dataclass, field
from typing import Literal

Path = Literal["krylov", "exact", "factored"]

_ACTIVE: ContextVar[SVDOutcomes | None] = ContextVar("primerge_svd_outcomes", default=None)


@dataclass
class SVDOutcomes:
    """Matrices per (path, reason); passes over the Krylov ones; the largest certified ε and part of
    the allowance used (:attr:`primerge.linalg.certificate.Certificate.used`: a member's backward
    error through the method's gain over its share of the allowance, or the members' summed error
    over the whole allowance, whichever test passed more easily); the flops of the work
    (:func:`krylov_flops`, :func:`exact_flops`) and seconds per path.

    ``reason`` says why the path was taken: for ``krylov`` the test that accepted the Ritz triplets
    (residual check, certificate for the output dtype) or ``svd: randomized``; for ``exact`` the
    recipe, the cost model (of the shapes, or of a member's certificate steps), or the tests that
    failed; for ``factored`` the low-rank task vectors.
    A Krylov attempt whose members are redone exactly counts its flops and seconds under ``krylov``
    (the redo's under ``exact``); ``passes`` counts those of the members kept.
    """

    counts: dict[tuple[str, str], int] = field(default_factory=dict)
    passes: int = 0
    epsilon: float = 0.0
    backward: float = 0.0
    flops: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, path: Path, reason: str, matrices: int) -> None:
        if matrices:
            key = (path, reason)
            self.counts[key] = self.counts.get(key, 0) + matrices

    def __add__(self, other: SVDOutcomes) -> SVDOutcomes:
        counts = dict(self.counts)
        for key, count in other.counts.items():
            counts[key] = counts.get(key, 0) + count
        seconds = dict(self.seconds)
        for path, value in other.seconds.items():
            seconds[path] = seconds.get(path, 0.0) + value
        return SVDOutcomes(counts, self.passes + other.passes, max(self.epsilon, other.epsilon),
                           max(self.backward, other.backward), self.flops + other.flops, seconds)

    def matrices(self, path: Path) -> int:
        return sum(count for (p, _), count in self.counts.items() if p == path)

    def timing(self, what: str = "merge") -> list[str]:
        """The seconds spent on each path (for the terminal: the model card holds no times, so that a
        merge run again writes the same card)."""
        if not self.seconds:
            return []
        return [f"svd ({what}): " + ", ".join(f"{path} {s:.2f}s" for path, s in sorted(self.seconds.items()))]

    def lines(self, what: str = "merge") -> list[str]:
        """One summary line, then one line per (path, reason), largest first; none when empty."""
        if not self.counts:
            return []
        krylov = self.matrices("krylov")
        per = f", {self.passes / krylov:.1f} passes over each" if krylov else ""
        factored = self.matrices("factored")
        extra = f", {factored} from LoRA factors" if factored else ""
        lines = [f"svd ({what}): {krylov} matrices by block Krylov{per}, {self.matrices('exact')} by exact SVD{extra}"
                 f" ({self.flops / 1e9:.1f} GFLOP)"]
        for (path, reason), count in sorted(self.counts.items(), key=lambda item: (-item[1], item[0])):
            lines.append(f"svd ({what}): {path}: {count} ({reason})")
        if self.epsilon > 0:
            lines.append(f"svd ({what}): certified matrices: energy within (1 + {self.epsilon:.3g}) of the optimum, "
                         f"backward error × the method's gain ≤ {self.backward:.2f} of the allowance (largest; "
                         f"the members' sum, or the member's own share)")
        return lines


def record(path: Path, reason: str, matrices: int, *, passes: int = 0, epsilon: float = 0.0,
           backward: float = 0.0, flops: float = 0.0, seconds: float = 0.0) -> None:
    """Add ``matrices`` solved by ``path`` for ``reason`` to the active record (if any)."""
    active = _ACTIVE.get()
    if active is None:
        return
    active.add(path, reason, matrices)
    active.passes += passes
    active.epsilon = max(active.epsilon, epsilon)
    active.backward = max(active.backward, backward)
    active.flops += flops
    if seconds:
        active.seconds[path] = active.seconds.get(path, 0.0) + seconds


def krylov_flops(shape: tuple[int, ...], width: int, passes: int) -> float:
    """Flops of ``passes`` products of every m × n matrix of ``shape`` with a block of ``width``
    columns: 2·m·n·width each (the GEMMs; the block's orthonormalisation and Rayleigh–Ritz are
    O((m + n)·c·width) and left out)."""
    return 2.0 * math.prod(shape) * width * passes


def exact_flops(shape: tuple[int, ...]) -> float:
    """Flops of LAPACK's thin SVD with both sets of singular vectors of every m × n matrix of
    ``shape`` (p = min, q = max): Householder bidiagonalisation 4qp² − 4p³/3 plus forming the
    vectors, about 4qp² + 8p³ in all (Golub & Van Loan, Matrix Computations, Section 8.6.3)."""
    p, q = sorted(shape[-2:])
    return math.prod(shape[:-2]) * (4.0 * q * p * p + 8.0 * p**3)


@contextmanager
def recording() -> Iterator[SVDOutcomes]:
    """A fresh :class:`SVDOutcomes` that every :func:`record` in this context adds to."""
    outcomes = SVDOutcomes()
    token = _ACTIVE.set(outcomes)
    try:
        yield outcomes
    finally:
        _ACTIVE.reset(token)
