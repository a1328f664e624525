"""Loading causal LMs for the LLM suite: model folders, PEFT LoRA adapters, merged state dicts.

Every model is loaded in float32 on the requested device, in eval mode. A LoRA adapter is applied to
its base with peft and merged into the weights (``merge_and_unload``: W + s·B A, the same function,
one forward instead of two per layer). A state dict (a merge's in-memory result) is loaded into a
model built from the base's config; tied weights (``lm_head`` = ``embed_tokens``) may be absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from primerge.io.adapters import CONFIG_NAME, is_adapter
from primerge.io.files import load_json
from primerge.util.errors import InputError
from primerge.evaluation.llm.convert import check_causal_lm
from primerge.io.hf import apply_adapter, load_tokenizer, transformers_module



def checked_device(device: str) -> str:
    """``cpu``, ``cuda[:N]`` or ``auto``, resolved (and refused when absent) as the merge engine does."""
    from primerge.engine.stream import resolve_device

    return str(resolve_device(device))


def adapter_base(folder: Path, base: Path | None = None) -> Path:
    """The base an adapter applies to: ``base`` if given, else its config's ``base_model_name_or_path``
    (which must be a local folder: nothing is downloaded)."""
    if base is not None:
        return Path(base)
    config = load_json(Path(folder) / CONFIG_NAME, "adapter config")
    named = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not named or not Path(named).is_dir():
        raise InputError(f"{folder} is a LoRA adapter whose base {named!r} is not a local folder; "
                         "name the base model folder with --base.")
    return Path(named)


def load_causal_lm(folder: Path, device: str = "cpu"):
    """A causal-LM folder's model in float32, eval mode (the folder is checked first)."""
    check_causal_lm(folder)
    try:
        model = transformers_module().AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"{folder}: cannot load it as a causal LM ({exc}).") from exc
    return model.to(device).eval()


def load_model(folder: Path, base: Path | None = None, device: str = "cpu"):
    """(model, tokenizer) of a causal-LM folder or of a LoRA adapter folder applied to its base."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"model folder {folder} does not exist.")
    if is_adapter(folder):
        base_folder = adapter_base(folder, base)
        model = apply_adapter(load_causal_lm(base_folder, device), folder)
        tokenizer_folder = folder if (folder / "tokenizer_config.json").is_file() else base_folder
        return model, load_tokenizer(tokenizer_folder)
    return load_causal_lm(folder, device), load_tokenizer(folder)


def model_from_state(base: Path, state: Mapping[str, torch.Tensor], origin: str, device: str = "cpu"):
    """A model built from ``base``'s config holding ``state`` (tied weights may be absent)."""
    transformers = transformers_module()
    config = transformers.AutoConfig.from_pretrained(str(base), local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_config(config)
    expected = model.state_dict()
    tied = {name for name in expected if name not in state and _is_tied(model, name)}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise InputError(f"{origin}: its tensors do not fit {base / 'config.json'} ({detail}).")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    model.tie_weights()
    return model.to(device).eval()


def _is_tied(model, name: str) -> bool:
    output = model.get_output_embeddings()
    return bool(model.config.tie_word_embeddings) and output is not None and name.startswith("lm_head.")
