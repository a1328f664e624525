"""The model card (README.md) written beside every merged model.

It records what is needed to reproduce and audit the merge: primerge's version,
the method and every effective parameter, the models with their weights, the
full recipe, how tensors were classified, the files written, and where each
task's own (unmerged) tensors are. Each output adds its own sections (the per-task layout
and the method's rebuild formula, a LoRA adapter's errors).

Names and paths come from users and checkpoints, so every one is written as a Markdown code span
(:func:`md_code`) and the recipe as a fence longer than any backtick run in it (:func:`md_fence`):
a tensor or model name holding backticks, ``|``, newlines or HTML cannot change the card's structure.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import yaml

from primerge.io.user_paths import components
from primerge.util.hashing import input_sha256
from primerge.util.platform import mixed_kinds_note
from primerge.version import __version__


def md_code(text: object, table: bool = False) -> str:
    """``text`` as one Markdown code span: control characters shown as ``\\xNN``, a fence longer
    than any backtick run inside, and (in a table cell) ``|`` escaped, as GFM requires."""
    text = re.sub(r"[\x00-\x1f\x7f]", lambda m: f"\\x{ord(m.group()):02x}", str(text))
    if table:
        text = text.replace("|", "\\|")
    fence = "`" * (1 + max((len(run) for run in re.findall("`+", text)), default=0))
    # CommonMark strips one space from each end of a span's content that begins and ends with one
    # (unless it is all spaces); a pad keeps such content, and separates backticks from the fence
    pad = " " if text[:1] == "`" or text[-1:] == "`" or (text[:1] == text[-1:] == " " and text.strip()) else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def md_fence(text: str, info: str = "") -> list[str]:
    """A fenced code block for ``text``, its fence longer than any backtick run inside."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", text)), default=0))
    return [f"{fence}{info}", text, fence]


#: The model card's file name (listed in the manifest without a hash: :data:`primerge.io.manifest.CARD_ENTRY`).
CARD = "README.md"


def input_records(plan) -> list[dict]:
    """Each input (the base, then every model) with the files the merge read from it and their
    SHA-256, by file name: what the card's front matter records, so a reader can check the inputs
    (``sha256sum``) without any local path. Hashing reads every input file once more."""
    weights = [None, *(entry.weight for entry in plan.recipe.models)]
    names = [Path(plan.recipe.base).name, *plan.labels]  # the base by its folder's name, never its path
    return [{"role": "base" if i == 0 else "model", "name": names[i], **({"weight": weights[i]} if i else {}),
             "files": {file.name: input_sha256(file) for file in files}}
            for i, (_, files) in enumerate(plan.input_files())]


def _front_matter(recipe, result) -> str:
    """YAML front matter: library, tags, and primerge's version, method, parameters, seed and the
    inputs' file hashes. No local path: it would say nothing on another machine."""
    meta = {
        "library_name": "primerge",
        "tags": ["merge", "primerge", result.method],
        "primerge": {"version": __version__, "method": result.method,
                     "parameters": result.parameters, "seed": recipe.seed, "inputs": result.inputs},
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
    files = components(heads)
    return [
        "## Task-specific tensors",
        "",
        "These tensors were not merged: each task keeps its own copy, stored under its own "
        "names in `task_heads/<model>.safetensors` (its model class in `task_heads/<model>.json`; a "
        "model name outside `A-Z a-z 0-9 - _ . + = @ ,` is percent-encoded in these file names). "
        "`primerge.load_task_model(folder, task)` returns the merged body with that task's head as "
        "the transformers model the fine-tune was.",
        "",
        *[f"- {md_code(label)}: {md_code(f'task_heads/{files[label]}.safetensors')}: "
          f"{', '.join(md_code(n) for n in tensors)}" for label, tensors in heads.items()],
        "",
    ]


def _treatment_lines(recipe, counts: dict[str, int]) -> list[str]:
    """The tensors of each treatment (primerge.core.treatments) and the vocabulary rows aligned."""
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


def _computed_on(kinds: dict[str, int]) -> str:
    """The machine kind the units ran on (what byte-identity is promised for), or the note that they
    ran on several."""
    if note := mixed_kinds_note(kinds):
        return note[0].upper() + note[1:]
    return f"Computed on: {md_code(next(iter(kinds), 'unknown'))}; the same inputs, primerge version and machine kind give the same bytes."


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
        f"{md_code(recipe.base)} and {len(recipe.models)} fine-tuned models.",
        "",
        "Executed on: " + ", ".join(f"{k} {v}" for k, v in result.execution.items() if k != "machine_kinds") + ".",
        "",
        _computed_on(result.execution.get("machine_kinds", {})),
        "",
        "## Parameters",
        "",
        "| parameter | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in result.parameters.items()],  # validated values, no user text
        f"| seed | {recipe.seed} |",
        "",
        "## Models",
        "",
        "| name | path | weight |",
        "|---|---|---|",
        *[f"| {md_code(label, table=True)} | {md_code(m.path, table=True)} | {m.weight} |"
          for label, m in zip(labels, recipe.models)],
        "",
        "## Tensors",
        "",
        *_treatment_lines(recipe, result.counts),
        f"- weight files: {', '.join(md_code(f) for f in weight_files)}",
        f"- files copied from the base folder: {', '.join(md_code(c) for c in copied) or 'none'}",
        "",
    ]
    if result.parameter_table:
        lines += ["## Parameters per tensor", "", "The values each tensor class and block range was merged with "
                  "(gradients and filters resolved; per model in model order):", "",
                  *md_fence("\n".join(result.parameter_table)), ""]
    if recipe.origin is not None:
        lines += [f"## Translated from {recipe.origin.format}", "", "Where primerge's semantics differ:", "",
                  *md_fence("\n".join(recipe.origin.notes) or "nowhere"), ""]
    if result.report:
        lines += ["## Whole-model pre-pass", "", result.report, ""]
    if result.decisions:
        lines += ["## Decided from the shapes", "", *[f"- {line}" for line in result.decisions], ""]
    svds = result.svd.lines() + result.prepass_svd.lines("pre-pass")
    if svds:
        lines += ["## Truncated SVDs", "", "How many matrices each SVD path solved, and why (block Krylov results "
                  "are kept when they pass the residual check, or the certificate for a 16-bit output; "
                  "`primerge.linalg.certificate`):", "", *[f"- {line}" for line in svds], ""]
    for section in sections:
        lines += [section.rstrip("\n"), ""]
    if heads:
        lines += _heads_section(heads)
    lines += INTEGRITY
    lines += ["## Recipe", "", *md_fence(recipe.to_yaml().rstrip(), "yaml"), ""]
    if recipe.origin is not None and recipe.origin.text:
        lines += [f"## Original {recipe.origin.format} configuration", "", *md_fence(recipe.origin.text.rstrip(), "yaml"), ""]
    path = folder / CARD
    # names and paths may hold lone surrogates (undecodable bytes of a path, "\udXXX" escapes in a
    # recipe): written as backslash escapes, so the card is always UTF-8 text
    path.write_text("\n".join(lines), encoding="utf-8", errors="backslashreplace")
    return path
