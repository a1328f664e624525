"""Shared linear algebra for every SVD-based method and for analysis (floor 0).

Written once, reused everywhere: :mod:`~primerge.linalg.core` (exact SVD, whitening, projections,
spectra, factored SVDs, null triplets), :mod:`~primerge.linalg.truncated` (``SVD_r`` with
``svd: auto | exact | randomized``), :mod:`~primerge.linalg.krylov` (the randomized block Krylov
SVD), :mod:`~primerge.linalg.certificate` (when its result is kept: the residual check, and for
16-bit outputs the backward-error and (1 + ε) energy certificate), :mod:`~primerge.linalg.choice`
(``auto``'s cost model) and :mod:`~primerge.linalg.outcomes` (what the SVDs of a merge did).
"""

from primerge.linalg.certificate import OutputPrecision
from primerge.linalg.choice import SVDChoice, choose_svd
from primerge.linalg.core import (
    SVD,
    drop_null,
    energy_rank,
    factored_svd,
    fit_rank,
    flatten_spectrum,
    live_polar,
    null_mask,
    polar,
    project_out,
    stable_rank,
    svd,
)
from primerge.linalg.krylov import OVERSAMPLE, KrylovSVD, block_krylov_svd
from primerge.linalg.outcomes import SVDOutcomes, record, recording
from primerge.linalg.truncated import SVDMode, takes_exact, truncated_svd

__all__ = [
    "OVERSAMPLE", "SVD", "KrylovSVD", "OutputPrecision", "SVDChoice", "SVDMode", "SVDOutcomes",
    "block_krylov_svd", "choose_svd", "drop_null", "energy_rank", "factored_svd", "fit_rank",
    "flatten_spectrum", "live_polar", "null_mask", "polar", "project_out", "record", "recording",
    "stable_rank", "svd", "takes_exact", "truncated_svd",
]
