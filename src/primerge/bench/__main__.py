"""``python -m primerge.bench RECIPE OUT DEVICE``: one measured child merge (:mod:`primerge.bench.runs`)."""

import sys

from primerge.bench.runs import child_merge

sys.exit(child_merge(sys.argv[1:]))
