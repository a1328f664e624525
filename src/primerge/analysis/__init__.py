"""Analysis of task vectors above the engine: interference, PRIME diagnostics, rank collapse,
sign agreement and HO-GSVD alignment (``primerge analyze``, ``primerge select``).

It imports the methods layer (PRIME's F(r), TSV's factors, DRM's joint space, HO-GSVD); methods
never import it.
"""

from primerge.analysis.alignment import greedy_select, pool_alignment
from primerge.analysis.report import Report, analyze

__all__ = ["Report", "analyze", "greedy_select", "pool_alignment"]
