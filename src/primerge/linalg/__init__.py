"""Shared linear algebra for every SVD-based method and for analysis (floor 0).

Written once, reused everywhere: :mod:`~primerge.linalg.core` (exact SVD, whitening, projections,
spectra, factored SVDs, null triplets), :mod:`~primerge.linalg.truncated` (``SVD_r`` with
``svd: auto | exact | randomized``), :mod:`~primerge.linalg.krylov` (the randomized block Krylov
SVD and its residual check) and :mod:`~primerge.linalg.choice` (``auto``'s cost model).
"""

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
from primerge.linalg.truncated import SVDMode, truncated_svd

__all__ = [
    "OVERSAMPLE", "SVD", "KrylovSVD", "SVDChoice", "SVDMode", "block_krylov_svd", "choose_svd", "drop_null",
    "energy_rank", "factored_svd", "fit_rank", "flatten_spectrum", "live_polar", "null_mask", "polar",
    "project_out", "stable_rank", "svd", "truncated_svd",
]
