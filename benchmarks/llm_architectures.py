"""Architecture-changing merges of the LLM track's full fine-tunes, scored by lm-evaluation-harness.

    python benchmarks/llm_architectures.py [--work DIR] [--steps 24] [--test-size 300]

From SmolLM2-135M-Instruct (30 blocks) and its four full fine-tunes of ``primerge demo --suite llm``
(reused from the cache when the same ``--steps`` trained them, else trained here), this writes and
runs, through primerge's command line:

1. ``merged.yml``: Task Arithmetic of the four fine-tunes (the 30-block reference);
2. ``upscaled.yml``: a depth up-scaled model of 45 blocks: blocks 0..22 and blocks 8..29, each range
   the Task Arithmetic merge of the four fine-tunes over the same blocks (``slices`` with several
   sources), embeddings and head merged too;
3. ``moe.yml``: a mergekit-moe configuration: a Mixtral model with the four fine-tunes' MLPs as experts,
   two per token, attention, norms and embeddings from the base, routers from the base's hidden states
   of eight training prompts per task (``gate_mode: hidden``).

Each output is scored with ``primerge eval --harness lm-eval`` on the four tasks' test prompts (as
the demo scores its rows), and the table of accuracies (± lm-eval's standard error) is printed with
the zero-shot base beside them. Nothing here is a test: it documents a measurement
(docs/benchmarks.md, "Layer stacks and mixtures of experts on SmolLM2").
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import yaml

from primerge.cli.main import main as primerge_cli
from primerge.evaluation.llm.demo import LLM_DEFAULT_TASKS, prepare_suite
from primerge.evaluation.llm.protocol import CPU_PROTOCOL
from primerge.evaluation.llm.zoo import build_llm_zoo
from primerge.evaluation.model import folder_fingerprint

FIRST_RANGE, SECOND_RANGE = (0, 23), (8, 30)  # 23 + 22 = 45 blocks
ROUTER_PROMPTS = 8


def merged_sources(zoo, layers: tuple[int, int]) -> list[dict]:
    """A slice's sources: the base and every fine-tune over ``layers``."""
    return [{"model": "base", "layers": list(layers)}] + [{"model": e.name, "layers": list(layers)}
                                                          for e in zoo.entries]


def recipes(zoo, suite) -> dict[str, dict]:
    """The three configurations of the module docstring, by name."""
    models = [{"path": str(e.path), "name": e.name} for e in zoo.entries]
    plain = {"base": str(zoo.base), "models": models, "method": "task_arithmetic"}
    upscaled = {**plain, "slices": [{"sources": merged_sources(zoo, FIRST_RANGE)},
                                    {"sources": merged_sources(zoo, SECOND_RANGE)}],
                "embeddings": "merged", "head": "merged"}
    moe = {"base_model": str(zoo.base), "gate_mode": "hidden", "experts_per_token": 2, "dtype": "float32",
           "experts": [{"source_model": str(e.path), "positive_prompts": list(task.train_prompts[:ROUTER_PROMPTS])}
                       for e, task in zip(zoo.entries, suite.tasks)]}
    return {"merged": plain, "upscaled": upscaled, "moe": moe}


def run(argv: list[str]) -> None:
    code = primerge_cli(argv)
    if code != 0:
        raise SystemExit(f"primerge {' '.join(argv)} exited with {code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("llm-architectures"), help="output folder")
    parser.add_argument("--steps", type=int, default=CPU_PROTOCOL.steps, help="the zoo's fine-tuning steps")
    parser.add_argument("--test-size", type=int, default=CPU_PROTOCOL.test_size, help="test prompts per task")
    args = parser.parse_args()
    protocol = replace(CPU_PROTOCOL, steps=args.steps, test_size=args.test_size)
    suite = prepare_suite(LLM_DEFAULT_TASKS, None, None, protocol, "cpu", print)
    zoo = build_llm_zoo("full", suite.tasks, suite.base, folder_fingerprint(suite.base), protocol, suite.root,
                        progress=False)
    args.work.mkdir(parents=True, exist_ok=True)
    scored = {"base (zero-shot)": suite.base}
    seconds = {}
    for name, recipe in recipes(zoo, suite).items():
        path, out = args.work / f"{name}.yml", args.work / name
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        start = time.perf_counter()
        run(["moe" if name == "moe" else "merge", str(path), "--out", str(out), "--force", "--quiet"])
        seconds[name] = time.perf_counter() - start
        scored[name] = out
    rows = {}
    for name, folder in scored.items():
        report = args.work / f"{name.split()[0]}-scores.json"
        run(["eval", str(folder), "--harness", "lm-eval", "--tasks", *LLM_DEFAULT_TASKS,
             "--test-size", str(args.test_size), "--json", str(report)])
        rows[name] = json.loads(report.read_text())["scores"]
    print(f"\n| model | blocks | {' | '.join(LLM_DEFAULT_TASKS)} | Avg | build s |")
    print("|---|---|" + "---|" * (len(LLM_DEFAULT_TASKS) + 2))
    for name, scores in rows.items():
        config = json.loads((scored[name] / "config.json").read_text())
        cells = [f"{100 * scores[t]['accuracy']:.1f} ± {100 * scores[t]['stderr']:.1f}" for t in LLM_DEFAULT_TASKS]
        average = sum(scores[t]["accuracy"] for t in LLM_DEFAULT_TASKS) / len(LLM_DEFAULT_TASKS)
        build = f"{seconds[name]:.0f}" if name in seconds else ""
        print(f"| {name} | {config['num_hidden_layers']} | {' | '.join(cells)} | {100 * average:.1f} | {build} |")


if __name__ == "__main__":
    main()
