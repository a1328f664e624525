"""Analysis of task vectors above the engine: interference, PRIME diagnostics, rank collapse,
sign agreement and HO-GSVD alignment (``primerge analyze``, ``primerge select``).

It imports the methods layer (PRIME's decomposition and F(r), DRM's joint space, HO-GSVD) and
streams task vectors through the merge's plan. Floors: above the plan and the engine (beside
purify), below the API; it never imports evaluation, and methods never import it.
"""

from primerge.util.lazy import lazy_attributes

#: Public names -> their modules, imported on first use (``primerge --help`` loads no torch).
_LAZY = {"Report": "primerge.analysis.report", "analyze": "primerge.analysis.report",
         "greedy_select": "primerge.analysis.alignment", "pool_alignment": "primerge.analysis.alignment"}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)
