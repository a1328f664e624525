"""Where a Ray merge's fixed start-up goes, on a private local cluster of N CPUs.

Each round is a fresh driver process (as every ``primerge merge --backend ray`` is a new Ray job):
it imports Ray, joins the cluster, runs one trivial task per worker (the job's workers start),
one task per worker that imports primerge's Ray executor (torch and the engine), and the same
again on the now warm workers, then disconnects. Run: ``python benchmarks/ray_overhead.py [N]``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from primerge.bench.cluster import RAY_ENV, local_cluster

DRIVER = r'''
import os, sys, time
t0 = time.perf_counter()
import ray
t1 = time.perf_counter()
ray.init(address=os.environ["ADDRESS"], include_dashboard=False, log_to_driver=False, configure_logging=False)
t2 = time.perf_counter()
workers = int(sys.argv[1])

@ray.remote(num_cpus=1)
def started():
    return os.getpid()

@ray.remote(num_cpus=1)
def imported():
    import primerge.engine.ray  # noqa: F401  torch, the engine, the methods
    return os.getpid()

ray.get([started.remote() for _ in range(workers)])
t3 = time.perf_counter()
ray.get([imported.remote() for _ in range(workers)])
t4 = time.perf_counter()
ray.get([imported.remote() for _ in range(workers)])
t5 = time.perf_counter()
ray.shutdown()
t6 = time.perf_counter()
print(f"import ray {t1 - t0:.2f} s, join {t2 - t1:.2f} s, start {workers} workers {t3 - t2:.2f} s, "
      f"import primerge in them {t4 - t3:.2f} s, a task on warm workers {t5 - t4:.3f} s, disconnect {t6 - t5:.2f} s")
'''


def main(workers: int = 2, rounds: int = 3) -> None:
    with local_cluster([workers]) as address:
        env = {**os.environ, **RAY_ENV, "ADDRESS": address}
        for _ in range(rounds):
            subprocess.run([sys.executable, "-c", DRIVER, str(workers)], env=env, check=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
