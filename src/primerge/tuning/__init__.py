"""``primerge tune``: each method's settings searched on validation data carved from the training
data (never the test split) with Optuna — TPE, seeded, median pruning.

Entry points: :func:`tune` (a recipe, a :class:`Suite` and the methods), the CLI subcommand
``tune`` (:mod:`primerge.cli.tune`) and ``primerge demo --tuned``. Search spaces live in
:mod:`primerge.tuning.spaces` (a registry keyed by method name, hints on a method's parameter
fields, a generic rule for the linear scale); ``--search`` adds mergekit-evolve's genome, a
weight per model and the scale as a gradient over depth (:mod:`primerge.tuning.genome`); merges
are cached per setting of the structural parameters (:mod:`primerge.tuning.cache`). This package
sits above evaluation and the public API.
"""

from primerge.util.lazy import lazy_attributes

_LAZY = {
    **dict.fromkeys(["TuneResult", "tune"], "primerge.tuning.run"),
    **dict.fromkeys(["SPACES", "Choice", "MethodSpace", "Range", "Scale", "space_for"], "primerge.tuning.spaces"),
    "MethodResult": "primerge.tuning.study",
    "TuneSettings": "primerge.tuning.settings",
    **dict.fromkeys(["SUITES", "EncoderSuite", "Suite"], "primerge.tuning.suites"),
    **dict.fromkeys(["Genome", "ScaleGradient", "WeightSpace", "parse_search"], "primerge.tuning.genome"),
    "carve": "primerge.tuning.holdout",
}
__getattr__ = lazy_attributes(__name__, _LAZY)
__all__ = sorted(_LAZY)
