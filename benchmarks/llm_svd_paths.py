"""`svd: auto` against `svd: exact` on the LLM track: the merged tensors and their lm-eval accuracies.

    python benchmarks/llm_svd_paths.py [--steps 24] [--test-size 300] [--zoos lora full]

For each zoo of ``primerge demo --suite llm`` (reused from the cache when the same ``--steps``
trained it) and each SVD method (PRIME, TSV, Iso-CTS at their defaults), the merge is run twice,
with ``svd: auto`` and ``svd: exact``, in memory. Printed per (zoo, method): the matrices each path
solved under ``auto`` (block Krylov / exact / from LoRA factors), the largest relative Frobenius
difference ‖W_auto − W_exact‖ / ‖W_exact − θ₀‖ over the merged matrices (as a fraction of the merged
update), both merges' wall seconds, and both models' accuracies on the test prompts (lm-eval,
scores cached by content as the demo's). The LLM track's models are float32, so ``auto`` keeps only
Krylov results that pass the strict residual check (``primerge.linalg.certificate``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import primerge
from primerge.evaluation.llm.demo import LLM_DEFAULT_TASKS, prepare_suite
from primerge.evaluation.llm.models import model_from_state
from primerge.evaluation.llm.protocol import CPU_PROTOCOL, KINDS
from primerge.evaluation.llm.zoo import build_llm_zoo
from primerge.evaluation.model import folder_fingerprint, read_tensors
from primerge.util.hashing import state_digest

METHODS = ("prime", "tsv", "iso_cts")
PATHS = ("auto", "exact")


def update_difference(auto: dict, exact: dict, base: dict) -> float:
    """max over 2-D tensors of ‖W_auto − W_exact‖_F / ‖W_exact − θ₀‖_F (0 where the update is 0)."""
    worst = 0.0
    for name, merged in exact.items():
        if merged.ndim != 2 or name not in base:
            continue
        update = (merged.double() - base[name].double()).norm()
        if update > 0:
            worst = max(worst, float((auto[name].double() - merged.double()).norm() / update))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=CPU_PROTOCOL.steps, help="the zoo's fine-tuning steps")
    parser.add_argument("--test-size", type=int, default=CPU_PROTOCOL.test_size, help="test prompts per task")
    parser.add_argument("--zoos", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    protocol = replace(CPU_PROTOCOL, steps=args.steps, test_size=args.test_size)
    suite = prepare_suite(LLM_DEFAULT_TASKS, None, None, protocol, "cpu", print)
    base = read_tensors(suite.base)
    fingerprint = folder_fingerprint(suite.base)
    header = " | ".join(f"{t} auto / exact" for t in LLM_DEFAULT_TASKS)
    lines = [f"| zoo | method | auto: krylov / exact / factored | max diff / update | merge s auto / exact | "
             f"{header} | Avg auto / exact |", "|---|---|---|---|---|" + "---|" * (len(LLM_DEFAULT_TASKS) + 1)]
    for kind in args.zoos:
        zoo = build_llm_zoo(kind, suite.tasks, suite.base, fingerprint, protocol, suite.root, progress=False)
        for method in args.methods:
            states, scores, seconds, outcomes = {}, {}, {}, None
            for path in PATHS:
                start = time.perf_counter()
                result = primerge.merge(suite.base, [str(p) for p in zoo.paths], method=method, svd=path, seed=42)
                seconds[path] = time.perf_counter() - start
                outcomes = result.svd if path == "auto" else outcomes
                state = states[path] = result.state_dict
                scores[path] = suite.score(state_digest(state), lambda state=state: model_from_state(
                    suite.base, state, f"the {method} merge", "cpu"))
            cells = [f"{100 * scores['auto'][t].accuracy:.1f} / {100 * scores['exact'][t].accuracy:.1f}"
                     for t in LLM_DEFAULT_TASKS]
            averages = [sum(scores[p][t].accuracy for t in LLM_DEFAULT_TASKS) / len(LLM_DEFAULT_TASKS) for p in PATHS]
            counts = " / ".join(str(outcomes.matrices(p)) for p in ("krylov", "exact", "factored"))
            lines.append(f"| {kind} | {method} | {counts} | {update_difference(states['auto'], states['exact'], base):.1e}"
                         f" | {seconds['auto']:.0f} / {seconds['exact']:.0f} | {' | '.join(cells)} | "
                         f"{100 * averages[0]:.2f} / {100 * averages[1]:.2f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
