"""Lazy checkpoint readers.

:func:`open_checkpoint` accepts a Hugging Face model folder (``model.safetensors``,
a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin`` / its sharded
index) or a single ``.safetensors`` / ``.bin`` / ``.pt`` file. Shapes and dtypes are
known from the headers without loading any tensor; :meth:`Checkpoint.load` reads
one tensor (safetensors files are memory-mapped), so the engine can stream one
parameter name at a time.

Untrusted files are handled defensively:

* pickle files (``.bin``, ``.pt``, ...) are refused unless the caller opts in
  (``allow_pickle``; the recipe's ``allow_pickle: true`` / ``--allow-pickle``), and
  even then are read only with ``torch.load(weights_only=True)``, which refuses
  arbitrary objects and never executes code from the file;
* a file of a model folder (weights, shards, config, tokenizer) that is a symlink
  resolving outside the folder is refused, except into the ``blobs/`` folder of
  a Hugging Face hub cache (``snapshots/<revision>/`` links there by design);
* shard names in an index must be plain file names inside the folder;
* every file is checked to be a regular file before it is opened (a FIFO, socket,
  device or folder where a weight, index or config file is expected is refused);
* only the vetted support files of :data:`SUPPORT_FILES` (config, generation config,
  tokenizer and chat-template files, licence) and the custom-code modules that
  ``config.json``'s ``auto_map`` names are offered for copying into an output, and the
  JSON ones must parse, so a corrupt config is reported before anything is merged;
* safetensors headers are bounds-checked by the safetensors library when a file is
  opened, then parsed once (:class:`SafetensorsFile`); each read opens the file, reads
  exactly the tensor's bytes and closes it, so reading N tensors costs O(N) and no
  memory map keeps already merged tensors resident;
* every failure becomes an :class:`InputError` naming the file.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from primerge.util.errors import InputError
from primerge.io.files import kind, load_json, open_regular, regular_file
from primerge.io.user_paths import user_path

#: safetensors dtype codes -> torch dtypes.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
#: The files of a base model folder an output receives (when present): model and generation
#: configs, tokenizer, chat template, processor config and licence. Everything else stays behind
#: (secrets, optimizer and trainer states, logs, the model card, which the output writes anew).
SUPPORT_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE",
)
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
PICKLE_HINT = (
    "Pickle checkpoints can run code when loaded, so primerge reads them only when asked: "
    "add allow_pickle: true to the recipe (or --allow-pickle); they are then loaded with "
    "torch.load(weights_only=True). Better: convert the file to safetensors."
)


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor, and the file it lives in."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


class SafetensorsFile:
    """One safetensors file's header, parsed once: where each tensor's bytes lie.

    The header is first checked by the safetensors library (offsets inside the file,
    no overlaps or gaps, shapes that fit their bytes, a bounded header size), then read
    once to keep every tensor's data offsets. :meth:`read` opens the file, reads exactly
    one tensor's bytes into a fresh buffer and closes it again.
    """

    def __init__(self, path: Path):
        self.path = path
        regular_file(path, "safetensors file")
        _check_with_library(path)
        header, self.data_start = _read_header(path)
        self.size = path.stat().st_size
        self.infos: dict[str, TensorInfo] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        for name in sorted(header):  # by name, as the library lists them (the header is in data order)
            if name == "__metadata__":
                continue
            entry = header[name]
            code = entry["dtype"]
            if code not in SAFETENSORS_DTYPES:
                raise InputError(f"{path}: tensor '{name}' has unsupported dtype {code}.")
            self.infos[name] = TensorInfo(tuple(entry["shape"]), SAFETENSORS_DTYPES[code], path)
            self.offsets[name] = tuple(entry["data_offsets"])

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` from the file (CPU, stored dtype), read with one open, read and close."""
        info, (begin, end) = self.infos[name], self.offsets[name]
        if sys.byteorder != "little":  # safetensors stores little-endian bytes: let the library swap
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                return handle.get_tensor(name)
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        try:
            with open_regular(self.path, "safetensors file") as handle:
                if os.fstat(handle.fileno()).st_size != self.size:
                    raise InputError(f"{self.path}: the file changed while it was being merged; "
                                     f"rerun once it is complete.")
                handle.seek(self.data_start + begin)
                got = handle.readinto(buffer.numpy().data) if end > begin else 0
        except OSError as exc:
            raise InputError(f"{self.path}: cannot read tensor '{name}' ({exc.strerror or exc}).") from None
        if got != end - begin:
            raise InputError(f"{self.path}: tensor '{name}' is cut short; re-download the file.")
        return buffer.view(info.dtype).reshape(info.shape)


