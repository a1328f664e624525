"""What a merge is, before any tensor is read: the recipe (:mod:`~primerge.core.recipe`), task-vector
sources aligned with the base (:mod:`~primerge.core.sources`, :mod:`~primerge.core.tensor_names`),
each tensor's treatment (:mod:`~primerge.core.treatments`), vocabulary alignment
(:mod:`~primerge.core.vocabulary`), the non-weight files (:mod:`~primerge.core.support_files`) and
the :class:`~primerge.core.plan.Plan` that gathers them.

Floor 2: above util, data, linalg, io and methods; below outputs and the engine.
"""
