"""The output's chat template, with end-of-sequence tokens that agree with it.

The recipe's ``chat_template`` is

- ``auto``: the template most inputs have (the base, then the models in recipe order; ties go to
  the first), read from ``chat_template.jinja`` or ``tokenizer_config.json``;
- a name of :data:`NAMED` (``chatml``, ``llama3``, ``mistral``, ``alpaca``, ``gemma``);
- Jinja text (anything holding ``{``).

A template ends each assistant turn with its *stop token*: a named template's own (``None``: the
tokenizer's ``eos_token``), otherwise the first of :data:`END_OF_TURN` that its text writes. The
output then agrees with it (:func:`with_chat_template`): ``tokenizer_config.json`` carries the
template (any ``chat_template.jinja`` / ``.json`` of the copied files is dropped, since
transformers would prefer it) and the stop token as ``eos_token``; ``generation_config.json``
(written when the base has none) lists its id first in ``eos_token_id``, after which the ids that
ended generation before still do. A stop token the output vocabulary lacks is refused with the fix.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from primerge.core.support_files import CHAT_FILES, OutputFile
from primerge.util.errors import RecipeError


@dataclass(frozen=True)
class NamedTemplate:
    """A template by name: its Jinja ``text`` and the token that ends a turn (``None``: eos_token)."""

    text: str
    stop: str | None


NAMED: dict[str, NamedTemplate] = {
    "chatml": NamedTemplate(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}", "<|im_end|>"),
    "llama3": NamedTemplate(
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' "
        "+ m['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}", "<|eot_id|>"),
    "mistral": NamedTemplate(
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}", None),
    "alpaca": NamedTemplate(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}", None),
    "gemma": NamedTemplate(
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}", "<end_of_turn>"),
}

#: Tokens that end a turn in the chat formats in use (ChatML, Llama 3, Gemma, Phi-3, Command-R).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|END_OF_TURN_TOKEN|>")
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


def check_chat_template(value: str) -> str:
    """``value`` when it is ``auto``, a name of :data:`NAMED` or Jinja text; else a ValueError."""
    if value == "auto" or value in NAMED or "{" in value:
        return value
    raise ValueError(f"'{value[:40]}' is not auto, a named template ({', '.join(NAMED)}) or Jinja text")


def _json(path: Path | None) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text()) if path is not None else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def template_of(support: list[Path]) -> str | None:
    """The chat template of a folder's support files (``chat_template.jinja``, else
    ``tokenizer_config.json``'s ``chat_template``; a list of named ones gives its ``default``)."""
    files = {f.name: f for f in support}
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].read_text().strip() or None
    template = _json(files.get(TOKENIZER_CONFIG)).get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template.strip() if isinstance(template, str) and template.strip() else None


def stop_token(choice: str, text: str) -> str | None:
    """The token that ends a turn of the template (``None``: the tokenizer's eos_token)."""
    if choice in NAMED:
        return NAMED[choice].stop
    return next((t for t in END_OF_TURN if t in text), None)


def chosen_template(choice: str, inputs: list[tuple[str, list[Path]]]) -> tuple[str | None, str]:
    """(template text, where it came from) for ``choice``; ``inputs`` are (label, support files)
    of the base and the models. ``auto`` without any template gives ``None``."""
    if choice in NAMED:
        return NAMED[choice].text, f"the named template '{choice}'"
    if choice != "auto":
        return choice, "the recipe's Jinja text"
    found = [(label, t) for label, support in inputs if (t := template_of(support)) is not None]
    if not found:
        return None, "no input has a chat template"
    counts = Counter(t for _, t in found)
    text = max(counts, key=lambda t: (counts[t], -[t2 for _, t2 in found].index(t)))
    holders = [label for label, t in found if t == text]
    return text, f"auto: the template of {', '.join(holders)} ({counts[text]} of {len(inputs)} inputs)"


def _ids(value: Any) -> list[int]:
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


def _file(files: dict[str, OutputFile], name: str) -> tuple[dict[str, Any], OutputFile | None]:
    """The JSON an output file will hold (its source with its changes), and the file."""
    found = files.get(name)
    if found is None:
        return {}, None
    data = json.loads(found.text) if found.text is not None else _json(found.source)
    for path, value in found.changes:
        if len(path) == 1:
            if value is None:
                data.pop(path[0], None)
            else:
                data[path[0]] = value
    return data, found


def with_chat_template(files: tuple[OutputFile, ...], choice: str, inputs: list[tuple[str, list[Path]]],
                       tokens: dict[str, int] | None) -> tuple[tuple[OutputFile, ...], list[str]]:
    """The output files with the chosen template and agreeing eos tokens (module docstring), and
    notes; ``tokens`` is the output vocabulary (``None`` when unknown: ids are then not checked)."""
    text, where = chosen_template(choice, inputs)
    if text is None:
        return files, [f"chat_template: {where}; none written"]
    by_name = {f.name: f for f in files if f.name not in CHAT_FILES}
    tok_config, tok_file = _file(by_name, TOKENIZER_CONFIG)
    if tok_file is None:
        raise RecipeError(f"chat_template: {choice[:40]}: the output has no {TOKENIZER_CONFIG} to hold it (the "
                          f"tokenizer source's folder has none); save the tokenizer there first.")
    eos = tok_config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    stop = stop_token(choice, text) or eos
    changes = {("chat_template",): text}
    notes = [f"chat_template: {where}; turns end with {stop!r}"]
    generation, gen_file = _file(by_name, GENERATION_CONFIG)
    config, _ = _file(by_name, "config.json")
    ended = _ids(generation.get("eos_token_id", config.get("eos_token_id")))
    if stop is not None and tokens is not None:
        if stop not in tokens:
            raise RecipeError(f"chat_template: {choice[:40]} ends each turn with {stop!r}, which the output "
                              f"vocabulary does not have; choose a template of this tokenizer (auto), or a "
                              f"tokenizer that has the token (tokenizer: union, or a model's).")
        eos_ids = list(dict.fromkeys([tokens[stop], *ended]))
        generation_changes = {**{k: v for k, v in generation.items()}, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids}
        by_name[GENERATION_CONFIG] = OutputFile(GENERATION_CONFIG, gen_file.source if gen_file else None,
                                                text=json.dumps(generation_changes, indent=2) + "\n")
        notes.append(f"generation stops at ids {eos_ids} ({GENERATION_CONFIG})")
    elif stop is not None:
        notes.append(f"no tokenizer.json in the output: the id of {stop!r} is not checked and "
                     f"{GENERATION_CONFIG} is left as it is")
    if stop is not None and stop != eos:
        changes[("eos_token",)] = stop
    by_name[TOKENIZER_CONFIG] = replace(tok_file, changes=tuple({**dict(tok_file.changes), **changes}.items()))
    return tuple(by_name.values()), notes