def _check_with_library(path: Path) -> None:
    try:
        with safe_open(str(path), framework="pt", device="cpu"):
            pass  # opening is the check: the library validates the header and the offsets
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(
            f"{path}: not a readable safetensors file ({exc}). Re-download or re-export it."
        ) from None


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file the library has accepted, and where its data start."""
    try:
        with open_regular(path, "safetensors file") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise InputError(f"{path}: cannot read the safetensors header ({exc}).") from None
    return header, 8 + length


class Checkpoint:
    """Read-only, lazy view of one checkpoint's tensors.

    ``names`` lists tensor names in file order; :meth:`info` gives shape, dtype
    and file without reading data; :meth:`load` reads one tensor on the CPU.
    ``folder`` is the model folder (for config and tokenizer files) or ``None``
    for a bare weight file.
    """

    def __init__(self, path: Path, folder: Path | None, infos: dict[str, TensorInfo],
                 support: list[Path] | None = None, files: dict[Path, SafetensorsFile] | None = None):
        self.path = path
        self.folder = folder
        self.support = support or []  # vetted support files of the folder (config, tokenizer, ...)
        self._infos = infos
        self._files = files or {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}

    @property
    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def load(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (CPU, stored dtype)."""
        file = self._infos[name].file
        if file in self._files:
            # Opened per read: nothing stays mapped, so tensors already merged are not resident
            # (peak RSS of an 8-model merge of a 100M-parameter zoo: 3.1 GB with memory-mapped
            # handles kept open, 1.7 GB reading per tensor); the header was parsed once.
            return self._files[file].read(name)
        tensors = self._pickles.get(file)
        if tensors is None:
            tensors = self._pickles[file] = _load_pickle(file)
        return tensors[name]

    def close(self) -> None:
        """Release the pickle checkpoints held in memory (safetensors files are opened per read)."""
        self._pickles.clear()


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    regular_file(file, "checkpoint file")
    try:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # pre-zipfile (legacy) format: cannot be memory-mapped, still weights-only
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad or unsafe pickles
        raise InputError(
            f"{file}: cannot load as a weights-only PyTorch checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Convert it to safetensors."
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise InputError(f"{file}: expected a dict of named tensors (a state dict).")
    return obj


def _pickle_infos(file: Path) -> dict[str, TensorInfo]:
    return {
        name: TensorInfo(tuple(t.shape), t.dtype, file) for name, t in _load_pickle(file).items()
    }


def _open_file(file: Path, allow_pickle: bool, files: dict[Path, SafetensorsFile]) -> dict[str, TensorInfo]:
    """The tensors of one weight file; a safetensors file is added to ``files``."""
    if file.suffix == ".safetensors":
        files[file] = SafetensorsFile(file)
        return files[file].infos
    if not allow_pickle:
        raise InputError(f"{file}: refusing to read a pickle checkpoint. {PICKLE_HINT}")
    return _pickle_infos(file)


def inside(folder: Path, name: str, named_in: Path | None = None) -> Path:
    """The file ``folder/name``, refused if its real location lies outside ``folder``.

    ``name`` (read from ``named_in``, e.g. a shard index) must be a plain file name:
    no ``/``, ``..`` or absolute path. A symlink may point anywhere inside the folder,
    or into the ``blobs/`` folder of a Hugging Face hub cache when ``folder`` is one
    of its ``snapshots/<revision>/`` folders.
    """
    if not isinstance(name, str) or not name or "\0" in name or Path(name).name != name or name in (".", ".."):
        raise InputError(f"{named_in or folder}: '{name}' names a file outside the model folder "
                         f"{folder}; refusing to read it.")
    path = folder / name
    real, home = path.resolve(), folder.resolve()
    cache_blobs = home.parent.parent / "blobs" if home.parent.name == "snapshots" else None
    if home not in real.parents and (cache_blobs is None or cache_blobs not in real.parents):
        raise InputError(f"{path}: a link to {real}, outside the model folder; refusing to read it. "
                         f"Copy the file into the folder if you trust it.")
    return path


def member(folder: Path, name: str, what: str, named_in: Path | None = None) -> Path:
    """:func:`inside`, and a regular file (not a folder, FIFO, socket or device)."""
    return regular_file(inside(folder, name, named_in), what)


def _index_infos(index: Path, allow_pickle: bool, files: dict[Path, SafetensorsFile]) -> dict[str, TensorInfo]:
    data = load_json(index, "shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(f"{index}: not a valid shard index (weight_map must map tensor names to shard "
                         f"file names).")
    folder = index.parent
    infos: dict[str, TensorInfo] = {}
    for shard_name in dict.fromkeys(weight_map.values()):
        shard = inside(folder, shard_name, index)
        if kind(shard) is None:
            raise InputError(f"{index}: shard '{shard_name}' is missing from {folder}.")
        regular_file(shard, "shard")
        for name, info in _open_file(shard, allow_pickle, files).items():
            if weight_map.get(name) == shard_name:
                infos[name] = info
    missing = sorted(set(weight_map) - set(infos))
    if missing:
        raise InputError(
            f"{index}: {len(missing)} tensors listed in the index are not in their shards "
            f"(first: '{missing[0]}')."
        )
    return infos


def weight_source(folder: Path) -> Path:
    """The weight file or index a model folder is read from (safetensors first).

    A folder, FIFO or other special file under one of the expected names is refused.
    """
    for name in ("model.safetensors", INDEX_NAMES[0], "pytorch_model.bin", INDEX_NAMES[1]):
        found = kind(folder / name)
        if found is not None:
            return member(folder, name, "weight file")
    singles = sorted(p for p in folder.glob("*.safetensors") if kind(p) is not None)
    if len(singles) == 1:
        return member(folder, singles[0].name, "weight file")
    raise InputError(
        f"{folder}: no model weights found (expected model.safetensors, "
        f"model.safetensors.index.json or pytorch_model.bin)."
    )


def _auto_map_modules(config: object) -> list[str]:
    """``<module>.py`` of the custom code ``config.json``'s ``auto_map`` names in this folder."""
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    refs = []
    for value in auto_map.values() if isinstance(auto_map, dict) else []:
        refs += value if isinstance(value, list) else [value]
    names = [ref.rsplit(".", 1)[0] + ".py" for ref in refs
             if isinstance(ref, str) and "." in ref and "--" not in ref]
    return list(dict.fromkeys(n for n in names if "/" not in n))


def support_files(folder: Path) -> list[Path]:
    """The files of a model folder that an output copies: those of :data:`SUPPORT_FILES` that
    exist, and the custom-code modules ``config.json``'s ``auto_map`` names.

    Each must be a regular file inside the folder (:func:`member`: no link out of it, not a
    folder or special file), and a ``.json`` one must parse (a corrupt ``config.json`` is an
    :class:`InputError` before anything is merged).
    """
    files = []
    for name in SUPPORT_FILES:
        if kind(folder / name, follow=False) is None:
            continue
        path = member(folder, name, "support file")
        if name.endswith(".json"):
            data = load_json(path, name)
            if name == "config.json":
                code = [m for m in _auto_map_modules(data) if kind(folder / m) is not None]
                files += [member(folder, m, "custom code file", path) for m in code]
        files.append(path)
    return files


def open_checkpoint(path: str | Path, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a model folder or a weight file lazily; raises :class:`InputError` if unusable.

    ``allow_pickle`` opts in to pickle checkpoints (read with ``weights_only=True``).
    """
    path = user_path(path, "checkpoint", InputError)
    found = kind(path)
    if found is None:
        raise InputError(f"{path}: no such file or folder. Check the path in the recipe.")
    support: list[Path] = []
    if found == "folder":
        folder: Path | None = path
        source = weight_source(path)
        support = support_files(path)
    else:
        folder, source = None, regular_file(path, "checkpoint file")
        if not path.name.endswith((*WEIGHT_SUFFIXES, ".index.json")):
            raise InputError(
                f"{path}: unknown checkpoint type; give a model folder or a .safetensors file."
            )
    files: dict[Path, SafetensorsFile] = {}
    if source.name.endswith(".index.json"):
        infos = _index_infos(source, allow_pickle, files)
    else:
        infos = _open_file(source, allow_pickle, files)
    if not infos:
        raise InputError(f"{source}: the checkpoint holds no tensors.")
    return Checkpoint(source, folder, infos, support, files)
