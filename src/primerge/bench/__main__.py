"""``python -m primerge.bench RECIPE OUT DEVICE``: one measured child merge (:mod:`primerge.bench.runs`);
``python -m primerge.bench --warm ADDRESS WORKERS GPUS_PER_WORKER``: the warm Ray driver
(:mod:`primerge.bench.warm`)."""

import sys

if sys.argv[1:2] == ["--warm"]:
    from primerge.bench.warm import serve

    sys.exit(serve(sys.argv[2:]))
from primerge.bench.runs import child_merge

sys.exit(child_merge(sys.argv[1:]))
