"""Analysis of task vectors above the engine: interference, PRIME diagnostics, rank collapse,
sign agreement and HO-GSVD alignment (``primerge analyze``, ``primerge select``).

It imports the methods layer (PRIME's decomposition and F(r), DRM's joint space, HO-GSVD) and
streams task vectors through the merge's plan. Floors: above the plan and the engine (beside
purify), below the API; it never imports evaluation, and methods never import it.
"""

from primerge.analysis.alignment import greedy_select, pool_alignment
from primerge.analysis.report import Report, analyze

__all__ = ["Report", "analyze", "greedy_select", "pool_alignment"]
