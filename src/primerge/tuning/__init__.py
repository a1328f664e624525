"""``primerge tune``: each method's settings searched on validation data carved from the training
data (never the test split) with Optuna — TPE, seeded, median pruning.

Entry points: :func:`tune` (a recipe, a :class:`Suite` and the methods), the CLI subcommand
``tune`` (:mod:`primerge.tuning.cli`) and ``primerge demo --tuned``. Search spaces live in
:mod:`primerge.tuning.spaces` (a registry keyed by method name, hints on a method's parameter
fields, a generic rule for the linear scale); merges are cached per setting of the structural
parameters (:mod:`primerge.tuning.cache`). This package sits above evaluation and the public API.
"""

from primerge.tuning.run import TuneResult, tune
from primerge.tuning.spaces import SPACES, Choice, MethodSpace, Range, Scale, space_for
from primerge.tuning.study import MethodResult, TuneSettings
from primerge.tuning.suites import SUITES, EncoderSuite, Suite
from primerge.tuning.validation import carve

__all__ = ["SPACES", "SUITES", "Choice", "EncoderSuite", "MethodResult", "MethodSpace", "Range", "Scale", "Suite",
           "TuneResult", "TuneSettings", "carve", "space_for", "tune"]
