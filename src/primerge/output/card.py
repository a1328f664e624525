"""The model card (README.md) written beside every merged model.

It records what is needed to reproduce and audit the merge: primerge's version,
the method and every effective parameter, the models with their weights, the
full recipe, how tensors were classified, the files written, and where each
task's own (unmerged) tensors are. Each output adds its own sections (the per-task layout
and the method's rebuild formula, a LoRA adapter's errors).
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from primerge.version import __version__


def _front_matter(recipe, result) -> str:
    meta = {
        "library_name": "primerge",
        "tags": ["merge", "primerge", result.method],
        "base_model": str(recipe.base),
        "primerge": {"version": __version__, "method": result.method,
                     "parameters": result.parameters, "seed": recipe.seed},
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


INTEGRITY = [
    "## Integrity",
    "",
    "`primerge-manifest.json` lists every file of this folder with its size, and every tensor "
    "with its shape, dtype and SHA-256 (the other files with their SHA-256). primerge checked the "
    "written files against the computed tensors before publishing the folder; "
    "`primerge verify <this folder>` checks them again at any time.",
    "",
]


def _heads_section(heads: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    return [
        "## Task-specific tensors",
        "",
        "These tensors were not merged: each task keeps its own copy, stored under its own "
        "names in `task_heads/<model>.safetensors`. Load the merged body, then the head of the "
        "task you want to run.",
        "",
        *[f"- `task_heads/{label}.safetensors`: {', '.join(f'`{n}`' for n in tensors)}"
          for label, tensors in heads.items()],
        "",
    ]


def _treatment_lines(recipe, counts: dict[str, int]) -> list[str]:
    """The tensors of each treatment (primerge.treatments) and the vocabulary rows aligned."""
    return [
        f"- matrix parameters (SVD treatment for SVD methods): {counts.get('matrix', 0)}",
        f"- expert tensors [E, m, n], merged matrix by matrix: {counts.get('experts', 0)} "
        f"({counts.get('expert_matrices', 0)} matrices)",
        f"- tensors flattened to one matrix (matrices: flatten): {counts.get('reshaped', 0)}",
        f"- other floating parameters (element-wise / fallback mean): {counts.get('fallback', 0)}",
        f"- copied from the base (non-floating, or task-specific names present in the base): {counts.get('copy', 0)}",
        f"- vocabulary tensors with rows aligned by token string (tokenizer: {recipe.tokenizer}): "
        f"{counts.get('vocab_aligned', 0)}",
    ]


def write_card(folder: Path, recipe, result, weight_files: list[str],
               heads: dict[str, dict[str, torch.Tensor]], copied: list[str], sections: list[str]) -> Path:
    """Write ``folder/README.md`` for a finished merge and return its path; ``sections`` are the
    outputs' own Markdown sections."""
    labels = recipe.model_labels()
    lines = [
        _front_matter(recipe, result),
        f"# Merged model ({result.method})",
        "",
        f"Merged by primerge {__version__} with method `{result.method}` from the base "
        f"`{recipe.base}` and {len(recipe.models)} fine-tuned models.",
        "",
        "Executed on: " + ", ".join(f"{k} {v}" for k, v in result.execution.items()) + ".",
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in result.parameters.items()],
        f"| seed | {recipe.seed} |",
        "",
        "## Models",
        "",
        "| name | path | weight |",
        "|---|---|---|",
        *[f"| {label} | `{m.path}` | {m.weight} |" for label, m in zip(labels, recipe.models)],
        "",
        "## Tensors",
        "",
        *_treatment_lines(recipe, result.counts),
        f"- weight files: {', '.join(f'`{f}`' for f in weight_files)}",
        f"- files copied from the base folder: {', '.join(f'`{c}`' for c in copied) or 'none'}",
        "",
    ]
    if result.report:
        lines += ["## Whole-model pre-pass", "", result.report, ""]
    for section in sections:
        lines += [section.rstrip("\n"), ""]
    if heads:
        lines += _heads_section(heads)
    lines += INTEGRITY
    lines += ["## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path
