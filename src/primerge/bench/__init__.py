"""``primerge bench``: wall time, CPU time and peak memory of whole merges, measured.

A synthetic model zoo with the tensor names and shapes of a LLaMA-style decoder
(``embed_tokens``, q/k/v/o with grouped KV heads, gate/up/down, RMS norms,
``lm_head``) is generated once, tensor by tensor, into the cache
(:func:`primerge.util.cache_dirs.cache_root` ``/bench/<key>``, the key naming every setting). Its task vectors have the
structure of real fine-tunes: a few strong directions shared by all tasks (with
task-specific weights), a few task-specific ones, a decaying tail and noise.

Every merge runs in its own child process (``python -m primerge.bench RECIPE OUT
DEVICE``, the same merge as ``primerge merge --force --quiet``); its
wall time, CPU time (user + system) and peak RSS come from ``os.wait4`` (the
child's own ``rusage``), and the engine's own merge time from its last output
line. Runs are interleaved over methods, each statistic is the median of
``--repeats`` runs, and ratios are taken against ``task_arithmetic`` measured in
the same session. With ``--ray-workers N`` every method also runs on a private Ray
cluster, cold (a fresh driver per merge, start-up included) and warm (in one driver
holding a Ray session, :mod:`~primerge.bench.warm`), each against the same method run
locally. Scaling rows compare T = 4 with T = 8 models and the zoo at
half depth with full depth; an accuracy row compares PRIME's automatic
(randomized) truncated SVD with its exact path on the float32 merged updates.

Modules: :mod:`~primerge.bench.zoo` (the synthetic zoo), :mod:`~primerge.bench.runs` (recipes and
measured child merges), :mod:`~primerge.bench.warm` (the warm Ray rows' driver),
:mod:`~primerge.bench.accuracy`, :mod:`~primerge.bench.report` (table, CSV),
:mod:`~primerge.cli.bench` (the command). Floors: above the engine and the API, below the CLI;
nothing in the core imports it.
"""

DEFAULT_METHODS = "task_arithmetic,ties,tsv,tsv:svd=exact,prime,prime:svd=exact"
#: The Ray rows' groups: a fresh driver per merge (``primerge merge --backend ray``), and merges in
#: one driver holding a Ray session whose workers are already started (:mod:`primerge.bench.warm`).
RAY_COLD, RAY_WARM = "ray-cold", "ray-warm"
#: Every ratio is taken against this method measured in the same session (the read-compute-write floor).
BASELINE = "task_arithmetic"
