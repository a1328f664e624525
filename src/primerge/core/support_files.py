"""The non-weight files of a merged model folder: config, tokenizer, generation config.

The base folder's support files are copied as they are, unless the merge changes what they
describe (:func:`output_files`):

- ``config.json``: ``vocab_size`` (and ``text_config.vocab_size``) when the output vocabulary has
  other rows; the token ids (bos/eos/pad/...) of a model chosen as tokenizer source; with FP8
  weights written as floats, no ``quantization_config``; with ``output.dtype``, the dtype keys;
- tokenizer files (:data:`TOKENIZER_FILES`) and ``generation_config.json``: ``tokenizer: MODEL``
  takes them from that model's folder (the base's generation config stays when the model has
  none); ``tokenizer: union`` keeps the base's with the added tokens (``tokenizer.json``, and
  ``added_tokens_decoder`` / ``added_tokens.json`` where the base has them), and takes the chat
  template of the first model that has one when the base has none.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from primerge.io.files import load_json
from primerge.util.errors import OutputError
from primerge.io.tokenizer import TOKENIZER_FILE, extended_tokenizer
from primerge.core.vocabulary import OutputVocabulary

TOKENIZER_FILES = re.compile(r"^(tokenizer(_config)?\.json|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)"
                             r"|merges\.txt|spiece\.model|sentencepiece\.bpe\.model|tokenizer\.model"
                             r"|chat_template\.(jinja|json)|generation_config\.json)$")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "sep_token_id",
                 "cls_token_id", "mask_token_id", "unk_token_id")
CHAT_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class OutputFile:
    """One support file of the output: ``source`` copied, or with JSON ``changes`` applied (key
    paths; a value ``None`` removes the key), or a tokenizer.json with ``tokens`` added, or the
    given ``text`` (a file primerge writes itself, e.g. a generation config)."""

    name: str
    source: Path | None
    changes: tuple[tuple[tuple[str, ...], Any], ...] = ()
    tokens: tuple[tuple[str, dict[str, bool]], ...] = ()
    text: str | None = None

    def write(self, folder: Path) -> None:
        target = folder / self.name
        try:
            if self.text is not None:
                target.write_text(self.text)
            elif self.tokens:
                target.write_text(extended_tokenizer(self.source, list(self.tokens))[0])
            elif self.changes:
                data = load_json(self.source, self.name)
                for path, value in self.changes:
                    _set(data, path, value)
                # a lone surrogate (a "\ud800" escape in the source JSON) is written back as that escape
                target.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", errors="backslashreplace")
            else:
                shutil.copyfile(self.source, target)
        except OSError as exc:
            raise OutputError(f"{target}: write failed ({exc}); check free space and permissions.") from None


def _set(data: dict, path: tuple[str, ...], value: Any) -> None:
    """Set (or with ``None`` remove) the key at ``path``; a missing parent means nothing to change,
    and a nested key is only replaced where it exists."""
    for key in path[:-1]:
        data = data.get(key)
        if not isinstance(data, dict):
            return
    if value is None:
        data.pop(path[-1], None)
    elif len(path) == 1 or path[-1] in data:
        data[path[-1]] = value


def _json(path: Path | None) -> dict:
    """A support JSON file's object (vetted when its folder was opened), ``{}`` if it holds none."""
    data = load_json(path, path.name) if path is not None else {}
    return data if isinstance(data, dict) else {}


def _by_name(files: list[Path]) -> dict[str, Path]:
    return {f.name: f for f in files}


def _chat_template(models: list[list[Path]]) -> list[OutputFile] | tuple[tuple[str, ...], Any] | None:
    """The chat template of the first model that has one: its file, or its tokenizer_config key."""
    for support in models:
        files = _by_name(support)
        found = [OutputFile(n, files[n]) for n in CHAT_FILES if n in files]
        if found:
            return found
        template = _json(files.get("tokenizer_config.json")).get("chat_template")
        if template:
            return (("chat_template",), template)
    return None


def union_files(base: list[Path], out: OutputVocabulary, models: list[list[Path]]) -> dict[str, OutputFile]:
    """The base's tokenizer files with the union's added tokens and, if it has none, a model's chat template."""
    files, result = _by_name(base), {}
    ids = {token: out.tokens[token] for token, _ in out.added}
    if out.added and TOKENIZER_FILE in files:
        result[TOKENIZER_FILE] = OutputFile(TOKENIZER_FILE, files[TOKENIZER_FILE], tokens=out.added)
    config_changes: list[tuple[tuple[str, ...], Any]] = []
    tok_config = _json(files.get("tokenizer_config.json"))
    if out.added and "added_tokens_decoder" in tok_config:
        decoder = dict(tok_config["added_tokens_decoder"])
        decoder.update({str(ids[t]): {"content": t, **props} for t, props in out.added})
        config_changes.append((("added_tokens_decoder",), decoder))
    if out.added and "added_tokens.json" in files:
        added = {**_json(files["added_tokens.json"]), **ids}
        result["added_tokens.json"] = OutputFile("added_tokens.json", files["added_tokens.json"],
                                                 changes=tuple(((k,), v) for k, v in added.items()))
    has_template = any(n in files for n in CHAT_FILES) or "chat_template" in tok_config
    template = None if has_template else _chat_template(models)
    if isinstance(template, list):
        result.update({f.name: f for f in template})
    elif template is not None:
        config_changes.append(template)
    if config_changes and "tokenizer_config.json" in files:
        result["tokenizer_config.json"] = OutputFile("tokenizer_config.json", files["tokenizer_config.json"],
                                                     tuple(config_changes))
    return result


def output_files(base: list[Path], out: OutputVocabulary | None, models: list[list[Path]],
                 source: list[Path] | None, config: dict[tuple[str, ...], Any]) -> tuple[OutputFile, ...]:
    """Every support file of the output (see the module docstring). ``base``, ``models`` and
    ``source`` (the tokenizer source model's, for ``tokenizer: MODEL``) are support file lists;
    ``config`` holds the config.json changes the weights ask for (dtype, quantization)."""
    files = {f.name: OutputFile(f.name, f) for f in base}
    changes = dict(config)
    if out is not None and source is not None:
        files = {n: f for n, f in files.items() if not TOKENIZER_FILES.match(n) or n == "generation_config.json"}
        files.update({f.name: OutputFile(f.name, f) for f in source if TOKENIZER_FILES.match(f.name)})
        model_config = _json(_by_name(source).get("config.json"))
        changes.update({(k,): model_config[k] for k in TOKEN_ID_KEYS if k in model_config})
    elif out is not None and out.source == "union":
        files.update(union_files(base, out, models))
    if out is not None:
        changes.update({("vocab_size",): out.rows, ("text_config", "vocab_size"): out.rows})
    if changes and "config.json" in files:
        files["config.json"] = OutputFile("config.json", files["config.json"].source, tuple(changes.items()))
    return tuple(files.values())
